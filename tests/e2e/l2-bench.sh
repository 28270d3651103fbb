# Sourced by l2-init.sh: the guest side of the `bench` scenario (e2e_bench.py).
# The L2 boot path up to E2E-MARKER is the one every scenario has; what runs
# after it here is the same under aivmm and QEMU:
#   bench-boot  prints E2E-BENCH-SAMPLE and idles, so L1 can sample the VMM's
#               memory while the guest is still up, then powers off
#   bench-io    fs (virtio-fs: aivmm's own, QEMU's through virtiofsd) sequential
#               write/read and `git status` on L1's tree of 10,000 files; blk 4 KiB
#               random reads (O_DIRECT, QD1) on /dev/vda
# Prints E2E-CHECK / E2E-FIG lines (see e2e_io.py and e2e_bench.py).
export HOME=/tmp

. /l2-io.sh # now_cs, rate, ck (shared with the I/O scenarios)

# One `git status` in the tree, timed: files per second (10,000 files stat-ed).
# Prints the figure (0 on failure; the FAIL check goes to stderr, also the console).
bench_git_status() {
	t0=$(now_cs)
	git -c safe.directory='*' -C /mnt/tree status --porcelain >/tmp/gst 2>&1
	rc=$?
	t1=$(now_cs)
	if [ $rc != 0 ] || [ -s /tmp/gst ]; then
		echo "E2E-CHECK git-status-$1 FAIL rc=$rc $(head -c 200 /tmp/gst | tr '\n' ' ')" >&2
		echo 0
		return
	fi
	c=$((t1 - t0))
	[ $c -lt 1 ] && c=1
	echo "$((10000 * 100 / c))"
}

bench_fs() {
	load_mods fs
	mkdir -p /mnt
	ck mount mount -t virtiofs e2e /mnt
	sync
	t0=$(now_cs)
	dd if=/dev/zero of=/mnt/seq bs=1M count=64 conv=fsync 2>/dev/null
	t1=$(now_cs)
	echo 3 >/proc/sys/vm/drop_caches
	t2=$(now_cs)
	n=$(dd if=/mnt/seq bs=1M 2>/dev/null | wc -c)
	t3=$(now_cs)
	ck seq-size [ "$n" = 67108864 ]
	rm -f /mnt/seq
	n=$(find /mnt/tree -type f ! -path '*/.git/*' | wc -l)
	ck tree-files [ "$n" = 10000 ]
	echo 3 >/proc/sys/vm/drop_caches
	cold=$(bench_git_status cold)
	w1=$(bench_git_status warm1)
	w2=$(bench_git_status warm2)
	w3=$(bench_git_status warm3)
	# The median of the three warm runs.
	warm=$(printf '%s\n' "$w1" "$w2" "$w3" | sort -n | sed -n 2p)
	ck git-status sh -c "[ '$cold' != 0 ] && [ '$w1' != 0 ] && [ '$w2' != 0 ] && [ '$w3' != 0 ]"
	echo "E2E-FIG fs_seq_write_MiBps=$(rate 67108864 $((t1 - t0))) fs_seq_read_MiBps=$(rate 67108864 $((t3 - t2))) fs_git_status_cold_files_per_s=$cold fs_git_status_warm_files_per_s=$warm"
	# 4 KiB random writes into a 16 MiB file (fio randwrite's defaults: buffered).
	dd if=/dev/zero of=/mnt/rw bs=1M count=16 2>/dev/null && sync
	out=$(/bin/bench-randread --write /mnt/rw 5 2>&1)
	case "$out" in
	E2E-FIG*) echo "$out" && echo "E2E-CHECK randwrite ok" ;;
	*) echo "E2E-CHECK randwrite FAIL $out" ;;
	esac
	rm -f /mnt/rw
	umount /mnt
}

bench_blk() {
	load_mods blk
	ck vda [ -b /dev/vda ]
	out=$(/bin/bench-randread /dev/vda "${1:-5}" 2>&1)
	case "$out" in
	E2E-FIG*) echo "$out" && echo "E2E-CHECK randread ok" ;;
	*) echo "E2E-CHECK randread FAIL $out" ;;
	esac
}

bench_main() {
	case "$1" in
	bench-boot)
		echo "E2E-BENCH-SAMPLE"
		sleep 2
		;;
	bench-io)
		bench_fs
		bench_blk 5
		;;
	*) echo "E2E-CHECK scenario FAIL l2-bench.sh does not know $1" ;;
	esac
}
