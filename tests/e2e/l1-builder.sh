# Sourced by l1-init.sh: the L1 side of the builder scenarios (tests/e2e/e2e_builder.py).
# `aivmm builder serve` runs in L1 with the Debian builder image (kernel and initrd
# in L1's initramfs under /guest/builder, the rootfs the read-only disk with serial
# e2e-builder); L1's own ssh client talks to it. Lines go out as
# @@O <tag> 0 E2E-CHECK|E2E-FIG|E2E-RESULT ... (judged by e2e_builder.py).
BSTATE=/tmp/bstate
BPORT=31022

bh() { echo "@@O $BTAG 0 $*"; }
bck() { # bck NAME CMD...: a check line from the command's status
	n=$1
	shift
	if "$@" >/tmp/bck.out 2>&1; then
		bh "E2E-CHECK $n ok"
	else
		bh "E2E-CHECK $n FAIL rc=$? $(head -c 300 /tmp/bck.out | tr '\n' ' ')"
	fi
}
bstatus() { sed -n "s/^$1=//p" $BSTATE/status 2>/dev/null; }
# bssh TAG CMD...: one ssh session through the builder's port, timed by vmmrun.
bssh() {
	t=$1
	shift
	vmmrun "$t" 400 -- ssh -p $BPORT -i $BSTATE/ssh/id_ed25519 -o IdentitiesOnly=yes \
		-o UserKnownHostsFile=$BSTATE/ssh/known_hosts -o StrictHostKeyChecking=yes \
		-o BatchMode=yes -o LogLevel=ERROR builder@127.0.0.1 "$@"
}
# wait_state STATE SECS: until the status file says STATE; prints the seconds waited.
wait_state() {
	w=0
	while [ "$(bstatus state)" != "$1" ] && [ $w -lt "$2" ]; do
		sleep 1
		w=$((w + 1))
	done
	echo $w
}

# builder_start TAG IDLE: starts `aivmm builder serve` in the background.
builder_start() {
	btag=$1 idle=$2
	dev=$(guest_disk builder)
	if [ -z "$dev" ]; then
		bh "E2E-CHECK rootfs-disk FAIL no L1 disk with serial e2e-builder"
		return 1
	fi
	[ -s /lib/modules/builder-order ] && while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </lib/modules/builder-order
	ip link set lo up
	rm -rf $BSTATE
	# Keep the VM's stderr and serve's log in the scenario log (`--log -`).
	AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$btag" 1500 -- aivmm builder serve --state-dir $BSTATE --port $BPORT \
		--cpus 1 --memory 1G --disk-size 2G --net none --idle "$idle" --boot-timeout 300 \
		--kernel /guest/builder/vmlinuz --initrd /guest/builder/initrd.cpio --rootfs "$dev" --log - &
	BVMMRUN=$!
	w=0
	until [ -s $BSTATE/status ] && netstat -ltn 2>/dev/null | grep -q "127.0.0.1:$BPORT "; do
		sleep 0.2
		w=$((w + 1))
		[ $w -lt 300 ] || { bh "E2E-CHECK serve-listens FAIL no listener after 60 s"; return 1; }
	done
	BPID=$(bstatus pid)
}

builder_stop() {
	[ -n "$BPID" ] && kill -TERM "$BPID" 2>/dev/null
	w=0
	while kill -0 "$BPID" 2>/dev/null && [ $w -lt 60 ]; do
		sleep 1
		w=$((w + 1))
	done
	bck serve-stops-on-sigterm sh -c "! kill -0 $BPID 2>/dev/null"
	wait $BVMMRUN 2>/dev/null
	bck no-vm-left sh -c "! ps -o args | grep -v grep | grep -q 'aivmm run --kernel'"
	for f in $BSTATE/console.log; do
		[ -f "$f" ] && tail -n 20 "$f" | sed "s|^|@@O $BTAG/console 0 |"
	done
	# The guest's own logs, from its state disk (the overlay's upper layer).
	for l in sshd vsock-ssh nix-daemon; do
		debugfs -R "cat /upper/var/log/$l.log" $BSTATE/disk.img 2>/dev/null | tail -n 15 | sed "s|^|@@O $BTAG/guest-$l 0 |"
	done
}

builder_scenario() {
	case "$1" in
	builder)
		BTAG=builder
		builder_start builder/serve 20s || return
		bh "E2E-CHECK serve-listens ok"
		bck keys-0600 sh -c "[ \$(stat -c %a $BSTATE/guest/ssh_host_ed25519_key) = 600 ] && [ \$(stat -c %a $BSTATE/ssh/id_ed25519) = 600 ]"
		bck off-before-use [ "$(bstatus state)" = off ]
		bck no-vm-before-use sh -c "! ps -o args | grep -v grep | grep -q 'aivmm run --kernel'"
		aivmm builder status --state-dir $BSTATE | sed "s|^|@@O builder/status-before 0 |"

		# Loopback only: nothing listens for the port on another address, a connect to
		# L1's other address is refused, while a control listener on 0.0.0.0 is reachable there.
		netstat -ltn 2>/dev/null | grep ":$BPORT " | sed "s|^|@@O builder 0 listen: |"
		bck listen-loopback-only sh -c "[ \"\$(netstat -ltn | grep ':$BPORT ' | awk '{print \$4}')\" = 127.0.0.1:$BPORT ]"
		tunctl -t b0 >/dev/null 2>&1
		ip addr add 10.0.98.1/24 dev b0
		ip link set b0 up
		socat -u TCP-LISTEN:31023,bind=0.0.0.0,reuseaddr OPEN:/tmp/b-control,creat,trunc &
		sleep 0.5
		bck other-address-control sh -c "echo reachable | socat -u - TCP:10.0.98.1:31023,connect-timeout=5"
		sleep 0.3
		bck other-address-control-data [ "$(cat /tmp/b-control 2>/dev/null)" = reachable ]
		bck port-refused-on-10.0.98.1 sh -c "! echo x | socat -u - TCP:10.0.98.1:$BPORT,connect-timeout=5"
		bck still-off-after-refused [ "$(bstatus state)" = off ]

		# Cold: the connection boots the VM, and uname answers from the guest.
		bssh builder/ssh-cold uname -a
		bck running-after-ssh [ "$(bstatus state)" = running ]
		bck one-boot [ "$(bstatus boots)" = 1 ]
		bssh builder/ssh-info 'echo "E2E-RESULT g_user=$(id -un) g_host=$(hostname) g_nix=$(nix-store --version | tr " " _)"'
		bh "E2E-RESULT l1_uname=$(uname -a | tr ' ' _)"
		# A real build through the guest's nix-daemon, as the builder user.
		bssh builder/ssh-nix 'p=$(nix-build --no-out-link --option substituters "" -E '"'"'derivation { name = "e2e"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo built-in-guest > $out" ]; }'"'"') && echo "E2E-RESULT g_build=$(cat $p) g_path=$p"'
		# Warm: the same VM.
		bssh builder/ssh-warm uname -a
		bck warm-same-boot [ "$(bstatus boots)" = 1 ]
		aivmm builder status --state-dir $BSTATE | sed "s|^|@@O builder/status-running 0 |"

		# Idle: with --idle 20s the VM stops by itself; the next connection starts it again.
		waited=$(wait_state off 180)
		bh "E2E-FIG idle_stop_after_s=$waited"
		bck idle-stop [ "$(bstatus state)" = off ]
		bck vm-process-gone sh -c "! ps -o args | grep -v grep | grep -q 'aivmm run --kernel'"
		bssh builder/ssh-again uname -a
		bck second-boot [ "$(bstatus boots)" = 2 ]
		aivmm builder status --state-dir $BSTATE | sed "s|^|@@O builder/status-after 0 |"
		builder_stop
		;;
	builder-nix)
		# A host's Nix builds through the builder, set up as `aivmm builder install`
		# tells a user to: its machines file, and its ssh_config in the system's.
		BTAG=builder-nix
		builder_start builder-nix/serve 60s || return
		vmmrun builder-nix/install 120 -- aivmm builder install --write --state-dir $BSTATE \
			--port $BPORT --cpus 1 --unit-dir /tmp/bunits
		bck install-wrote-machines [ -s $BSTATE/nix/machines ]
		sed "s|^|@@O builder-nix 0 machines: |" $BSTATE/nix/machines
		bck machines-offer-kvm grep -q ' kvm,nixos-test,' $BSTATE/nix/machines
		mkdir -p /etc/ssh /etc/nix /root /nix/store /nix/var/nix
		echo "Include $BSTATE/ssh/config" >/etc/ssh/ssh_config
		# Root's Nix in L1 without a daemon or build users; no binary cache (no network).
		printf 'build-users-group =\nsandbox = false\nsubstituters =\n' >/etc/nix/nix.conf
		cat >/tmp/remote.nix <<'EOF'
{ nonce }:
let
  sh = name: extra: script:
    derivation ({
      inherit name nonce;
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" script ];
      PATH = "/usr/bin:/bin";
    } // extra);
in
{
  plain = sh "e2e-remote" { } "echo host=$(uname -n) kernel=$(uname -r) uid=$(id -u) >$out";
  kvm = sh "e2e-remote-kvm" { requiredSystemFeatures = [ "kvm" ]; }
    "test -w /dev/kvm && echo kvm=writable host=$(uname -n) >$out";
}
EOF
		bck off-before-build [ "$(bstatus state)" = off ]
		nonce=$(cat /proc/sys/kernel/random/uuid)
		for a in plain kvm; do
			# --max-jobs 0: L1 builds nothing itself. The first build's connection boots the VM.
			vmmrun "builder-nix/build-$a" 600 -- nix-build /tmp/remote.nix -A $a --argstr nonce "$nonce" \
				--max-jobs 0 --builders "@$BSTATE/nix/machines" -o /tmp/result-$a
			if [ -e /tmp/result-$a ]; then
				bh "E2E-RESULT $a=$(tr ' ' , </tmp/result-$a)"
				bck "$a-valid-in-l1-store" nix-store --check-validity "$(readlink /tmp/result-$a)"
			else
				bh "E2E-CHECK $a-valid-in-l1-store FAIL no result"
			fi
		done
		bck plain-built-in-guest grep -q '^host=aivmm ' /tmp/result-plain
		bck kvm-built-with-dev-kvm grep -q '^kvm=writable host=aivmm$' /tmp/result-kvm
		bck running-after-build [ "$(bstatus state)" = running ]
		bck one-boot [ "$(bstatus boots)" = 1 ]
		builder_stop
		;;
	builder-bench)
		BTAG=builder-bench
		builder_start builder-bench/serve 15s || return
		for i in 1 2; do
			bssh "builder-bench/cold$i" true
			for j in 1 2 3; do
				bssh "builder-bench/warm$i.$j" true
			done
			[ $i = 2 ] || bh "E2E-FIG wait_off_s=$(wait_state off 180)"
		done
		bh "E2E-RESULT boots=$(bstatus boots) last_boot_ms=$(bstatus last_boot_ms)"
		builder_stop
		;;
	esac
}
