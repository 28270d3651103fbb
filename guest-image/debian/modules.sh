# Sourced by stage 2 (usr/lib/aivmm/init2, the agent's and the builder's): loading
# modules without kmod's indexes, and nested KVM.

# modload FILE: insmod a module (e.g. kvm-amd.ko) after the ones it needs, from
# the text modules.dep (it lists direct dependencies only). It works in an image
# built without kmod's binary indexes, where modprobe does not. $NICE may hold a
# `nice -n N` prefix.
MODDIR=/lib/modules/$(uname -r)
modload() {
	local line dep
	line=$(grep -m1 "^[^:]*/$1:" "$MODDIR/modules.dep") || return 1
	for dep in ${line#*:}; do
		modload "${dep##*/}" || true
	done
	$NICE insmod "$MODDIR/${line%%:*}" 2>/dev/null ||
		grep -q "^$(echo "${1%%.ko*}" | tr - _) " /proc/modules
}

# nested_kvm: when the vCPU has SVM or VMX (the host allows nested KVM), loads KVM
# (a kernel with it built in has /dev/kvm already) and lets every user open
# /dev/kvm (Nix's build users too); fails when the vCPU has neither. The flags
# line is read with the shell's own `read`: no grep to load.
nested_kvm() {
	local kvm key rest
	kvm=
	while read -r key rest; do
		case "$key" in
		flags)
			case " $rest " in *" svm "*) kvm=kvm-amd.ko ;; *" vmx "*) kvm=kvm-intel.ko ;; esac
			break
			;;
		esac
	done </proc/cpuinfo
	[ -n "$kvm" ] && { [ -c /dev/kvm ] || modload $kvm; } && chmod 0666 /dev/kvm
}
