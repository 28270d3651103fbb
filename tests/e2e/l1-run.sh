# Sourced by l1-init.sh: the L1 side of the `aivmm run --workdir` scenarios
# (workdir, parallel, lock, env, stop, nested, terminal, ssh; judged by e2e_run.py).
# Every run boots the Debian guest image without Claude (`run_guest`'s image) with
# --net none, 1 vCPU and 512 MiB. Checks go out as
#   @@O <tag> 0 E2E-CHECK <name> ok|FAIL <why>
# so the harness files them under that run.

RN_STATE=/tmp/rn-state
rn_ck() { # rn_ck TAG NAME CMD...: one check
	t=$1 n=$2
	shift 2
	if "$@" >/tmp/rn-ck.out 2>&1; then
		echo "@@O $t 0 E2E-CHECK $n ok"
	else
		echo "@@O $t 0 E2E-CHECK $n FAIL rc=$? $(head -c 300 /tmp/rn-ck.out | tr '\n' ' ')"
	fi
}
rn_is() { # rn_is FILE TEXT: FILE holds exactly TEXT (and a newline)
	[ "$(cat "$1" 2>&1)" = "$2" ] || { echo "$1 holds '$(head -c 100 "$1" 2>&1)', want '$2'"; return 1; }
}
rn_owner() { # rn_owner UID:GID PATH...
	o=$1
	shift
	for p in "$@"; do
		[ "$(stat -c %u:%g "$p" 2>&1)" = "$o" ] || { echo "$p owned by $(stat -c %u:%g "$p" 2>&1), want $o"; return 1; }
	done
}
rn_wait_file() { # rn_wait_file PATH SECS
	i=0
	while [ ! -e "$1" ] && [ $i -lt $(($2 * 5)) ]; do sleep 0.2; i=$((i + 1)); done
	[ -e "$1" ]
}
rn_out() { # rn_out LOGTAG FILE: a command's output as @@O lines of LOGTAG
	sed "s|^|@@O $1 0 |" "$2"
}

# rn_aivmm TAG TIMEOUT WORKDIR [RUN-OPTIONS...] -- CMD...: one `aivmm run --workdir`.
# RN_AS="UID GID" runs it as that user (runtool as).
rn_aivmm() {
	t=$1 to=$2 w=$3
	shift 3
	gcmd=""
	[ -s /e2e/guest-cmdline ] && gcmd=$(cat /e2e/guest-cmdline)
	as=""
	[ -n "$RN_AS" ] && as="runtool as $RN_AS"
	# RN_WRAP: a command aivmm runs under (passt's mount namespace); RN_NET: --net;
	# RN_OPTS: more run options.
	XDG_STATE_HOME=${RN_STATE_HOME:-$RN_STATE} AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$t" "$to" -- \
		$RN_WRAP $as aivmm run --workdir "$w" --kernel /guest/noclaude/vmlinuz --initrd /guest/noclaude/initrd.cpio \
		--rootfs "$RN_DEV" ${gcmd:+--cmdline "$gcmd"} --net "${RN_NET:-none}" ${RN_SIZE:---cpus 1 --memory 512M --disk-size 1G} \
		$RN_OPTS "$@"
}
# rn_console TAG WORKDIR: the tail of that workdir's guest console log.
rn_console() {
	for f in ${RN_STATE_HOME:-$RN_STATE}/aivmm/vms/"$(basename "$2")"-*/console.log; do
		[ -f "$f" ] && tail -n "${3:-12}" "$f" | sed "s|^|@@O $1/console 0 |"
	done
}
# rn_tool TAG TIMEOUT aivmm ARGS...: another aivmm command (ps, stop, exec), timed.
rn_tool() {
	t=$1 to=$2
	shift 2
	XDG_STATE_HOME=${RN_STATE_HOME:-$RN_STATE} vmmrun "$t" "$to" -- "$@"
}
# rn_vmlog TAG WORKDIR: that workdir's aivmm.log (aivmm's own log of its last run).
rn_vmlog() {
	for f in ${RN_STATE_HOME:-$RN_STATE}/aivmm/vms/"$(basename "$2")"-*/aivmm.log; do
		[ -f "$f" ] && tail -n 40 "$f" | sed "s|^|@@O $1/vmlog 0 |"
	done
}
# rn_start_bg TAG WORKDIR [SCRIPT]: a VM on WORKDIR whose command (sh -c SCRIPT)
# marks /work/started and then waits (a trap-less shell: the stop ends it with SIGHUP).
RN_BG_SCRIPT='echo up >/work/started; echo bg-started; while :; do sleep 1; done'
rn_start_bg() {
	rm -f "$2/started"
	rn_aivmm "$1" 240 "$2" -- sh -c "${3:-$RN_BG_SCRIPT}" &
	RN_BG=$!
	if rn_wait_file "$2/started" 150; then
		echo "@@O $1 0 E2E-CHECK started ok"
	else
		echo "@@O $1 0 E2E-CHECK started FAIL no /work/started after 150 s"
	fi
}

rn_scenario() {
	RN_DEV=$(guest_disk noclaude)
	if [ -z "$RN_DEV" ]; then
		echo "@@O $1 0 E2E-CHECK rootfs FAIL no disk with serial e2e-noclaude"
		return
	fi
	mkdir -p $RN_STATE
	case "$1" in
	workdir)
		# As an ordinary user (uid 1000): what the guest makes in /work is theirs.
		w=/tmp/rn-workdir
		rm -rf $w /tmp/rn-ustate && mkdir -p $w /tmp/rn-ustate
		echo host >$w/host-edit.txt
		echo bye >$w/host-delete.txt
		chown -R 1000:1000 $w /tmp/rn-ustate
		chmod 0666 /dev/kvm
		chmod 0644 "$RN_DEV"
		RN_AS="1000 1000" RN_STATE_HOME=/tmp/rn-ustate rn_aivmm workdir 240 $w -- sh -c '
			set -e
			cd /work
			echo one >a.txt; echo two >>a.txt
			sed -i s/one/ONE/ a.txt
			mkdir -p sub/deeper; echo deep >sub/deeper/d.txt
			echo temp >gone.txt; rm gone.txt
			echo keep >from.txt; mv from.txt renamed.txt
			echo edited >>host-edit.txt
			rm host-delete.txt
			mkdir emptied; rmdir emptied
			id -u >uid.txt
			# The guest clock does not lag the host: a file just made here (its time
			# is the host kernel'"'"'s) is not from the guest'"'"'s future.
			touch clk.txt
			m=$(stat -c %.9Y clk.txt); n=$(date +%s.%N)
			awk -v m=$m -v n=$n "BEGIN { if (n >= m) print \"ok\"; else printf \"behind by %.3f s\\n\", m - n }" >clock.txt
			# What a shell in the guest expects: mount, and modprobe finding modules
			# (kmod reads the modules.dep.bin the image build made).
			{ mount | grep -q " /work " && modprobe --show-depends virtio_balloon | grep -Eq "virtio_balloon[.]ko|^builtin virtio_balloon" && echo ok; } >tools.txt 2>&1 || true
			echo workdir-guest-done
			exit 3'
		rn_console workdir $w
		rn_ck workdir l1-a rn_is $w/a.txt "$(printf 'ONE\ntwo')"
		rn_ck workdir l1-guest-clock rn_is $w/clock.txt ok
		rn_ck workdir l1-guest-tools rn_is $w/tools.txt ok
		rn_ck workdir l1-deep rn_is $w/sub/deeper/d.txt deep
		rn_ck workdir l1-renamed rn_is $w/renamed.txt keep
		rn_ck workdir l1-host-edit rn_is $w/host-edit.txt "$(printf 'host\nedited')"
		rn_ck workdir l1-deleted sh -c "! ls -d $w/gone.txt $w/from.txt $w/host-delete.txt $w/emptied 2>/dev/null | grep ."
		rn_ck workdir l1-guest-uid rn_is $w/uid.txt 1000
		rn_ck workdir l1-owner rn_owner 1000:1000 $w/a.txt $w/sub $w/sub/deeper $w/sub/deeper/d.txt $w/renamed.txt $w/host-edit.txt $w/uid.txt
		;;
	parallel)
		# Two workdirs at once; each guest also gets --share-rw of one directory
		# (at the same path) where it waits for the other: proof they overlap.
		# And --share-ro of another: readable, not writable.
		rm -rf /tmp/rn-par1 /tmp/rn-par2 /tmp/rn-meet /tmp/rn-ro
		mkdir -p /tmp/rn-par1 /tmp/rn-par2 /tmp/rn-meet /tmp/rn-ro
		echo ro-content >/tmp/rn-ro/r.txt
		for n in 1 2; do
			o=$((3 - n))
			rn_aivmm parallel/$n 240 /tmp/rn-par$n --share-rw /tmp/rn-meet --share-ro /tmp/rn-ro -- sh -c "
				echo vm$n >/work/me.txt
				echo here >/tmp/rn-meet/vm$n
				i=0; while [ ! -e /tmp/rn-meet/vm$o ] && [ \$i -lt 600 ]; do sleep 0.2; i=\$((i+1)); done
				[ -e /tmp/rn-meet/vm$o ] && echo saw-vm$o
				echo ro=\$(cat /tmp/rn-ro/r.txt)
				if echo x 2>/dev/null >/tmp/rn-ro/w.txt; then echo ro-writable; else echo ro-refused; fi
				grep MemTotal /proc/meminfo" &
			eval "p$n=\$!"
		done
		wait "$p1"
		wait "$p2"
		rn_ck parallel l1-workdirs sh -c 'rn() { [ "$(cat $1)" = $2 ]; }; rn /tmp/rn-par1/me.txt vm1 && rn /tmp/rn-par2/me.txt vm2'
		rn_ck parallel l1-meet ls /tmp/rn-meet/vm1 /tmp/rn-meet/vm2
		rn_ck parallel l1-ro-untouched sh -c '! ls /tmp/rn-ro/w.txt 2>/dev/null'
		;;
	lock)
		w=/tmp/rn-lock
		rm -rf $w && mkdir -p $w
		rn_start_bg lock/a $w
		rn_aivmm lock/b 60 $w -- sh -c 'echo second-run-ran'
		rn_tool lock/stop 60 aivmm stop $w
		wait "$RN_BG"
		# The lock goes with the VM: the next run on the workdir works.
		rn_aivmm lock/c 240 $w -- sh -c 'echo third-run-ran state-kib=$(df -k / | awk "NR == 2 { print \$2 }")'
		# A larger --disk-size grows the state disk, and the guest its filesystem (the
		# overlay root's size is the state disk's); a smaller one is refused, not cut.
		RN_SIZE="--cpus 1 --memory 512M --disk-size 2G" rn_aivmm lock/grow 240 $w -- \
			sh -c 'echo grown-run-ran state-kib=$(df -k / | awk "NR == 2 { print \$2 }")'
		rn_aivmm lock/shrink 60 $w -- sh -c 'echo shrink-ran'
		;;
	stop)
		w=/tmp/rn-stop
		rm -rf $w && mkdir -p $w
		rn_start_bg stop/a $w
		rn_tool stop/ps 30 aivmm ps
		rn_tool stop/exec 60 aivmm exec $w -- sh -c 'echo exec-ran uid=$(id -u) pwd=$(pwd); echo from-exec >/work/exec.txt; exit 5'
		rn_ck stop/exec l1-exec-file rn_is $w/exec.txt from-exec
		rn_tool stop/stop 60 aivmm stop $w
		wait "$RN_BG"
		rn_console stop/a $w
		rn_vmlog stop/a $w
		rn_tool stop/ps-after 30 aivmm ps
		# A guest that ignores the power button (its ACPI button driver unbound by
		# the command): `aivmm stop` waits --timeout, then kills aivmm.
		w=/tmp/rn-stop-ignore
		rm -rf $w && mkdir -p $w
		rn_start_bg stop/ignore-a $w 'if echo PNP0C0C:00 >/sys/bus/acpi/drivers/button/unbind || rmmod button; then echo button-ignored; fi
			echo up >/work/started; echo bg-started; while :; do sleep 1; done'
		rn_tool stop/ignore 60 aivmm stop --timeout 6 $w
		wait "$RN_BG"
		rn_vmlog stop/ignore-a $w
		rn_tool stop/ps-after-kill 30 aivmm ps
		# A stop while the guest still boots: aivmm holds the button (presses every
		# second) until the guest, once its driver and the agent are up, shuts down.
		w=/tmp/rn-stop-boot
		rm -rf $w && mkdir -p $w
		rn_aivmm stop/boot-a 240 $w -- sh -c 'echo boot-cmd-ran; sleep 100' &
		RN_BG=$!
		i=0
		while ! ls $RN_STATE/aivmm/vms/rn-stop-boot-*/vm.json >/dev/null 2>&1 && [ $i -lt 150 ]; do
			sleep 0.2
			i=$((i + 1))
		done
		rn_tool stop/boot-ps 30 aivmm ps
		rn_tool stop/boot 60 aivmm stop $w
		wait "$RN_BG"
		rn_vmlog stop/boot-a $w
		rn_console stop/boot-a $w
		;;
	env)
		w=/tmp/rn-env
		rm -rf $w && mkdir -p $w
		E2E_FROM_L1=from-l1-value rn_aivmm env 240 $w --env E2E_SECRET=s3cr3t-Value-42 --env E2E_FROM_L1 -- sh -c '
			echo "env-secret=$E2E_SECRET"
			echo "env-from-l1=$E2E_FROM_L1"
			if grep -q -e s3cr3t -e from-l1-value /proc/cmdline; then echo cmdline-LEAK; else echo cmdline-clean; fi
			echo "cmdline: $(cat /proc/cmdline)"'
		;;
	claude-auth)
		# L1's ~/.claude is never shared: the guest gets a copy of the credentials and
		# of ~/.claude.json's auth fields; only a refreshed token comes back.
		w=/tmp/rn-claude
		hm=/tmp/rn-home
		rm -rf $w $hm $RN_STATE/aivmm/claude && mkdir -p $w $hm/.claude
		echo '{"claudeAiOauth":{"accessToken":"sk-l1-old","refreshToken":"rt-l1-old","expiresAt":1000,"scopes":["user:inference"]},"mcpOAuth":{"l1":1}}' >$hm/.claude/.credentials.json
		chmod 600 $hm/.claude/.credentials.json
		echo '{"theme":"dark"}' >$hm/.claude/settings.json
		echo '{"oauthAccount":{"emailAddress":"l1@e2e"},"mcpServers":{"l1":{"command":"true"}}}' >$hm/.claude.json
		# Every path of L1's Claude files, and the sums of all but the credentials.
		rn_claude_snap() { (cd $hm && find .claude .claude.json | sort && find .claude .claude.json -type f ! -name .credentials.json | sort | xargs sha256sum); }
		rn_claude_same() { [ "$(cat /tmp/rn-claude-before)" = "$(cat /tmp/rn-claude-after)" ] || { echo changed: $(cat /tmp/rn-claude-after); return 1; }; }
		rn_claude_snap >/tmp/rn-claude-before
		HOME=$hm rn_aivmm claude-auth 240 $w --claude-auth -- sh -c '
			echo "claude-cred=$(cat ~/.claude/.credentials.json)"
			echo "claude-json=$(cat ~/.claude.json)"
			echo "claude-settings=$(cat ~/.claude/settings.json 2>/dev/null || echo none)"
			echo "{\"guest\":2}" >~/.claude.json
			echo "{\"hooks\":{\"SessionStart\":[{\"hooks\":[{\"type\":\"command\",\"command\":\"touch /tmp/rn-pwned\"}]}]}}" >~/.claude/settings.json
			mkdir -p ~/.claude/commands && echo "run something" >~/.claude/commands/x.md
			echo "{\"claudeAiOauth\":{\"accessToken\":\"sk-guest-new\",\"refreshToken\":\"rt-guest-new\",\"expiresAt\":2000,\"scopes\":[\"user:inference\"]}}" >~/.claude/.credentials.json'
		rn_claude_snap >/tmp/rn-claude-after
		rn_ck claude-auth l1-claude-unchanged rn_claude_same
		rn_ck claude-auth l1-claude-no-commands sh -c "test ! -e $hm/.claude/commands"
		rn_ck claude-auth l1-claude-token sh -c "c=$hm/.claude/.credentials.json; grep -q '\"accessToken\":\"sk-guest-new\"' \$c && grep -q '\"expiresAt\":2000' \$c && grep -q '\"mcpOAuth\":{\"l1\":1}' \$c && test \$(stat -c %a \$c) = 600 || { cat \$c; false; }"
		rn_ck claude-auth l1-claude-copy rn_is $RN_STATE/aivmm/claude/.claude.json '{"guest":2}'
		;;
	nested)
		w=/tmp/rn-nested
		rm -rf $w && mkdir -p $w
		cp /bin/runtool $w/runtool
		rn_aivmm nested 240 $w -- sh -c '
			grep -qw -e svm -e vmx /proc/cpuinfo && echo cpu-virt=yes || echo cpu-virt=no
			i=0; while [ ! -c /dev/kvm ] && [ $i -lt 150 ]; do sleep 0.2; i=$((i+1)); done
			ls -l /dev/kvm
			[ -c /dev/kvm ] || { lsmod | grep kvm; grep kvm /lib/modules/$(uname -r)/modules.dep; dmesg | grep -i -e kvm -e svm | tail -n 5; }
			/work/runtool kvm'
		rn_console nested $w
		;;
	trust)
		rn_trust
		;;
	protected-paths)
		rn_protected
		;;
	agent-hostile)
		rn_agent_hostile
		;;
	long-work)
		# Four minutes of CPU-bound work in /work (xz over 200 source files, round after
		# round, then git): L1 must carry a long, busy guest and its exit. The Debian
		# test image has no C compiler, so xz and git stand in for a build.
		w=/tmp/rn-long
		rm -rf $w && mkdir -p $w/src
		i=0
		while [ $i -lt 200 ]; do
			head -c 8000 /dev/urandom | od -An -tx1 >$w/src/f$i.txt
			i=$((i + 1))
		done
		rn_aivmm long-work 900 $w -- sh -c '
			set -e
			cd /work
			git init -q .
			git add -A
			git -c user.name=e2e -c user.email=e2e@e2e commit -q -m src
			mkdir -p out
			start=$(cut -d. -f1 /proc/uptime)
			end=$((start + 240))
			round=0
			while [ "$(cut -d. -f1 /proc/uptime)" -lt $end ]; do
				round=$((round + 1))
				for f in src/*.txt; do xz -6 -c "$f" >"out/${f#src/}.xz"; done
				echo "long-round $round at $(($(cut -d. -f1 /proc/uptime) - start)) s"
			done
			sha256sum out/*.xz >sums.txt
			git add -A
			git -c user.name=e2e -c user.email=e2e@e2e commit -q -m out
			echo "long-done rounds=$round seconds=$(($(cut -d. -f1 /proc/uptime) - start))"'
		rn_ck long-work l1-outputs sh -c "cd $w && for f in src/*.txt; do xzcat out/\${f#src/}.xz | cmp - \$f || exit 1; done"
		rn_ck long-work l1-sums sh -c "cd $w && sha256sum -c sums.txt >/dev/null"
		rn_ck long-work l1-git sh -c "cd $w && git fsck --strict && [ \$(git rev-list --count HEAD) = 2 ] && git diff --quiet HEAD"
		rn_console long-work $w 40
		rn_vmlog long-work $w
		;;
	terminal)
		rn_terminal
		;;
	ssh)
		rn_ssh
		;;
	esac
}

# The ssh scenario: `aivmm run --ssh` with user networking (passt, as l1-io.sh's
# `forward` runs it); L1's ssh reaches the guest's sshd on 127.0.0.1 with the
# generated key, first through the generated `ssh -F` config, then by hand with
# -i and -p and strict host key checking against the key the first one recorded.
rn_ssh() {
	l1_net
	w=/tmp/rn-ssh
	rm -rf $w && mkdir -p $w
	RN_WRAP="unshare -m /bin/sh /tmp/io-nsroot.sh" RN_NET=user RN_OPTS=--ssh
	rn_start_bg ssh/a $w
	RN_WRAP="" RN_NET="" RN_OPTS=""
	rn_tool ssh/ps 30 aivmm ps
	cfg=$(ls $RN_STATE/aivmm/vms/rn-ssh-*/ssh/config 2>/dev/null | head -n 1)
	if [ -z "$cfg" ]; then
		echo "@@O ssh/a 0 E2E-CHECK ssh-config FAIL no ssh/config in the workdir's state"
	else
		echo "@@O ssh/a 0 E2E-CHECK ssh-config ok"
		d=$(dirname "$cfg")
		port=$(sed -n 's/^ *Port //p' "$cfg")
		user=$(sed -n 's/^ *User //p' "$cfg")
		echo "@@O ssh/a 0 ssh config: port $port user $user"
		# passt drops a SYN it sent before the guest had an address, and the connection
		# then hangs in the banner exchange: ConnectTimeout covers that, and we retry.
		i=0 t0=$(date +%s)
		while [ $i -lt 30 ]; do
			if timeout 30 ssh -F "$cfg" -o BatchMode=yes -o ConnectTimeout=8 aivmm 'uname -a; echo ssh-guest-uid=$(id -u); hostname' \
				>/tmp/rn-ssh.out 2>/tmp/rn-ssh.err; then
				break
			fi
			i=$((i + 1))
			sleep 1
		done
		echo "@@O ssh/a 0 ssh attempts: $((i + 1)), $(($(date +%s) - t0)) s"
		rn_out ssh/config-ssh /tmp/rn-ssh.out
		sed "s|^|@@O ssh/config-ssh 0 stderr: |" /tmp/rn-ssh.err | head -n 5
		rn_ck ssh/a guest-answered grep -q ssh-guest-uid=0 /tmp/rn-ssh.out
		rn_ck ssh/a host-key-recorded grep -q 'ssh-ed25519\|ecdsa\|ssh-rsa' "$d/known_hosts"
		# By hand: the generated key and port, and the host key as recorded (strict).
		# Strict checking is real: under a name known_hosts lacks, the login is refused.
		if timeout 60 ssh -i "$d/id_ed25519" -p "$port" -o BatchMode=yes -o ConnectTimeout=8 -o IdentitiesOnly=yes \
			-o UserKnownHostsFile="$d/known_hosts" -o StrictHostKeyChecking=yes -o HostKeyAlias=aivmm-unknown \
			"$user@127.0.0.1" true 2>/tmp/rn-ssh2.err; then
			echo "@@O ssh/a 0 E2E-CHECK strict-host-key FAIL an unrecorded host key was accepted"
		elif grep -q 'Host key verification failed' /tmp/rn-ssh2.err; then
			echo "@@O ssh/a 0 E2E-CHECK strict-host-key ok"
		else
			echo "@@O ssh/a 0 E2E-CHECK strict-host-key FAIL $(head -c 200 /tmp/rn-ssh2.err | tr '\n' ' ')"
		fi
		timeout 60 ssh -i "$d/id_ed25519" -p "$port" -o BatchMode=yes -o ConnectTimeout=8 -o IdentitiesOnly=yes \
			-o UserKnownHostsFile="$d/known_hosts" -o StrictHostKeyChecking=yes \
			"$user@127.0.0.1" 'echo by-hand-$((6*7))' >/tmp/rn-ssh2.out 2>/tmp/rn-ssh2.err
		rn_ck ssh/a by-hand grep -q by-hand-42 /tmp/rn-ssh2.out
		sed "s|^|@@O ssh/by-hand 0 stderr: |" /tmp/rn-ssh2.err | head -n 5
		# A key the guest does not know is refused.
		ssh-keygen -q -t ed25519 -N '' -f /tmp/rn-ssh-other -C other </dev/null >/dev/null 2>&1
		if timeout 60 ssh -i /tmp/rn-ssh-other -p "$port" -o BatchMode=yes -o ConnectTimeout=8 -o IdentitiesOnly=yes \
			-o UserKnownHostsFile="$d/known_hosts" -o StrictHostKeyChecking=yes "$user@127.0.0.1" true 2>/tmp/rn-ssh3.err; then
			echo "@@O ssh/a 0 E2E-CHECK other-key-refused FAIL a key aivmm did not make logged in"
		elif grep -q 'Permission denied' /tmp/rn-ssh3.err; then
			echo "@@O ssh/a 0 E2E-CHECK other-key-refused ok"
		else
			echo "@@O ssh/a 0 E2E-CHECK other-key-refused FAIL $(head -c 200 /tmp/rn-ssh3.err | tr '\n' ' ')"
		fi
		rm -f /tmp/rn-ssh-other /tmp/rn-ssh-other.pub
	fi
	rn_tool ssh/stop 60 aivmm stop $w
	wait "$RN_BG"
	rn_console ssh/a $w
	rn_vmlog ssh/a $w # the press, the command's end and the VM's end, timed
}

# The terminal test: aivmm runs an interactive bash in the guest inside a tmux
# pane (a real pty, 80x24). Typed input gets answers, Ctrl-C interrupts, and a
# window resize reaches the guest's terminal.
rn_tx() { LC_ALL=C.UTF-8 tmux -S /tmp/rn-tmux.sock "$@"; }
rn_screen() { rn_tx capture-pane -p -t rn -S -200 2>/dev/null; }
rn_expect() { # rn_expect NAME PATTERN SECS: wait until the pane shows PATTERN
	i=0
	while ! rn_screen | grep -q -e "$2"; do
		i=$((i + 1))
		if [ $i -gt $(($3 * 5)) ]; then
			echo "@@O terminal 0 E2E-CHECK $1 FAIL no '$2' on the screen after $3 s"
			rn_screen | tail -n 8 | sed 's|^|@@O terminal 0 screen: |'
			return 1
		fi
		sleep 0.2
	done
	echo "@@O terminal 0 E2E-CHECK $1 ok"
}
rn_terminal() {
	w=/tmp/rn-term
	rm -rf $w /tmp/rn-term-exit && mkdir -p $w
	gcmd=""
	[ -s /e2e/guest-cmdline ] && gcmd="--cmdline '$(cat /e2e/guest-cmdline)'"
	cat >/tmp/rn-term.sh <<EOF
XDG_STATE_HOME=$RN_STATE aivmm run --workdir $w --kernel /guest/noclaude/vmlinuz --initrd /guest/noclaude/initrd.cpio \
	--rootfs $RN_DEV $gcmd --net none --cpus 1 --memory 512M --disk-size 1G -- bash --norc -i
echo "aivmm-exit=\$?" >/tmp/rn-term-exit
sleep 600
EOF
	mkdir -p /dev/pts
	grep -q ' /dev/pts ' /proc/mounts || mount -t devpts -o ptmxmode=0666 devpts /dev/pts
	export TERM=screen
	rn_tx -f /dev/null new-session -d -s rn -x 80 -y 24 "sh /tmp/rn-term.sh"
	rn_expect prompt '[$#] *$' 150 || { rn_tx kill-server; return; }
	rn_tx send-keys -t rn 'echo typed-$((6*7))' Enter
	rn_expect typed-input 'typed-42' 30
	# The pane's own idea of its size (a status line may take a row).
	sz=$(rn_tx display-message -p -t rn '#{pane_height} #{pane_width}')
	echo "@@O terminal 0 pane size before: $sz"
	rn_tx send-keys -t rn 'stty size' Enter
	rn_expect size-initial "^$sz\$" 30
	rn_tx send-keys -t rn "trap 'echo WINCH-SEEN' WINCH" Enter
	sleep 1
	rn_tx resize-window -t rn -x 100 -y 30
	sleep 2
	sz2=$(rn_tx display-message -p -t rn '#{pane_height} #{pane_width}')
	echo "@@O terminal 0 pane size after: $sz2"
	rn_ck terminal pane-resized [ "$sz2" != "$sz" ]
	rn_tx send-keys -t rn 'stty size; echo cols=$COLUMNS' Enter
	rn_expect resized "^$sz2\$" 30
	rn_expect winch-trap 'WINCH-SEEN' 10
	rn_tx send-keys -t rn 'sleep 300' Enter
	sleep 2
	rn_tx send-keys -t rn C-c
	rn_tx send-keys -t rn 'echo after-ctrl-c-$?' Enter
	rn_expect ctrl-c 'after-ctrl-c-130' 30
	rn_tx send-keys -t rn 'exit 7' Enter
	if rn_wait_file /tmp/rn-term-exit 60; then
		rn_ck terminal exit-status rn_is /tmp/rn-term-exit aivmm-exit=7
	else
		echo "@@O terminal 0 E2E-CHECK exit-status FAIL aivmm did not exit after 'exit 7'"
	fi
	rn_screen | tail -n 16 | sed 's|^|@@O terminal 0 screen: |'
	rn_tx kill-server
}

# trust: a workdir aivmm.toml that widens the sandbox runs only once `aivmm trust`
# pinned it; one that only sizes runs untrusted; a guest's edit of a pinned file makes
# the next run refuse it. The refusals must come before anything boots or is created.
rn_trust() {
	w=/tmp/trust-w s=/tmp/trust-secret hm=/tmp/trust-home st=/tmp/trust-state
	rm -rf $w $s $hm $st && mkdir -p $w $s $hm/.claude $st
	echo top-secret >$s/key
	echo '{}' >$hm/.claude.json
	echo l1-cred >$hm/.claude/.credentials.json
	printf 'share_ro = ["%s"]\nenv = ["E2E_SECRET"]\nclaude_auth = true\n' $s >$w/aivmm.toml
	cp $w/aivmm.toml /tmp/trust-hostile
	export E2E_SECRET=hunter2
	# 1. refused, nothing boots, no state made.
	HOME=$hm RN_STATE_HOME=$st rn_aivmm trust/refused 60 $w -- sh -c 'echo BOOTED'
	rn_ck trust/refused no-state sh -c "! ls -d $st/aivmm/vms/* 2>/dev/null"
	# 2. sizes alone run untrusted (and --cpus is left to the file).
	printf 'cpus = 2\n' >$w/aivmm.toml
	HOME=$hm RN_STATE_HOME=$st RN_SIZE="--memory 512M --disk-size 1G" rn_aivmm trust/narrow 240 $w -- \
		sh -c 'echo "nproc=$(nproc)"; echo "E=${E2E_SECRET:-unset}"'
	# 3. the widening file, after `aivmm trust`.
	cp /tmp/trust-hostile $w/aivmm.toml
	HOME=$hm XDG_STATE_HOME=$st vmmrun trust/pin 30 -- aivmm trust $w
	rn_ck trust/pin modes sh -c "[ \$(stat -c %a $st/aivmm/trusted) = 600 ] && [ \$(stat -c %a $st/aivmm) = 700 ]"
	HOME=$hm RN_STATE_HOME=$st rn_aivmm trust/ok 240 $w -- sh -c \
		"cat $s/key; echo E=\$E2E_SECRET; test -e ~/.claude/.credentials.json && echo CLAUDE-OK"
	# 4. the guest edits the pinned file; the next run refuses it.
	HOME=$hm RN_STATE_HOME=$st rn_aivmm trust/edit 240 $w -- sh -c \
		'if echo "share_rw = [\"/\"]" >>/work/aivmm.toml 2>/dev/null; then echo EDIT=ok; else echo EDIT=refused; fi'
	HOME=$hm RN_STATE_HOME=$st rn_aivmm trust/after 60 $w -- sh -c 'echo BOOTED'
	if cmp -s $w/aivmm.toml /tmp/trust-hostile; then echo "@@O trust/after 0 E2E-RESULT file=unchanged"; else echo "@@O trust/after 0 E2E-RESULT file=changed"; fi
	# 5. revoke.
	HOME=$hm XDG_STATE_HOME=$st vmmrun trust/revoke 30 -- aivmm trust --revoke $w
	cp /tmp/trust-hostile $w/aivmm.toml
	HOME=$hm RN_STATE_HOME=$st rn_aivmm trust/revoked 60 $w -- sh -c 'echo BOOTED'
	unset E2E_SECRET
}

# protected-paths: a workdir that is a git repository. The guest cannot change the
# files the host runs or reads as config (EROFS, renames over them included), git
# still commits, L1's `git status` runs nothing the guest planted, and a repository
# the guest makes gets no executable hook and its fsmonitor is reported at the stop.
rn_protected() {
	w=/tmp/rn-prot
	rm -rf $w /tmp/l1-pwned* && mkdir -p $w
	# L1's git has no templates: make the hooks directory every `git init` makes.
	(cd $w && git init -q . && mkdir -p .git/hooks && echo base >README && git add README &&
		git -c user.name=l1 -c user.email=l1@e2e commit -q -m base) >/dev/null 2>&1
	echo 'cpus = 1' >$w/aivmm.toml
	before=$(cd $w && sha256sum .git/config aivmm.toml | tr '\n' ' ')
	rn_aivmm protected-paths 240 $w -- bash -c '
		cd /work
		ck() { n=$1; shift; if out=$("$@" 2>&1); then echo "E2E-CHECK $n FAIL it worked"; else
			case "$out" in *"Read-only file system"*) echo "E2E-CHECK $n ok";; *) echo "E2E-CHECK $n FAIL $out";; esac; fi; }
		ck config-append sh -c "printf \"[core]\\n\\tfsmonitor = touch /tmp/l1-pwned-fsmonitor\\n\" >>.git/config"
		ck hook-create sh -c "printf \"#!/bin/sh\\ntouch /tmp/l1-pwned-hook\\n\" >.git/hooks/pre-commit"
		ck aivmm-toml sh -c "echo share_rw = [\\\"/\\\"] >aivmm.toml"
		echo "[core]" >evil && ck config-rename-over mv -f evil .git/config
		echo x >evil2 && ck toml-rename-over mv -f evil2 aivmm.toml
		ck envrc-create sh -c "echo touch /tmp/l1-pwned-envrc >.envrc"
		echo change >>README
		if git -c user.name=g -c user.email=g@e2e commit -q -am guest-commit; then echo "E2E-CHECK guest-commit ok"; else echo "E2E-CHECK guest-commit FAIL"; fi
		mkdir sub && cd sub && git init -q .
		printf "#!/bin/sh\ntouch /tmp/l1-pwned-sub-hook\n" >.git/hooks/post-checkout
		chmod 755 .git/hooks/post-checkout
		git config core.fsmonitor "touch /tmp/l1-pwned-sub"
		echo protected-done'
	after=$(cd $w && sha256sum .git/config aivmm.toml | tr '\n' ' ')
	rn_ck protected-paths l1-config-unchanged [ "$before" = "$after" ]
	rn_ck protected-paths l1-no-hook [ ! -e $w/.git/hooks/pre-commit ]
	rn_ck protected-paths l1-no-envrc [ ! -e $w/.envrc ]
	rn_ck protected-paths l1-guest-commit sh -c "cd $w && [ \$(git rev-list --count HEAD) = 2 ] && git log -1 --format=%s | grep -qx guest-commit"
	(cd $w && git status >/dev/null 2>&1 && git -c user.name=l1 -c user.email=l1@e2e commit -q --allow-empty -m l1-after >/dev/null 2>&1)
	rn_ck protected-paths l1-nothing-ran sh -c "! ls /tmp/l1-pwned* 2>/dev/null"
	rn_ck protected-paths l1-sub-hook-not-executable sh -c "[ -f $w/sub/.git/hooks/post-checkout ] && [ ! -x $w/sub/.git/hooks/post-checkout ]"
}

# agent-hostile: the guest's agent is replaced by `aivmm-agent --hostile MODE` (a
# staged script that execs the real binary from /work): oversized, unknown and
# truncated frames, and a 256 MiB output flood. Each bad one closes the agent's
# channel with a log line naming the problem; the guest goes on (the hostile agent
# sees the close and says so on the console), powers off cleanly, and only then
# does the run end with one error line, no panic, and no aivmm left behind.
rn_agent_hostile() {
	w=/tmp/rn-ah
	rm -rf $w /tmp/ah && mkdir -p $w /tmp/ah
	cp /usr/local/aivmm/aivmm-agent $w/aivmm-agent
	for m in oversized unknown truncated flood; do
		printf '#!/bin/sh\nexec /work/aivmm-agent --hostile %s\n' $m >/tmp/ah/agent-$m
		chmod 755 /tmp/ah/agent-$m
	done
	for m in oversized unknown truncated; do
		AIVMM_AGENT=/tmp/ah/agent-$m rn_aivmm agent-hostile/$m 180 $w -- true
		rn_vmlog agent-hostile/$m $w
		rn_console agent-hostile/$m $w 40
		rn_ck agent-hostile/$m no-aivmm-left sh -c '! pgrep -x aivmm'
	done
	# The flood goes to a file, not through vmmrun to the console.
	t0=$(cut -d. -f1 /proc/uptime)
	XDG_STATE_HOME=$RN_STATE AIVMM_AGENT=/tmp/ah/agent-flood timeout 400 aivmm run --workdir $w \
		--kernel /guest/noclaude/vmlinuz --initrd /guest/noclaude/initrd.cpio --rootfs "$RN_DEV" \
		--net none --cpus 1 --memory 512M --disk-size 1G -- true >/tmp/ah/flood.out 2>/tmp/ah/flood.err
	rc=$?
	echo "@@O agent-hostile/flood 0 E2E-RESULT rc=$rc bytes=$(wc -c </tmp/ah/flood.out) seconds=$(($(cut -d. -f1 /proc/uptime) - t0))"
	sed 's|^|@@O agent-hostile/flood 0 stderr: |' /tmp/ah/flood.err | head -n 5
	rn_ck agent-hostile/flood no-aivmm-left sh -c '! pgrep -x aivmm'
	rm -f /tmp/ah/flood.out
}
