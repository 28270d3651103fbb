/* hard-swap: the L1 side of the e2e fs-escape-hard swap race (l1-hard.sh).
 *
 *   hard-swap SHARE OUTSIDE STOPFILE
 *
 * Until STOPFILE exists, flips SHARE/swap between the directory it is and a
 * symlink to OUTSIDE: rename swap -> swap.d, symlink OUTSIDE as swap, unlink it,
 * rename swap.d -> swap. One process making the system calls, where the shell
 * loop forked four processes a round: that fork storm in L1 beside a running L2
 * is what L1's kernel (nested KVM under QEMU TCG) twice did not survive.
 * Prints the number of rounds. Built static with gcc by e2e_hard.py. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: hard-swap SHARE OUTSIDE STOPFILE\n");
		return 2;
	}
	if (chdir(argv[1]) != 0) {
		perror(argv[1]);
		return 1;
	}
	unsigned long rounds = 0;
	for (;;) {
		if (rounds % 16 == 0 && access(argv[3], F_OK) == 0)
			break;
		/* Failures are part of the race (the guest may hold or have changed a
		 * name); the loop just goes on. */
		(void)rename("swap", "swap.d");
		usleep(500);
		(void)symlink(argv[2], "swap");
		usleep(500);
		(void)unlink("swap");
		(void)rename("swap.d", "swap");
		usleep(500);
		rounds++;
	}
	printf("%lu\n", rounds);
	return 0;
}
