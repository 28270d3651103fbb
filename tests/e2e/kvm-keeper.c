/* kvm-keeper: holds one idle KVM VM open in L1 for the whole e2e run.
 *
 * Why: L1 is QEMU TCG. KVM flips static keys (e.g. its "APIC software-disabled"
 * key) when the first VM with a local APIC is created and, a second later, when
 * the last one is gone; each flip patches kernel text with int3 breakpoints
 * (text_poke_bp), and under TCG that cross-CPU code patching now and then leaves
 * an L1 CPU looping in the int3 handler: L1 hangs (vCPUs seen in asm_exc_int3 /
 * exc_int3 / kprobe_int3_handler / __schedule). A VM whose vCPU never runs keeps
 * its APIC software-disabled, so those keys stay on and later VMs never flip them.
 *
 * Build: gcc -static -O2 -o kvm-keeper kvm-keeper.c. Prints one line, then sleeps.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		printf("@@L1 kvm-keeper: /dev/kvm: %s\n", strerror(errno));
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) {
		printf("@@L1 kvm-keeper: KVM_CREATE_VM: %s\n", strerror(errno));
		return 1;
	}
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) {
		printf("@@L1 kvm-keeper: KVM_CREATE_IRQCHIP: %s\n", strerror(errno));
		return 1;
	}
	if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0) {
		printf("@@L1 kvm-keeper: KVM_CREATE_VCPU: %s\n", strerror(errno));
		return 1;
	}
	printf("@@L1 kvm-keeper: holding an idle VM (pid %d)\n", (int)getpid());
	fflush(stdout);
	for (;;)
		pause();
}
