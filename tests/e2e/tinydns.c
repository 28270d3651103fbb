/* tinydns: L1's own DNS server for the e2e `net-dns` scenario.
 *
 *   tinydns NAME=A.B.C.D...
 *   tinydns --hold PORT      (for `net-many`: accept on PORT, keep every connection)
 *
 * Listens on 127.0.0.1:53 (UDP) and answers A queries for the NAMEs given with
 * their address, NXDOMAIN for other names, an empty answer for other types of a
 * known name. With L1's /etc/resolv.conf pointing at it, a name only this server
 * knows proves that aivmm's DNS answers come from the host's resolver. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXN 16

static char names[MAXN][256];
static struct in_addr addrs[MAXN];
static int n;

/* Listens on PORT with a deep backlog and holds every connection it accepts
 * until its peer closes (as a server does: it then closes too). */
static int hold(int port) {
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
	if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 4096) < 0) {
		perror("tinydns --hold");
		return 1;
	}
	static struct pollfd p[1000];
	int n = 1;
	p[0].fd = s;
	p[0].events = POLLIN;
	for (;;) {
		p[0].events = n < 1000 ? POLLIN : 0; /* full: the backlog holds the rest */
		if (poll(p, n, -1) < 0)
			continue;
		if (p[0].revents & POLLIN) {
			int c = accept(s, NULL, NULL);
			if (c >= 0) {
				p[n].fd = c;
				p[n].events = POLLIN;
				p[n].revents = 0;
				n++;
			}
		}
		for (int i = 1; i < n; i++) {
			char b[256];
			if (!p[i].revents || read(p[i].fd, b, sizeof b) > 0)
				continue;
			close(p[i].fd);
			p[i--] = p[--n];
		}
	}
}

int main(int argc, char **argv) {
	if (argc == 3 && strcmp(argv[1], "--hold") == 0)
		return hold(atoi(argv[2]));
	for (int i = 1; i < argc && n < MAXN; i++) {
		char *eq = strchr(argv[i], '=');
		if (!eq || eq - argv[i] >= 255 || inet_aton(eq + 1, &addrs[n]) == 0) {
			fprintf(stderr, "tinydns: bad argument %s\n", argv[i]);
			return 2;
		}
		memcpy(names[n], argv[i], eq - argv[i]);
		names[n][eq - argv[i]] = 0;
		n++;
	}
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0) {
		perror("tinydns: bind 127.0.0.1:53");
		return 1;
	}
	for (;;) {
		unsigned char q[512], r[600];
		struct sockaddr_in from;
		socklen_t fl = sizeof from;
		ssize_t len = recvfrom(s, q, sizeof q, 0, (struct sockaddr *)&from, &fl);
		if (len < 12 || (q[2] & 0x80) || q[4] != 0 || q[5] != 1)
			continue;
		/* The question's name, dotted and lower-cased. */
		char name[256];
		size_t p = 12, o = 0;
		int ok = 1;
		while (p < (size_t)len && q[p] != 0) {
			size_t l = q[p++];
			if (l > 63 || p + l > (size_t)len || o + l + 1 >= sizeof name) {
				ok = 0;
				break;
			}
			if (o)
				name[o++] = '.';
			for (size_t i = 0; i < l; i++)
				name[o++] = (char)tolower(q[p + i]);
			p += l;
		}
		name[o] = 0;
		if (!ok || p + 5 > (size_t)len)
			continue;
		size_t qend = p + 5; /* the root label, QTYPE, QCLASS */
		unsigned qtype = (q[p + 1] << 8) | q[p + 2];
		int k = -1;
		for (int i = 0; i < n; i++)
			if (strcmp(names[i], name) == 0)
				k = i;
		memcpy(r, q, qend);
		r[2] = 0x80 | (q[2] & 0x01); /* QR, RD copied */
		r[3] = 0x80 | (k < 0 ? 3 : 0); /* RA; NXDOMAIN for an unknown name */
		r[6] = r[7] = r[8] = r[9] = r[10] = r[11] = 0;
		size_t rl = qend;
		if (k >= 0 && qtype == 1) {
			r[7] = 1;
			unsigned char rr[16] = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4};
			memcpy(rr + 12, &addrs[k], 4);
			memcpy(r + rl, rr, 16);
			rl += 16;
		}
		sendto(s, r, rl, 0, (struct sockaddr *)&from, fl);
	}
}
