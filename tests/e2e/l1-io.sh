# Sourced by l1-init.sh: the L1 side of the I/O scenarios. L1 prepares the
# host side (files, servers, tap), runs aivmm once, then checks what the guest
# did. Check lines go out as @@O <tag> 0 E2E-CHECK|E2E-RESULT|E2E-FIG ..., so the
# harness sees them as part of that aivmm run (see e2e_io.py).
export HOME=/tmp

now_cs() {
	read -r u _ </proc/uptime
	u=${u%.*}${u#*.}
	while [ "${u#0}" != "$u" ]; do u=${u#0}; done
	echo "${u:-0}"
}
rate() {
	c=$2
	[ "$c" -lt 1 ] && c=1
	v=$(($1 * 1000 / c / 1048576))
	echo "$((v / 10)).$((v % 10))"
}
sha() { sha256sum <"$1" | cut -d' ' -f1; }
# Output for the current run tag $IOTAG.
h() { echo "@@O $IOTAG 0 $*"; }
hck() { # hck NAME CMD...
	n=$1
	shift
	if "$@" >/tmp/hck.out 2>&1; then
		h "E2E-CHECK l1-$n ok"
	else
		h "E2E-CHECK l1-$n FAIL rc=$? $(head -c 300 /tmp/hck.out | tr '\n' ' ')"
	fi
}
hfile() { # hfile NAME PATH PRINTF-FORMAT: PATH holds exactly those bytes
	hck "$1" [ "$(sha "$2" 2>&1)" = "$(printf "$3" | sha256sum | cut -d' ' -f1)" ]
}

# run_io TAG TIMEOUT L2-SCENARIO AIVMM-ARGS...
run_io() {
	IOTAG=$1
	io_t=$2 io_s=$3
	shift 3
	AIVMM_LOG="${AIVMM_LOG:-$LOG}" vmmrun "$IOTAG" "$io_t" -- $IO_CHROOT aivmm run --kernel $L2K --initrd $L2I \
		--cmdline "$BASE aivmm.scenario=$io_s" "$@"
}

# run_qemu_io TAG TIMEOUT L2-SCENARIO QEMU-ARGS...: the same L2 under QEMU microvm
# (KVM, same kernel, initrd and memory as run_io's aivmm default), for side-by-side figures.
run_qemu_io() {
	IOTAG=$1
	io_t=$2 io_s=$3
	shift 3
	vmmrun "$IOTAG" "$io_t" -- qemu-system-x86_64 -L /fw $QEMU_DIAG -M microvm,acpi=on,rtc=on -enable-kvm -cpu host \
		-smp 1 -m 512M -nodefaults -no-user-config -display none -serial stdio -no-reboot \
		-device virtio-rng-device -kernel $L2K -initrd $L2I -append "$BASE aivmm.scenario=$io_s" "$@"
}

io_mods() {
	[ -e /tmp/.io-mods ] && return
	while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done </lib/modules/io-order
	ip link set lo up
	: >/tmp/.io-mods
}

# passt copies L1's default-route interface: give L1 one (an idle tap) and a gateway.
# The addresses a guest reaches as outside hosts live in "the outside", a network
# namespace behind a veth pair, with their servers ($OUT CMD runs CMD there): were
# they L1's own, aivmm's egress policy would close them (it closes the host's own
# addresses, whatever their range).
l1_net() {
	io_mods
	if [ ! -e /tmp/.l1-net ]; then
		# (busybox ip cannot add a dummy link; a tap with no reader does, link down is fine)
		tunctl -t d0 >/dev/null
		ip addr add 10.0.2.15/24 dev d0
		ip link set d0 up
		ip route add default via 10.0.2.2 dev d0
		# L1's own address that a guest behind passt reaches as an outside host: passt runs
		# with --no-map-gw, so the gateway address no longer leads to L1's loopback.
		ip addr add 10.0.96.1/32 dev d0
		# L1's own public-looking address: a guest of aivmm's network must not reach
		# L1's services through it.
		ip addr add 203.0.113.9/32 dev d0
		unshare -n sleep 1000000 &
		echo $! >/tmp/outside.pid
		sleep 0.2
		# busybox ip names the peer itself (vethN): read it back.
		ip link add vo0 type veth peer name vo1
		peer=$(ip -o link show vo0 | sed -n 's/^[0-9]*: vo0@\([^:]*\):.*/\1/p')
		ip link set "$peer" netns "$(cat /tmp/outside.pid)"
		ip addr add 10.0.95.1/24 dev vo0
		ip link set vo0 up
		OUT="nsenter -t $(cat /tmp/outside.pid) -n"
		$OUT ip link set lo up
		$OUT ip addr add 10.0.95.2/24 dev "$peer"
		$OUT ip link set "$peer" up
		$OUT ip route add default via 10.0.95.1
		# Two public-looking addresses (TEST-NET-2, open under aivmm's default egress
		# policy) and a private one (closed by default), with names for the guest's DNS
		# (aivmm answers from L1's resolver: /etc/hosts); the issue's stand-ins: a public
		# address, a private one and the metadata address.
		for a in 198.51.100.1 198.51.100.2 192.168.77.1 203.0.113.1 10.0.98.1 169.254.169.254; do
			$OUT ip addr add $a/32 dev "$peer"
			ip route add $a/32 via 10.0.95.2
		done
		printf '%s\n' '127.0.0.1 localhost' '198.51.100.1 e2e-allowed.test' '198.51.100.2 e2e-other.test' >/etc/hosts
		# passt makes a user namespace (refused to a chrooted process) and pivot_root()s
		# (refused when the root is the initramfs: rootfs has no parent mount). So aivmm
		# (and so passt) runs in its own mount namespace whose root is a recursive bind
		# mount of / moved onto / (what switch_root does): same files, same /tmp.
		mkdir -p /tmp/nr
		mount -o rbind / /tmp/nr
		printf '%s\n' 'cd /tmp/nr && mount --move /tmp/nr / && exec chroot . "$@"' >/tmp/io-nsroot.sh
		: >/tmp/.l1-net
	fi
	OUT="nsenter -t $(cat /tmp/outside.pid) -n"
}

aivmm_rss_kib() { # the VmRSS (KiB) of the running `aivmm run`, 0 if there is none
	for d in /proc/[0-9]*; do
		[ "$(cat $d/comm 2>/dev/null)" = aivmm ] || continue
		set -- $(tr '\0' ' ' <$d/cmdline 2>/dev/null)
		[ "$2" = run ] || continue
		r=$(sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' $d/status)
		echo "${r:-0}"
		return
	done
	echo 0
}
vmm_rss_sum_kib() { # vmm_rss_sum_kib aivmm|qemu: the VmRSS (KiB) of every running VM of that VMM
	k=$1 t=0
	for d in /proc/[0-9]*; do
		c=$(cat $d/comm 2>/dev/null)
		set -- $(tr '\0' ' ' <$d/cmdline 2>/dev/null)
		case "$k:$c:$2" in
		aivmm:aivmm:run | qemu*:qemu-system-x86*) ;;
		*) continue ;;
		esac
		r=$(sed -n 's/^VmRSS:[^0-9]*\([0-9]*\).*/\1/p' $d/status)
		t=$((t + ${r:-0}))
	done
	echo $t
}
wait_file() { # wait_file PATH SECS
	n=0
	while [ ! -e "$1" ] && [ $n -lt $(($2 * 5)) ]; do
		sleep 0.2
		n=$((n + 1))
	done
	[ -e "$1" ]
}
balloon_json() { aivmm balloon /tmp/bal.sock --json 2>&1; }
json_num() { sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; } # json_num KEY <JSON
balloon_driver() { # L1's side of the balloon scenario (run in the background)
	if ! wait_file /tmp/bal/filled 600; then
		h "E2E-CHECK l1-balloon-filled FAIL the guest never filled its cache"
		return
	fi
	full=$(aivmm_rss_kib)
	h "E2E-FIG rss_full_mib=$((full / 1024))"
	: >/tmp/bal/go-drop
	wait_file /tmp/bal/dropped 600 || return
	# From the guest's drop_caches to aivmm's RSS 700 MiB lower: free page
	# reporting (the guest waits 2 s before it reports) and aivmm's discard.
	# Sampled for 15 s (30 at most if it is slower): when it first is 700 MiB
	# lower, and how far it falls.
	t0=$(now_cs)
	low=$full t700=
	while [ $(($(now_cs) - t0)) -lt 1500 ] || [ -z "$t700" -a $(($(now_cs) - t0)) -lt 3000 ]; do
		r=$(aivmm_rss_kib)
		[ "$r" -lt "$low" ] && low=$r
		[ -z "$t700" ] && [ $((full - low)) -ge 716800 ] && t700=$(($(now_cs) - t0))
		sleep 0.2
	done
	t700=${t700:-9999}
	h "E2E-FIG rss_fell_700m_after_s=$((t700 / 100)).$((t700 % 100 / 10)) rss_fell_mib=$(((full - low) / 1024))"
	h "E2E-RESULT balloon_status=$(balloon_json | tr -d ' ' | head -c 600)"
	hck rss-fell-700m [ $((full - low)) -ge 716800 ]
	hck rss-fell-within-10s [ "$t700" -le 1000 ]
	hck reported-free-pages [ "$(balloon_json | json_num reported)" -ge 734003200 ]
	# Inflate to 1.5 GiB; wait until the driver holds it.
	hck balloon-set aivmm balloon /tmp/bal.sock 1536M
	t0=$(now_cs)
	while [ $(($(now_cs) - t0)) -lt 12000 ]; do
		a=$(balloon_json | json_num actual)
		[ "${a:-0}" -ge 1610612736 ] && break
		sleep 0.5
	done
	t1=$(now_cs)
	h "E2E-FIG inflate_1536m_s=$(((t1 - t0) / 100)) rss_inflated_mib=$(($(aivmm_rss_kib) / 1024))"
	hck balloon-inflated [ "${a:-0}" -ge 1610612736 ]
	: >/tmp/bal/inflated
	wait_file /tmp/bal/filled2 600 || return
	j=$(balloon_json)
	a=$(echo "$j" | json_num actual)
	d=$(echo "$j" | json_num deflated)
	h "E2E-FIG deflated_on_oom_mib=$((d / 1048576)) balloon_after_mib=$((a / 1048576))"
	hck deflated-on-oom [ "${d:-0}" -gt 0 -a "${a:-0}" -lt 1610612736 ]
	hck guest-stats sh -c 'aivmm balloon /tmp/bal.sock | grep -q "free_memory: "'
	: >/tmp/bal/done
}

tcp_servers() { # [PREFIX] 5001: guest->L1 sink; 5002: L1->guest 32 MiB source (PREFIX: $OUT)
	head -c 33554432 /dev/urandom >/tmp/net-down
	h "E2E-RESULT h_down_sha=$(sha /tmp/net-down)"
	rm -f /tmp/net-up
	$1 socat -u TCP-LISTEN:5001,reuseaddr OPEN:/tmp/net-up,creat,trunc &
	SP1=$!
	$1 socat -u OPEN:/tmp/net-down TCP-LISTEN:5002,reuseaddr &
	SP2=$!
}
tcp_collect() {
	sleep 1
	kill $SP1 $SP2 2>/dev/null
	h "E2E-RESULT h_up_sha=$(sha /tmp/net-up 2>/dev/null)"
	rm -f /tmp/net-up /tmp/net-down
}

io_fs_check() { # after the fs scenario: what the guest did in /tmp/share/w
	IOTAG=fs
	W=/tmp/share/w
	hfile a.txt $W/a.txt 'E2E-A1\nE2E-A2\n'
	hfile m2 $W/m2 'E2E-MV\n'
	hck m1-gone [ ! -e $W/m1 ]
	hck symlink [ "$(readlink $W/sl)" = a.txt ]
	hck linkcount [ "$(stat -c %h $W/a.txt)" = 2 ]
	hck hardlink-inode [ "$(stat -c %i $W/a.txt)" = "$(stat -c %i $W/hl)" ]
	hck d2-gone [ ! -e $W/d2 ]
	hfile d1/f $W/d1/f 'E2E-IN\n'
	hck chmod [ "$(stat -c %a $W/ex)" = 750 ]
	hfile ex $W/ex 'E2E-X\n'
	hfile truncate $W/tr '0123'
	hck del-gone [ ! -e $W/del ]
	h "E2E-RESULT h_big_sha=$(sha $W/big 2>&1) h_big_size=$(stat -c %s $W/big 2>&1)"
	hck git-log [ "$(git -c safe.directory='*' -C $W/repo log --format=%s 2>&1)" = e2e-commit ]
	hck git-fsck git -c safe.directory='*' -C $W/repo fsck --strict
	hck git-show [ "$(git -c safe.directory='*' -C $W/repo show HEAD:f.txt 2>&1)" = E2E-GIT ]
	hck git-author [ "$(git -c safe.directory='*' -C $W/repo log --format=%an/%ae 2>&1)" = e2e/e2e@example.invalid ]
	hck creates [ "$(ls $W/many | wc -l)" = 500 ]
	rm -rf $W
}

io_blk_ext4() { # after blk: a second run makes an ext2 fs (busybox mke2fs) and writes files
	rm -f /tmp/ext.img
	dd if=/dev/zero of=/tmp/ext.img bs=1M count=32 2>/dev/null
	run_io blk/ext4 120 blk-ext4 --disk /tmp/ext.img
	hck e2fsck e2fsck -fn /tmp/ext.img
	hck ext-hello [ "$(debugfs -R 'cat /hello.txt' /tmp/ext.img 2>/dev/null)" = E2E-EXT-HELLO ]
	hck ext-symlink sh -c "debugfs -R 'stat /sl' /tmp/ext.img 2>/dev/null | grep -q 'Fast link dest: \"hello.txt\"'"
	rm -f /tmp/ext-rand.bin
	debugfs -R 'dump /dir/rand.bin /tmp/ext-rand.bin' /tmp/ext.img >/dev/null 2>&1
	h "E2E-RESULT h_ext_sha=$(sha /tmp/ext-rand.bin 2>&1)"
	rm -f /tmp/ext.img /tmp/ext-rand.bin
}

io_scenario() {
	IOTAG=$1
	case "$1" in
	fs-ro)
		rm -rf /tmp/share-ro && mkdir -p /tmp/share-ro/sub
		echo E2E-RO-HELLO >/tmp/share-ro/hello.txt
		echo E2E-RO-INNER >/tmp/share-ro/sub/inner.txt
		before=$(find /tmp/share-ro -exec stat -c '%n %s %a %h %Y' {} \; | sort | sha256sum)
		run_io fs-ro 120 fs-ro --share /tmp/share-ro:e2e:ro
		after=$(find /tmp/share-ro -exec stat -c '%n %s %a %h %Y' {} \; | sort | sha256sum)
		hck share-unchanged [ "$before" = "$after" ]
		;;
	fs-many)
		rm -rf /tmp/share-many && mkdir -p /tmp/share-many
		# 300 s: 2000 creates (four FUSE round trips each) took 67 s at 30/s on a slow
		# L1; past 120 s vmmrun killed a guest still at work, and its vCPU was unkillable.
		run_io fs-many 300 fs-many --share /tmp/share-many:e2e
		hck creates [ "$(ls /tmp/share-many/many | wc -l)" = 2000 ]
		rm -rf /tmp/share-many
		;;
	fs-escape)
		rm -rf /tmp/esc && mkdir -p /tmp/esc/share/sub
		M="E2E-SECRET-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
		echo "$M" >/tmp/esc/e2e-secret.txt
		ln -s /tmp/esc/e2e-secret.txt /tmp/esc/share/abs
		ln -s ../e2e-secret.txt /tmp/esc/share/rel
		ln -s ../../e2e-secret.txt /tmp/esc/share/sub/deep
		ln -s /tmp/esc /tmp/esc/share/dirlink
		echo E2E-ESC-OK >/tmp/esc/share/sub/ok.txt
		run_io fs-escape 120 fs-escape --share /tmp/esc/share:e2e
		hck secret-intact [ "$(cat /tmp/esc/e2e-secret.txt)" = "$M" ]
		hck outside-untouched [ "$(ls -a /tmp/esc | tr '\n' ' ')" = ". .. e2e-secret.txt share " ]
		h "E2E-RESULT l1_share_after=$(ls -a /tmp/esc/share | tr '\n' ,)"
		;;
	blk-ro)
		rm -f /tmp/ro.img
		dd if=/dev/zero of=/tmp/ro.img bs=1M count=16 2>/dev/null
		echo E2E-DISK-PATTERN | dd of=/tmp/ro.img conv=notrunc 2>/dev/null
		before=$(sha /tmp/ro.img)
		run_io blk-ro 120 blk-ro --disk /tmp/ro.img:ro
		hck image-unchanged [ "$before" = "$(sha /tmp/ro.img)" ]
		rm -f /tmp/ro.img
		;;
	balloon)
		# A 2 GiB guest fills 1 GiB of page cache from a (sparse) disk, then drops
		# it: free page reporting must give it back (aivmm's RSS falls by 700 MiB
		# within 10 s). Then the balloon is inflated to 1.5 GiB and the guest needs
		# 768 MiB: it must deflate (DEFLATE_ON_OOM) without an OOM kill.
		rm -rf /tmp/bal /tmp/bal.img /tmp/bal.sock && mkdir -p /tmp/bal
		dd if=/dev/zero of=/tmp/bal.img bs=1M count=0 seek=1024 2>/dev/null
		balloon_driver &
		BD=$!
		run_io balloon 600 balloon --memory 2G --disk /tmp/bal.img:ro --share /tmp/bal:e2e --control /tmp/bal.sock
		# The guest waits for the driver's last step, so it is done, or stuck
		# waiting for a guest that is gone.
		kill $BD 2>/dev/null
		wait $BD 2>/dev/null
		rm -rf /tmp/bal /tmp/bal.img
		;;
	density)
		# Four idle 1 GiB VMs side by side, aivmm's and then QEMU microvm's (the
		# same kernel and initrd): the total RSS of the four VMM processes.
		# QEMU twice: as its users run it, and with a free page reporting balloon.
		for kind in aivmm qemu qemu-fpr; do
			rm -f /tmp/dens-*.log
			pids=
			for i in 1 2 3 4; do
				if [ $kind = aivmm ]; then
					(run_io density/aivmm/$i 300 density --memory 1G | tee /tmp/dens-$i.log) &
					pids="$pids $!"
				elif [ $kind = qemu ]; then
					(run_qemu_io density/qemu/$i 300 density -m 1G | tee /tmp/dens-$i.log) &
					pids="$pids $!"
				else
					(run_qemu_io density/qemu-fpr/$i 300 density -m 1G \
						-device virtio-balloon-device,free-page-reporting=on | tee /tmp/dens-$i.log) &
					pids="$pids $!"
				fi
			done
			t0=$(now_cs)
			while [ "$(cat /tmp/dens-*.log 2>/dev/null | grep -c E2E-IDLE)" -lt 4 ] && [ $(($(now_cs) - t0)) -lt 24000 ]; do
				sleep 0.5
			done
			# Settle: the guests' free page reporting waits 2 s.
			sleep 10
			IOTAG=density
			n=$(cat /tmp/dens-*.log | grep -c E2E-IDLE)
			h "E2E-FIG density_${kind}_idle_vms=$n density_${kind}_rss_mib=$(($(vmm_rss_sum_kib $kind) / 1024))"
			hck density-$kind-four-idle [ "$n" = 4 ]
			wait $pids
		done
		;;
	net)
		l1_net
		tcp_servers "$OUT"
		# While aivmm runs: is there a passt process? (There must not be: the
		# network is a thread of aivmm.) Seen counts prove the sampler saw aivmm.
		rm -f /tmp/net-ps && (
			a=0 p=0
			for _ in $(seq 1 600); do
				ps >/tmp/ps.out 2>/dev/null
				grep -q '[a]ivmm run' /tmp/ps.out && a=$((a + 1))
				grep -q '[p]asst' /tmp/ps.out && p=$((p + 1))
				echo "$a $p" >/tmp/net-ps
				[ -e /tmp/net-ps-stop ] && break
				sleep 0.5
			done
		) &
		rm -f /tmp/net-ps-stop
		run_io net 150 net --net user
		: >/tmp/net-ps-stop
		sleep 1
		tcp_collect
		read -r seen_aivmm seen_passt </tmp/net-ps
		hck no-passt [ "$seen_aivmm" -gt 0 ] && [ "$seen_passt" = 0 ]
		h "E2E-RESULT ps_samples_with_aivmm=$seen_aivmm with_passt=$seen_passt"
		;;
	net-policy)
		# The default policy: one listener on every address of the outside and of L1,
		# so a refusal is the policy's.
		l1_net
		$OUT socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OUTSIDE-OK" &
		P1=$!
		socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OWN-ADDRESS" &
		P2=$!
		run_io net-policy 120 net-policy --net user
		kill $P1 $P2 2>/dev/null
		;;
	net-dns)
		# A name only L1's own DNS server knows: aivmm must answer from L1's resolver.
		l1_net
		tinydns e2e-dns-only.test=203.0.113.7 &
		P1=$!
		echo "nameserver 127.0.0.1" >/etc/resolv.conf
		run_io net-dns 120 net-dns --net user
		rm -f /etc/resolv.conf
		kill $P1 2>/dev/null
		;;
	net-many)
		l1_net
		$OUT tinydns --hold 5010 &
		P1=$!
		$OUT socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OUTSIDE-OK" &
		P2=$!
		# aivmm's own memory (every mapping but the 512 MiB of guest RAM), sampled
		# while the guest holds 2,000 connections: the peak, in KiB.
		rm -f /tmp/many-rss /tmp/many-stop && (
			peak=0
			while [ ! -e /tmp/many-stop ]; do
				for d in /proc/[0-9]*; do
					grep -q '^aivmm' $d/comm 2>/dev/null || continue
					r=$(awk '/^Size:/{s=$2} /^Rss:/{if (s != 524288) t += $2} END{print t+0}' $d/smaps 2>/dev/null)
					[ "${r:-0}" -gt "$peak" ] && peak=$r
				done
				echo $peak >/tmp/many-rss
				sleep 0.5
			done
		) &
		run_io net-many 180 net-many --net user
		: >/tmp/many-stop
		sleep 1
		kill $P1 $P2 2>/dev/null
		peak=$(cat /tmp/many-rss)
		h "E2E-RESULT many_aivmm_rss_peak_kib=$peak"
		# The documented bound: 64 MiB of network buffers at most, plus aivmm itself.
		hck rss-bound [ "$peak" -gt 0 -a "$peak" -lt 98304 ]
		;;
	net-allow)
		l1_net
		$OUT socat TCP-LISTEN:5005,reuseaddr,fork SYSTEM:"echo E2E-PRIVATE-OK" &
		P1=$!
		socat TCP-LISTEN:5004,bind=127.0.0.1,reuseaddr,fork SYSTEM:"echo L1-LOOPBACK-ALLOWED" &
		P2=$!
		socat TCP-LISTEN:5007,bind=127.0.0.1,reuseaddr,fork SYSTEM:"echo L1-LOOPBACK-SECRET" &
		P3=$!
		$OUT socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OUTSIDE-OK" &
		P4=$!
		# Pings leave through aivmm's unprivileged ICMP socket, which Linux allows only
		# to the groups in this range (systemd opens it to all; the initramfs has not).
		echo "0 2147483647" >/proc/sys/net/ipv4/ping_group_range
		run_io net-allow 120 net-allow --net user --net-allow 192.168.77.0/24 --net-allow 127.0.0.1:5004
		kill $P1 $P2 $P3 $P4 2>/dev/null
		;;
	net-allow-only)
		l1_net
		$OUT socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OUTSIDE-OK" &
		P1=$!
		$OUT socat TCP-LISTEN:5006,reuseaddr,fork SYSTEM:"echo L1-OTHER-PORT" &
		P2=$!
		run_io net-allow-only 120 net-allow-only --net user --net-allow-only e2e-allowed.test:5003
		kill $P1 $P2 2>/dev/null
		;;
	host-loopback)
		# A secret on L1's loopback only, a control on all addresses: the guest must
		# get the control through L1's public-looking address and never the secret
		# through the gateway (aivmm's egress policy closes the host's loopback).
		l1_net
		socat TCP-LISTEN:5004,bind=127.0.0.1,reuseaddr,fork SYSTEM:"echo L1-LOOPBACK-SECRET" &
		LP1=$!
		$OUT socat TCP-LISTEN:5003,reuseaddr,fork SYSTEM:"echo L1-OUTSIDE-OK" &
		LP2=$!
		IO_CHROOT="unshare -m /bin/sh /tmp/io-nsroot.sh" run_io host-loopback 150 host-loopback --net user
		kill $LP1 $LP2 2>/dev/null
		;;
	forward | net-passt)
		l1_net
		FWDNET=user
		[ "$1" = net-passt ] && FWDNET=passt
		rm -f /tmp/fwd-got
		(
			i=0
			while [ $i -lt 120 ]; do
				# passt accepts at once, even before the guest listens, and a SYN it
				# sends a guest without an address is not retried: an idle connection is
				# dropped (-T) and made again. The client speaks first, as HTTP does:
				# bookworm's passt does not ACK the guest's SYN-ACK until the host side
				# sends data, so a server-speaks-first exchange would stall.
				{ echo GET; sleep 15; } | socat -T 10 - TCP:127.0.0.1:18080,connect-timeout=5 >/tmp/fwd-got 2>/dev/null
				h "E2E-INFO forward attempt $i: $(wc -c </tmp/fwd-got) bytes"
				[ "$(wc -c </tmp/fwd-got 2>/dev/null)" = 1048576 ] && break
				sleep 1
				i=$((i + 1))
			done
		) &
		FP=$!
		IO_CHROOT="unshare -m /bin/sh /tmp/io-nsroot.sh" run_io "$1" 150 forward --net $FWDNET --forward 18080:8080
		kill $FP 2>/dev/null
		h "E2E-RESULT h_fwd_sha=$(sha /tmp/fwd-got 2>&1)"
		rm -f /tmp/fwd-got
		;;
	net-tap)
		io_mods
		if ! ip link show tap0 >/dev/null 2>&1; then
			tunctl -t tap0 >/dev/null
			ip addr add 10.0.99.1/24 dev tap0
			ip link set tap0 up
		fi
		tcp_servers
		run_io net-tap 150 net-tap --net tap:tap0
		tcp_collect
		IOTAG=net-tap/qemu
		tcp_servers
		run_qemu_io net-tap/qemu 150 net-tap -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off \
			-device virtio-net-device,netdev=n0
		tcp_collect
		;;
	vsock)
		rm -f /tmp/vs.sock /tmp/vs.sock_5000 /tmp/v-up
		head -c 16777216 /dev/urandom >/tmp/v-down
		IOTAG=vsock
		h "E2E-RESULT h_vdown_sha=$(sha /tmp/v-down)"
		socat -u UNIX-LISTEN:/tmp/vs.sock_5000 OPEN:/tmp/v-up,creat,trunc &
		UP=$!
		(
			# Once the guest's upload is in, its listener on port 5001 is up.
			while kill -0 $UP 2>/dev/null; do sleep 0.2; done
			t0=$(now_cs)
			(printf 'CONNECT 5001\n' && cat /tmp/v-down) | socat -u - UNIX-CONNECT:/tmp/vs.sock
			rc=$?
			t1=$(now_cs)
			h "E2E-CHECK l1-host-connect $([ $rc = 0 ] && echo ok || echo "FAIL socat rc=$rc")"
			h "E2E-FIG vsock_down_MiBps=$(rate 16777216 $((t1 - t0)))"
		) &
		DP=$!
		run_io vsock 150 vsock --vsock /tmp/vs.sock
		kill $UP $DP 2>/dev/null
		h "E2E-RESULT h_vup_sha=$(sha /tmp/v-up 2>&1) h_vup_bytes=$(stat -c %s /tmp/v-up 2>&1)"
		rm -f /tmp/v-up /tmp/v-down
		;;
	esac
}
