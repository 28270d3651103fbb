"""The built-kernel scenario of the nested-VM harness (imported by harness.py).

guest-custom-kernel: `aivmm image build --no-claude --kernel-from-source` (kind
"kernel") builds the guest kernel from Debian's linux-source with
guest-image/kernel.config, on the host, before L1 boots. L1 (l1-kernel.sh) runs one
`aivmm run --workdir` with that image: the command writes to /work, prints
`uname -r` and exits 5, which must be aivmm's exit status. Then the same command
runs with the Debian image (kind "noclaude", Debian's cloud kernel and its
module-loading initramfs) for the boot-to-ready comparison.

Not in the default set: the first kernel build takes 10-30 minutes on a small
machine (then it is cached under ~/.cache/aivmm/kernel-build).
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    "guest-custom-kernel": "run --workdir with the Debian image whose kernel is built from linux-source + "
    "guest-image/kernel.config (no boot modules): exit 5 passes through, /work write seen by L1, "
    "`uname -r` is the built kernel's; boot-to-ready next to Debian's cloud kernel (same command)",
}
NOT_DEFAULT = {"guest-custom-kernel"}
# The image each scenario needs (harness GUEST_IMAGE_SCENARIOS), extra images it
# boots too, and the `aivmm image build` flags of the kind.
IMAGES = {"guest-custom-kernel": "kernel"}
EXTRA_KINDS = {"guest-custom-kernel": ["noclaude"]}
IMAGE_FLAGS = {"kernel": ["--no-claude", "--kernel-from-source"]}
# Two cold boots of the guest in L2 (~1 min each under TCG).
BUDGET = {"guest-custom-kernel": 600}

WANT_EXIT = "5"
MARK = "ready-from-guest"


def l1_extras(cpio, moddir, h):
    """L1 side: l1-kernel.sh."""
    cpio.copy("l1-kernel.sh", os.path.join(HERE, "l1-kernel.sh"), 0o644)


def _run_problem(r, what):
    if r is None:
        return f"{what}: aivmm did not run"
    allt = [l for _, l in r.out + r.err]
    errs = [l for _, l in r.err if l.startswith("aivmm: error:")]
    if r.exit is None:
        return f"{what}: no exit report (L1 lost it)"
    panic = next((l for l in allt if "panicked" in l or "Kernel panic" in l), None)
    if panic:
        return f"{what}: {panic.strip()}"
    if r.timeout:
        return f"{what}: timed out after {r.wall_ms} ms" + ("; no output" if not r.out else "")
    if r.exit != WANT_EXIT:
        return f"{what}: aivmm exit status {r.exit}, want {WANT_EXIT}" + (f": {errs[0]}" if errs else "")
    if r.first(MARK) is None:
        return f"{what}: `echo {MARK}` did not reach aivmm's stdout"
    return None


def _release(r):
    """The line after the marker: the guest's `uname -r`."""
    lines = [l.strip() for _, l in r.out]
    for i, l in enumerate(lines):
        if MARK in l and i + 1 < len(lines):
            return lines[i + 1]
    return None


def judge(sc):
    res = {}
    for t in sc.order:
        res.update(sc.runs[t].results())
    if res.get("rootfs_dev") == "missing":
        return False, "the built-kernel image's rootfs is not attached to L1", []
    r = sc.runs.get(sc.name)
    why = _run_problem(r, "built kernel")
    if why:
        return False, why, []
    release = _release(r) or ""
    if not release.endswith("-aivmm"):
        return False, f"guest `uname -r` says {release!r}, want the built kernel's (…-aivmm)", []
    if res.get("host_sees") != "E2E-KERNEL-FILE":
        return False, f"L1 finds {res.get('host_sees')!r} in workdir/from-guest.txt, want 'E2E-KERNEL-FILE'", []
    ready = r.first(MARK)
    figs = (f"built kernel {release}: exit {WANT_EXIT} passed through, /work write seen by L1; "
            f"boot-to-ready (exec -> first command output) {ready:.0f} ms, aivmm exit after {r.wall_ms} ms")
    info = []
    d = sc.runs.get(f"{sc.name}-debian")
    dwhy = _run_problem(d, "Debian kernel") if d is not None else "Debian kernel: not run (no noclaude image in L1)"
    if dwhy:
        # The comparison is a figure, not the scenario's point: say why it is missing.
        info.append(f"no comparison: {dwhy}")
        figs += "; Debian kernel: n/a"
    else:
        dready = d.first(MARK)
        figs += (f"; Debian kernel {_release(d)}: boot-to-ready {dready:.0f} ms, exit after {d.wall_ms} ms "
                 f"(built/Debian {ready / dready:.2f})")
    return True, figs, info
