# Sourced by l1-init.sh: the L1 side of the `bench` scenario (e2e_bench.py).
# aivmm, QEMU -M microvm and QEMU -M pc boot the same L2 (run_vmm, as in
# qemu-compare: 1 vCPU, 256M), round robin, after one untimed warm-up boot each
# (aivmm's fills its vmlinux cache under $HOME/.cache/aivmm/kernels). While each
# timed guest idles after its marker, L1 samples the VMM process's memory. Then
# the device figures, aivmm against QEMU microvm: fs (virtio-fs; QEMU's through
# virtiofsd) + blk in one guest (bench-io), TCP over a tap (the net-tap guest of
# l2-io.sh, l1-io.sh's servers).
#
# Output (the harness reads it as part of each run, see e2e_bench.py):
#   @@O <tag> 0 E2E-RESULT mem_vmrss_kb=... mem_ram_map_kb=... mem_ram_rss_kb=...

BENCH_RUNS=10
[ -s /e2e/bench-runs ] && BENCH_RUNS=$(cat /e2e/bench-runs)
BENCH_IO_RUNS=1
[ -s /e2e/bench-io-runs ] && BENCH_IO_RUNS=$(cat /e2e/bench-io-runs)

# bench_sample TAG: memory of the one VMM process running now (aivmm or QEMU).
# Guest RAM is the process's largest mapping (its size is the guest RAM size or a
# little more); its Rss is the guest RAM touched. The rest of VmRSS is overhead.
bench_sample() {
	pid=""
	for d in /proc/[0-9]*; do
		read -r c 2>/dev/null <"$d/comm" || continue
		case "$c" in aivmm | qemu-system-x86) pid=${d#/proc/} && break ;; esac
	done
	if [ -z "$pid" ]; then
		echo "@@O $1 0 E2E-RESULT mem_sample=no-vmm-process"
		return
	fi
	st=$(awk '/^(VmRSS|RssAnon|RssFile|RssShmem|VmHWM):/ { printf "mem_%s_kb=%s ", tolower($1), $2 }' \
		"/proc/$pid/status" | tr -d :)
	map=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "") ? "anon" : $6 }
		/^Size:/ { size = $2 }
		/^Rss:/ { if (size > best) { best = size; rss = $2; bname = name } }
		END { printf "mem_ram_map_kb=%d mem_ram_rss_kb=%d mem_ram_map=%s", best, rss, bname }' "/proc/$pid/smaps")
	echo "@@O $1 0 E2E-RESULT mem_sample=ok mem_pid=$pid mem_comm=$c $st$map"
}

# bench_boot TAG KIND: one boot of the bench-boot guest, its output relayed line by
# line; at the guest's E2E-BENCH-SAMPLE line (after E2E-MARKER) L1 samples memory.
bench_boot() {
	rm -f /tmp/bench.fifo
	mkfifo /tmp/bench.fifo
	AIVMM_LOG=${LOG:-aivmm::vmm=debug} run_vmm "$1" "$2" 1 256M bench-boot >/tmp/bench.fifo &
	bp=$!
	while IFS= read -r l; do
		echo "$l"
		case "$l" in *" E2E-BENCH-SAMPLE"*) bench_sample "$1" ;; esac
	done </tmp/bench.fifo
	wait $bp
	rm -f /tmp/bench.fifo
}

# The fs bench's share: a git tree of 10,000 files in 100 directories, committed
# and refreshed in L1 (so `git status` in the guest finds nothing to do), plus room
# for the sequential file.
bench_tree() {
	rm -rf /tmp/bench-share
	mkdir -p /tmp/bench-share/tree
	(
		cd /tmp/bench-share/tree || exit 1
		mkdir $(awk 'BEGIN { for (i = 0; i < 100; i++) print "d" i }')
		awk 'BEGIN { for (i = 0; i < 10000; i++) { f = sprintf("d%d/f%d.txt", i % 100, i); print "file " i > f; close(f) } }'
		git init -q . 2>/dev/null
		git add -A
		git -c user.name=e2e -c user.email=e2e@example.invalid commit -q -m tree
		sleep 1 # no racily clean index entries
		git update-index -q --refresh
		echo "@@O bench/tree 0 E2E-RESULT tree_files=$(git ls-files | wc -l) tree_status=$(git status --porcelain | wc -l)"
	)
}

bench_scenario() {
	echo "@@O bench/setup 0 E2E-RESULT bench_runs=$BENCH_RUNS bench_io_runs=$BENCH_IO_RUNS home=$HOME"
	# Untimed warm-up boots: aivmm's first boot in this L1 unpacks the bzImage into its
	# vmlinux cache; QEMU's warms the page cache for its binary and firmware alike.
	for k in aivmm qemu-microvm qemu-pc; do
		bench_boot "bench/warmup/$k" $k
	done
	ls -l "$HOME/.cache/aivmm/kernels" 2>&1 | sed 's|^|@@O bench/warmup/aivmm 0 cache: |'
	i=1
	while [ $i -le "$BENCH_RUNS" ]; do
		for k in aivmm qemu-microvm qemu-pc; do
			settle "bench/boot/$k/$i" # l1-init.sh
			bench_boot "bench/boot/$k/$i" $k
		done
		i=$((i + 1))
	done

	# Devices: fs (virtio-fs vs virtio-9p) and blk (virtio-blk, same raw image).
	bench_tree
	head -c 67108864 /dev/urandom >/tmp/bench.img
	# Both virtio-fs servers keep an fd per inode they know: virtiofsd raises its
	# RLIMIT_NOFILE to 1000000 itself; aivmm raises its soft limit to the hard one,
	# which L1's init leaves at 4096 (a desktop's is 524288 or more), too few for the
	# 10,000-file tree. So the same limit for both.
	ulimit -n 1000000
	i=1
	while [ $i -le "$BENCH_IO_RUNS" ]; do
		run_io "bench/io/aivmm/$i" 180 bench-io --disk /tmp/bench.img --share /tmp/bench-share:e2e
		# QEMU's virtio-fs is vhost-user: virtiofsd (QEMU 7.2's C one, Debian's
		# qemu-system-common) with the same cache mode as aivmm's default, and guest
		# RAM QEMU can share with it (a memfd backend, the same 512M). libvhost-user
		# refuses legacy virtio, microvm's default for virtio-mmio: modern, like aivmm.
		rm -f /tmp/vfsd.sock
		virtiofsd -f --socket-path=/tmp/vfsd.sock -o source=/tmp/bench-share -o cache=auto \
			-o sandbox=chroot >/tmp/vfsd.log 2>&1 &
		vp=$!
		j=0
		while [ ! -S /tmp/vfsd.sock ] && [ $j -lt 50 ]; do sleep 0.1; j=$((j + 1)); done
		run_qemu_io "bench/io/qemu-microvm/$i" 180 bench-io \
			-object memory-backend-memfd,id=mem,size=512M,share=on -M memory-backend=mem \
			-global virtio-mmio.force-legacy=false \
			-chardev socket,id=vfs,path=/tmp/vfsd.sock -device vhost-user-fs-device,chardev=vfs,tag=e2e \
			-drive file=/tmp/bench.img,if=none,id=d0,format=raw -device virtio-blk-device,drive=d0
		kill $vp 2>/dev/null
		wait $vp 2>/dev/null
		sed "s|^|@@O bench/io/qemu-microvm/$i 0 virtiofsd: |" /tmp/vfsd.log | tail -n 5
		i=$((i + 1))
	done
	rm -rf /tmp/bench-share /tmp/bench.img

	bench_net
}

# The net rows: TCP over a tap, 32 MiB each way (l1-io.sh's servers, l2-io.sh's
# net-tap guest), aivmm against QEMU microvm; then aivmm's user-mode networks,
# its own (`--net user`) and passt (`--net passt`), the same 32 MiB each way to
# a public-looking address in l1_net's outside namespace and 200 connects one
# after another (l2-io.sh's net-bench guest, tinydns --hold as the server).
bench_net() {
	io_mods
	l1_net
	if ! ip link show tap0 >/dev/null 2>&1; then
		tunctl -t tap0 >/dev/null
		ip addr add 10.0.99.1/24 dev tap0
		ip link set tap0 up
	fi
	i=1
	while [ $i -le "$BENCH_IO_RUNS" ]; do
		IOTAG="bench/net/aivmm/$i"
		tcp_servers
		run_io "$IOTAG" 150 net-tap --net tap:tap0
		tcp_collect
		IOTAG="bench/net/qemu-microvm/$i"
		tcp_servers
		run_qemu_io "$IOTAG" 150 net-tap -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off \
			-device virtio-net-device,netdev=n0
		IOTAG="bench/net/qemu-microvm/$i"
		tcp_collect
		# QEMU at its best on a tap: the kernel's vhost-net moves the packets.
		if [ -c /dev/vhost-net ]; then
			IOTAG="bench/net/qemu-vhost/$i"
			tcp_servers
			run_qemu_io "$IOTAG" 150 net-tap -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=on \
				-device virtio-net-device,netdev=n0
			tcp_collect
		else
			echo "@@O bench/net/qemu-vhost/$i 0 E2E-CHECK vhost-net FAIL no /dev/vhost-net in L1"
		fi
		$OUT tinydns --hold 5010 &
		hp=$!
		IOTAG="bench/net/aivmm-user/$i"
		tcp_servers "$OUT"
		run_io "$IOTAG" 150 net-bench --net user
		tcp_collect
		IOTAG="bench/net/aivmm-passt/$i"
		tcp_servers "$OUT"
		IO_CHROOT="unshare -m /bin/sh /tmp/io-nsroot.sh" run_io "$IOTAG" 150 net-bench --net passt
		tcp_collect
		kill $hp 2>/dev/null
		i=$((i + 1))
	done
}

bench_net_scenario() {
	echo "@@O bench/setup 0 E2E-RESULT bench_io_runs=$BENCH_IO_RUNS"
	bench_net
}
