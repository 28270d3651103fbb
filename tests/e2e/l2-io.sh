# Sourced by l2-init.sh: the guest side of the I/O scenarios (fs extras, fs-ro,
# fs-escape, blk-ext4, blk-ro, net, forward, vsock, net-tap). Prints
#   E2E-CHECK <name> ok|FAIL <why>   one check (the harness fails on any FAIL)
#   E2E-RESULT g_<key>=<v>           values the harness compares with L1's h_<key>
#   E2E-FIG <key>=<v>                figures shown on the PASS line
export HOME=/tmp

now_cs() { # /proc/uptime in centiseconds, without forking
	read -r u _ </proc/uptime
	u=${u%.*}${u#*.}
	while [ "${u#0}" != "$u" ]; do u=${u#0}; done
	echo "${u:-0}"
}

rate() { # rate BYTES CS -> MiB/s with one decimal
	c=$2
	[ "$c" -lt 1 ] && c=1
	v=$(($1 * 1000 / c / 1048576))
	echo "$((v / 10)).$((v % 10))"
}

refused() { # refused NAME HOST:PORT: the connection is refused (a RST) within 2 s
	t0=$(now_cs)
	got=$(timeout 20 socat -u TCP:$2,connect-timeout=10 - 2>&1 | head -c 200 | tr '\n' ' ')
	t1=$(now_cs)
	case "$got" in
	*"Connection refused"*)
		if [ $((t1 - t0)) -lt 200 ]; then
			echo "E2E-CHECK $1 ok ($2 refused in $((t1 - t0))0 ms)"
		else
			echo "E2E-CHECK $1 FAIL $2 refused only after $((t1 - t0))0 ms"
		fi
		;;
	*) echo "E2E-CHECK $1 FAIL $2: ${got:-nothing}" ;;
	esac
}

ck() { # ck NAME CMD...: one check line
	n=$1
	shift
	if "$@" >/tmp/ck.out 2>&1; then
		echo "E2E-CHECK $n ok"
	else
		echo "E2E-CHECK $n FAIL rc=$? $(head -c 200 /tmp/ck.out | tr '\n' ' ')"
	fi
}

erofs() { # erofs NAME CMD...: CMD must fail with "Read-only file system"
	n=$1
	shift
	out=$("$@" 2>&1)
	rc=$?
	case "$out" in
	*"Read-only file system"*) [ $rc -ne 0 ] && echo "E2E-CHECK erofs-$n ok" && return ;;
	esac
	echo "E2E-CHECK erofs-$n FAIL rc=$rc: $(echo "$out" | head -c 200 | tr '\n' ' ')"
}

sha() { sha256sum <"$1" | cut -d' ' -f1; }

cache_mib() { # the page cache: files (Cached) and block devices (Buffers), MiB
	awk '/^(Buffers|Cached):/ { k += $2 } END { print int(k / 1024) }' /proc/meminfo
}

wait_for() { # wait_for FILE SECS: until FILE exists (a note from L1 in the share)
	n=0
	while [ ! -e "$1" ] && [ $n -lt $(($2 * 5)) ]; do
		sleep 0.2
		n=$((n + 1))
	done
	[ -e "$1" ] || echo "E2E-CHECK wait-$(basename "$1") FAIL no $1 after $2 s"
}

mount_share() {
	load_mods fs
	mkdir -p /mnt
	ck mount mount -t virtiofs e2e /mnt
}

creates() { # creates DIR N: N empty files (a regular builtin: a failed redirect must not end init)
	mkdir $1
	t4=$(now_cs)
	i=0 bad=0
	while [ $i -lt $2 ]; do
		true >$1/f$i 2>/dev/null || bad=$((bad + 1))
		i=$((i + 1))
	done
	t5=$(now_cs)
	got=$(ls $1 | wc -l)
	if [ "$got" = $2 ] && [ $bad = 0 ]; then
		echo "E2E-CHECK creates ok"
	else
		echo "E2E-CHECK creates FAIL $got of $2 files exist, $bad creates failed: $(true >$1/again 2>&1)"
	fi
	c=$((t5 - t4))
	[ $c -lt 1 ] && c=1
	CPS=$(($2 * 100 / c))
}

io_fs_extra() { # called by the fs scenario with the share on /mnt
	W=/mnt/w
	ck mkdir mkdir -p $W/d1
	ck create sh -c "echo E2E-A1 >$W/a.txt"
	ck append sh -c "echo E2E-A2 >>$W/a.txt"
	ck rename sh -c "echo E2E-MV >$W/m1 && mv $W/m1 $W/m2 && [ ! -e $W/m1 ]"
	ck symlink ln -s a.txt $W/sl
	ck hardlink ln $W/a.txt $W/hl
	ck linkcount-guest sh -c "[ \$(stat -c %h $W/a.txt) = 2 ]"
	ck rmdir sh -c "mkdir $W/d2 && rmdir $W/d2 && [ ! -e $W/d2 ]"
	ck chmod sh -c "echo E2E-X >$W/ex && chmod 750 $W/ex && [ \$(stat -c %a $W/ex) = 750 ]"
	ck truncate sh -c "printf 0123456789 >$W/tr && truncate -s 4 $W/tr && [ \$(cat $W/tr) = 0123 ]"
	ck subdir-file sh -c "echo E2E-IN >$W/d1/f"
	ck unlink sh -c "echo gone >$W/del && rm $W/del && [ ! -e $W/del ]"
	head -c 4194304 /dev/urandom >/tmp/r4
	echo "E2E-RESULT g_big_sha=$(sha /tmp/r4)"
	ck dd-4m-fsync dd if=/tmp/r4 of=$W/big bs=1M conv=fsync
	echo 3 >/proc/sys/vm/drop_caches
	ck big-readback sh -c "[ \$(sha256sum <$W/big | cut -d' ' -f1) = $(sha /tmp/r4) ]"
	rm -f /tmp/r4
	ck git-commit sh -c "mkdir $W/repo && cd $W/repo && git init -q && echo E2E-GIT >f.txt && git add f.txt &&
		git -c user.name=e2e -c user.email=e2e@example.invalid commit -q -m e2e-commit"
	# Figures: sequential write/read of 64 MiB, then 2000 creates.
	sync
	t0=$(now_cs)
	dd if=/dev/zero of=$W/seq bs=1M count=64 conv=fsync 2>/dev/null
	t1=$(now_cs)
	echo 3 >/proc/sys/vm/drop_caches
	t2=$(now_cs)
	n=$(dd if=$W/seq bs=1M 2>/dev/null | wc -c)
	t3=$(now_cs)
	ck seq-read-size [ "$n" = 67108864 ]
	rm -f $W/seq
	creates $W/many ${FS_CREATES:-500}
	echo "E2E-FIG fs_write_MiBps=$(rate 67108864 $((t1 - t0))) fs_read_MiBps=$(rate 67108864 $((t3 - t2))) fs_creates_per_s=$CPS"
}

dhcp() {
	cat >/tmp/udhcpc.sh <<'EOF'
#!/bin/sh
case "$1" in
bound | renew)
	# The MTU as the guest image applies it (passt and aivmm offer 65520).
	[ -z "$mtu" ] || ip link set dev "$interface" mtu "$mtu"
	ifconfig "$interface" "$ip" netmask "$subnet" up
	for r in $router; do route add default gw "$r" dev "$interface"; break; done
	echo "E2E-RESULT dhcp_ip=$ip dhcp_router=$router dhcp_dns=$(echo $dns | tr ' ' ,) dhcp_mtu=$mtu"
	;;
esac
EOF
	chmod 755 /tmp/udhcpc.sh
	ip link set lo up
	ip link set eth0 up
	ck dhcp udhcpc -i eth0 -s /tmp/udhcpc.sh -n -q -t 10 -T 2 -O mtu
	grep -q 'eth0:' /proc/net/dev || echo "E2E-CHECK eth0 FAIL no eth0"
	GW=$(ip route | sed -n 's/^default via \([0-9.]*\).*/\1/p')
	echo "E2E-RESULT gw=$GW"
}

tcp_xfer() { # tcp_xfer HOST: 32 MiB each way against L1's socat servers on 5001/5002
	head -c 33554432 /dev/urandom >/tmp/r32
	echo "E2E-RESULT g_up_sha=$(sha /tmp/r32)"
	t0=$(now_cs)
	ck tcp-up timeout 90 socat -u OPEN:/tmp/r32 TCP:$1:5001
	t1=$(now_cs)
	rm -f /tmp/r32
	ck tcp-down timeout 90 socat -u TCP:$1:5002 OPEN:/tmp/d32,creat,trunc
	t2=$(now_cs)
	echo "E2E-RESULT g_down_sha=$(sha /tmp/d32)"
	rm -f /tmp/d32
	echo "E2E-FIG ${2}up_MiBps=$(rate 33554432 $((t1 - t0))) ${2}down_MiBps=$(rate 33554432 $((t2 - t1)))"
}

io_main() {
	case "$1" in
	fs-ro)
		mount_share
		ck ro-read sh -c '[ "$(cat /mnt/hello.txt)" = E2E-RO-HELLO ]'
		erofs write sh -c 'echo x >>/mnt/hello.txt'
		erofs create sh -c 'echo x >/mnt/new.txt'
		erofs mkdir mkdir /mnt/newdir
		erofs unlink rm -f /mnt/hello.txt
		erofs chmod chmod 600 /mnt/hello.txt
		erofs rename mv /mnt/hello.txt /mnt/h2.txt
		erofs symlink ln -s hello.txt /mnt/sl
		erofs truncate truncate -s 0 /mnt/hello.txt
		ck ro-read-after sh -c '[ "$(cat /mnt/sub/inner.txt)" = E2E-RO-INNER ] && [ "$(cat /mnt/hello.txt)" = E2E-RO-HELLO ]'
		umount /mnt
		;;
	fs-escape)
		mount_share
		# Everything read is echoed: the harness fails if L1's secret marker shows up.
		for p in /mnt/.. /mnt/../.. /mnt/sub/.. /mnt/sub/../.. /mnt/abs /mnt/rel /mnt/sub/deep; do
			echo "ls $p: $(ls -a $p 2>&1 | tr '\n' ' ')"
		done
		for p in /mnt/abs /mnt/rel /mnt/sub/deep /mnt/../e2e-secret.txt /mnt/../../tmp/esc/e2e-secret.txt \
			/mnt/sub/../../e2e-secret.txt /mnt/../../../../tmp/esc/e2e-secret.txt /mnt/dirlink/e2e-secret.txt; do
			echo "cat $p: $(head -c 300 $p 2>&1 | tr '\n' ' ')"
		done
		echo "readlink abs=$(readlink /mnt/abs) rel=$(readlink /mnt/rel)"
		(cd /mnt/sub && echo "cd-sub cat: $(cat ../../e2e-secret.txt 2>&1)" && echo "cd-sub ls: $(ls ../.. 2>&1 | tr '\n' ' ')")
		echo "hardlink-symlink: $(ln /mnt/abs /mnt/hl-abs 2>&1; head -c 300 /mnt/hl-abs 2>&1)"
		echo "hardlink-out: $(ln /init /mnt/hl-init 2>&1; ln /mnt/../e2e-secret.txt /mnt/hl-sec 2>&1; head -c 300 /mnt/hl-sec 2>&1)"
		echo "guest-symlink: $(ln -s ../e2e-secret.txt /mnt/gsl 2>&1; head -c 300 /mnt/gsl 2>&1)"
		echo "write-through: $(echo pwned >/mnt/rel 2>&1; echo pwned >/mnt/../e2e-pwned.txt 2>&1)"
		echo "find: $(find /mnt 2>&1 | tr '\n' ' ')"
		for f in $(find /mnt -type f 2>/dev/null); do echo "file $f: $(head -c 300 $f 2>&1)"; done
		ck escape-listed true
		umount /mnt
		;;
	blk-ext4)
		load_mods blk
		ck mke2fs mke2fs -F /dev/vda
		mkdir -p /mnt
		ck mount-ext4 mount -t ext4 /dev/vda /mnt
		ck ext-write sh -c 'echo E2E-EXT-HELLO >/mnt/hello.txt && mkdir /mnt/dir && ln -s hello.txt /mnt/sl'
		head -c 1048576 /dev/urandom >/tmp/r1
		echo "E2E-RESULT g_ext_sha=$(sha /tmp/r1)"
		ck ext-write-big cp /tmp/r1 /mnt/dir/rand.bin
		ck sync sync
		ck umount umount /mnt
		;;
	blk-ro)
		load_mods blk
		ck getro sh -c '[ "$(blockdev --getro /dev/vda)" = 1 ]'
		ck ro-read sh -c '[ "$(head -c 16 /dev/vda)" = E2E-DISK-PATTERN ]'
		out=$(dd if=/dev/zero of=/dev/vda bs=512 count=1 conv=fsync 2>&1)
		rc=$?
		[ $rc -ne 0 ] && echo "E2E-CHECK write-fails ok ($(echo "$out" | head -1))" ||
			echo "E2E-CHECK write-fails FAIL dd rc=0: $out"
		out=$(dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=16 oflag=direct 2>&1)
		rc=$?
		[ $rc -ne 0 ] && echo "E2E-CHECK direct-write-fails ok ($(echo "$out" | head -1))" ||
			echo "E2E-CHECK direct-write-fails FAIL dd rc=0: $out"
		ck ro-read-after sh -c '[ "$(head -c 16 /dev/vda)" = E2E-DISK-PATTERN ]'
		;;
	net)
		load_mods net
		dhcp
		tcp_xfer 198.51.100.1 net_ # a public-looking address in L1's outside namespace (l1_net); the gateway is not L1
		;;
	host-loopback)
		load_mods net
		dhcp
		ck outside sh -c 'timeout 20 socat -u TCP:198.51.100.1:5003,connect-timeout=10 - | grep -q L1-OUTSIDE-OK'
		t0=$(now_cs)
		got=$(timeout 20 socat -u TCP:$GW:5004,connect-timeout=10 - 2>&1 | head -c 200 | tr '\n' ' ')
		t1=$(now_cs)
		# A refusal is a RST at once, not a connect that hangs until it times out.
		ck gateway-refused-fast [ $((t1 - t0)) -lt 200 ]
		case "$got" in
		*L1-LOOPBACK-SECRET*) echo "E2E-CHECK gateway-loopback FAIL the guest read L1's loopback service via $GW: $got" ;;
		*) echo "E2E-CHECK gateway-loopback ok ($GW:5004: ${got:-nothing})" ;;
		esac
		;;
	net-policy)
		load_mods net
		dhcp
		ck public sh -c 'timeout 20 socat -u TCP:203.0.113.1:5003,connect-timeout=10 - | grep -q L1-OUTSIDE-OK'
		refused private-refused 10.0.98.1:5003
		refused metadata-refused 169.254.169.254:5003
		refused loopback-refused $GW:5003
		# L1's own public-looking address: L1 itself, not the internet.
		refused host-own-address-refused 203.0.113.9:5003
		ck ping-private-refused sh -c '! ping -c 1 -W 3 10.0.98.1'
		;;
	net-dns)
		load_mods net
		dhcp
		ck dns-l1-only sh -c 'nslookup e2e-dns-only.test 10.0.2.2 | grep -q 203.0.113.7'
		ck dns-nxdomain sh -c 'nslookup nope.test 10.0.2.2 2>&1 | grep -q NXDOMAIN'
		;;
	net-bench)
		# The bench's net rows (l1-bench.sh): aivmm --net user or --net passt.
		load_mods net
		dhcp
		tcp_xfer 198.51.100.1 net_
		net-many --rate 198.51.100.1 5010 200 net_connects_per_s
		;;
	net-many)
		load_mods net
		dhcp
		net-many 203.0.113.1 5010 2000 10 5003
		;;
	net-allow)
		load_mods net
		dhcp
		ck dns-hosts sh -c 'nslookup e2e-allowed.test 10.0.2.2 | grep -q 198.51.100.1'
		ck private-allowed sh -c 'timeout 20 socat -u TCP:192.168.77.1:5005,connect-timeout=10 - | grep -q E2E-PRIVATE-OK'
		refused private-refused 192.168.78.1:5005 # private, outside the allowed /24
		ck loopback-allowed sh -c "timeout 20 socat -u TCP:$GW:5004,connect-timeout=10 - | grep -q L1-LOOPBACK-ALLOWED"
		refused loopback-refused $GW:5007
		ck public sh -c 'timeout 20 socat -u TCP:198.51.100.1:5003,connect-timeout=10 - | grep -q L1-OUTSIDE-OK'
		ck ping-gateway ping -c 1 -W 5 10.0.2.2
		ck ping-public ping -c 1 -W 5 198.51.100.1
		ck ping-private-refused sh -c '! ping -c 1 -W 3 192.168.78.1'
		;;
	net-allow-only)
		load_mods net
		dhcp
		refused unlearned-refused 198.51.100.1:5003 # not yet learned through DNS
		ck dns-allowed sh -c 'nslookup e2e-allowed.test 10.0.2.2 | grep -q 198.51.100.1'
		ck allowed sh -c 'timeout 20 socat -u TCP:198.51.100.1:5003,connect-timeout=10 - | grep -q L1-OUTSIDE-OK'
		refused allowed-other-port-refused 198.51.100.1:5006
		ck dns-other-refused sh -c '! nslookup e2e-other.test 10.0.2.2 | grep -q 198.51.100.2'
		refused unlearned-refused-2 198.51.100.2:5003
		;;
	forward)
		load_mods net
		dhcp
		head -c 1048576 /dev/urandom >/tmp/page
		echo "E2E-RESULT g_fwd_sha=$(sha /tmp/page)"
		# L1 retries until it has the whole page: a connection it gave up on (passt
		# accepted it before this listener existed) fails here with EPIPE, so serve again.
		# The request (4 bytes) is read before the reply: a socket closed with unread
		# input sends RST, which would cut off the reply in flight.
		ck serve-8080 timeout 90 sh -c 'until socat TCP-LISTEN:8080,reuseaddr SYSTEM:"head -c 4 >/dev/null; cat /tmp/page"; do sleep 0.2; done'
		sleep 5 # what socat handed the kernel is still on its way out through passt
		;;
	net-tap)
		load_mods net
		ip link set lo up
		ck static-ip sh -c 'ifconfig eth0 10.0.99.2 netmask 255.255.255.0 up'
		ck ping ping -c 3 -W 5 10.0.99.1
		tcp_xfer 10.0.99.1 tap_
		;;
	vsock)
		load_mods vsock
		head -c 16777216 /dev/urandom >/tmp/v16
		echo "E2E-RESULT g_vup_sha=$(sha /tmp/v16)"
		timeout 90 socat -u VSOCK-LISTEN:5001 OPEN:/tmp/vdown,creat,trunc &
		lpid=$!
		sleep 1
		t0=$(now_cs)
		ck vsock-up timeout 90 socat -u OPEN:/tmp/v16 VSOCK-CONNECT:2:5000
		t1=$(now_cs)
		rm -f /tmp/v16
		ck vsock-down wait $lpid
		t2=$(now_cs)
		echo "E2E-RESULT g_vdown_sha=$(sha /tmp/vdown)"
		echo "E2E-FIG vsock_up_MiBps=$(rate 16777216 $((t1 - t0))) guest_wait_down_s=$(((t2 - t1) / 100))"
		;;
	fs-many)
		mount_share
		creates /mnt/many 2000
		echo "E2E-FIG fs_creates_per_s=$CPS"
		umount /mnt
		;;
	balloon)
		# The memory balloon: L1 (l1-io.sh) measures aivmm's RSS and drives the
		# balloon through its control socket; the two sides meet through files in
		# the share.
		load_mods balloon
		load_mods blk
		mount_share
		ck balloon-driver sh -c 'ls /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio'
		# 1 GiB of page cache: the whole disk, read once. The disk stays open: a
		# block device's cache is dropped at its last close.
		exec 3</dev/vda
		ck fill-cache dd if=/dev/vda of=/dev/null bs=1M
		echo "E2E-FIG guest_cache_mib=$(cache_mib)"
		ck cache-filled [ "$(cache_mib)" -ge 900 ]
		: >/mnt/filled
		wait_for /mnt/go-drop 600
		echo 3 >/proc/sys/vm/drop_caches
		exec 3<&-
		echo "E2E-FIG guest_cache_after_drop_mib=$(cache_mib)"
		: >/mnt/dropped
		# L1 inflates the balloon to 1.5 GiB of the 2; then the guest needs 768 MiB
		# it cannot drop (a tmpfs, no swap): the driver must deflate, not the OOM
		# killer kill.
		wait_for /mnt/inflated 600
		mkdir -p /fill && mount -t tmpfs -o size=1g tmpfs /fill
		ck fill-after-inflate dd if=/dev/zero of=/fill/f bs=1M count=768
		ck no-oom-kill sh -c '! dmesg | grep -i -e "killed process" -e "out of memory"'
		dmesg | grep -i -e "killed process" -e "out of memory" | head -5
		rm -f /fill/f
		: >/mnt/filled2
		wait_for /mnt/done 600
		umount /mnt
		;;
	density)
		# Idle after boot, while L1 adds up the VMMs' memory, then power off.
		load_mods balloon
		echo "E2E-IDLE"
		sleep 60
		;;
	*) echo "E2E-CHECK scenario FAIL l2-io.sh does not know $1" ;;
	esac
}
