/* fsmodes DIR: run by the guest in a virtio-fs share (tests/e2e `fs-modes`). It
 * tries what must not reach the host: setuid and setgid bits by chmod, by create
 * and by mkdir, and security.* / trusted.* extended attributes; a user.* one must
 * still work. Prints `E2E-CHECK name ok|FAIL why` lines; L1 then checks the modes
 * on its side.
 *
 * fsmodes --owner DIR UID (tests/e2e `fs-owner`): as UID (and gid UID), makes
 * oUID-file, oUID-dir, oUID-link and oUID-fifo in DIR and chmods the file 4755;
 * L1 then checks who owns them.
 *
 * Build: gcc -static -O2 -o fsmodes fsmodes.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

static void check(const char *name, int ok, const char *why)
{
	printf("E2E-CHECK %s %s%s%s\n", name, ok ? "ok" : "FAIL", ok ? "" : " ", ok ? "" : why);
}

static void refused(const char *name, int rc)
{
	char why[128];
	snprintf(why, sizeof why, "rc=%d errno=%s", rc, rc == 0 ? "none (it was set)" : strerror(errno));
	check(name, rc != 0, why);
}

static int owner(const char *dir, const char *id)
{
	int uid = atoi(id);
	char why[160], name[64];
	if (chdir(dir) != 0 || setgroups(0, NULL) != 0 || setgid(uid) != 0 || setuid(uid) != 0) {
		printf("E2E-CHECK as-%d FAIL %s\n", uid, strerror(errno));
		return 1;
	}
	snprintf(name, sizeof name, "o%d-file", uid);
	int fd = open(name, O_CREAT | O_WRONLY | O_EXCL, 0644);
	snprintf(why, sizeof why, "create: %s", strerror(errno));
	check(uid ? "user-create" : "root-create", fd >= 0, why);
	if (fd >= 0)
		close(fd);
	int rc = chmod(name, 04755);
	snprintf(why, sizeof why, "chmod: %s", strerror(errno));
	check(uid ? "user-chmod" : "root-chmod", rc == 0, why);
	snprintf(name, sizeof name, "o%d-dir", uid);
	rc = mkdir(name, 0755);
	snprintf(why, sizeof why, "mkdir: %s", strerror(errno));
	check(uid ? "user-mkdir" : "root-mkdir", rc == 0, why);
	snprintf(name, sizeof name, "o%d-link", uid);
	rc = symlink("target", name);
	snprintf(why, sizeof why, "symlink: %s", strerror(errno));
	check(uid ? "user-symlink" : "root-symlink", rc == 0, why);
	snprintf(name, sizeof name, "o%d-fifo", uid);
	rc = mkfifo(name, 0644);
	snprintf(why, sizeof why, "mkfifo: %s", strerror(errno));
	check(uid ? "user-mkfifo" : "root-mkfifo", rc == 0, why);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "--owner"))
		return owner(argv[2], argv[3]);
	if (argc != 2 || chdir(argv[1]) != 0) {
		printf("E2E-CHECK fsmodes-start FAIL usage: fsmodes DIR\n");
		return 2;
	}
	char why[160];
	int fd = open("suid", O_CREAT | O_WRONLY | O_TRUNC, 0755);
	check("create", fd >= 0, strerror(errno));
	if (fd >= 0)
		close(fd);
	int rc = chmod("suid", 04755);
	snprintf(why, sizeof why, "chmod 4755: %s", strerror(errno));
	check("chmod-4755-answered", rc == 0, why); /* answered, with the bit dropped */
	fd = open("sgid", O_CREAT | O_WRONLY | O_TRUNC, 0755);
	if (fd >= 0)
		close(fd);
	chmod("sgid", 02755);
	fd = open("created-suid", O_CREAT | O_WRONLY | O_EXCL, 06755);
	if (fd >= 0)
		close(fd);
	mkdir("sgid-dir", 02775);
	chmod("sgid-dir", 02775);
	/* A file capability (VFS_CAP_REVISION_2, cap_setuid permitted+effective). */
	unsigned char cap[20] = {0x01, 0x00, 0x00, 0x02, 0x80, 0x00, 0x00, 0x00};
	refused("setxattr-security-capability", setxattr("suid", "security.capability", cap, sizeof cap, 0));
	refused("setxattr-trusted", setxattr("suid", "trusted.e2e", "x", 1, 0));
	/* user.* is passed through; whether it sticks is the host file system's
	 * business (L1's tmpfs on 6.1 has no user xattrs): reported, not judged. */
	rc = setxattr("suid", "user.e2e", "kept", 4, 0);
	printf("E2E-RESULT user_xattr=%s\n", rc == 0 ? "set" : strerror(errno));
	struct stat st;
	if (stat("suid", &st) == 0) {
		snprintf(why, sizeof why, "the guest sees mode %o", st.st_mode & 07777);
		check("guest-no-suid", !(st.st_mode & (S_ISUID | S_ISGID)), why);
	}
	printf("E2E-FSMODES-DONE\n");
	return 0;
}
