# Sourced by l1-init.sh: the L1 side of guest-custom-kernel (judged by e2e_kernel.py).
# The same command runs under the image whose kernel aivmm built from linux-source
# (kind "kernel") and then under the Debian image (kind "noclaude", Debian's cloud
# kernel) for the boot-to-ready comparison; `run_guest` (l1-init.sh) does each run.

kernel_scenario() {
	kcmd='echo ready-from-guest; uname -r; cd /work && echo E2E-KERNEL-FILE >from-guest.txt; exit 5'
	run_guest guest-custom-kernel kernel -- sh -c "$kcmd"
	echo "@@O guest-custom-kernel 0 E2E-RESULT host_sees=$(head -c 20 /tmp/gw-guest-custom-kernel/from-guest.txt 2>/dev/null)"
	if [ -s /guest/noclaude/vmlinuz ]; then
		run_guest guest-custom-kernel-debian noclaude -- sh -c "$kcmd"
	fi
}
