#!/bin/sh
# L2 init: the guest that the VMM under test (aivmm, or QEMU for comparison) boots.
# Loads the virtio modules, writes the boot marker, runs the scenario named by
# `aivmm.scenario=` on the kernel command line, prints `E2E-RESULT key=value`
# lines on the console and powers off. Keep it short: every fork and every
# console line costs real time under nested TCG.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null

# Module load order is written by the harness from modules.dep; scenarios that
# need more (blk, fs) load their own list later, so the boot path stays the same.
load_mods() {
	while read -r m; do
		insmod "/lib/modules/$m" 2>/dev/null || echo "E2E-WARN insmod-failed=$m"
	done <"/lib/modules/order${1:+-$1}"
}
load_mods

# Boot marker: the aivmm boot-timer MMIO write, then a console line that is
# timestamped host-side (the same method for every VMM).
devmem 0xc0000000 8 1 2>/dev/null || echo "E2E-WARN devmem-failed"
echo "E2E-MARKER"
case " $(cat /proc/cmdline) " in *" e2e.dmesg="*) echo E2E-KMSG-MARKER >/dev/kmsg ;; esac

scenario=none
for w in $(cat /proc/cmdline); do
	case "$w" in aivmm.scenario=*) scenario="${w#*=}" ;; esac
done
read -r up _ </proc/uptime
echo "E2E-RESULT scenario=$scenario uptime_s=$up"
# e2e.dmesg=1 (debugging a boot, e.g. with `quiet initcall_debug`): the kernel log,
# printed after the marker so that it does not slow the boot being measured.
# e2e.dmesg=gaps: only where the boot spent its time, few enough lines that the
# console storm stays small: the lines after a gap of 20 ms or more in the log (and
# the line before each), initcalls and probes of 3 ms or more (with initcall_debug),
# kvm-clock's offset (its clock's age when the kernel's clock started), the start
# of /init and the marker's kernel timestamp (E2E-KMSG-MARKER). The kernel's clock
# seemed to run ~20% slow against the host's under nested TCG: compare kernel timestamps
# with each other, host-side times with each other.
case " $(cat /proc/cmdline) " in
*" e2e.dmesg=1 "*) dmesg | sed 's/^/L2-DMESG /' ;;
*" e2e.dmesg=gaps "*)
	dmesg | awk '{ t = substr($0, 2, index($0, "]") - 2) + 0 }
		/ returned .* after [0-9]+ usecs/ { u = $0; sub(/.* after /, "", u); if (u + 0 >= 3000) print "L2-SLOW " $0 }
		NR > 1 && t - pt >= 0.02 { printf "L2-GAP %.3f after: %s\nL2-GAP %.3f line: %s\n", t - pt, prev, t - pt, $0 }
		/sched offset|E2E-KMSG-MARKER|Run \/init/ { print "L2-HEAD " $0 }
		{ pt = t; prev = $0 }'
	;;
esac

case "$scenario" in
smp)
	n=$(grep -c '^processor' /proc/cpuinfo)
	mem=$(sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo)
	echo "E2E-RESULT cpus=$n online=$(cat /sys/devices/system/cpu/online) memtotal_kb=$mem"
	;;
blk)
	load_mods blk
	echo "E2E-RESULT blk_sectors=$(cat /sys/block/vda/size 2>/dev/null || echo none) blk_head=$(head -c 16 /dev/vda 2>/dev/null)"
	echo E2E-GUEST-WROTE | dd of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null
	echo "E2E-RESULT blk_write_rc=$? blk_readback=$(dd if=/dev/vda bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -c 15)"
	;;
fs)
	load_mods fs
	mkdir -p /mnt
	mount -t virtiofs e2e /mnt
	echo "E2E-RESULT fs_mount_rc=$? fs_read=$(cat /mnt/sub/hello.txt 2>/dev/null) fs_ls=$(ls /mnt | tr '\n' ,)"
	echo E2E-FS-GUEST >/mnt/from-guest.txt
	echo "E2E-RESULT fs_write_rc=$?"
	. /l2-io.sh && io_fs_extra # tests/e2e/l2-io.sh
	sync
	umount /mnt
	;;
rng)
	cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
	echo "E2E-RESULT rng_current=${cur:-missing} rng_available=$(cat /sys/class/misc/hw_random/rng_available 2>/dev/null | tr ' ' ,)"
	if [ -c /dev/hwrng ]; then
		head -c 128 /dev/hwrng >/rng.bin 2>/dev/null
		echo "E2E-RESULT rng_bytes=$(wc -c </rng.bin) rng_hex=$(od -An -tx1 -N32 /rng.bin | tr -d ' \n')"
	else
		echo "E2E-RESULT rng_bytes=0 rng_hex=nodev"
	fi
	;;
fs-ro | fs-escape | fs-many | blk-ext4 | blk-ro | net | host-loopback | forward | net-policy | net-dns | net-many | net-bench | net-allow | net-allow-only | net-tap | vsock | balloon | density)
	. /l2-io.sh && io_main "$scenario" # tests/e2e/l2-io.sh
	;;
hard-*) . /l2-hard.sh && hard_main "$scenario" ;; # tests/e2e/l2-hard.sh
bench-*) . /l2-bench.sh && bench_main "$scenario" ;; # tests/e2e/l2-bench.sh
esac

echo "E2E-DONE"
poweroff -f
