"""The `bench` scenario of the nested-VM harness (imported by harness.py).

aivmm against QEMU (`-M microvm` and `-M pc`, KVM) in the same L1 and the same
run. L1 side: l1-bench.sh; guest side: l2-bench.sh (and l2-io.sh's net-tap
guest). The judge here prints medians and ratios and writes the table to
benches/results/latest.md and the boot-time distributions to
benches/results/boot.svg.

Method (the same for every VMM):
- Boot time: vmmrun's stopwatch, exec of the VMM to the moment it reads the
  guest's `E2E-MARKER` console line. One untimed warm-up boot per VMM first (the
  first aivmm boot in an L1 unpacks the bzImage into aivmm's vmlinux cache), then
  E2E_BENCH_RUNS boots each, round robin. aivmm's setup time is its own debug line
  `setup took ... since exec` (exec -> first vCPU entry).
- Memory overhead: while the guest idles after its marker, L1 reads the VMM
  process's VmRSS (/proc/PID/status) and the Rss of its largest mapping
  (/proc/PID/smaps), which is the guest RAM (256 MiB, a little more for QEMU's
  alignment). Overhead = VmRSS - guest RAM Rss: what the VMM itself keeps
  resident, whatever the guest touched.
- fs: virtio-fs both sides (aivmm's in-process device; QEMU vhost-user-fs with the
  virtiofsd that Debian's qemu-system-common ships, cache=auto like aivmm's
  default). The L2 kernel (Debian cloud) has no 9p (CONFIG_NET_9P is off), and
  building the Rust virtiofsd would cost CI minutes. 64 MiB sequential write with
  fsync and read after drop_caches; `git status` in a committed tree of 10,000
  files (cold after drop_caches, and the median of three warm runs).
- blk: the same 64 MiB raw image in L1's tmpfs; bench-randread.c, 4 KiB random
  reads, O_DIRECT, queue depth 1, 5 s after a 1 s warm-up.
- net: TCP over one tap in L1, 32 MiB each way (the net-tap guest and l1-io.sh's
  socat servers), QEMU with virtio-net-device and vhost=off.

- ready: `aivmm run --workdir D -- sh -c 'echo ready'` on the Debian guest image
  (noclaude) against QEMU microvm + virtiofsd (QEMU 7.2's C one) on the same kernel,
  initrd and rootfs, the image's init running the command itself; exec -> the line
  "ready", median of E2E_BENCH_RUNS each, plus one traced run each (the guest's
  /run/aivmm/boot-trace). See l1-bench.sh's bench_ready.

Checked against goals (GOALS), what the VMM controls: the setup ratio (exec to
guest start, aivmm's `setup took` line against QEMU's `runstate_set` to running,
both as vmmrun saw them), the memory overhead ratio, and aivmm's exit latency
(its `the guest stopped` line to its exit). The same-kernel boot ratio is set by
the guest's own work and is printed only.

Environment: E2E_BENCH_RUNS (timed boots per VMM, default 10), E2E_BENCH_IO_RUNS
(device runs per VMM, default 1).
"""

import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess

import e2e_io

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(ROOT, "benches", "results")

RUNS = int(os.environ.get("E2E_BENCH_RUNS", "10"))
IO_RUNS = int(os.environ.get("E2E_BENCH_IO_RUNS", "1"))
KINDS = ("aivmm", "qemu-microvm", "qemu-pc")
# What the VMM controls, and each goal (at most): the same-kernel boot ratio is
# set by the guest's own work and is printed for information only.
GOALS = {
    "setup ratio aivmm/qemu-microvm": 0.3,
    "memory overhead ratio aivmm/qemu-microvm": 0.1,
    "exit latency ms": 5.0,
}

SCENARIOS = {
    "bench": f"aivmm vs QEMU microvm/pc in one L1, median of E2E_BENCH_RUNS={RUNS} boots each: setup, "
    "memory overhead and exit latency checked against their goals, the boot ratio, fs/blk/net figures; "
    "writes benches/results/",
}
SCENARIOS["bench-net"] = (f"the bench's net rows alone, E2E_BENCH_IO_RUNS={IO_RUNS} each: 32 MiB each way and "
                          "200 sequential connects through aivmm's own network (--net user), passt (--net passt) "
                          "and a tap (aivmm and QEMU microvm), with the ratios against their goals")
SCENARIOS["bench-io"] = (f"the bench's device rows alone, E2E_BENCH_IO_RUNS={IO_RUNS} each: virtio-fs (sequential "
                         "write and read, git status cold and warm, 4 KiB random writes) and virtio-blk (4 KiB "
                         "random reads), aivmm against QEMU microvm with the C virtiofsd, the same tree and image")
SCENARIOS["ready"] = (f"the bench's ready rows alone: `aivmm run --workdir D -- sh -c 'echo ready'` on the Debian "
                      f"image against QEMU microvm + virtiofsd on the same kernel, initrd and rootfs, median of "
                      f"E2E_BENCH_RUNS={RUNS} each, exec to \"ready\"")
SCENARIOS["build"] = ("the bench's build rows alone: zlib (Debian's source package) in /work, git init/add/commit, "
                      "configure, make -j2 and make test, in aivmm's guest and under QEMU microvm + virtiofsd on the "
                      "same image; the output matches L1's native build file for file, no clock skew warning")
# ~40 boots and the device runs: far too long for the default set (CI has 90 minutes).
NOT_DEFAULT = {"bench", "bench-net", "bench-io", "ready", "build"}
# The Debian guest image (harness GUEST_IMAGE_SCENARIOS) each boots: "build" is
# the image without Claude Code plus a C toolchain (IMAGE_FLAGS); the ready rows
# boot whichever of the two L1 has.
IMAGES = {"bench": "build", "ready": "noclaude", "build": "build"}
IMAGE_FLAGS = {"build": ["--no-claude", "--package", "gcc", "--package", "make", "--package", "libc6-dev"]}
# The build rows' project: Debian bookworm's zlib source (the upstream tarball of
# the source package), fetched once from the Debian archive into the harness's
# work directory and checked against the Sources index's sha256.
BUILD_SRC_URL = "http://deb.debian.org/debian/pool/main/z/zlib/zlib_1.2.13.dfsg.orig.tar.bz2"
BUILD_SRC_SHA256 = "71feb7947e3c00ef125f83b79a4e529bde31171e5babe48b391f06758d1ab0a1"
BUILD_KINDS = ("aivmm", "qemu-virtiofsd", "qemu-virtiofsd-rs")
BUILD_PEERS = {"qemu-virtiofsd": "QEMU 7.2's C virtiofsd", "qemu-virtiofsd-rs": "the Rust virtiofsd"}
BUILD_NAME = "build ratio aivmm/qemu-microvm+virtiofsd"
BUILD_GOAL = 0.8
READY_KINDS = ("aivmm", "qemu-virtiofsd")
READY_NAME = "ready ratio aivmm/qemu-microvm+virtiofsd"
READY_GOAL = 0.6
NO_READY = 'no "ready" line, '
# A boot takes 5-15 s under nested TCG; 60 s each is the same slack qemu-compare has.
BUDGET = {"bench": 5 * (RUNS + 1) * 60 + IO_RUNS * (2 * 180 + 4 * 150) + 300,
          "bench-net": IO_RUNS * 4 * 150 + 120,
          "bench-io": IO_RUNS * 2 * 180 + 300,
          "ready": 2 * (RUNS + 1) * 60 + 120,
          "build": 4 * 900 + 300}
BUDGET["bench"] += BUDGET["build"]
# The net rows' goals (at least): aivmm's own network against passt and a tap, in
# the same L1, each way; connection setup at least passt's.
NET_GOALS = {
    "net up ratio user/passt": 2.0,
    "net down ratio user/passt": 2.0,
    "net up ratio user/tap": 0.8,
    "net down ratio user/tap": 0.8,
    "connects/s ratio user/passt": 1.0,
}

MIB = 1024.0


def l2_extras(cpio, moddir, base_mods, h):
    """Guest side: l2-bench.sh and bench-randread (static, built here with gcc)."""
    cpio.copy("l2-bench.sh", os.path.join(HERE, "l2-bench.sh"), 0o644)
    src = os.path.join(HERE, "bench-randread.c")
    out = os.path.join(h.WORK, "bench-randread")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", out, src],
                           capture_output=True, text=True)
        if r.returncode != 0:
            h.die(f"building bench-randread failed (gcc -static; needs libc6-dev):\n{r.stderr}")
    cpio.copy("bin/bench-randread", out, 0o755)


def build_source(h):
    """The build rows' source tarball in the work directory (fetched once), or None
    with a note when it cannot be had (offline and not cached)."""
    import hashlib
    import urllib.request
    out = os.path.join(h.WORK, os.path.basename(BUILD_SRC_URL))

    def ok(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == BUILD_SRC_SHA256
    if os.path.exists(out) and ok(out):
        return out
    try:
        with urllib.request.urlopen(BUILD_SRC_URL, timeout=60) as r, open(out + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        h.note(f"cannot fetch the build rows' source {BUILD_SRC_URL}: {e}")
        return None
    if not ok(out + ".part"):
        h.note(f"{BUILD_SRC_URL}: sha256 mismatch (want {BUILD_SRC_SHA256}); the build rows will fail")
        return None
    os.replace(out + ".part", out)
    return out


def l1_extras(cpio, moddir, h, names=()):
    """L1 side: l1-bench.sh, QEMU's virtiofsd, the run counts, and the build rows'
    source if a scenario that builds is run."""
    if {"bench", "build"} & set(names):
        src = build_source(h)
        if src:
            cpio.copy("e2e/build-src.tar.bz2", src, 0o644)
        rs = os.path.join(h.WORK, "virtiofsd-rs", "bin", "virtiofsd")
        if os.path.exists(rs):  # tests/e2e/run installs it (cargo install virtiofsd)
            h.add_binary(cpio, "bin/virtiofsd-rs", rs)
    cpio.copy("l1-bench.sh", os.path.join(HERE, "l1-bench.sh"), 0o644)
    vfsd = "/usr/lib/qemu/virtiofsd"
    if os.path.exists(vfsd):
        h.add_binary(cpio, "bin/virtiofsd", vfsd)
    cpio.file("e2e/bench-runs", f"{RUNS}\n".encode())
    cpio.file("e2e/bench-io-runs", f"{IO_RUNS}\n".encode())


# ---------------------------------------------------------------- figures


def med(v):
    return statistics.median(v) if v else None


def fmt(v, nd=0):
    return "n/a" if v is None else f"{v:.{nd}f}"


def fmt_list(v):
    return ",".join(fmt(x) for x in v) or "none"


def ratio(a, b):
    return a / b if a is not None and b else None


def mem_sample(run):
    """(VmRSS, guest RAM Rss, mapping size) in KiB from L1's sample, or None."""
    res = run.results()
    if res.get("mem_sample") != "ok":
        return None
    try:
        return (int(res["mem_vmrss_kb"]), int(res["mem_ram_rss_kb"]), int(res["mem_ram_map_kb"]),
                res.get("mem_ram_map", "?"))
    except (KeyError, ValueError):
        return None


def collect(sc):
    """Everything the bench runs measured, and what broke."""
    d = {
        "marker": {k: [] for k in KINDS}, "uptime": {k: [] for k in KINDS},
        "overhead": {k: [] for k in KINDS}, "rss": {k: [] for k in KINDS},
        "ram_rss": {k: [] for k in KINDS}, "ram_map": {k: set() for k in KINDS},
        "setup": [], "setup_seen": [], "boot_timer": [], "warmup": {}, "phases": {},
        "started": {k: [] for k in KINDS}, "exit": {k: [] for k in KINDS},
        "io": {"aivmm": {}, "qemu-microvm": {}, "qemu-vhost": {}, "aivmm-user": {}, "aivmm-passt": {}},
        "broken": [],
        "io_problems": [],
        "ready": {k: [] for k in READY_KINDS}, "ready_warmup": {}, "ready_trace": {k: {} for k in READY_KINDS},
        "ready_guest": {}, "ready_retried": [], "build": {}, "build_retry": {},
    }
    for tag in sc.order:
        parts = tag.split("/")
        if len(parts) < 3 or parts[0] != "bench":
            continue
        r = sc.runs[tag]
        part, kind = parts[1], parts[2]
        if part == "warmup":
            why = r.broke()
            if why:
                d["broken"].append(f"warm-up {kind}: {why}")
            else:
                d["warmup"][kind] = r.first("E2E-MARKER")
        elif part == "boot":
            why = r.broke()
            if why:
                d["broken"].append(f"{kind} boot {parts[3]}: {why}")
                continue
            d["marker"][kind].append(r.first("E2E-MARKER"))
            try:
                d["uptime"][kind].append(float(r.results().get("uptime_s", "nan")))
            except ValueError:
                pass
            m = mem_sample(r)
            if m is None:
                d["broken"].append(f"{kind} boot {parts[3]}: no memory sample ({r.results().get('mem_sample')})")
            else:
                rss, ram_rss, ram_map, name = m
                if ram_map < 256 * 1024:
                    d["broken"].append(f"{kind} boot {parts[3]}: largest mapping {ram_map} KiB ({name}) "
                                       "is smaller than guest RAM (256 MiB)")
                else:
                    d["overhead"][kind].append((rss - ram_rss) / MIB)
                    d["rss"][kind].append(rss / MIB)
                    d["ram_rss"][kind].append(ram_rss / MIB)
                    d["ram_map"][kind].add(f"{name} {ram_map // 1024} MiB")
            started, ended = vm_span(r, kind)
            if started is not None:
                d["started"][kind].append(started)
            if ended is not None:
                d["exit"][kind].append(ended)
            if kind == "aivmm":
                if r.setup_ms() is not None:
                    d["setup"].append(r.setup_ms())
                seen = next((ms for ms, l in r.err if "setup took" in l), None)
                if seen is not None:
                    d["setup_seen"].append(seen)
                if r.boot_timer_ms() is not None:
                    d["boot_timer"].append(r.boot_timer_ms())
                for name, ms in setup_phases(r):
                    d["phases"].setdefault(name, []).append(ms)
        elif part == "build" and kind in BUILD_KINDS + ("native",):
            d["build"][kind] = r
        elif part == "build" and kind.endswith("r") and kind[:-1] in BUILD_KINDS:
            d["build_retry"][kind[:-1]] = r
        elif part == "ready-trace" and kind in READY_KINDS:
            d["ready_guest"][kind] = guest_trace(r)
        elif part in ("ready", "ready-warmup") and kind in READY_KINDS:
            ms = ready_ms(r)
            if ms is None or r.exit != "0" or r.timeout:
                errs = [l.strip() for _, l in r.err if l.startswith("aivmm: error:")] or \
                    [l.strip() for _, l in r.err if l.strip()][-2:]
                why = (f"{part} {kind}{' ' + parts[3] if len(parts) > 3 else ''}: "
                       f"{NO_READY if ms is None else ''}exit {r.exit}{', timed out' if r.timeout else ''}: "
                       f"{r.qemu_reset() or errs}")
                if part == "ready" and f"bench/ready/{kind}/{parts[3]}r" in sc.runs:
                    d["ready_retried"].append(why)  # its retry counts (or fails) instead
                else:
                    d["broken"].append(why)
            elif part == "ready-warmup":
                d["ready_warmup"][kind] = ms
            else:
                d["ready"][kind].append(ms)
                for name, t in ready_trace(r, kind).items():
                    d["ready_trace"][kind].setdefault(name, []).append(t)
        elif part in ("io", "net") and kind in d["io"]:
            problems, _ = e2e_io.check_run(sc, tag)
            if problems:
                d["io_problems"] += problems
            for k, v in e2e_io.figures(sc, tag).items():
                if v > 0:  # a rate of 0 is a failed step (its check says why), not a figure
                    d["io"][kind].setdefault(k, []).append(v)
    return d


def ready_ms(r):
    """When the VMM's stdout said "ready" (the command's own line), ms after exec."""
    return next((ms for ms, l in r.out if l.strip() == "ready"), None)


def ready_trace(r, kind):
    """{step: ms after exec} of one ready run, as vmmrun saw the VMM's lines: where
    the time between exec and "ready" goes."""
    steps = {}
    if kind == "aivmm":
        pats = [("vCPU entry", r"setup took"), ("agent connected", r"the guest agent is ready after")]
        for name, pat in pats:
            ms = next((ms for ms, l in r.err if re.search(pat, l)), None)
            if ms is not None:
                steps[name] = ms
    else:
        ms = next((ms for ms, l in r.err if re.search(r"runstate_set .*new_state \d+ \(running\)", l)), None)
        if ms is not None:
            steps["vCPU entry"] = ms
    ms = ready_ms(r)
    if ms is not None:
        steps["ready"] = ms
    return steps


def guest_trace(r):
    """[(guest uptime s, step)] of a trace run: the lines `UPTIME STEP` that the
    Debian image's init writes to /run/aivmm/boot-trace (the command cats it)."""
    out = []
    for _, l in r.out:
        m = re.match(r"^(\d+\.\d+) ([a-z].*)$", l.strip())
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def ready_rows(d):
    """(lines, missed goals) of the ready rows."""
    m = {k: med(d["ready"][k]) for k in READY_KINDS}
    v = ratio(m["aivmm"], m["qemu-virtiofsd"])
    lines = [f"{READY_NAME}: {fmt(v, 2)} (goal: <= {READY_GOAL:g}; exec -> \"ready\" median ms: aivmm "
             f"{fmt(m['aivmm'])}, qemu-microvm+virtiofsd {fmt(m['qemu-virtiofsd'])}; "
             f"{len(d['ready']['aivmm'])} and {len(d['ready']['qemu-virtiofsd'])} runs)"]
    for k in READY_KINDS:
        tr = d["ready_trace"][k]
        lines.append(f"  ready trace {k} (median ms after exec): "
                     + ", ".join(f"{name} {fmt(med(v_))}" for name, v_ in tr.items())
                     + f"; all runs {fmt_list(d['ready'][k])}; warm-up {fmt(d['ready_warmup'].get(k))}")
        g = d["ready_guest"].get(k)
        if g:
            # Each step with the time it took since the one before (the first: the
            # kernel's own boot, from uptime 0).
            prev, steps = 0.0, []
            for up, name in g:
                steps.append(f"{name} {up:.2f} (+{(up - prev) * 1000:.0f} ms)")
                prev = up
            lines.append(f"  guest boot trace {k} (uptime s, one untimed run): " + ", ".join(steps))
    for why in d["ready_retried"]:
        lines.append(f"  ready run retried: {why}")
    missed = []
    if v is None:
        missed.append(f"{READY_NAME}: not measured")
    elif v > READY_GOAL:
        missed.append(f"{READY_NAME} {fmt(v, 2)} > goal {READY_GOAL:g}")
    return lines, missed


BUILD_STEPS = ("build-start", "build-git", "build-configured", "build-made", "build-end")


def build_run(d, k):
    """The build run of kind `k` that counts: its retry, if it had one."""
    return d["build_retry"].get(k) or d["build"].get(k)


def build_marks(r):
    """{step: ms after exec} of one build run's BUILD_STEPS lines (None if missing)."""
    return {s_: next((ms for ms, l in r.out if l.strip() == s_), None) for s_ in BUILD_STEPS}


def build_seconds(r):
    """build-start to build-end of one build run, as vmmrun stamped them, or None."""
    if r is None or r.exit != "0":
        return None
    at = build_marks(r)
    if at["build-start"] is None or at["build-end"] is None:
        return None
    return (at["build-end"] - at["build-start"]) / 1000


def build_rows(d):
    """(lines, problems, missed goals) of the build rows."""
    lines, problems, missed = [], [], []
    t, steps = {}, {}
    for k in ("native",) + BUILD_KINDS:
        r = d["build"].get(k)
        if r is None:
            problems.append(f"build {k}: did not run")
            continue
        if k in d["build_retry"]:
            # The first run never reached build-end (l1-bench.sh ran it again).
            reached = [s_ for s_, ms in build_marks(r).items() if ms is not None][-1:]
            lines.append(f"  build run retried: {k} ended after {reached} (exit {r.exit}): "
                         f"{r.qemu_reset() or [l.strip() for _, l in r.err if l.strip()][-2:]}")
            r = d["build_retry"][k]
        at = build_marks(r)
        if build_seconds(r) is None:
            tail = [l.strip() for _, l in (r.out + r.err) if l.strip()][-3:]
            problems.append(f"build {k}: did not finish (exit {r.exit}; reached "
                            f"{[s_ for s_ in BUILD_STEPS if at[s_] is not None][-1:]}): {r.qemu_reset() or tail}")
            continue
        t[k] = build_seconds(r)
        steps[k] = ", ".join(f"{b.split('-', 1)[1]} {(at[b] - at[a]) / 1000:.1f}"
                             for a, b in zip(BUILD_STEPS, BUILD_STEPS[1:]) if at[a] is not None and at[b] is not None)
        if not any(l.strip() == "build-no-skew" for _, l in r.out):
            skew = [l.strip() for _, l in r.out if "skew" in l.lower() or "in the future" in l.lower()]
            # The peer's own clock is its business: reported, not failed.
            (problems if k == "aivmm" else lines).append(f"build {k}: make warned of clock skew: {skew[:2]}")
        if k != "native":
            res = r.results()
            native = d["build"].get("native")
            want = native.results().get("files") if native else None
            if res.get("differ") != "0" or res.get("files") != want:
                problems.append(f"build {k}: the output differs from L1's native build: {res.get('differ')} "
                                f"file(s) ({res.get('first_diffs')}), {res.get('files')} files against {want}")
    # Against the better peer.
    peers = [k for k in BUILD_PEERS if k in t]
    best = min(peers, key=lambda k: t[k]) if peers else None
    v = ratio(t.get("aivmm"), t.get(best))
    lines.append(f"{BUILD_NAME}: {fmt(v, 2)} (goal: <= {BUILD_GOAL:g}, against the better peer, "
                 f"{BUILD_PEERS.get(best, 'none')}; zlib in /work, git + configure + make -j2 + make test, s: "
                 f"aivmm {fmt(t.get('aivmm'), 1)}, "
                 + ", ".join(f"qemu-microvm+{BUILD_PEERS[k]} {fmt(t.get(k), 1)}" for k in BUILD_PEERS)
                 + f", L1 native {fmt(t.get('native'), 1)})")
    for k in ("native",) + BUILD_KINDS:
        if k in steps:
            lines.append(f"  build steps {k} (s): {steps[k]}")
    if v is None:
        missed.append(f"{BUILD_NAME}: not measured")
    elif v > BUILD_GOAL:
        missed.append(f"{BUILD_NAME} {fmt(v, 2)} > goal {BUILD_GOAL:g}")
    return lines, problems, missed


def judge_build(sc):
    """build: the build rows alone. It fails on a build that did not finish, an
    output that differs from L1's native build, or a clock skew warning; the goal
    is printed, not enforced."""
    d = collect(sc)
    lines, problems, missed = build_rows(d)
    if problems:
        return False, "; ".join(problems)[:1500], lines
    return True, ("the builds match L1's native build file for file, no clock skew"
                  + (f" ({'; '.join(missed)})" if missed else ", within the goal") + "; figures below"), lines


def judge_ready(sc):
    """ready: the ready rows alone. The goal is printed, not enforced (like the build
    ratio, it is a figure for the README, not a gate)."""
    d = collect(sc)
    lines, missed = ready_rows(d)
    problems = list(d["broken"])
    for k in READY_KINDS:
        if len(d["ready"][k]) < RUNS:
            problems.append(f"{k}: {len(d['ready'][k])} of {RUNS} ready runs reported")
    if problems:
        return False, "; ".join(problems)[:1500], lines
    return True, ("ready rows measured" + (f" ({'; '.join(missed)})" if missed else ", within the goal")
                  + "; figures below"), lines


def vm_span(r, kind):
    """(exec -> guest start, guest stop -> process exit) in ms, both as vmmrun saw
    the VMM's stderr lines, the same way for each VMM: aivmm's debug lines `setup
    took` (first vCPU entry) and `the guest stopped`; QEMU's traces `runstate_set`
    to running and `qemu_system_shutdown_request`. None where a line is missing."""
    if kind.startswith("aivmm"):
        start = next((ms for ms, l in r.err if "setup took" in l), None)
        stop = next((ms for ms, l in r.err if "the guest stopped:" in l), None)
    else:
        start = next((ms for ms, l in r.err if re.search(r"runstate_set .*new_state \d+ \(running\)", l)), None)
        stop = next((ms for ms, l in r.err if "qemu_system_shutdown_request" in l), None)
    exited = r.wall_ms if r.exit == "0" or kind.startswith("aivmm") else None
    span = exited - stop if exited is not None and stop is not None and exited >= stop else None
    return start, span


def setup_phases(r):
    """[(phase, ms)] from aivmm's debug lines `setup: PHASE took X ms (Y ms since exec)`;
    the first entry is what comes before them (exec, argument and config checks)."""
    out = []
    for _, line in r.err:
        m = re.search(r"setup: (.+?) took ([\d.]+) ms \(([\d.]+) ms since exec\)", line)
        if m:
            if not out:
                out.append(("exec to VM build", float(m.group(3)) - float(m.group(2))))
            out.append((m.group(1), float(m.group(2))))
    return out


# (figure key, device, metric label, unit); higher is better for all of them.
DEVICE_FIGS = [
    ("fs_seq_write_MiBps", "fs", "seq_write", "MiB/s"),
    ("fs_seq_read_MiBps", "fs", "seq_read", "MiB/s"),
    ("fs_git_status_cold_files_per_s", "fs", "git_status_cold", "files/s"),
    ("fs_git_status_warm_files_per_s", "fs", "git_status_warm", "files/s"),
    ("fs_randwrite_iops", "fs", "randwrite_4k", "IOPS"),
    ("blk_randread_iops", "blk", "randread_4k", "IOPS"),
    ("tap_up_MiBps", "net", "tcp_up", "MiB/s"),
    ("tap_down_MiBps", "net", "tcp_down", "MiB/s"),
]


def net_rows(d):
    """(lines, missed goals) of the net rows: aivmm's own network against passt and a tap."""
    io = d["io"]
    user, passt, tap = io["aivmm-user"], io["aivmm-passt"], io["aivmm"]
    fig = {
        "net up ratio user/passt": (med(user.get("net_up_MiBps", [])), med(passt.get("net_up_MiBps", [])), "MiB/s"),
        "net down ratio user/passt": (med(user.get("net_down_MiBps", [])), med(passt.get("net_down_MiBps", [])),
                                      "MiB/s"),
        "net up ratio user/tap": (med(user.get("net_up_MiBps", [])), med(tap.get("tap_up_MiBps", [])), "MiB/s"),
        "net down ratio user/tap": (med(user.get("net_down_MiBps", [])), med(tap.get("tap_down_MiBps", [])), "MiB/s"),
        "connects/s ratio user/passt": (med(user.get("net_connects_per_s", [])),
                                        med(passt.get("net_connects_per_s", [])), "connects/s"),
    }
    lines, missed = [], []
    # The tap rows against QEMU with vhost-net (information: no goal).
    vh = io["qemu-vhost"]
    for d_ in ("up", "down"):
        a, b = med(tap.get(f"tap_{d_}_MiBps", [])), med(vh.get(f"tap_{d_}_MiBps", []))
        lines.append(f"net tap {d_} ratio aivmm/qemu-microvm-vhost: {fmt(ratio(a, b), 2)} "
                     f"({fmt(a, 1)} against {fmt(b, 1)} MiB/s; QEMU -netdev tap,vhost=on)")
    for name, goal in NET_GOALS.items():
        a, b, unit = fig[name]
        v = ratio(a, b)
        lines.append(f"{name}: {fmt(v, 2)} (goal: >= {goal:g}; {fmt(a, 1)} against {fmt(b, 1)} {unit})")
        if v is None:
            missed.append(f"{name}: not measured")
        elif v < goal:
            missed.append(f"{name} {fmt(v, 2)} < goal {goal:g}")
    return lines, missed


def judge_net(sc):
    """bench-net: the net rows alone."""
    d = collect(sc)
    lines, missed = net_rows(d)
    problems = d["io_problems"] + missed
    if problems:
        return False, "; ".join(problems)[:1500], lines
    return True, "the net rows meet their goals; figures below", lines


def device_rows(d, figs):
    """(lines, [(device, metric, unit, aivmm, qemu)], problems) of the device rows."""
    lines, dev, problems = [], [], []
    for key, devname, metric, unit in figs:
        a, b = med(d["io"]["aivmm"].get(key, [])), med(d["io"]["qemu-microvm"].get(key, []))
        dev.append((devname, metric, unit, a, b))
        lines.append(f"{devname} {metric} ratio aivmm/qemu-microvm: {fmt(ratio(a, b), 2)} "
                     f"(aivmm {fmt(a, 1)} {unit}, qemu-microvm {fmt(b, 1)} {unit})")
        for k in ("aivmm", "qemu-microvm"):
            if not d["io"][k].get(key):
                problems.append(f"{devname} {metric}: no {k} figure")
    return lines, dev, problems


def judge_io(sc):
    """bench-io: the fs and blk rows alone; figures, no goal (a row with no figure fails)."""
    d = collect(sc)
    lines, _, missing = device_rows(d, [f for f in DEVICE_FIGS if f[1] in ("fs", "blk")])
    lines.append("  (all runs: " + "; ".join(f"{k} {key}={fmt_list(v)}" for k in ("aivmm", "qemu-microvm")
                                             for key, v in sorted(d["io"][k].items())) + ")")
    problems = d["io_problems"] + missing
    if problems:
        return False, "; ".join(problems)[:1500], lines
    return True, "device rows measured; figures below", lines


def judge(sc, vmm_mode="aivmm"):
    """(ok, message, extra lines); writes benches/results/ when it has boot figures."""
    if sc.name == "bench-net":
        return judge_net(sc)
    if sc.name == "bench-io":
        return judge_io(sc)
    if sc.name == "ready":
        return judge_ready(sc)
    if sc.name == "build":
        return judge_build(sc)
    d = collect(sc)
    m = {k: med(d["marker"][k]) for k in KINDS}
    lines = [f"  boot median ms (exec -> E2E-MARKER console line, {RUNS} timed boots each, round robin, "
             "after one untimed warm-up boot per VMM): "
             + " ".join(f"{k}={fmt(m[k])}" for k in KINDS)
             + " (runs: " + ", ".join(f"{k}={len(d['marker'][k])}" for k in KINDS) + ")",
             "  warm-up boots ms (untimed): " + " ".join(f"{k}={fmt(d['warmup'].get(k))}" for k in KINDS)]
    boot_ratio = {q: ratio(m["aivmm"], m[q]) for q in ("qemu-microvm", "qemu-pc")}
    for q in ("qemu-microvm", "qemu-pc"):
        lines.append(f"boot ratio aivmm/{q}: {fmt(boot_ratio[q], 2)} (information: the same kernel's own "
                     "work sets it)")
    st = {k: med(d["started"][k]) for k in KINDS}
    ex = {k: med(d["exit"][k]) for k in KINDS}
    ov0 = {k: med(d["overhead"][k]) for k in KINDS}
    figures = {
        "setup ratio aivmm/qemu-microvm": ratio(st["aivmm"], st["qemu-microvm"]),
        "memory overhead ratio aivmm/qemu-microvm": ratio(ov0["aivmm"], ov0["qemu-microvm"]),
        "exit latency ms": ex["aivmm"],
    }
    detail = {
        "setup ratio aivmm/qemu-microvm": f"exec -> guest start as vmmrun saw it, median ms: aivmm "
        f"{fmt(st['aivmm'])} (`setup took`), qemu-microvm {fmt(st['qemu-microvm'])} (runstate running), "
        f"qemu-pc {fmt(st['qemu-pc'])}",
        "memory overhead ratio aivmm/qemu-microvm": f"aivmm {fmt(ov0['aivmm'], 1)} MiB, qemu-microvm "
        f"{fmt(ov0['qemu-microvm'], 1)} MiB",
        "exit latency ms": "aivmm's `the guest stopped` line to its exit, median; the same span for "
        f"qemu-microvm (shutdown request to exit) {fmt(ex['qemu-microvm'])} ms, qemu-pc {fmt(ex['qemu-pc'])} "
        f"ms; aivmm runs {fmt_list(d['exit']['aivmm'])}",
    }
    missed = []
    for name, goal in GOALS.items():
        v = figures[name]
        nd = 0 if name.endswith("ms") else 2
        lines.append(f"{name}: {fmt(v, nd)} (goal: <= {goal:g}; {detail[name]})")
        if v is None:
            missed.append(f"{name}: not measured")
        elif v > goal:
            missed.append(f"{name} {fmt(v, nd)} > goal {goal:g}")
    lines.append(f"  aivmm setup (exec -> first vCPU entry, its `setup took` line) median ms: "
                 f"{fmt(med(d['setup']), 1)} (line seen by vmmrun at {fmt(med(d['setup_seen']))} ms); "
                 f"aivmm boot-timer median ms: {fmt(med(d['boot_timer']))}")
    if d["phases"]:
        lines.append("  aivmm setup phases median ms: "
                     + ", ".join(f"{k} {fmt(med(v), 1)}" for k, v in d["phases"].items()))
    lines.append("  guest uptime at marker median s: "
                 + " ".join(f"{k}={fmt(med(d['uptime'][k]), 2)}" for k in KINDS))
    ov = {k: med(d["overhead"][k]) for k in KINDS}
    lines.append("  memory median MiB (VmRSS - Rss of the guest RAM mapping, sampled after the marker): "
                 + "; ".join(f"{k} overhead {fmt(ov[k], 1)} (VmRSS {fmt(med(d['rss'][k]), 1)}, "
                             f"guest RAM touched {fmt(med(d['ram_rss'][k]), 1)}; "
                             f"{', '.join(sorted(d['ram_map'][k])) or '?'})" for k in KINDS))
    for q in ("qemu-microvm", "qemu-pc"):
        lines.append(f"memory overhead aivmm/{q}: {fmt(ratio(ov['aivmm'], ov[q]), 2)} "
                     f"(aivmm {fmt(ov['aivmm'], 1)} MiB, {q} {fmt(ov[q], 1)} MiB)")
    dev_lines, dev, dev_missing = device_rows(d, DEVICE_FIGS)
    lines += dev_lines
    lines += ready_rows(d)[0]
    b_lines, b_problems, _ = build_rows(d)
    lines += b_lines
    net_lines, net_missed = net_rows(d)
    lines += net_lines
    missed += net_missed
    lines.append("  (fs: virtio-fs on both sides, QEMU through QEMU 7.2's C virtiofsd from Debian; "
                 "virtio-9p is out because the L2 kernel has no 9p, and building the Rust virtiofsd "
                 "would cost CI minutes)")
    lines.append("  all boots ms: " + "; ".join(f"{k}=" + ",".join(fmt(x) for x in d["marker"][k])
                                                for k in KINDS))
    if vmm_mode == "qemu":
        lines.append("  (E2E_VMM=qemu: the 'aivmm' column is QEMU microvm; benches/results/ not written)")
    elif any(d["marker"][k] for k in KINDS):
        try:
            write_results(d, m, boot_ratio, ov, dev)
            lines.append(f"  wrote {os.path.relpath(os.path.join(RESULTS, 'latest.md'), ROOT)} and "
                         f"{os.path.relpath(os.path.join(RESULTS, 'boot.svg'), ROOT)}")
        except OSError as e:
            lines.append(f"  could not write benches/results: {e}")

    problems = list(d["broken"]) + d["io_problems"] + b_problems
    for k in KINDS:
        if len(d["marker"][k]) < RUNS and not any(p.startswith(k) for p in d["broken"]):
            problems.append(f"{k}: {len(d['marker'][k])} of {RUNS} timed boots reported")
    problems += dev_missing
    if vmm_mode == "aivmm":
        problems[:0] = missed
    if problems:
        return False, "; ".join(problems)[:1500], lines
    return True, "setup, memory and exit latency within their goals; figures below", lines


# ---------------------------------------------------------------- results files


def machine():
    model, n = "unknown CPU", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        n = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, nproc {n}{mem}, host kernel {platform.release()}"


def revision():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" with uncommitted changes" if dirty else "") if rev else "unknown"
    except OSError:
        return "unknown"


def write_results(d, m, boot_ratio, ov, dev):
    os.makedirs(RESULTS, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    kernel = os.path.basename(os.environ.get("E2E_KERNEL", "") or _l2_kernel())
    t = [
        "# aivmm benchmark results",
        "",
        f"Written by `tests/e2e/run bench` on {now}, aivmm {revision()}.",
        "",
        f"- Machine: {machine()}.",
        "- L1: QEMU TCG (`-accel tcg,thread=multi -cpu max`, 2 vCPUs, 3 GiB) running the Debian cloud "
        f"kernel ({kernel}) with kvm-amd/kvm-intel loaded (nested virtualization); every VMM below runs "
        "in that same L1, with KVM, in the same run. L1's kernel command line has "
        f"`{os.environ.get('E2E_L1_CMDLINE', 'init_on_free=1')}` (see tests/e2e/README.md, "
        "\"Fair timing\").",
        "- L2: the same kernel and a busybox initramfs, `console=ttyS0 quiet panic=-1`, 1 vCPU; 256 MiB "
        "for the boots, 512 MiB for the device runs. QEMU: `-M microvm,acpi=on,rtc=on` or `-M pc`, "
        "`-enable-kvm -cpu host -nodefaults`.",
        "- Absolute times under nested TCG mean little; compare the ratios.",
        "",
        "## Boot and memory",
        "",
        f"Medians of {len(d['marker']['aivmm'])}/{len(d['marker']['qemu-microvm'])}/"
        f"{len(d['marker']['qemu-pc'])} boots (aivmm/microvm/pc), round robin, after one untimed "
        "warm-up boot each.",
        "",
        "| | aivmm | QEMU microvm | QEMU pc | aivmm/microvm | aivmm/pc |",
        "|---|---:|---:|---:|---:|---:|",
        f"| boot, exec to guest marker (ms) | {fmt(m['aivmm'])} | {fmt(m['qemu-microvm'])} | "
        f"{fmt(m['qemu-pc'])} | {fmt(boot_ratio['qemu-microvm'], 2)} | {fmt(boot_ratio['qemu-pc'], 2)} |",
        f"| guest uptime at marker (s) | " + " | ".join(fmt(med(d['uptime'][k]), 2) for k in KINDS) + " | | |",
        f"| VMM setup, exec to first vCPU entry (ms) | {fmt(med(d['setup']), 1)} | | | | |",
        f"| memory overhead, VmRSS - guest RAM Rss (MiB) | {fmt(ov['aivmm'], 1)} | {fmt(ov['qemu-microvm'], 1)} | "
        f"{fmt(ov['qemu-pc'], 1)} | {fmt(ratio(ov['aivmm'], ov['qemu-microvm']), 2)} | "
        f"{fmt(ratio(ov['aivmm'], ov['qemu-pc']), 2)} |",
        f"| VmRSS (MiB) | " + " | ".join(fmt(med(d['rss'][k]), 1) for k in KINDS) + " | | |",
        "",
        "![boot-time distributions](boot.svg)",
        "",
        "Where aivmm's set-up time goes (medians, ms; its `setup:` debug lines): "
        + (", ".join(f"{k} {fmt(med(v), 1)}" for k, v in d["phases"].items()) or "not logged") + ".",
        "",
        "## Devices (aivmm vs QEMU microvm)",
        "",
        f"Medians of {IO_RUNS} run(s) each. Higher is better.",
        "",
        "| device | metric | aivmm | QEMU microvm | aivmm/microvm |",
        "|---|---|---:|---:|---:|",
    ]
    for devname, metric, unit, a, b in dev:
        t.append(f"| {devname} | {metric} ({unit}) | {fmt(a, 1)} | {fmt(b, 1)} | {fmt(ratio(a, b), 2)} |")
    for key, metric in (("tap_up_MiBps", "tcp_up"), ("tap_down_MiBps", "tcp_down")):
        a, b = med(d["io"]["aivmm"].get(key, [])), med(d["io"]["qemu-vhost"].get(key, []))
        t.append(f"| net | {metric}, QEMU vhost=on (MiB/s) | {fmt(a, 1)} | {fmt(b, 1)} | {fmt(ratio(a, b), 2)} |")
    rm = {k: med(d["ready"][k]) for k in READY_KINDS}
    t += [
        "",
        "## Time to a working prompt, and a build in /work (aivmm vs QEMU microvm + virtiofsd)",
        "",
        "The Debian guest image on both sides (same kernel, initrd and rootfs; 1 vCPU; virtio-fs /work; "
        "QEMU with QEMU 7.2's C virtiofsd, cache=auto). Lower is better.",
        "",
        "| | aivmm | QEMU microvm + virtiofsd | aivmm/QEMU |",
        "|---|---:|---:|---:|",
        f"| `aivmm run --workdir D -- sh -c 'echo ready'`, exec to \"ready\" (ms, median of "
        f"{len(d['ready']['aivmm'])}/{len(d['ready']['qemu-virtiofsd'])}) | {fmt(rm['aivmm'])} | "
        f"{fmt(rm['qemu-virtiofsd'])} | {fmt(ratio(rm['aivmm'], rm['qemu-virtiofsd']), 2)} |",
    ]
    bt = {k: build_seconds(build_run(d, k)) for k in ("native",) + BUILD_KINDS}
    for k, peer in BUILD_PEERS.items():
        t.append(f"| zlib in /work: git init/add/commit, configure, make -j2, make test (s; QEMU with {peer}; "
                 f"L1 natively: {fmt(bt['native'], 1)}) | {fmt(bt['aivmm'], 1)} | {fmt(bt[k], 1)} | "
                 f"{fmt(ratio(bt['aivmm'], bt[k]), 2)} |")
    t += [
        "",
        "## Method",
        "",
        "- Boot: `vmmrun` (tests/e2e/vmmrun.rs) takes the time at the VMM's exec and stamps the guest "
        "console line `E2E-MARKER`, which the L2 init prints after loading its modules: the same span "
        "for every VMM. One boot per VMM is an untimed warm-up; aivmm's unpacks the bzImage into its "
        "vmlinux cache, which the timed boots use (its default; `qemu-compare` also times "
        "`--no-kernel-cache`).",
        "- Setup: aivmm's debug line `setup took ... since exec` (`AIVMM_LOG=aivmm::vmm=debug`).",
        "- Memory: the guest idles 2 s after its marker; L1 reads the VMM's `VmRSS` from "
        "/proc/PID/status and, from /proc/PID/smaps, the `Rss` of the process's largest mapping, which "
        "is the guest RAM for both VMMs. Overhead = VmRSS - that Rss: what the VMM keeps resident "
        "besides the guest RAM the guest touched.",
        "- fs: virtio-fs both sides, cache=auto: aivmm's in-process device; QEMU `vhost-user-fs-device` "
        "with QEMU 7.2's C virtiofsd (Debian qemu-system-common), a shared memfd RAM backend and modern "
        "virtio-mmio (`-global virtio-mmio.force-legacy=false`: libvhost-user refuses legacy devices). "
        "virtio-9p is not compared: the L2 kernel (Debian cloud) is built without 9p, and building the "
        "Rust virtiofsd would cost CI minutes. 64 MiB `dd` with fsync, read back after drop_caches; "
        "`git status` on a committed tree of 10,000 files in 100 directories (cold after drop_caches, "
        "and the median of three warm runs), as files per second.",
        "- ready: `aivmm run --workdir D --net none --cpus 1 --memory 1G -- sh -c 'echo ready'` on the "
        "Debian image without Claude Code; QEMU `-M microvm` with the same kernel, initrd and rootfs "
        "(read-only), a state disk, `vhost-user-fs-device` tag `work` on D, and `aivmm.cmd=` so the "
        "image's init runs the command itself (the claude-microvm seed's way, without Nix). Exec to the "
        "line `ready` on the VMM's stdout; virtiofsd is started before QEMU's clock starts. One untimed "
        "warm-up run each formats the state disks.",
        "- build: zlib 1.2.13 (Debian bookworm's source package, 124 files) unpacked in L1; in /work: "
        "`git init; git add -A; git commit; ./configure; make -j2; make test`, timed from the script's "
        "first line to its last as stamped on the host; the image is the one above plus Debian's gcc, "
        "make and libc6-dev. The tree each VM leaves matches L1's native build (a chroot of the same "
        "image) file for file, aside from .git (commit times), configure.log (configure writes the "
        "date into it) and the script's own logs of configure, make and make test; aivmm's make "
        "warned of no clock skew.",
        "- blk: `tests/e2e/bench-randread.c`, 4 KiB random reads with O_DIRECT at queue depth 1 for 5 s "
        "on a 64 MiB raw image in L1's tmpfs (aivmm `--disk`, QEMU `virtio-blk-device`).",
        "- net: 32 MiB each way over TCP between the guest and socat in L1, through one tap "
        "(aivmm `--net tap:`, QEMU `-netdev tap` + `virtio-net-device`, with vhost=off and again "
        "with vhost=on: the kernel's vhost-net, QEMU's best on a tap).",
        "- Device runs give both VMMs an RLIMIT_NOFILE of 1000000 (virtiofsd sets that itself; aivmm raises "
        "its soft limit to the hard one, which L1's init leaves at 4096, too few fds for the 10,000-file "
        "tree: aivmm keeps one per inode).",
        "",
        "All boots (ms): " + "; ".join(f"{k} " + ", ".join(fmt(x) for x in d["marker"][k]) for k in KINDS),
        "",
    ]
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write("\n".join(t))
    with open(os.path.join(RESULTS, "boot.svg"), "w") as f:
        f.write(boot_svg({k: d["marker"][k] for k in KINDS}))


def _l2_kernel():
    import glob
    c = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    return c[-1] if c else "unknown"


def quantile(v, q):
    s = sorted(v)
    if not s:
        return None
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def boot_svg(series):
    """A box plot with every run as a dot, one row per VMM, hand-written SVG."""
    w, row, left, right, top = 800, 70, 170, 30, 40
    h = top + row * len(series) + 50
    vals = [x for v in series.values() for x in v]
    hi = max(vals) if vals else 1.0
    step = 1000 if hi > 5000 else 500 if hi > 2000 else 100
    xmax = (int(hi / step) + 1) * step

    def x(v):
        return left + (w - left - right) * v / xmax

    colors = {"aivmm": "#1f77b4", "qemu-microvm": "#d62728", "qemu-pc": "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">Boot time, exec to guest marker '
           f'(ms), nested KVM in one L1</text>']
    y_axis = top + row * len(series)
    for t in range(0, xmax + 1, step):
        if (t // step) % (2 if xmax / step > 12 else 1):
            continue
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{y_axis}" stroke="#ddd"/>')
        out.append(f'<text x="{x(t):.1f}" y="{y_axis + 16}" text-anchor="middle">{t}</text>')
    out.append(f'<line x1="{left}" y1="{y_axis}" x2="{w - right}" y2="{y_axis}" stroke="black"/>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{y_axis + 36}" text-anchor="middle">ms</text>')
    for i, (name, v) in enumerate(series.items()):
        cy = top + row * i + row / 2
        c = colors.get(name, "black")
        out.append(f'<text x="{left - 10}" y="{cy + 4:.1f}" text-anchor="end">{name} (n={len(v)})</text>')
        if not v:
            continue
        q1, q2, q3 = quantile(v, 0.25), quantile(v, 0.5), quantile(v, 0.75)
        out.append(f'<line x1="{x(min(v)):.1f}" y1="{cy:.1f}" x2="{x(max(v)):.1f}" y2="{cy:.1f}" stroke="{c}"/>')
        out.append(f'<rect x="{x(q1):.1f}" y="{cy - 14:.1f}" width="{max(x(q3) - x(q1), 1):.1f}" height="28" '
                   f'fill="{c}" fill-opacity="0.15" stroke="{c}"/>')
        out.append(f'<line x1="{x(q2):.1f}" y1="{cy - 14:.1f}" x2="{x(q2):.1f}" y2="{cy + 14:.1f}" '
                   f'stroke="{c}" stroke-width="3"/>')
        out.append(f'<text x="{x(q2):.1f}" y="{cy - 18:.1f}" text-anchor="middle" fill="{c}">'
                   f'median {q2:.0f}</text>')
        for j, val in enumerate(v):
            jitter = ((j * 7) % 11 - 5) * 1.6
            out.append(f'<circle cx="{x(val):.1f}" cy="{cy + jitter:.1f}" r="3" fill="{c}" fill-opacity="0.7"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
