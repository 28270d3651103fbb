/* bench-randread: 4 KiB random reads at queue depth 1 with O_DIRECT, for the
 * `bench` e2e scenario (busybox has no fio). Built static on the host with gcc
 * and put in the L2 initramfs by e2e_bench.py.
 *
 * Usage: bench-randread DEVICE SECONDS
 *        bench-randread --write FILE SECONDS
 * Reads 4 KiB blocks at uniformly random 4 KiB-aligned offsets of DEVICE, first
 * for SECONDS/5 untimed (warm-up), then for SECONDS, and prints
 *   E2E-FIG blk_randread_iops=<N> blk_randread_ops=<count> blk_randread_s=<secs>
 * With --write, writes 4 KiB blocks the same way into the existing regular FILE
 * with plain buffered pwrite (fio's randwrite at its defaults: on virtio-fs with
 * no writeback cache each one reaches the host), and prints
 *   E2E-FIG fs_randwrite_iops=<N> fs_randwrite_ops=<count> fs_randwrite_s=<secs>
 * Exit status 1 with one line on stderr on any error (a short read included).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

#define BLOCK 4096

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Reads at random offsets for `secs` seconds; returns the count, or -1. */
static int writing;

static long run(int fd, uint64_t blocks, double secs, void *buf, uint64_t *seed)
{
	long n = 0;
	double end = now() + secs;
	while (now() < end) {
		for (int i = 0; i < 16; i++) {
			off_t off = (off_t)(xorshift(seed) % blocks) * BLOCK;
			ssize_t r = writing ? pwrite(fd, buf, BLOCK, off) : pread(fd, buf, BLOCK, off);
			if (r != BLOCK) {
				fprintf(stderr, "bench-randread: %s at %lld: %s\n", writing ? "pwrite" : "pread",
					(long long)off, r < 0 ? strerror(errno) : "short transfer");
				return -1;
			}
			n++;
		}
	}
	return n;
}

int main(int argc, char **argv)
{
	if (argc == 4 && strcmp(argv[1], "--write") == 0) {
		writing = 1;
		argv++;
		argc--;
	}
	if (argc != 3) {
		fprintf(stderr, "usage: bench-randread [--write] PATH SECONDS\n");
		return 2;
	}
	double secs = atof(argv[2]);
	if (secs <= 0) {
		fprintf(stderr, "bench-randread: SECONDS must be positive\n");
		return 2;
	}
	int fd = writing ? open(argv[1], O_WRONLY) : open(argv[1], O_RDONLY | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "bench-randread: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	uint64_t size = 0;
	if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
		struct stat st;
		if (fstat(fd, &st) != 0) {
			fprintf(stderr, "bench-randread: size of %s: %s\n", argv[1], strerror(errno));
			return 1;
		}
		size = st.st_size;
	}
	uint64_t blocks = size / BLOCK;
	if (blocks == 0) {
		fprintf(stderr, "bench-randread: %s is smaller than 4 KiB\n", argv[1]);
		return 1;
	}
	void *buf;
	if (posix_memalign(&buf, BLOCK, BLOCK) != 0) {
		fprintf(stderr, "bench-randread: out of memory\n");
		return 1;
	}
	memset(buf, 0xa5, BLOCK);
	uint64_t seed = 0x9e3779b97f4a7c15ull;
	if (run(fd, blocks, secs / 5, buf, &seed) < 0)
		return 1;
	double t0 = now();
	long n = run(fd, blocks, secs, buf, &seed);
	double t = now() - t0;
	if (n < 0)
		return 1;
	if (writing)
		printf("E2E-FIG fs_randwrite_iops=%.0f fs_randwrite_ops=%ld fs_randwrite_s=%.2f\n", n / t, n, t);
	else
		printf("E2E-FIG blk_randread_iops=%.0f blk_randread_ops=%ld blk_randread_s=%.2f\n", n / t, n, t);
	return 0;
}
