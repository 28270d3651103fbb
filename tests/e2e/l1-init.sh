#!/bin/sh
# L1 init: runs inside QEMU TCG on the host. Loads KVM, then runs each scenario
# named in `e2e.scenarios=` one at a time, every VMM run wrapped by `vmmrun`
# (stopwatch + watchdog). All output goes to L1's console, which the host parses:
#   @@L1 ...              L1 status lines
#   @@BEGIN <name> / @@END <name>   scenario delimiters
#   @@O/@@E/@@X <tag> ... one VMM run (see vmmrun.rs)
#   @@K <name> <line>     L1 kernel log lines logged during the scenario
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /tmp
mount -t tmpfs tmp /tmp # virtio-fs passthrough wants file handles; initramfs may be ramfs

SCENARIOS=""
VMM=aivmm
RUNS=3
TO=60
for w in $(cat /proc/cmdline); do
	case "$w" in
	e2e.scenarios=*) SCENARIOS=$(echo "${w#*=}" | tr , ' ') ;;
	e2e.vmm=*) VMM="${w#*=}" ;;
	e2e.runs=*) RUNS="${w#*=}" ;;
	e2e.timeout=*) TO="${w#*=}" ;;
	e2e.guest_timeout=*) GTO="${w#*=}" ;;
	esac
done
read -r up _ </proc/uptime
echo "@@L1 up uptime_s=$up"

while read -r m; do
	insmod "/lib/modules/$m" 2>/dev/null
done </lib/modules/kvm-order
# vgif=0: KVM in L1 does not use the CPU's virtual GIF (QEMU's -cpu max offers it).
# The "stack guard page was hit" panics show an interrupt taken right after VMRUN
# returned, before KVM restored L1's GS base (sysvec_reschedule_ipi at
# __svm_vcpu_run+0x9c, then exc_page_fault on a %gs read over and over). GIF is 0
# after #VMEXIT on real hardware, so L0's TCG emulation of GIF is the suspect, and
# vGIF its least-used part; without it, KVM's own CLGI/STGI decide (see README).
insmod /lib/modules/kvm-amd.ko vgif=0 2>/dev/null || insmod /lib/modules/kvm-intel.ko 2>/dev/null
# The guest-image scenarios' root filesystems are virtio-pci disks (found by serial).
if [ -s /lib/modules/l1-disk-order ]; then
	while read -r m; do
		insmod "/lib/modules/$m" 2>/dev/null
	done </lib/modules/l1-disk-order
fi
if [ -c /dev/kvm ]; then
	# Keeps KVM's static keys from flipping at every VM start and end, which under
	# TCG now and then hangs or crashes L1 (see tests/e2e/kvm-keeper.c).
	kvm-keeper &
	echo "@@L1 kvm=ok $(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null || cat /sys/module/kvm_intel/parameters/nested 2>/dev/null) vgif=$(cat /sys/module/kvm_amd/parameters/vgif 2>/dev/null)"
else
	echo "@@L1 kvm=missing"
	dmesg | tail -20 | sed 's/^/@@L1 dmesg: /'
fi
# Only crit/alert/emerg kernel messages (lockups, oopses) interrupt the console;
# the rest is dumped after each scenario as @@K lines.
echo "3 4 1 7" >/proc/sys/kernel/printk
echo 1 >/proc/sys/kernel/sysrq # the host sends sysrq-l when L1 hangs
dmesg -c >/dev/null
# Heartbeats. l1-heartbeat (SCHED_FIFO, memory locked) prints `@@L1 hb ...` every 10 s:
# while it comes, L1's timers and scheduler work, however busy L1 is. The shell loop
# below adds, every 30 s, what is running and L1's kernel log, for the scenario logs.
l1-heartbeat 10 &
HB_PID=$!
(while sleep 30; do
	read -r up _ </proc/uptime
	echo "@@L1 alive uptime_s=$up; running: $(ps -o pid,stat,args | grep -E 'aivmm|qemu|vmmrun' | grep -v grep | tr -s ' ' | tr '\n' ';')"
	dmesg -c | sed 's/^/@@K heartbeat /'
done) &
HB_SHELL=$!

L2K=/l2/vmlinuz
L2I=/l2/initrd.cpio
BASE="console=ttyS0 quiet panic=-1"
# E2E_L2_CMDLINE on the host replaces BASE (e.g. without `quiet`, to debug a boot).
[ -s /e2e/l2-cmdline ] && BASE=$(cat /e2e/l2-cmdline)
QC_KINDS="aivmm aivmm-bzimage qemu-microvm qemu-pc"
[ -s /e2e/qc-kinds ] && QC_KINDS=$(cat /e2e/qc-kinds)
# E2E_AIVMM_LOG on the host sets AIVMM_LOG for every aivmm run.
LOG=""
[ -s /e2e/aivmm-log ] && LOG=$(cat /e2e/aivmm-log)

# E2E_KVM_STATS=1 on the host prints, per run_vmm boot, L1's THP/compaction counter
# deltas and the KVM exit counters of the VM. KVM's debugfs totals cover live VMs
# only, so those are sampled while the VMM runs and the last sample is printed.
vm_counters() {
	grep -E '^(thp_fault|thp_collapse|compact_stall|compact_fail|pgfault|pgmajfault)' /proc/vmstat
}
kvm_sampler() {
	while :; do
		for f in /sys/kernel/debug/kvm/*; do
			[ -f "$f" ] && echo "kvm_${f##*/} $(cat "$f")"
		done >/tmp/kvm-sample.new
		mv /tmp/kvm-sample.new /tmp/kvm-sample
		sleep 0.2
	done
}
STATS=""
if [ -s /e2e/kvm-stats ]; then
	STATS=1
	mount -t debugfs debugfs /sys/kernel/debug 2>&1 | sed 's/^/@@L1 debugfs: /'
	echo "@@L1 THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled) defrag: $(cat /sys/kernel/mm/transparent_hugepage/defrag)"
fi

# settle TAG: before a timed boot, waits (up to 5 s) until L1's CPUs have been idle
# (under 10% busy) for half a second, so that one VMM's teardown (its memory freed,
# KVM's deferred work) does not slow the next VMM's boot; prints how long it waited.
settle() {
	n=0
	while [ $n -lt 10 ]; do
		b1=$(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
		sleep 0.5
		b2=$(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
		busy=$(echo "$b1 $b2" | awk '{d = $4 - $2; print (d > 0) ? int(100 * ($3 - $1) / d) : 0}')
		[ "$busy" -lt 10 ] && break
		n=$((n + 1))
	done
	echo "@@O $1 0 E2E-RESULT settle_ms=$((n * 500)) l1_busy_pct=$busy"
}

# run_vmm TAG KIND CPUS MEM SCENARIO [TIMEOUT]: boot L2 once under KIND.
# With e2e.vmm=qemu (debugging the harness), KIND aivmm runs QEMU microvm instead.
# DISK (a raw image) and SHARE (HOST_DIR:TAG) attach virtio-blk / virtio-fs.
run_vmm() {
	tag=$1 kind=$2 cpus=$3 mem=$4 scen=$5 to=${6:-$TO}
	cmd="$BASE aivmm.scenario=$scen"
	case "$kind" in *+*) cmd="$cmd ${kind#*+}" && kind=${kind%%+*} ;; esac
	[ "$kind" = aivmm ] && [ "$VMM" = qemu ] && kind=qemu-microvm
	if [ -z "$STATS" ]; then
		run_vmm_kind
		return
	fi
	vm_counters >/tmp/kvm-before
	rm -f /tmp/kvm-sample
	kvm_sampler &
	sampler=$!
	run_vmm_kind
	kill $sampler
	wait $sampler 2>/dev/null
	{
		vm_counters | awk 'NR==FNR {b[$1]=$2; next} {print $1, $2-b[$1]}' /tmp/kvm-before -
		cat /tmp/kvm-sample 2>/dev/null
	} | awk -v tag="$tag" '$2 != 0 {printf "@@O %s 0 KVMSTAT %s=%d\n", tag, $1, $2}'
}
run_vmm_kind() {
	case "$kind" in
	aivmm)
		AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$tag" "$to" -- aivmm run --kernel $L2K --initrd $L2I --cmdline "$cmd" \
			${cpus:+--cpus $cpus} ${mem:+--memory $mem} ${DISK:+--disk $DISK} ${SHARE:+--share $SHARE}
		;;
	aivmm-bzimage) # the bzImage with its own in-guest decompressor, not aivmm's cached vmlinux
		AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$tag" "$to" -- aivmm run --kernel $L2K --initrd $L2I --cmdline "$cmd" \
			${cpus:+--cpus $cpus} ${mem:+--memory $mem} --no-kernel-cache
		;;
	qemu-microvm)
		vmmrun "$tag" "$to" -- qemu-system-x86_64 -L /fw $QEMU_DIAG -M microvm,acpi=on,rtc=on -enable-kvm -cpu host \
			-smp "${cpus:-1}" -m "${mem:-256M}" -nodefaults -no-user-config -display none \
			-serial stdio -no-reboot -device virtio-rng-device \
			${DISK:+-drive file=$DISK,if=none,id=d0,format=raw -device virtio-blk-device,drive=d0} \
			-kernel $L2K -initrd $L2I -append "$cmd"
		;;
	qemu-pc)
		vmmrun "$tag" "$to" -- qemu-system-x86_64 -L /fw $QEMU_DIAG -M pc -enable-kvm -cpu host \
			-smp "${cpus:-1}" -m "${mem:-256M}" -nodefaults -no-user-config -display none \
			-serial stdio -no-reboot \
			-kernel $L2K -initrd $L2I -append "$cmd"
		;;
	esac
}

# QEMU's trace of how a run ended (stderr, @@E lines): a power-off shows
# `qemu_system_shutdown_request reason=6` (guest-shutdown) before the runstate turns
# to shutdown; a guest reset under -no-reboot turns it with no such request. The
# judge (harness.py Run.broke) names the reset instead of a bare "exit 0".
QEMU_DIAG="-trace qemu_system_shutdown_request -trace runstate_set"

# guest_disk KIND: the L1 block device whose virtio serial is e2e-KIND.
guest_disk() {
	for d in /sys/block/vd*; do
		[ "$(cat "$d/serial" 2>/dev/null)" = "e2e-$1" ] && { echo "/dev/${d##*/}"; return; }
	done
}

# run_guest TAG KIND -- CMD...: `aivmm run --workdir /tmp/gw-TAG` with the Debian image
# KIND (kernel and initrd from the initramfs, rootfs the read-only disk). State in
# tmpfs; --net none (the commands need no network). Prints the console.log tail afterwards.
run_guest() {
	tag=$1 kind=$2
	shift 3
	dev=$(guest_disk "$kind")
	if [ -z "$dev" ]; then
		echo "@@O $tag 0 E2E-RESULT rootfs_dev=missing"
		ls /sys/block | sed "s|^|@@O $tag 0 L1 block device: |"
		return
	fi
	echo "@@O $tag 0 E2E-RESULT rootfs_dev=$dev"
	gw=/tmp/gw-$tag
	rm -rf "$gw" && mkdir -p "$gw" /tmp/e2e-state
	gcmd=""
	[ -s /e2e/guest-cmdline ] && gcmd=$(cat /e2e/guest-cmdline)
	XDG_STATE_HOME=/tmp/e2e-state AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$tag" "${GTO:-240}" -- \
		aivmm run --workdir "$gw" --kernel "/guest/$kind/vmlinuz" --initrd "/guest/$kind/initrd.cpio" \
		--rootfs "$dev" ${gcmd:+--cmdline "$gcmd"} --net none --cpus 1 --memory 1G --disk-size 2G -- "$@"
	for f in /tmp/e2e-state/aivmm/vms/gw-"$tag"-*/console.log; do
		[ -f "$f" ] && tail -n 40 "$f" | sed "s|^|@@O $tag/console 0 |"
	done
}

. /l1-io.sh # the I/O scenarios' L1 side
. /l1-run.sh # the run --workdir scenarios' L1 side (e2e_run.py)
. /l1-builder.sh # aivmm builder serve (e2e_builder.py)
. /l1-kernel.sh # guest-custom-kernel (e2e_kernel.py)
. /l1-hard.sh # the hardening scenarios' L1 side
. /l1-bench.sh # aivmm vs QEMU figures (e2e_bench.py)

# harness-selftest (run with E2E_STALL=15): L1 falls silent twice on purpose, with its
# heartbeats stopped. First busy for 50 s (a CPU loop: the watchdog must wait); then
# idle until a keyboard interrupt arrives (as a CPU whose timer interrupt was lost:
# the watchdog's sysrq keys must bring it back). Prints nothing while silent.
harness_selftest() {
	echo "@@O harness-selftest 0 E2E-SELFTEST busy-start"
	kill -STOP $HB_PID $HB_SHELL
	end=$(($(cut -d. -f1 /proc/uptime) + 50))
	while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do :; done
	kill -CONT $HB_PID $HB_SHELL
	echo "@@O harness-selftest 0 E2E-SELFTEST busy-end"
	sleep 12
	kb() { awk '$NF == "i8042" {s = 0; for (i = 2; i < NF - 2; i++) s += $i; print s}' /proc/interrupts; }
	k0=$(kb)
	echo "@@O harness-selftest 0 E2E-SELFTEST idle-start i8042=$k0"
	kill -STOP $HB_PID $HB_SHELL
	i=0
	while [ "$(kb)" = "$k0" ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
	kill -CONT $HB_PID $HB_SHELL
	echo "@@O harness-selftest 0 E2E-SELFTEST idle-end after_s=$i i8042=$(kb)"
	sleep 12
}

scenario() {
	case "$1" in
	guest-exit-status)
		run_guest guest-exit-status noclaude -- sh -c 'echo hello-from-guest; echo E2E-GUEST-FILE >/work/from-guest.txt; exit 7'
		echo "@@O guest-exit-status 0 E2E-RESULT host_sees=$(cat /tmp/gw-guest-exit-status/from-guest.txt 2>/dev/null | head -c 20)"
		;;
	guest-claude)
		run_guest guest-claude claude -- claude --version
		;;
	# `setup took …` (exec to first vCPU run) is an aivmm debug log line.
	boot) AIVMM_LOG=${LOG:-aivmm::vmm=debug} run_vmm boot aivmm "" "" boot ;;
	smp) run_vmm smp aivmm 4 2G smp ;;
	rng) run_vmm rng aivmm "" "" rng ;;
	bad-kernel)
		head -c 65536 /dev/urandom >/tmp/garbage.bin
		: >/tmp/empty.bin
		head -c 4096 $L2K >/tmp/truncated.bin
		for k in garbage empty truncated; do
			vmmrun "bad-kernel/$k" 30 -- aivmm run --kernel /tmp/$k.bin --initrd $L2I --cmdline "$BASE"
		done
		;;
	blk)
		# The guest checks the pattern at sector 0 and writes one at sector 2048.
		dd if=/dev/zero of=/tmp/disk.img bs=1M count=16 2>/dev/null
		echo E2E-DISK-PATTERN | dd of=/tmp/disk.img conv=notrunc 2>/dev/null
		DISK=/tmp/disk.img run_vmm blk aivmm "" "" blk
		echo "@@O blk 0 E2E-RESULT host_readback=$(dd if=/tmp/disk.img bs=512 skip=2048 count=1 2>/dev/null | head -c 15)"
		io_blk_ext4 # tests/e2e/l1-io.sh
		;;
	fs)
		rm -rf /tmp/share && mkdir -p /tmp/share/sub
		echo E2E-FS-HELLO >/tmp/share/sub/hello.txt
		# 180 s, not e2e.timeout: the guest's own work (a 4 MiB dd with fsync, a git
		# commit, 200 creates) took 47 s in a slow L1 (2026-12-07), 55 s to its exit.
		SHARE=/tmp/share:e2e run_vmm fs aivmm "" "" fs 180
		echo "@@O fs 0 E2E-RESULT host_sees=$(cat /tmp/share/from-guest.txt 2>/dev/null | head -c 20)"
		io_fs_check # tests/e2e/l1-io.sh
		;;
	qemu-compare)
		# Untimed: fills aivmm's vmlinux cache (the judge skips this tag).
		run_vmm "qemu-compare/warmup" aivmm 1 256M boot
		i=1
		while [ $i -le "$RUNS" ]; do
			for k in $QC_KINDS; do
				settle "qemu-compare/$k/$i"
				run_vmm "qemu-compare/$k/$i" $k 1 256M boot
			done
			i=$((i + 1))
		done
		;;
	fs-ro | fs-escape | fs-many | blk-ro | net | host-loopback | forward | net-passt | net-policy | net-dns | net-many | net-allow | net-allow-only | net-tap | vsock | balloon | density) io_scenario "$1" ;; # tests/e2e/l1-io.sh
	fs-escape-hard | blk-durability | fs-durability | panic | seccomp | disk-full | fs-modes | fs-owner) hard_scenario "$1" ;; # tests/e2e/l1-hard.sh
	builder | builder-bench | builder-nix) builder_scenario "$1" ;; # tests/e2e/l1-builder.sh
	guest-custom-kernel) kernel_scenario ;; # tests/e2e/l1-kernel.sh
	workdir | parallel | lock | env | claude-auth | stop | nested | terminal | ssh | long-work | trust | protected-paths | agent-hostile) rn_scenario "$1" ;; # tests/e2e/l1-run.sh
	bench) bench_scenario ;; # tests/e2e/l1-bench.sh
	bench-net) bench_net_scenario ;; # tests/e2e/l1-bench.sh
	bench-io) bench_io_scenario ;; # tests/e2e/l1-bench.sh
	ready) bench_ready_scenario ;; # tests/e2e/l1-bench.sh
	build) bench_build_scenario ;; # tests/e2e/l1-bench.sh
	harness-selftest) harness_selftest ;;
	*) echo "@@L1 unknown scenario $1" ;;
	esac
}

for s in $SCENARIOS; do
	read -r up _ </proc/uptime
	echo "@@BEGIN $s uptime_s=$up"
	scenario "$s"
	dmesg -c | sed "s/^/@@K $s /"
	read -r up _ </proc/uptime
	echo "@@END $s uptime_s=$up"
done
echo "@@L1 done"
poweroff -f
