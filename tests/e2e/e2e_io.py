"""The I/O scenarios of the nested-VM harness (imported by harness.py).

Guest side: l2-io.sh; L1 side: l1-io.sh. Both print, inside one aivmm run's
output (tag = the run), lines the judge here reads:
  E2E-CHECK <name> ok | E2E-CHECK <name> FAIL <why>
  E2E-RESULT g_<key>=<v> (guest) and h_<key>=<v> (L1): must be equal
  E2E-FIG <key>=<v> ...: figures for the PASS line
"""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))

SCENARIOS = {
    "fs-ro": "--share DIR:TAG:ro: write/create/mkdir/unlink/chmod/rename/symlink/truncate fail with "
    "'Read-only file system', reads work, L1's tree unchanged",
    "fs-many": "2000 empty files created in a share (more than the default 1024 open files: aivmm "
    "keeps an O_PATH fd per inode and raises its limit); creates/s",
    "fs-escape": "symlinks (absolute, relative) and .. from the share toward an L1 secret outside it: "
    "the secret's marker never reaches the guest; nothing outside the share changes",
    "blk-ro": "--disk IMG:ro: blockdev --getro = 1, writes fail, reads work, image unchanged",
    "net": "--net user (aivmm's own): DHCP, then 32 MiB each way with a TCP server at a public-looking address "
    "(198.51.100.1, in L1's outside namespace), sha256-checked; MiB/s; no passt process exists while it runs (L1's ps)",
    "host-loopback": "--net user: a service on L1's 127.0.0.1 is refused through the gateway address (a RST "
    "within 2 s, named in aivmm's log), while a public-looking outside address answers (the control)",
    "forward": "--net user --forward 18080:8080: L1 fetches 1 MiB from a guest TCP server, sha256-checked",
    "net-policy": "--net user, the default egress policy: 203.0.113.1 (outside) answers; 10.0.98.1, 169.254.169.254, "
    "L1's 127.0.0.1 through the gateway and L1's own public-looking 203.0.113.9 (a listener on all of them) are "
    "refused within 2 s, named in aivmm's log",
    "net-dns": "--net user: a name only L1's own DNS server knows (tinydns, L1's resolv.conf) resolves in the "
    "guest through the gateway; an unknown name is NXDOMAIN",
    "net-many": "--net user: the guest opens 2,000 connections at once; 512 (the limit) connect, the rest are "
    "refused at once, aivmm's own memory (all but guest RAM) peaks under 96 MiB, and a connection works after",
    "net-allow": "--net user --net-allow 192.168.77.0/24 --net-allow 127.0.0.1:5004: the allowed private "
    "address and loopback port answer; another private address and loopback port are refused at once; "
    "the public address answers; DNS of an L1 /etc/hosts name through the gateway; pings reach the gateway "
    "and the public address (through aivmm's ICMP socket), not the closed private one",
    "net-allow-only": "--net user --net-allow-only e2e-allowed.test:5003: the name resolves and its address "
    "answers on 5003 only; an address the guest did not learn by DNS and another name are refused",
    "net-passt": "--net passt --forward 18080:8080: DHCP and the forward of `forward`, through the passt program",
    "vsock": "--vsock: 16 MiB guest->L1 (CID 2 port 5000 -> PATH_5000) and L1->guest (CONNECT 5001), "
    "sha256-checked; MiB/s",
    "net-tap": "--net tap:tap0: static 10.0.99.2, ping L1's 10.0.99.1, 32 MiB each way over TCP; MiB/s",
    "density": "4 idle 1 GiB VMs side by side (the io L2): the total RSS of the four aivmm processes, next to "
    "4 QEMU microvm, and 4 QEMU microvm with a free page reporting balloon (figures, by name)",
    "balloon": "virtio-balloon, a 2 GiB guest: it fills 1 GiB of page cache and drops it; free page reporting "
    "brings aivmm's RSS down by 700 MiB within 10 s. `aivmm balloon` inflates it to 1.5 GiB, then the guest "
    "needs 768 MiB: the driver deflates (DEFLATE_ON_OOM) and nothing is OOM-killed; the guest's statistics show",
}

# All of them run by default. `forward` once failed for want of two things in the test,
# not in aivmm: bookworm's passt (2023-03) does not ACK a guest's SYN-ACK until the
# host side sends data, and a SYN it sends before the guest has an address is never
# retried; so L1 speaks first (as HTTP does) and retries idle connections.
# `net` runs on aivmm's own network; the side-by-side with passt and TAP is the bench's
# net rows (bookworm's passt now and then resets or stalls a 32 MiB transfer in L1).
NOT_DEFAULT = {"density"}

# Seconds each takes at most (the L1 overall timeout is the sum).
BUDGET = {"fs-many": 360, "fs-ro": 120, "fs-escape": 120, "blk-ro": 120, "net": 300, "host-loopback": 200, "forward": 150, "vsock": 150,
          "net-tap": 300, "net-policy": 150, "net-allow": 150, "net-allow-only": 150, "net-passt": 150,
          "net-dns": 150, "net-many": 240, "balloon": 600, "density": 900}
# Extra seconds for the extended fs and blk scenarios (blk boots a second time).
EXTRA_BUDGET = {"fs": 120, "blk": 120}

# Checks that must be present (so a check that silently did not run fails).
REQUIRED = {
    "fs": [c for c in ("create", "append", "rename", "symlink", "hardlink", "rmdir", "chmod",
                                   "truncate", "dd-4m-fsync", "big-readback", "git-commit", "creates",
                                   "l1-a.txt", "l1-symlink", "l1-linkcount", "l1-git-log", "l1-git-fsck",
                                   "l1-creates", "l1-truncate", "l1-chmod")],
    "fs-ro": ["mount", "ro-read", "erofs-write", "erofs-create", "erofs-mkdir", "erofs-unlink",
              "erofs-chmod", "ro-read-after", "l1-share-unchanged"],
    "fs-many": ["mount", "creates", "l1-creates"],
    "fs-escape": ["mount", "escape-listed", "l1-secret-intact", "l1-outside-untouched"],
    "blk/ext4": ["mke2fs", "mount-ext4", "ext-write", "umount", "l1-e2fsck", "l1-ext-hello", "l1-ext-symlink"],
    "blk-ro": ["getro", "ro-read", "write-fails", "ro-read-after", "l1-image-unchanged"],
    "net": ["dhcp", "tcp-up", "tcp-down", "l1-no-passt"],
    "host-loopback": ["dhcp", "outside", "gateway-loopback", "gateway-refused-fast"],
    "forward": ["dhcp", "serve-8080"],
    "net-passt": ["dhcp", "serve-8080"],
    "net-policy": ["dhcp", "public", "private-refused", "metadata-refused", "loopback-refused",
                   "host-own-address-refused", "ping-private-refused"],
    "net-dns": ["dhcp", "dns-l1-only", "dns-nxdomain"],
    "balloon": ["balloon-driver", "mount", "fill-cache", "cache-filled", "l1-rss-fell-700m", "l1-rss-fell-within-10s",
                "l1-reported-free-pages", "l1-balloon-set", "l1-balloon-inflated", "fill-after-inflate",
                "no-oom-kill", "l1-deflated-on-oom", "l1-guest-stats"],
    "net-many": ["dhcp", "limit-refuses", "after-flood", "l1-rss-bound"],
    "density": ["l1-density-aivmm-four-idle", "l1-density-qemu-four-idle", "l1-density-qemu-fpr-four-idle"],
    "net-allow": ["dhcp", "dns-hosts", "private-allowed", "private-refused", "loopback-allowed",
                   "loopback-refused", "public", "ping-gateway", "ping-public", "ping-private-refused"],
    "net-allow-only": ["dhcp", "dns-allowed", "allowed", "allowed-other-port-refused",
                       "unlearned-refused", "dns-other-refused"],
    "vsock": ["vsock-up", "vsock-down", "l1-host-connect"],
    "net-tap": ["static-ip", "ping", "tcp-up", "tcp-down"],
}
REQUIRED["net/qemu"] = REQUIRED["net"]
REQUIRED["net-tap/qemu"] = REQUIRED["net-tap"]
# g_/h_ pairs that must be present (and equal).
PAIRS = {"fs": ["big_sha"], "blk/ext4": ["ext_sha"], "net": ["up_sha", "down_sha"], "forward": ["fwd_sha"],
         "net-passt": ["fwd_sha"],
         "vsock": ["vup_sha", "vdown_sha"], "net-tap": ["up_sha", "down_sha"]}
PAIRS["net/qemu"] = PAIRS["net"]
PAIRS["net-tap/qemu"] = PAIRS["net-tap"]


def l2_extras(cpio, moddir, base_mods, h):
    """Guest side: l2-io.sh, socat and git with their libraries, net and vsock modules."""
    cpio.copy("l2-io.sh", os.path.join(HERE, "l2-io.sh"), 0o644)
    h.add_binary(cpio, "bin/socat", "/usr/bin/socat")
    cpio.copy("bin/net-many", h.build_static("net-many"), 0o755)
    h.add_binary(cpio, "bin/git", "/usr/bin/git")
    for scen, wanted in (("net", ["virtio_net"]), ("vsock", ["vmw_vsock_virtio_transport"]),
                         ("balloon", ["virtio_balloon"])):
        extra = [m for m in h.module_closure(moddir, wanted) if m not in base_mods]
        h.add_modules(cpio, moddir, extra, f"order-{scen}")


def l1_extras(cpio, moddir, h):
    """L1 side: l1-io.sh, socat, passt, git, debugfs/e2fsck, the tun module, a passwd
    (passt started as root switches to `nobody`)."""
    cpio.copy("l1-io.sh", os.path.join(HERE, "l1-io.sh"), 0o644)
    cpio.copy("bin/tinydns", h.build_static("tinydns"), 0o755)
    for b in ("/usr/bin/socat", "/usr/bin/passt", "/usr/bin/git", "/usr/sbin/debugfs", "/usr/sbin/e2fsck"):
        h.add_binary(cpio, "bin/" + os.path.basename(b), b)
    h.add_modules(cpio, moddir, h.module_closure(moddir, ["tun", "veth", "vhost_net"]), "io-order")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")


def collect(run):
    checks, figs, res = [], [], {}
    for _, line in run.out:
        i = line.find("E2E-CHECK ")
        if i >= 0:
            parts = line[i + 10:].split(" ", 2)
            checks.append((parts[0], parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else ""))
        i = line.find("E2E-FIG ")
        if i >= 0:
            figs.append(line[i + 8:].strip())
    res = run.results()
    return checks, figs, res


def check_run(sc, tag, clean=True, required=None):
    """(problems, figures) of the run `tag` in scenario sc: its checks, the required
    ones (`required`, a dict by tag, default REQUIRED), the g_/h_ pairs; with `clean`,
    also a clean boot to power-off."""
    r = sc.runs.get(tag)
    if r is None:
        return [f"{tag}: VMM did not run"], []
    problems = []
    why = r.broke() if clean else None
    if why:
        problems.append(f"{tag}: {why}")
    checks, figs, res = collect(r)
    names = {c[0] for c in checks}
    bad = [f"{n} {st} {rest}".strip() for n, st, rest in checks if st != "ok"]
    if bad:
        problems.append(f"{tag}: " + "; ".join(bad))
    missing = [n for n in (REQUIRED if required is None else required).get(tag, []) if n not in names]
    if missing:
        problems.append(f"{tag}: checks missing: {' '.join(missing)}")
    for k in PAIRS.get(tag, []):
        g, hv = res.get("g_" + k), res.get("h_" + k)
        if not g or g != hv:
            problems.append(f"{tag}: {k} differs: guest {g} L1 {hv}")
    for k in res:
        if k.startswith("g_") and "h_" + k[2:] in res and res[k] != res["h_" + k[2:]]:
            if k[2:] not in PAIRS.get(tag, []):
                problems.append(f"{tag}: {k[2:]} differs: guest {res[k]} L1 {res['h_' + k[2:]]}")
    n_ok = sum(1 for c in checks if c[1] == "ok")
    info = [f"{tag}: {n_ok} checks ok" + (f", {len(PAIRS.get(tag, []))} sha256 pairs equal" if PAIRS.get(tag) else "")]
    if figs:
        info.append(f"{tag}: " + " ".join(figs))
    if "dhcp_ip" in res:
        info.append(f"{tag}: dhcp ip={res.get('dhcp_ip')} router={res.get('dhcp_router')}")
    return problems, info


DENSITY_KINDS = (("aivmm", "aivmm"), ("qemu", "qemu-microvm"), ("qemu-fpr", "qemu-microvm+free-page-reporting"))


def judge_density(sc):
    """density: every VM booted and powered off cleanly; the RSS totals side by side."""
    problems, info = check_run(sc, "density", clean=False)
    for kind, _ in DENSITY_KINDS:
        for i in range(1, 5):
            p, _ = check_run(sc, f"density/{kind}/{i}")
            problems += p
    f = figures(sc, "density")
    a = f.get("density_aivmm_rss_mib")
    parts = []
    for kind, name in DENSITY_KINDS:
        v = f.get(f"density_{kind}_rss_mib")
        if v:
            parts.append(f"{name} {v:.0f} MiB" + (f" (aivmm/{name}: {a / v:.2f})" if a and kind != "aivmm" else ""))
    info.append("density: total RSS of 4 idle 1 GiB VMs: " + ", ".join(parts))
    if problems:
        return False, "; ".join(problems), info
    return True, "; ".join(info), []


def judge(sc):
    """New scenarios: (ok, message, extra lines)."""
    if sc.name == "density":
        return judge_density(sc)
    problems, info = check_run(sc, sc.name)
    if sc.name == "fs-escape":
        r = sc.runs.get(sc.name)
        leaks = [l for _, l in (r.out + r.err if r else []) if "E2E-SECRET-" in l]
        if leaks:
            problems.append(f"the L1 secret reached the guest: {leaks[0][:200]!r}")
        else:
            info.append("fs-escape: secret marker absent from all guest output")
    if sc.name == "net-tap":
        info += compare_qemu(sc)
    if sc.name in ("host-loopback", "net-policy", "net-allow", "net-allow-only", "net-many"):
        # A refusal is named in aivmm's own log (its stderr), not only seen by the guest.
        r = sc.runs.get(sc.name)
        named = [l for _, l in (r.err if r else []) if "usernet: refused" in l]
        if named:
            info.append(f"{sc.name}: aivmm's log: {named[0].strip()[:160]}")
        else:
            problems.append(f"{sc.name}: aivmm's log names no refused connection")
    if problems:
        return False, "; ".join(problems), info
    return True, "; ".join(info), []


def figures(sc, tag):
    """The E2E-FIG key=value pairs of run `tag`, as floats."""
    r = sc.runs.get(tag)
    out = {}
    for fig in collect(r)[1] if r else []:
        for kv in fig.split():
            k, _, v = kv.partition("=")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def compare_qemu(sc):
    """net / net-tap: the same transfers under QEMU microvm with the same backend in
    the same L1; lines with both figures and the ratio. A broken QEMU run is reported,
    not counted against aivmm."""
    q = sc.name + "/qemu"
    problems, _ = check_run(sc, q)
    if problems:
        return [f"qemu comparison unavailable: {'; '.join(problems)[:300]}"]
    a, b = figures(sc, sc.name), figures(sc, q)
    lines = []
    for k in sorted(a):
        if k in b and b[k] > 0:
            d = k.replace("_MiBps", "").replace("net_", "").replace("tap_", "")
            lines.append(f"{sc.name} {d} MiB/s: aivmm {a[k]:.1f} qemu-microvm {b[k]:.1f} "
                         f"ratio aivmm/qemu-microvm: {a[k] / b[k]:.2f}")
    return lines or [f"qemu comparison: no figures (aivmm {a}, qemu {b})"]


def extend(sc, tags):
    """Extra checks for the extended fs / blk scenarios: (problems, info)."""
    problems, info = [], []
    for t in tags:
        p, i = check_run(sc, t)
        problems += p
        info += i
    return problems, info
