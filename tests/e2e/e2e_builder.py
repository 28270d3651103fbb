"""The builder scenarios of the nested-VM harness (imported by harness.py).

L1 side: l1-builder.sh. `aivmm builder serve` runs in L1 with the Debian builder
image (`aivmm image build --builder`; its rootfs is L1's read-only disk with serial
e2e-builder), and L1's ssh client connects to 127.0.0.1:31022. Every ssh session is
a vmmrun run (tag builder/ssh-…), so its wall time is the time to the command's end.
L1 prints `E2E-CHECK name ok|FAIL why`, `E2E-FIG k=v` and `E2E-RESULT k=v` lines.
"""

import os
import statistics

import e2e_io  # its E2E-CHECK / E2E-FIG parser

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    "builder": "`aivmm builder serve` (Debian builder image, 1 GiB): the port listens on 127.0.0.1 only "
    "(refused on L1's 10.0.98.1), the VM is off until the first connection, `ssh builder@127.0.0.1 "
    "uname -a` boots it and answers from the guest (host key pinned), idle TTL 20s stops it, the "
    "next connection boots it again; SIGTERM powers it off",
    "builder-nix": "a host's Nix builds through the builder: Nix in L1 (Debian's nix-bin, root, no daemon), "
    "set up from `aivmm builder install --write` (machines file, ssh_config), runs `nix-build --max-jobs 0 "
    "--builders @machines` on a derivation the VM (off until then) builds and one that requires `kvm`; "
    "the results come back into L1's store",
    "builder-bench": "builder: cold (VM off) and warm time to the end of the first `ssh … true`, "
    "2 cold and 6 warm runs, idle TTL 15s between the cold ones",
}
# builder-bench (cold and warm ssh figures, several boots) runs by name: CI time goes
# to the functional scenarios, and `builder` already boots, idles and re-boots.
NOT_DEFAULT = {"builder-bench"}
# The Debian image each scenario needs (harness GUEST_IMAGE_SCENARIOS) and the
# `aivmm image build` flags of that kind.
IMAGES = {"builder": "builder", "builder-bench": "builder", "builder-nix": "builder"}
IMAGE_FLAGS = {"builder": ["--builder"]}
# Seconds each takes at most (each cold boot of the Debian guest in L2 takes ~1 min).
BUDGET = {"builder": 900, "builder-bench": 1200, "builder-nix": 900}

REQUIRED = ["serve-listens", "keys-0600", "off-before-use", "no-vm-before-use", "listen-loopback-only",
            "other-address-control", "other-address-control-data", "port-refused-on-10.0.98.1",
            "still-off-after-refused", "running-after-ssh", "one-boot", "warm-same-boot", "idle-stop",
            "vm-process-gone", "second-boot", "serve-stops-on-sigterm", "no-vm-left"]


REQUIRED_NIX = ["install-wrote-machines", "machines-offer-kvm", "off-before-build", "plain-valid-in-l1-store",
                "kvm-valid-in-l1-store", "plain-built-in-guest", "kvm-built-with-dev-kvm", "running-after-build",
                "one-boot", "serve-stops-on-sigterm", "no-vm-left"]
# Nix in L1 for builder-nix: Debian's nix-bin (tests/e2e/run installs it). One binary
# that acts by its name; build-remote is the hook a remote build runs.
NIX_NAMES = ["nix-build", "nix-store", "nix-instantiate"]


def l1_extras(cpio, moddir, h, names=()):
    """L1 side: l1-builder.sh, the ssh client with its libraries, the tun module (for
    a second L1 address); Nix when builder-nix runs (about 54 MiB more)."""
    cpio.copy("l1-builder.sh", os.path.join(HERE, "l1-builder.sh"), 0o644)
    h.add_binary(cpio, "bin/ssh", "/usr/bin/ssh")
    h.add_modules(cpio, moddir, h.module_closure(moddir, ["tun"]), "builder-order")
    if "builder-nix" in names:
        if not os.path.exists("/usr/bin/nix"):
            h.die("builder-nix needs Nix on the host (apt-get install nix-bin)")
        h.add_binary(cpio, "usr/bin/nix", "/usr/bin/nix")
        for n in NIX_NAMES:
            cpio.symlink(f"usr/bin/{n}", "nix")
        cpio.symlink("usr/libexec/nix/build-remote", "/usr/bin/nix")


def checks(run):
    """The E2E-CHECK lines of a run: [(name, status, rest)] (e2e_io's parser)."""
    return e2e_io.collect(run)[0]


def figs(run):
    """The E2E-FIG k=v pairs of a run."""
    return dict(part.split("=", 1) for f in e2e_io.collect(run)[1] for part in f.split() if "=" in part)


def ssh_ok(sc, tag, want_prefix=None):
    """(problem or None, wall ms, first stdout line) of one ssh session."""
    r = sc.runs.get(tag)
    if r is None:
        return f"{tag}: did not run", None, None
    first = r.out[0][1] if r.out else None
    if r.timeout:
        return f"{tag}: timed out after {r.wall_ms} ms", r.wall_ms, first
    if r.exit != "0":
        err = " | ".join(l for _, l in r.err[-3:])
        return f"{tag}: ssh exit {r.exit}: {err}", r.wall_ms, first
    if want_prefix and not (first or "").startswith(want_prefix):
        return f"{tag}: first line {first!r}, want {want_prefix!r}…", r.wall_ms, first
    return None, r.wall_ms, first


def judge(sc):
    problems, info = [], []
    main = sc.runs.get(sc.name)
    if main is None:
        return False, "no L1 output for the scenario", []
    for n, st, rest in checks(main):
        if st != "ok":
            problems.append(f"{n} {st} {rest}".strip())
    names = {c[0] for c in checks(main)}
    serve = sc.runs.get(f"{sc.name}/serve")
    if serve is not None:
        panics = [l for _, l in serve.err + serve.out if "panicked" in l]
        if panics:
            problems.append(f"serve panicked: {panics[0]}")
    if sc.name == "builder":
        missing = [n for n in REQUIRED if n not in names]
        if missing:
            problems.append("checks missing: " + " ".join(missing))
        res = main.results()
        info_run = sc.runs.get("builder/ssh-info")
        g = info_run.results() if info_run else {}
        p, cold, line = ssh_ok(sc, "builder/ssh-cold", "Linux aivmm ")
        problems += [p] if p else []
        p, warm, _ = ssh_ok(sc, "builder/ssh-warm", "Linux aivmm ")
        problems += [p] if p else []
        p, again, _ = ssh_ok(sc, "builder/ssh-again", "Linux aivmm ")
        problems += [p] if p else []
        p, _, _ = ssh_ok(sc, "builder/ssh-info")
        problems += [p] if p else []
        nix_run = sc.runs.get("builder/ssh-nix")
        nb = nix_run.results() if nix_run else {}
        if nb.get("g_build") != "built-in-guest":
            p, _, _ = ssh_ok(sc, "builder/ssh-nix")
            problems.append(f"nix-build in the guest: {p or 'output ' + repr(nb.get('g_build'))}")
        if (g.get("g_user"), g.get("g_host")) != ("builder", "aivmm"):
            problems.append(f"guest says user={g.get('g_user')} host={g.get('g_host')}, want builder/aivmm")
        if line and res.get("l1_uname", "").replace("_", " ") == line:
            problems.append("uname -a over ssh equals L1's own: not the guest")
        f = figs(main)
        msg = (f"cold ssh (boot + uname) {cold} ms, warm {warm} ms, after idle stop {again} ms; "
               f"idle stop {f.get('idle_stop_after_s', '?')} s after the TTL began; {len(names)} checks")
        info.append(f"  guest: {line!r}; {g.get('g_nix', '?').replace('_', ' ')}; nix-build through the "
                    f"guest's daemon -> {nb.get('g_path')} ({nix_run.wall_ms if nix_run else '?'} ms)")
    elif sc.name == "builder-nix":
        missing = [n for n in REQUIRED_NIX if n not in names]
        if missing:
            problems.append("checks missing: " + " ".join(missing))
        res = main.results()
        walls = {}
        for a in ("plain", "kvm"):
            r = sc.runs.get(f"builder-nix/build-{a}")
            if r is None:
                problems.append(f"nix-build of {a}: did not run")
                continue
            walls[a] = r.wall_ms
            remote = [l for _, l in r.err if "ssh-ng://builder@aivmm-builder" in l]
            if r.timeout or r.exit != "0":
                tail = " | ".join(l for _, l in r.err[-4:])
                problems.append(f"nix-build of {a}: {'timed out' if r.timeout else 'exit ' + str(r.exit)}: {tail}")
            elif not remote:
                problems.append(f"nix-build of {a}: no 'building … on ssh-ng://builder@aivmm-builder' line")
        msg = (f"L1's nix-build through the builder: cold (boots the VM) {walls.get('plain', '?')} ms, "
               f"the kvm one {walls.get('kvm', '?')} ms; {len(names)} checks")
        info.append(f"  results in L1's store: plain {res.get('plain', '?').replace(',', ' ')}; "
                    f"kvm {res.get('kvm', '?').replace(',', ' ')}")
    else:
        cold, warm = [], []
        for i in (1, 2):
            p, ms, _ = ssh_ok(sc, f"builder-bench/cold{i}")
            problems += [p] if p else []
            cold += [ms] if ms is not None and not p else []
            for j in (1, 2, 3):
                p, ms, _ = ssh_ok(sc, f"builder-bench/warm{i}.{j}")
                problems += [p] if p else []
                warm += [ms] if ms is not None and not p else []
        res = main.results()
        if res.get("boots") != "2":
            problems.append(f"{res.get('boots')} boots, want 2 (one per cold run)")
        med = lambda v: f"{statistics.median(v):.0f}" if v else "n/a"
        msg = (f"time to the first ssh command: cold (VM off) median {med(cold)} ms, warm median "
               f"{med(warm)} ms")
        info.append(f"  cold runs ms: {', '.join(str(c) for c in cold)}; warm runs ms: "
                    f"{', '.join(str(w) for w in warm)}; last VM boot (connection -> guest ready) "
                    f"{res.get('last_boot_ms')} ms")
    if problems:
        return False, "; ".join(problems), info
    return True, msg, info
