/* Helpers for the `aivmm run --workdir` scenarios (e2e_run.py), built static on the
 * host with gcc:
 *   runtool as UID GID PROG ARGS...   run PROG as UID:GID, no supplementary groups
 *                                      (L1's busybox setpriv cannot change ids)
 *   runtool kvm                        in the guest: open /dev/kvm, KVM_GET_API_VERSION,
 *                                      KVM_CREATE_VM, KVM_CREATE_VCPU; print what worked
 * Exit status 0 only if everything asked for worked. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define KVMIO 0xAE
#define KVM_GET_API_VERSION _IO(KVMIO, 0x00)
#define KVM_CREATE_VM _IO(KVMIO, 0x01)
#define KVM_CHECK_EXTENSION _IO(KVMIO, 0x03)
#define KVM_CREATE_VCPU _IO(KVMIO, 0x41)
#define KVM_CAP_USER_MEMORY 3

static int kvm(void) {
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		printf("E2E-KVM open=FAIL errno=%d (%s)\n", errno, strerror(errno));
		return 1;
	}
	int api = ioctl(fd, KVM_GET_API_VERSION, 0);
	int cap = ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
	int vm = ioctl(fd, KVM_CREATE_VM, 0);
	int vm_errno = vm < 0 ? errno : 0;
	int vcpu = vm >= 0 ? ioctl(vm, KVM_CREATE_VCPU, 0) : -1;
	int vcpu_errno = vcpu < 0 ? errno : 0;
	printf("E2E-KVM open=ok api=%d user_memory=%d create_vm=%s vm_errno=%d create_vcpu=%s vcpu_errno=%d\n",
	       api, cap, vm >= 0 ? "ok" : "FAIL", vm_errno, vcpu >= 0 ? "ok" : "FAIL", vcpu_errno);
	return !(api == 12 && vm >= 0 && vcpu >= 0);
}

int main(int argc, char **argv) {
	if (argc >= 2 && !strcmp(argv[1], "kvm"))
		return kvm();
	if (argc >= 5 && !strcmp(argv[1], "as")) {
		uid_t uid = (uid_t)atoi(argv[2]);
		gid_t gid = (gid_t)atoi(argv[3]);
		if (setgroups(0, NULL) || setgid(gid) || setuid(uid)) {
			perror("runtool as");
			return 126;
		}
		execvp(argv[4], argv + 4);
		perror(argv[4]);
		return 127;
	}
	fprintf(stderr, "usage: runtool as UID GID PROG ARGS... | runtool kvm\n");
	return 2;
}
