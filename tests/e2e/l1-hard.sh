# Sourced by l1-init.sh: the L1 side of the hardening scenarios (e2e_hard.py).
# Lines for the harness go out as @@O <tag> 0 E2E-CHECK|E2E-RESULT ..., part of
# that aivmm run's output.

hh() { # hh TAG LINE...
	t=$1
	shift
	echo "@@O $t 0 $*"
}
hhck() { # hhck TAG NAME CMD...
	t=$1 n=$2
	shift 2
	if "$@" >/tmp/hhck.out 2>&1; then
		hh "$t" "E2E-CHECK l1-$n ok"
	else
		hh "$t" "E2E-CHECK l1-$n FAIL rc=$? $(head -c 300 /tmp/hhck.out | tr '\n' ' ')"
	fi
}

# hard_vmm TAG TIMEOUT L2-SCENARIO AIVMM-ARGS...: one aivmm run of L2.
hard_vmm() {
	t=$1 to=$2 s=$3
	shift 3
	AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$t" "$to" -- aivmm run --kernel $L2K --initrd $L2I \
		--cmdline "$BASE${HARD_CMDLINE:+ $HARD_CMDLINE} aivmm.scenario=$s" "$@"
}

# hard_kill9 TAG L2-SCENARIO AIVMM-ARGS...: like hard_vmm, and aivmm gets SIGKILL as
# soon as the guest's E2E-HARD-FLUSHED line passes by.
hard_kill9() {
	t=$1 s=$2
	shift 2
	hard_vmm "$t" 90 "$s" "$@" | while IFS= read -r l; do
		echo "$l"
		case "$l" in
		"@@O $t "*E2E-HARD-FLUSHED*)
			p=$(pidof aivmm)
			[ -n "$p" ] && kill -9 $p && echo "@@O $t 0 E2E-RESULT h_killed=$p"
			;;
		esac
	done
}

# thread_report TAG PID WANT: one line per thread of PID (name, Seccomp, filters)
# and a check that every thread's Seccomp field is WANT.
thread_report() {
	t=$1 pid=$2 want=$3 bad="" n=0
	for task in /proc/$pid/task/*; do
		name=$(cat $task/comm 2>/dev/null)
		sc=$(sed -n 's/^Seccomp:[[:space:]]*//p' $task/status 2>/dev/null)
		nf=$(sed -n 's/^Seccomp_filters:[[:space:]]*//p' $task/status 2>/dev/null)
		[ -z "$sc" ] && continue
		n=$((n + 1))
		hh "$t" "E2E-THREAD tid=${task##*/} name=$name seccomp=$sc filters=${nf:-?}"
		[ "$sc" = "$want" ] || bad="$bad ${name}:$sc"
	done
	hh "$t" "E2E-RESULT threads=$n"
	hhck "$t" "threads-seccomp-$want" [ -z "$bad" -a $n -ge 4 ]
	[ -n "$bad" ] && hh "$t" "E2E-CHECK l1-threads-list FAIL not $want:$bad"
}

# hard_seccomp_run TAG MODE: aivmm with a disk, a share and rng; while the guest
# waits, read /proc/PID/task/*/status.
hard_seccomp_run() {
	t=$1 mode=$2
	rm -rf /tmp/hs && mkdir -p /tmp/hs/share
	dd if=/dev/zero of=/tmp/hs/disk.img bs=1M count=8 2>/dev/null
	hard_vmm "$t" 120 hard-seccomp --seccomp "$mode" --disk /tmp/hs/disk.img --share /tmp/hs/share:e2e &
	vp=$!
	i=0
	while [ ! -e /tmp/hs/share/ready ] && [ $i -lt 180 ]; do
		sleep 0.5
		i=$((i + 1))
	done
	pid=$(pidof aivmm)
	if [ -e /tmp/hs/share/ready ] && [ -n "$pid" ]; then
		want=2
		[ "$mode" = off ] && want=0
		thread_report "$t" "$pid" $want
	else
		hh "$t" "E2E-CHECK l1-guest-ready FAIL no ready file after $((i / 2)) s (pid=$pid)"
	fi
	touch /tmp/hs/share/go
	wait $vp
	rm -rf /tmp/hs
}

hard_scenario() {
	case "$1" in
	seccomp)
		hard_seccomp_run seccomp on
		hard_seccomp_run seccomp/off off
		;;
	panic)
		# The ACPI power-management block logs the reset writes it sees (debug).
		dbg=warn,aivmm_devices::legacy=debug
		# reboot=acpi as in aivmm's own default command line.
		HARD_CMDLINE=reboot=acpi AIVMM_LOG=$dbg hard_vmm panic 60 hard-panic
		# The e2e base command line: if the guest's reset does not reach aivmm, aivmm
		# stops the guest itself a few seconds after the panic line.
		AIVMM_LOG=$dbg hard_vmm panic/no-reset 60 hard-panic
		HARD_CMDLINE=reboot=acpi AIVMM_LOG=$dbg hard_vmm panic/reset 60 hard-reset
		;;
	blk-durability)
		rm -f /tmp/dur.img
		dd if=/dev/zero of=/tmp/dur.img bs=1M count=16 2>/dev/null
		hard_kill9 blk-durability hard-blk-dur --disk /tmp/dur.img
		hh blk-durability "E2E-RESULT h_dur_sha=$(dd if=/tmp/dur.img bs=65536 skip=16 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"
		hhck blk-durability no-aivmm-left [ -z "$(pidof aivmm)" ]
		rm -f /tmp/dur.img
		;;
	fs-durability)
		rm -rf /tmp/fsdur && mkdir -p /tmp/fsdur
		hard_kill9 fs-durability hard-fs-dur --share /tmp/fsdur:e2e
		hh fs-durability "E2E-RESULT h_dur_sha=$(sha256sum </tmp/fsdur/dur.bin 2>&1 | cut -d' ' -f1)"
		hhck fs-durability no-aivmm-left [ -z "$(pidof aivmm)" ]
		rm -rf /tmp/fsdur
		;;
	fs-modes)
		rm -rf /tmp/fm && mkdir -p /tmp/fm
		cp /bin/fsmodes /tmp/fm/fsmodes
		hard_vmm fs-modes 90 hard-fsmodes --share /tmp/fm:e2e
		hhck fs-modes no-suid [ "$(stat -c %a /tmp/fm/suid)" = 755 ]
		hhck fs-modes no-sgid [ "$(stat -c %a /tmp/fm/sgid)" = 755 ]
		hhck fs-modes create-no-suid sh -c '[ $(( 0$(stat -c %a /tmp/fm/created-suid) & 06000 )) = 0 ]'
		hhck fs-modes dir-no-sgid sh -c '[ $(( 0$(stat -c %a /tmp/fm/sgid-dir) & 06000 )) = 0 ]'
		hh fs-modes "E2E-RESULT l1_modes=$(stat -c %n:%a /tmp/fm/* | tr '\n' ,)"
		;;
	fs-owner)
		# aivmm runs as root here: what each guest user makes is that user's.
		rm -rf /tmp/fo && mkdir -p /tmp/fo && chmod 0777 /tmp/fo
		cp /bin/fsmodes /tmp/fo/fsmodes
		hard_vmm fs-owner 90 hard-fsowner --share /tmp/fo:e2e
		for k in file dir link fifo; do
			hhck fs-owner root-$k [ "$(stat -c %u:%g /tmp/fo/o0-$k)" = 0:0 ]
			hhck fs-owner user-$k [ "$(stat -c %u:%g /tmp/fo/o65534-$k)" = 65534:65534 ]
		done
		hhck fs-owner user-no-suid [ "$(stat -c %a /tmp/fo/o65534-file)" = 755 ]
		hh fs-owner "E2E-RESULT l1_owners=$(stat -c %n:%u:%g:%a /tmp/fo/o* | tr '\n' ,)"
		;;
	disk-full)
		mkdir -p /tmp/full && mount -t tmpfs -o size=4m full /tmp/full
		mkdir -p /tmp/full/share
		# A sparse 64 MiB image on the 4 MiB file system.
		dd if=/dev/zero of=/tmp/full/disk.img bs=1M count=0 seek=64 2>/dev/null
		hard_vmm disk-full 120 hard-full --disk /tmp/full/disk.img --share /tmp/full/share:e2e
		hhck disk-full after-file [ "$(cat /tmp/full/share/after 2>&1)" = E2E-AFTER ]
		hh disk-full "E2E-RESULT l1_df=$(df -k /tmp/full | tail -1 | tr -s ' ' ,)"
		umount /tmp/full
		;;
	fs-escape-hard)
		E=/tmp/eh
		rm -rf $E && mkdir -p $E/share/sub $E/share/swap $E/outside
		M="E2E-HSECRET-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
		echo "$M" >$E/outside/secret
		ln -s $E/outside/secret $E/share/abs
		ln -s ../outside/secret $E/share/rel
		ln -s ../../outside/secret $E/share/sub/deep
		ln -s /proc/self/root$E/outside/secret $E/share/procroot
		ln -s /proc/1/root$E/outside/secret $E/share/proc1
		ln -s $E/outside $E/share/dirlink
		# The swap race: `swap` flips between a directory and a link to outside
		# (hard-swap.c: one process, no fork storm).
		hard-swap $E/share $E/outside $E/stop >$E/swaps &
		sw=$!
		hard_vmm fs-escape-hard 120 hard-escape --share $E/share:e2e &
		vp=$!
		# The guest writes its swap-loop count to the share's `progress`. If that
		# stands still for 20 s, say where aivmm's threads are, twice 2 s apart (a
		# vCPU thread spinning in L1's kernel shows in its stime and stack).
		i=0 last= same=0 dumped=
		while kill -0 $vp 2>/dev/null && [ $i -lt 220 ]; do
			sleep 0.5
			i=$((i + 1))
			now=$(cat $E/share/progress 2>/dev/null)
			if [ -n "$now" ] && [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; fi
			last=$now
			if [ $same -ge 40 ] && [ -z "$dumped" ] && p=$(pidof aivmm); then
				dumped=1
				for round in 1 2; do
					for task in /proc/$p/task/*; do
						hh fs-escape-hard "E2E-STUCK round=$round guest-progress=$now $(cut -d' ' -f2,3,14,15 $task/stat) wchan=$(cat $task/wchan 2>/dev/null) syscall=$(cut -d' ' -f1 $task/syscall 2>/dev/null) stack=$(head -6 $task/stack 2>/dev/null | tr -s ' \n' ' ')"
					done
					sleep 2
				done
			fi
		done
		wait $vp
		touch $E/stop
		wait $sw
		t=fs-escape-hard
		hh $t "E2E-RESULT l1_swaps=$(cat $E/swaps)"
		hhck $t secret-intact [ "$(cat $E/outside/secret)" = "$M" ]
		hhck $t outside-untouched [ "$(ls -a $E/outside | tr '\n' ' ')" = ". .. secret " ]
		hhck $t no-device-nodes [ -z "$(find $E/share -type b -o -type c)" ]
		hhck $t fifo-is-fifo [ -p $E/share/fifo ]
		hhck $t guest-symlink-kept [ "$(readlink $E/share/gdir)" = $E/outside ]
		hhck $t proc-fd-symlink-kept [ "$(readlink $E/share/pfd)" = /proc/self/fd/3 ]
		hh $t "E2E-RESULT l1_share_after=$(ls -a $E/share | tr '\n' , | head -c 300)"
		rm -rf $E
		;;
	esac
}
