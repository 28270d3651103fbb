# Sourced by l2-init.sh: the guest side of the hardening scenarios (e2e_hard.py).
# Scenario names on the kernel command line start with `hard-`. Prints
#   E2E-CHECK <name> ok|FAIL <why>   one check
#   E2E-RESULT g_<key>=<v>           compared with L1's h_<key>
#   E2E-HARD-FLUSHED                 the data is flushed: L1 kills aivmm -9 on this line

. /l2-io.sh # ck NAME CMD...: one check that CMD succeeds

hfail_g() { # hfail_g NAME CMD...: CMD must fail; its output is shown (the harness
	# fails if L1's secret marker is in it)
	n=$1
	shift
	out=$("$@" 2>&1)
	rc=$?
	echo "attempt $n rc=$rc: $(echo "$out" | head -c 200 | tr '\n' ' ')"
	if [ $rc -ne 0 ]; then
		echo "E2E-CHECK $n ok"
	else
		echo "E2E-CHECK $n FAIL succeeded: $(echo "$out" | head -c 200 | tr '\n' ' ')"
	fi
}

hard_mount() {
	load_mods fs
	mkdir -p /mnt
	ck mount mount -t virtiofs e2e /mnt
}

hard_escape() { # L1's share holds links toward /tmp/eh/outside/secret (a marker)
	hard_mount
	hfail_g abs-symlink cat /mnt/abs
	hfail_g rel-symlink cat /mnt/rel
	hfail_g deep-rel-symlink cat /mnt/sub/deep
	hfail_g procroot-symlink cat /mnt/procroot
	hfail_g proc1-symlink cat /mnt/proc1
	hfail_g dotdot cat /mnt/../outside/secret
	hfail_g dotdot-deep cat /mnt/sub/../../outside/secret
	hfail_g dotdot-cd sh -c 'cd /mnt/sub && cat ../../../tmp/eh/outside/secret'
	hfail_g dirlink cat /mnt/dirlink/secret
	# Device nodes in the share would be the host's devices if aivmm ever opened them.
	hfail_g mknod-blk mknod /mnt/blkdev b 8 0
	hfail_g mknod-chr mknod /mnt/memdev c 1 1
	ck mkfifo mkfifo /mnt/fifo
	# Links the guest makes toward outside stay links (resolved in the guest's view).
	ln -s /tmp/eh/outside /mnt/gdir
	hfail_g plant-through-symlink sh -c 'echo planted >/mnt/gdir/planted'
	ck proc-fd-symlink sh -c 'ln -s /proc/self/fd/3 /mnt/pfd && [ "$(readlink /mnt/pfd)" = /proc/self/fd/3 ]'
	hfail_g hardlink-across ln /init /mnt/hl-init
	# L1 swaps /mnt/swap between a directory and a symlink to outside all along.
	# A watchdog that touches nothing in /mnt: if the loop makes no progress for
	# 15 s, it shows where the guest's tasks are blocked (sysrq w, l) and what the
	# virtio interrupt counters say, so a stall shows which side stopped.
	(
		last=-1
		while sleep 15; do
			now=$(cat /tmp/swap-i 2>/dev/null)
			if [ "$now" = "$last" ]; then
				echo "E2E-STALL guest swap loop stuck at $now"
				grep -i virtio /proc/interrupts | tr -s ' ' | head -5
				echo w >/proc/sysrq-trigger
				echo l >/proc/sysrq-trigger
				dmesg | tail -n 120 | sed 's/^/E2E-STALL-K /'
			fi
			last=$now
		done
	) &
	wd=$!
	i=0 planted=0 seen=0
	while [ $i -lt 300 ]; do
		echo $i >/tmp/swap-i
		echo $i >/mnt/progress
		s=$(cat /mnt/swap/secret 2>/dev/null) && [ -n "$s" ] && echo "swap read: $s" && seen=$((seen + 1))
		echo pwn >/mnt/swap/planted-$i 2>/dev/null && planted=$((planted + 1))
		i=$((i + 1))
	done
	kill $wd
	echo "E2E-RESULT g_swap_planted=$planted g_swap_secret_reads=$seen"
	ck swap-no-secret [ $seen = 0 ]
	ls -la /mnt /mnt/sub 2>&1 | tr '\n' ' ' | head -c 1500
	echo
	sync
	umount /mnt
}

hard_seccomp() { # devices busy, then wait for L1 to read every thread's Seccomp field
	hard_mount
	load_mods blk
	ck blk-read sh -c 'head -c 4096 /dev/vda | wc -c | grep -q 4096'
	echo E2E-SEC >/mnt/file && ck fs-write [ "$(cat /mnt/file)" = E2E-SEC ]
	head -c 64 /dev/hwrng >/dev/null 2>&1
	touch /mnt/ready
	i=0
	while [ ! -e /mnt/go ] && [ $i -lt 240 ]; do
		sleep 0.5
		i=$((i + 1))
	done
	ck l1-go [ -e /mnt/go ]
	umount /mnt
}

hard_full() { # the share and the disk image sit on a 4 MiB tmpfs in L1
	hard_mount
	load_mods blk
	out=$(dd if=/dev/zero of=/mnt/big bs=65536 count=128 conv=fsync 2>&1)
	echo "fs-full: $out" | tr '\n' ' '
	echo
	case "$out" in
	*"No space left"*) echo "E2E-CHECK fs-enospc ok" ;;
	*) echo "E2E-CHECK fs-enospc FAIL $(echo "$out" | tail -c 200)" ;;
	esac
	ck fs-after-full sh -c 'rm -f /mnt/big && echo E2E-AFTER >/mnt/after && [ "$(cat /mnt/after)" = E2E-AFTER ]'
	if dd if=/dev/urandom of=/dev/vda bs=65536 count=128 conv=fsync 2>/tmp/blk.err; then
		echo "E2E-CHECK blk-eio FAIL 8 MiB written to a disk on a 4 MiB file system"
	else
		echo "E2E-CHECK blk-eio ok"
		echo "blk-full: $(tr '\n' ' ' </tmp/blk.err | head -c 200)"
	fi
	ck blk-read-after sh -c 'head -c 4096 /dev/vda | wc -c | grep -q 4096'
	umount /mnt
}

hard_pattern() { # 1 MiB of random bytes in /tmp/p; prints its sha256 as g_dur_sha
	dd if=/dev/urandom of=/tmp/p bs=65536 count=16 2>/dev/null
	echo "E2E-RESULT g_dur_sha=$(sha256sum </tmp/p | cut -d' ' -f1)"
}

hard_main() {
	case "$1" in
	hard-escape) hard_escape ;;
	hard-seccomp) hard_seccomp ;;
	hard-full) hard_full ;;
	hard-fsowner)
		hard_mount
		/mnt/fsmodes --owner /mnt 0
		/mnt/fsmodes --owner /mnt 65534
		umount /mnt
		;;
	hard-fsmodes)
		hard_mount
		/mnt/fsmodes /mnt
		umount /mnt
		;;
	hard-blk-dur)
		load_mods blk
		hard_pattern
		# 1 MiB at offset 1 MiB, then fsync: the block driver sends FLUSH.
		if dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=notrunc,fsync 2>/tmp/dd.err; then
			echo "E2E-HARD-FLUSHED"
			# More writes, never flushed, while L1 kills aivmm.
			while :; do dd if=/dev/urandom of=/dev/vda bs=65536 seek=64 count=16 2>/dev/null; done
		else
			echo "E2E-CHECK blk-write FAIL $(cat /tmp/dd.err)"
		fi
		;;
	hard-fs-dur)
		hard_mount
		hard_pattern
		if dd if=/tmp/p of=/mnt/dur.bin bs=65536 conv=fsync 2>/tmp/dd.err; then
			echo "E2E-HARD-FLUSHED"
			while :; do dd if=/dev/urandom of=/mnt/scratch.bin bs=65536 count=16 2>/dev/null; done
		else
			echo "E2E-CHECK fs-write FAIL $(cat /tmp/dd.err)"
		fi
		;;
	hard-panic)
		# Through the kernel log, at crit level: panic() flushes that to the console,
		# where a line still in the tty's buffer is lost when the kernel stops.
		echo "<2>E2E-HARD-PANICKING" >/dev/kmsg
		# Init exits: the kernel panics ("Attempted to kill init!") and, with
		# panic=-1, resets at once.
		exit 3
		;;
	hard-reset)
		echo "<2>E2E-HARD-RESETTING" >/dev/kmsg # flushed before the reset, unlike the tty
		reboot -f
		sleep 30
		;;
	esac
}
