/* net-many: the guest side of the e2e `net-many` scenario.
 *
 *   net-many IP PORT N HOLD_S AFTER_PORT
 *   net-many --rate IP PORT N   (connects/s: N connections one after the other)
 *
 * Opens N non-blocking TCP connections to IP:PORT at once, waits until each has
 * connected or failed (or 60 s), holds them open HOLD_S seconds (L1 samples
 * aivmm's memory meanwhile), closes them all, and then connects to IP:AFTER_PORT
 * and reads what the server says there. Prints E2E-RESULT and E2E-CHECK lines. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* N sequential connects (each closed at once), as E2E-FIG KEY=connects/s. */
static int rate(const char *ip, int port, int n, const char *key) {
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (inet_aton(ip, &a.sin_addr) == 0 || n <= 0)
		return 2;
	int ok = 0;
	double t0 = now();
	for (int i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0)
			ok++;
		if (s >= 0)
			close(s);
	}
	double dt = now() - t0;
	if (ok == n)
		printf("E2E-FIG %s=%.0f\n", key, n / dt);
	else
		printf("E2E-CHECK connect-rate FAIL %d of %d connected\n", ok, n);
	return 0;
}

int main(int argc, char **argv) {
	if (argc == 6 && strcmp(argv[1], "--rate") == 0)
		return rate(argv[2], atoi(argv[3]), atoi(argv[4]), argv[5]);
	if (argc != 6)
		return 2;
	int n = atoi(argv[3]), hold = atoi(argv[4]);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
	if (inet_aton(argv[1], &a.sin_addr) == 0 || n <= 0)
		return 2;
	struct rlimit rl = {n + 64, n + 64};
	setrlimit(RLIMIT_NOFILE, &rl);
	struct pollfd *p = calloc(n, sizeof *p);
	int *state = calloc(n, sizeof *state); /* 0 pending, 1 connected, 2 failed */
	int opened = 0, failed_now = 0;
	double t0 = now();
	for (int i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		p[i].fd = s;
		p[i].events = POLLOUT;
		if (s < 0) {
			state[i] = 2;
			p[i].fd = -1;
			failed_now++;
			continue;
		}
		opened++;
		if (connect(s, (struct sockaddr *)&a, sizeof a) == 0)
			state[i] = 1;
		else if (errno != EINPROGRESS) {
			state[i] = 2;
			failed_now++;
		}
	}
	int pending = 1;
	while (pending && now() - t0 < 60) {
		pending = 0;
		for (int i = 0; i < n; i++)
			if (state[i] == 0)
				pending++;
		if (!pending)
			break;
		for (int i = 0; i < n; i++)
			p[i].events = state[i] == 0 ? POLLOUT : 0;
		poll(p, n, 500);
		for (int i = 0; i < n; i++) {
			if (state[i] != 0 || !p[i].revents)
				continue;
			int err = 0;
			socklen_t l = sizeof err;
			getsockopt(p[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
			state[i] = err ? 2 : 1;
		}
	}
	int ok = 0, failed = 0, still = 0;
	for (int i = 0; i < n; i++)
		ok += state[i] == 1, failed += state[i] == 2, still += state[i] == 0;
	printf("E2E-RESULT many_opened=%d many_connected=%d many_refused=%d many_pending=%d many_settle_ms=%.0f\n",
	       opened, ok, failed, still, (now() - t0) * 1000);
	/* The gateway's connection limit (512) refuses the rest at once: nothing hangs. */
	if (ok > 0 && ok <= 512 && failed == n - ok && still == 0)
		printf("E2E-CHECK limit-refuses ok (%d connected, %d refused)\n", ok, failed);
	else
		printf("E2E-CHECK limit-refuses FAIL %d connected, %d refused, %d pending\n", ok, failed, still);
	fflush(stdout);
	sleep(hold);
	for (int i = 0; i < n; i++)
		if (p[i].fd >= 0)
			close(p[i].fd);
	sleep(5); /* the gateway and L1 close them */
	/* Afterwards a connection works again. */
	int s = socket(AF_INET, SOCK_STREAM, 0);
	char buf[64] = {0};
	a.sin_port = htons(atoi(argv[5]));
	int r = connect(s, (struct sockaddr *)&a, sizeof a);
	ssize_t got = r == 0 ? read(s, buf, sizeof buf - 1) : -1;
	printf("E2E-CHECK after-flood %s\n", got > 0 && strstr(buf, "L1-OUTSIDE-OK") ? "ok" : "FAIL no answer after the flood");
	return 0;
}
