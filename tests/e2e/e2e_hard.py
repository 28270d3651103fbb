"""The hardening scenarios of the nested-VM harness (imported by harness.py).

Guest side: l2-hard.sh (L2 scenarios named hard-*); L1 side: l1-hard.sh. Lines
read here, inside one aivmm run's output:
  E2E-CHECK <name> ok | E2E-CHECK <name> FAIL <why>
  E2E-RESULT g_<key>=<v> (guest) and h_<key>=<v> (L1): must be equal
  E2E-THREAD tid=.. name=.. seccomp=.. filters=..   (the seccomp scenario)
"""

import os
import re
import subprocess

import e2e_io  # check_run(): a run's checks, required checks and g_/h_ pairs

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    "fs-escape-hard": "a hostile guest in a share: absolute, relative, /proc/self/root and /proc/1/root "
    "symlinks, .., mknod of block and char devices (refused), a symlink/directory swap race run by L1 "
    "during 300 guest reads and creates; L1's secret never reaches the guest, nothing lands outside",
    "blk-durability": "the guest writes 1 MiB to /dev/vda with fsync (FLUSH); L1 kill -9's aivmm as "
    "soon as the guest prints that the flush completed; the bytes are in the image (sha256)",
    "fs-durability": "the guest writes 1 MiB to a file in a virtio-fs share with fsync; L1 kill -9's "
    "aivmm right after; the file on L1 has those bytes (sha256)",
    "panic": "the guest kernel panics (init exits; panic=-1 resets): aivmm exits non-zero with "
    "`aivmm: error: guest kernel panic: Kernel panic - not syncing: ...`; a plain guest reset still exits 0",
    "disk-full": "the share and a sparse disk image on a 4 MiB tmpfs in L1: the guest's 8 MiB writes get "
    "ENOSPC (virtio-fs) and EIO (virtio-blk); both devices work afterwards; aivmm exits 0",
    "fs-modes": "in a virtio-fs share the guest's chmod 4755/2755, a create with 06755 and a mkdir with "
    "02775 leave no setuid/setgid bit on L1; security.capability and trusted.* setxattr fail",
    "fs-owner": "aivmm as root: the guest's root and its user 65534 each make a file, a directory, a "
    "symlink and a FIFO in a share; on L1 they are 0:0 and 65534:65534; the user's chmod 4755 sets no setuid",
    "seccomp": "aivmm with a disk, a share and rng, devices active: every thread in "
    "/proc/PID/task/*/status shows Seccomp: 2 with two filters, the process filter and its kind's "
    "(and, as a control, 0 with --seccomp off)",
}

# All in the default set. fs-escape-hard's one stall (2 in ~15 runs) was L1's kernel (nested
# SVM under QEMU TCG: a stack overflow in exc_page_fault on aivmm's vCPU thread) beside a
# shell swap loop forking four processes a round; hard-swap.c replaced the loop, and both
# sides now print where things stand if the swap loop stops (tests/e2e/README.md).
NOT_DEFAULT = set()

# Seconds each takes at most (the L1 overall timeout is the sum).
BUDGET = {"fs-owner": 120, "fs-modes": 120, "disk-full": 120, "fs-escape-hard": 150, "blk-durability": 120, "fs-durability": 120, "panic": 200, "seccomp": 260}

REQUIRED = {
    "fs-escape-hard": ["mount", "abs-symlink", "rel-symlink", "deep-rel-symlink", "procroot-symlink",
                       "proc1-symlink", "dotdot", "dotdot-deep", "dotdot-cd", "dirlink", "mknod-blk",
                       "mknod-chr", "mkfifo", "plant-through-symlink", "proc-fd-symlink", "hardlink-across",
                       "swap-no-secret", "l1-secret-intact", "l1-outside-untouched", "l1-no-device-nodes",
                       "l1-fifo-is-fifo", "l1-guest-symlink-kept", "l1-proc-fd-symlink-kept"],
    "seccomp": ["mount", "blk-read", "fs-write", "l1-go", "l1-threads-seccomp-2"],
    "seccomp/off": ["mount", "l1-threads-seccomp-0"],
    "fs-modes": ["mount", "create", "chmod-4755-answered", "setxattr-security-capability", "setxattr-trusted",
                 "guest-no-suid", "l1-no-suid", "l1-no-sgid", "l1-create-no-suid",
                 "l1-dir-no-sgid"],
    "fs-owner": ["mount"] + [f"{w}-{k}" for w in ("root", "user") for k in ("create", "chmod", "mkdir", "symlink",
                                                                           "mkfifo")]
    + [f"l1-{w}-{k}" for w in ("root", "user") for k in ("file", "dir", "link", "fifo")] + ["l1-user-no-suid"],
    "disk-full": ["mount", "fs-enospc", "fs-after-full", "blk-eio", "blk-read-after", "l1-after-file"],
    "blk-durability": [],
    "fs-durability": ["mount"],
}


def l2_extras(cpio):
    """Guest side: l2-hard.sh."""
    cpio.copy("l2-hard.sh", os.path.join(HERE, "l2-hard.sh"), 0o644)


def l1_extras(cpio):
    """L1 side: l1-hard.sh and hard-swap (static, built here with gcc)."""
    cpio.copy("l1-hard.sh", os.path.join(HERE, "l1-hard.sh"), 0o644)
    for name in ("hard-swap", "fsmodes"):
        src = os.path.join(HERE, f"{name}.c")
        out = os.path.join(os.environ.get("E2E_WORK", os.path.join(HERE, "work")), name)
        if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", out, src],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"e2e: error: building {name} failed (gcc -static; needs libc6-dev):\n{r.stderr}")
        cpio.copy(f"bin/{name}", out, 0o755)


def check_run(sc, tag, clean=True):
    """e2e_io.check_run with this module's required checks."""
    return e2e_io.check_run(sc, tag, clean, REQUIRED)


def panics(run):
    return [l for _, l in run.out + run.err if "panicked" in l]


def judge_durability(sc):
    r = sc.runs.get(sc.name)
    if r is None:
        return False, "aivmm did not run", []
    problems, info = check_run(sc, sc.name, clean=False)
    res = r.results()
    flushed = r.first("E2E-HARD-FLUSHED")
    if flushed is None:
        problems.append("the guest never printed E2E-HARD-FLUSHED")
    if not res.get("h_killed"):
        problems.append("L1 did not kill aivmm")
    if r.exit != "sig9":
        problems.append(f"aivmm exit {r.exit}, want sig9 (killed)")
    g, h = res.get("g_dur_sha"), res.get("h_dur_sha")
    if not g or g != h:
        problems.append(f"data lost: guest wrote sha256 {g}, L1 finds {h}")
    if panics(r):
        problems.append(f"Rust panic: {panics(r)[0]}")
    if problems:
        return False, "; ".join(problems), info
    return True, (f"1 MiB flushed at {flushed} ms, aivmm killed -9 right after (pid {res.get('h_killed')}), "
                  f"L1 finds the same sha256 {g[:16]}..."), info


def judge_panic_run(sc, tag):
    """(problems, the error line) of one run whose guest panics."""
    problems = []
    r = sc.runs.get(tag)
    line = None
    if r is None or r.exit is None:
        problems.append(f"{tag}: no result")
    else:
        errs = [l for _, l in r.err if l.startswith("aivmm: error:")]
        line = next((l for l in errs if l.startswith("aivmm: error: guest kernel panic: Kernel panic - not syncing")),
                    None)
        if r.timeout:
            problems.append(f"{tag}: still running after {r.wall_ms} ms")
        elif r.exit == "0" or not r.exit.isdigit():
            problems.append(f"{tag}: aivmm exit {r.exit}, want a non-zero status")
        if line is None:
            problems.append(f"{tag}: no `aivmm: error: guest kernel panic: Kernel panic - not syncing` line; "
                            f"stderr errors: {errs[:3]}")
        if r.first("E2E-HARD-PANICKING") is None:
            problems.append(f"{tag}: the guest did not reach its panic")
        if panics(r):
            problems.append(f"{tag}: Rust panic: {panics(r)[0]}")
    return problems, line


def judge_panic(sc):
    problems, line = judge_panic_run(sc, "panic")
    p2, _ = judge_panic_run(sc, "panic/no-reset")
    problems += p2
    r, r2 = sc.runs.get("panic"), sc.runs.get("panic/no-reset")
    q = sc.runs.get("panic/reset")
    if q is None or q.exit is None:
        problems.append("panic/reset: no result")
    else:
        errs = [l for _, l in q.err if l.startswith("aivmm: error:")]
        if q.exit != "0":
            problems.append(f"panic/reset: a plain reset gave exit {q.exit}, want 0: {errs[:2]}")
        if errs:
            problems.append(f"panic/reset: error lines after a plain reset: {errs[:2]}")
        if q.first("E2E-HARD-RESETTING") is None:
            problems.append("panic/reset: the guest did not reach its reboot")
    if problems:
        return False, "; ".join(problems), []
    return True, (f"exit {r.exit} after {r.wall_ms} ms with: {line.strip()}; without a guest reset "
                  f"aivmm stops it itself (exit {r2.exit} after {r2.wall_ms} ms); a plain reset still exits 0"), []


def judge_seccomp(sc):
    problems, info = [], []
    for tag in ("seccomp", "seccomp/off"):
        p, i = check_run(sc, tag)
        problems += p
        info += i
    r = sc.runs.get("seccomp")
    threads = []
    if r is not None:
        for _, l in r.out:
            m = re.search(r"E2E-THREAD tid=(\d+) name=(\S*) seccomp=(\d+) filters=(\S+)", l)
            if m:
                threads.append((m.group(2), m.group(3), m.group(4)))
        errs = [l for _, l in r.err if "seccomp" in l and "aivmm: error" in l]
        if errs:
            problems.append(f"seccomp: {errs[0]}")
    names = {t[0] for t in threads}
    for want in ("vcpu0", "aivmm-fs-q1", "aivmm-blk"):
        if want not in names:
            problems.append(f"seccomp: no {want} thread among {sorted(names)}")
    # Every thread: the process filter and its own kind's (API threads included).
    one = [n for n, _, f in threads if f != "2"]
    if one:
        problems.append(f"seccomp: threads without their own filter (Seccomp_filters != 2): {one}")
    summary = ", ".join(f"{n}:{s}/{f}" for n, s, f in threads)
    info.append(f"threads (name:Seccomp/filters): {summary}")
    if problems:
        return False, "; ".join(problems), info
    return True, (f"{len(threads)} threads, all Seccomp: 2 with 2 filters each (the process filter and "
                  f"their kind's: API, vCPU or device)"), info


def judge_escape(sc):
    problems, info = check_run(sc, sc.name)
    r = sc.runs.get(sc.name)
    leaks = [l for _, l in (r.out + r.err if r else []) if "E2E-HSECRET-" in l]
    if leaks:
        problems.append(f"the L1 secret reached the guest: {leaks[0][:200]!r}")
    res = r.results() if r else {}
    info.append(f"swap race: {res.get('g_swap_planted')} creates landed inside the share, "
                f"{res.get('g_swap_secret_reads')} secret reads")
    # The guest's watchdog (its swap loop stood still for 15 s) and L1's thread dump (20 s):
    # shown; a run that then never ends fails as timed out (check_run).
    lines = [l for _, l in (r.out + r.err if r else [])]
    stall = [l[:300] for l in lines if "E2E-STALL" in l or "E2E-STUCK" in l][:60]
    if res.get("l1_swaps"):
        info.append(f"L1 swapped {res['l1_swaps']} times")
    if problems:
        return False, "; ".join(problems), info + stall
    return True, "; ".join(info), stall


def judge(sc):
    """(ok, message, extra lines) for one of SCENARIOS."""
    if not sc.ended:
        return False, "did not finish", []
    if sc.name in ("blk-durability", "fs-durability"):
        return judge_durability(sc)
    if sc.name == "panic":
        return judge_panic(sc)
    if sc.name == "seccomp":
        return judge_seccomp(sc)
    if sc.name == "fs-owner":
        problems, info = check_run(sc, sc.name)
        if problems:
            return False, "; ".join(problems), info
        return True, "guest root's file, dir, symlink and FIFO are 0:0 on L1, user 65534's are 65534:65534; " \
                     "the user's chmod 4755 left 755", []
    if sc.name == "fs-modes":
        problems, info = check_run(sc, sc.name)
        if problems:
            return False, "; ".join(problems), info
        return True, "no setuid/setgid bit reached L1 (chmod, create, mkdir); security.* and trusted.* " \
                     "xattrs refused; aivmm exit 0", []
    if sc.name == "disk-full":
        problems, info = check_run(sc, sc.name)
        if problems:
            return False, "; ".join(problems), info
        return True, "ENOSPC in the share, EIO on the disk, both usable after, aivmm exit 0; " + "; ".join(info), []
    return judge_escape(sc)
