/* l1-heartbeat: L1's pulse for the host's watchdog (tests/e2e/harness.py).
 *
 * Why: the host must tell a slow L1 from a stuck one. A shell loop that forks
 * `ps` and `grep` is late whenever L1 is busy, so its silence proves little.
 * This program runs SCHED_FIFO with its memory locked, sleeps to absolute
 * deadlines on CLOCK_MONOTONIC, and writes one short line straight to the
 * console every E2E_HB seconds (default 10):
 *
 *   @@L1 hb n=<count> up=<uptime s> late_ms=<how late this wake-up was> run=<runnable>
 *
 * A line that comes means L1's timers fire and its scheduler runs. late_ms
 * shows timer trouble (a lost or late timer interrupt) before it becomes a hang,
 * and run= (runnable tasks, from /proc/loadavg) shows load.
 *
 * Build: gcc -static -O2 -o l1-heartbeat l1-heartbeat.c.
 */
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static long long ns(const struct timespec *t)
{
	return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

int main(int argc, char **argv)
{
	int period = argc > 1 ? atoi(argv[1]) : 10;
	if (period <= 0)
		period = 10;
	struct sched_param sp = {.sched_priority = 50};
	const char *rt = sched_setscheduler(0, SCHED_FIFO, &sp) == 0 ? "fifo" : "other";
	mlockall(MCL_CURRENT | MCL_FUTURE);
	int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (con < 0)
		con = 1;
	char buf[160];
	int n = snprintf(buf, sizeof buf, "@@L1 hb start period_s=%d sched=%s\n", period, rt);
	if (write(con, buf, n) < 0)
		return 1;

	struct timespec next;
	clock_gettime(CLOCK_MONOTONIC, &next);
	for (unsigned long count = 1;; count++) {
		next.tv_sec += period;
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) != 0)
			;
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		long long late_ms = (ns(&now) - ns(&next)) / 1000000;
		if (late_ms >= period * 1000LL)
			next = now; /* after a stall, one line, not a burst of catch-ups */
		char up[32] = "?", load[64] = "";
		int fd = open("/proc/uptime", O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			ssize_t r = read(fd, up, sizeof up - 1);
			up[r > 0 ? r : 0] = 0;
			up[strcspn(up, " \n")] = 0;
			close(fd);
		}
		fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
		const char *runnable = "?";
		if (fd >= 0) {
			ssize_t r = read(fd, load, sizeof load - 1);
			load[r > 0 ? r : 0] = 0;
			close(fd);
			/* "0.00 0.01 0.05 1/123 456": the fourth field is running/total. */
			char *p = load;
			for (int i = 0; i < 3 && p; i++) {
				p = strchr(p, ' ');
				if (p)
					p++;
			}
			if (p) {
				p[strcspn(p, "/")] = 0;
				runnable = p;
			}
		}
		n = snprintf(buf, sizeof buf, "@@L1 hb n=%lu up=%s late_ms=%lld run=%s\n", count, up, late_ms, runnable);
		if (write(con, buf, n) < 0)
			return 1;
	}
}
