#!/usr/bin/env python3
"""Nested-VM end-to-end harness for aivmm (driven by tests/e2e/run).

Flow: build the L2 initramfs (busybox + virtio modules + l2-init.sh) and the L1
initramfs (busybox, kvm modules, aivmm, QEMU, vmmrun, the L2 kernel and
initramfs, l1-init.sh); boot L1 once under QEMU TCG with the scenario list on
its kernel command line; parse L1's console as it streams; print one
PASS/FAIL line per scenario and a summary.

Environment:
  AIVMM_BIN         aivmm binary to test (default: target/release/aivmm)
  E2E_VMM           aivmm (default) or qemu: run QEMU microvm in aivmm's place
                    (to debug the harness itself)
  E2E_BOOT_RUNS     boots per VMM in qemu-compare (default 1: a check that each boots;
                    5 or more for figures)
  E2E_VMM_TIMEOUT   seconds allowed for one VMM run inside L1 (default 60)
  E2E_TIMEOUT       overall seconds allowed for L1 (default: computed)
  E2E_END_BY        Unix time by which the whole run ends (.ci/run sets it to fit CI's
                    limit): scenarios not run by then fail, named, with the summary
  E2E_KERNEL        kernel for L1 and L2 (default: newest /boot/vmlinuz-*-cloud-amd64)
  E2E_VERBOSE=1     echo L1's console to stderr while it runs
  E2E_STALL         seconds of console silence after which the watchdog looks at L1's vCPUs
                    (default 60; L1's real-time heartbeat prints every 10 s): registers
                    changing (general-purpose registers; RIP, RSP and flags alone are a
                    loop) = busy, wait (up to E2E_BUSY_MAX, default 420 s of silence);
                    all halted or frozen = stuck: sysrq dumps (keyboard interrupts, which
                    also wake a CPU whose timer was lost), then, if no heartbeat follows,
                    L1 is hung and a fresh L1 runs what it left
  E2E_L2_CMDLINE    replaces the L2 base command line "console=ttyS0 quiet panic=-1"
                    (aivmm.scenario=<name> is always appended), e.g. to drop `quiet`;
                    with `e2e.dmesg=1` L2 prints its kernel log after the boot marker;
                    with `e2e.dmesg=gaps` only the lines after a gap of 20 ms or more, the
                    kvm-clock offset, the marker's kernel timestamp and (with
                    `initcall_debug`) the initcalls of 3 ms or more: few enough lines
                    that the console storm stays small
  E2E_L1_CMDLINE    extra words for L1's kernel command line (default "init_on_free=1",
                    see run_l1; "" to boot L1 without it)
  E2E_L1_ACCEL      L0's -accel for L1 (default "tcg,thread=multi")
  E2E_L1_SMP        L1's vCPUs (default 2)
  E2E_L0_QEMU       the QEMU that runs L1 (default qemu-system-x86_64 on PATH; e.g. an
                    unpacked bookworm-backports QEMU 10). QEMU inside L1 stays the PATH one
  E2E_L2_KERNEL     another L2 kernel (a bzImage with its virtio drivers built in, e.g.
                    aivmm's guest kernel from guest-image/kernel.config); L2 then loads no
                    modules
  E2E_QC_KINDS      the VMM kinds qemu-compare boots, round robin (default "aivmm
                    aivmm-bzimage qemu-microvm qemu-pc"); KIND+WORD appends WORD to that
                    kind's L2 command line, e.g. "aivmm aivmm+nokaslr qemu-microvm"
  E2E_GUEST_TIMEOUT seconds for one `aivmm run --workdir` in guest-exit-status/guest-claude (240)
  E2E_GUEST_CMDLINE replaces the Debian guest's base command line (--cmdline), e.g.
                    "console=ttyS0 panic=-1 aivmm.debug=1"
  AIVMM_AGENT_BIN   aivmm-agent to put beside aivmm in L1 (default: target/release/aivmm-agent)
  E2E_KVM_STATS=1   print, after every run_vmm boot, L1's THP counter deltas and the VM's
                    KVM exit counters (sampled every 0.2 s while it runs), as
                    `KVMSTAT name=value` lines (to see where L2 time goes)
  E2E_AIVMM_LOG     AIVMM_LOG for every aivmm run (default: aivmm::vmm=debug in `boot`
                    only, for its `setup took` line; nothing elsewhere)
"""

import glob
import gzip
import lzma
import os
import queue
import re
import shutil
import signal
import socket
import tempfile
import statistics
import subprocess
import sys
import threading
import time

import e2e_io  # the I/O scenarios (fs-ro, net, vsock, ...): tests/e2e/e2e_io.py
import e2e_run  # the `run --workdir` scenarios (workdir, lock, stop, ...): tests/e2e/e2e_run.py
import e2e_builder  # aivmm builder serve: tests/e2e/e2e_builder.py
import e2e_hard  # the hardening scenarios (seccomp, panic, durability, ...): tests/e2e/e2e_hard.py
import e2e_bench  # aivmm vs QEMU figures, benches/results/: tests/e2e/e2e_bench.py
import e2e_kernel  # guest-custom-kernel (kernel from linux-source): tests/e2e/e2e_kernel.py

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORK = os.environ.get("E2E_WORK", os.path.join(HERE, "work"))
#: The L2 kernel when it is not L1's (E2E_L2_KERNEL): a bzImage with its virtio
#: drivers built in, e.g. aivmm's own guest kernel (guest-image/kernel.config).
L2_KERNEL = os.environ.get("E2E_L2_KERNEL") or None

SCENARIOS = {
    "boot": "L2 reaches userspace and powers off; aivmm exits 0; boot-timer and console-marker ms",
    "smp": "--cpus 4 --memory 2G: guest sees 4 CPUs and MemTotal > 1.8 GiB",
    "rng": "guest reads 64+ non-zero bytes from /dev/hwrng; rng_current names virtio",
    "blk": "--disk: guest reads a pattern from /dev/vda, writes one with fsync; host reads it back",
    "fs": "--share: guest mounts virtiofs, reads a host file, writes one the host then sees",
    "bad-kernel": "garbage / empty / truncated kernel: non-zero exit, one `aivmm: error:` line, no panic",
    "qemu-compare": "boot time aivmm vs QEMU microvm and pc (KVM in L1), medians of E2E_BOOT_RUNS; "
    "fails only if a boot breaks",
    "guest-exit-status": "run --workdir with the Debian image (no Claude): command stdout reaches aivmm's "
    "stdout, a file written in /work reaches the host, aivmm exits with the command's status (7)",
    "guest-claude": "run --workdir with the Debian image with Claude Code: `claude --version` prints "
    "'Claude Code', aivmm exits 0",
}
SCENARIOS.update(e2e_io.SCENARIOS)
SCENARIOS.update(e2e_run.SCENARIOS)
SCENARIOS.update(e2e_hard.SCENARIOS)
# Scenarios that use a Debian guest image (`aivmm image build --out WORK/image-<kind>`),
# attached to L1 as a read-only virtio disk with serial e2e-<kind>.
GUEST_IMAGE_SCENARIOS = {"guest-exit-status": "noclaude", "guest-claude": "claude"}
GUEST_IMAGE_SCENARIOS.update({n: e2e_run.IMAGE_KIND for n in e2e_run.SCENARIOS})
SCENARIOS.update(e2e_builder.SCENARIOS)
GUEST_IMAGE_SCENARIOS.update(e2e_builder.IMAGES)
SCENARIOS.update(e2e_kernel.SCENARIOS)
GUEST_IMAGE_SCENARIOS.update(e2e_kernel.IMAGES)
GUEST_IMAGE_SCENARIOS.update(e2e_bench.IMAGES)
# Scenarios left out of the default set (run them by name).
NOT_DEFAULT = set()
NOT_DEFAULT.update(e2e_io.NOT_DEFAULT)
NOT_DEFAULT.update(e2e_run.NOT_DEFAULT)
NOT_DEFAULT.update(e2e_builder.NOT_DEFAULT)
NOT_DEFAULT.update(e2e_kernel.NOT_DEFAULT)
NOT_DEFAULT.update(e2e_hard.NOT_DEFAULT)
SCENARIOS.update(e2e_bench.SCENARIOS)
SCENARIOS["harness-selftest"] = ("the watchdog itself (run with E2E_STALL=15): L1 falls silent busy for 50 s "
                                 "(must be waited out) and then idle until a keyboard interrupt (must be woken "
                                 "by the sysrq keys and go on); no retry")
NOT_DEFAULT.add("harness-selftest")
NOT_DEFAULT.update(e2e_bench.NOT_DEFAULT)

L2_CMDLINE_NOTE = "console=ttyS0 quiet panic=-1 aivmm.scenario=<name>"
L1_MEM = "3072"
L1_ACCEL = os.environ.get("E2E_L1_ACCEL", "tcg,thread=multi")
L1_SMP = os.environ.get("E2E_L1_SMP", "2")
# Seconds allowed for one `aivmm run --workdir` with the Debian guest inside L1.
GUEST_TIMEOUT = int(os.environ.get("E2E_GUEST_TIMEOUT", "240"))
TAIL = 20


def die(msg):
    print(f"e2e: error: {msg}", file=sys.stderr)
    sys.exit(2)


def note(msg):
    print(f"e2e: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cpio (newc)


class Cpio:
    """A minimal newc writer, so device nodes and symlinks need no root."""

    def __init__(self):
        self.entries = {}  # path -> (mode, data, rdev)

    def _dirs(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.entries:
                self.entries[d] = (0o040755, b"", (0, 0))

    def dir(self, path):
        path = path.strip("/")
        self._dirs(path + "/x")

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        self._dirs(path)
        self.entries[path] = (0o100000 | mode, data, (0, 0))

    def copy(self, path, src, mode=None):
        with open(src, "rb") as f:
            data = f.read()
        if mode is None:
            mode = os.stat(src).st_mode & 0o777
        self.file(path, data, mode)

    def symlink(self, path, target):
        path = path.strip("/")
        self._dirs(path)
        self.entries[path] = (0o120777, target.encode(), (0, 0))

    def chardev(self, path, major, minor, mode=0o600):
        path = path.strip("/")
        self._dirs(path)
        self.entries[path] = (0o020000 | mode, b"", (major, minor))

    def write(self, out):
        def hdr(ino, name, mode, size, rdev):
            fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
            return b"070701" + b"".join(b"%08X" % v for v in fields)

        def pad(f):
            f.write(b"\0" * ((4 - f.tell() % 4) % 4))

        with open(out + ".tmp", "wb") as f:
            ino = 1
            for name in sorted(self.entries):
                mode, data, rdev = self.entries[name]
                f.write(hdr(ino, name.encode(), mode, len(data), rdev))
                f.write(name.encode() + b"\0")
                pad(f)
                f.write(data)
                pad(f)
                ino += 1
            f.write(hdr(0, b"TRAILER!!!", 0, 0, (0, 0)) + b"TRAILER!!!\0")
            pad(f)
        os.replace(out + ".tmp", out)


# ---------------------------------------------------------------- inputs


def find_kernel():
    k = os.environ.get("E2E_KERNEL")
    if not k:
        cands = glob.glob("/boot/vmlinuz-*-cloud-amd64")
        if not cands:
            die("no /boot/vmlinuz-*-cloud-amd64 (install linux-image-cloud-amd64)")

        def key(p):
            v = p[len("/boot/vmlinuz-"):]
            return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"[.+~-]", v)]

        k = sorted(cands, key=key)[-1]
    if not os.access(k, os.R_OK):
        die(f"cannot read {k} (Debian installs it mode 0600: run as root)")
    ver = os.path.basename(k)[len("vmlinuz-"):]
    moddir = f"/lib/modules/{ver}"
    if not os.path.isdir(moddir):
        die(f"no module directory {moddir}")
    return k, moddir


def module_closure(moddir, names):
    """Module paths (relative to moddir) for `names` and their deps, deps first."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            if ":" not in line:
                continue
            mod, rest = line.split(":", 1)
            deps[mod.strip()] = rest.split()
    by_name = {}
    for mod in deps:
        base = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", os.path.basename(mod)).replace("-", "_")
        by_name[base] = mod
    builtin = set()
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            for line in f:
                base = re.sub(r"\.ko$", "", os.path.basename(line.strip())).replace("-", "_")
                builtin.add(base)
    except OSError:
        pass
    order = []

    def visit(mod):
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    for n in names:
        key = n.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            die(f"module {n} is neither in {moddir}/modules.dep nor built in")
    return order


def read_module(moddir, mod):
    path = os.path.join(moddir, mod)
    if mod.endswith(".xz"):
        return lzma.open(path).read()
    if mod.endswith(".gz"):
        return gzip.open(path).read()
    if mod.endswith(".zst"):
        if not shutil.which("zstd"):
            die(f"{mod} is zstd-compressed and zstd is not installed")
        return subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
    with open(path, "rb") as f:
        return f.read()


def mod_basename(mod):
    return re.sub(r"\.(xz|zst|gz)$", "", os.path.basename(mod))


def add_modules(cpio, moddir, mods, order_file):
    names = []
    for m in mods:
        name = mod_basename(m)
        cpio.file(f"lib/modules/{name}", read_module(moddir, m))
        names.append(name)
    cpio.file(f"lib/modules/{order_file}", "".join(n + "\n" for n in names).encode())


def add_busybox(cpio):
    bb = "/bin/busybox"
    if not os.path.exists(bb):
        die("no /bin/busybox (install busybox-static)")
    if ldd_libs(bb):
        die("/bin/busybox is dynamically linked; install busybox-static")
    cpio.copy("bin/busybox", bb, 0o755)
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            cpio.symlink(f"bin/{a}", "busybox")
    for a in ("devmem", "insmod", "poweroff", "head", "od", "dmesg"):
        if a not in applets:
            die(f"busybox lacks the `{a}` applet")
    for d in ("proc", "sys", "dev", "tmp", "usr"):
        cpio.dir(d)
    cpio.symlink("sbin", "bin")
    cpio.symlink("usr/bin", "../bin")
    cpio.symlink("usr/sbin", "../bin")
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)


def ldd_libs(binary):
    """Shared libraries a dynamic binary loads, as real paths (ld.so included)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if "not a dynamic executable" in out.stdout + out.stderr:
        return []
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            die(f"{binary}: {line.strip()}")
    return libs


def add_binary(cpio, dest, src, strip=False):
    data_src = src
    if strip and shutil.which("strip"):
        tmp = os.path.join(WORK, os.path.basename(dest) + ".stripped")
        shutil.copyfile(src, tmp)
        if subprocess.run(["strip", "--strip-debug", tmp], capture_output=True).returncode == 0:
            data_src = tmp
    cpio.copy(dest, data_src, 0o755)
    for lib in ldd_libs(src):
        cpio.copy(lib, os.path.realpath(lib), 0o755)


def build_vmmrun():
    src = os.path.join(HERE, "vmmrun.rs")
    out = os.path.join(WORK, "vmmrun")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(src):
        return out
    rustc = shutil.which("rustc") or os.path.expanduser("~/.cargo/bin/rustc")
    r = subprocess.run([rustc, "--edition", "2021", "-O", "-o", out, src], capture_output=True, text=True)
    if r.returncode != 0:
        die(f"building vmmrun failed:\n{r.stderr}")
    return out


def find_firmware(name):
    for d in ("/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu", "/usr/share/qemu/firmware"):
        p = os.path.join(d, name)
        if os.path.exists(p):
            return os.path.realpath(p)
    return None


def build_l2(kernel, moddir):
    cpio = Cpio()
    add_busybox(cpio)
    # Another L2 kernel (E2E_L2_KERNEL) has its virtio drivers built in: the boot
    # loads no modules (the scenarios' extra lists stay, unused by a boot).
    mods = [] if L2_KERNEL else module_closure(moddir, ["virtio_mmio", "virtio_rng"])
    add_modules(cpio, moddir, mods, "order")
    for scen, wanted in (("blk", ["virtio_blk"]), ("fs", ["virtiofs"])):
        extra = [m for m in module_closure(moddir, wanted) if m not in mods]
        add_modules(cpio, moddir, extra, f"order-{scen}")
    e2e_io.l2_extras(cpio, moddir, mods, sys.modules[__name__])
    e2e_hard.l2_extras(cpio)
    e2e_bench.l2_extras(cpio, moddir, mods, sys.modules[__name__])
    cpio.copy("init", os.path.join(HERE, "l2-init.sh"), 0o755)
    out = os.path.join(WORK, "l2-initrd.cpio")
    cpio.write(out)
    return out, [mod_basename(m) for m in mods]


def build_guest_images(names, aivmm):
    """Builds (or finds up to date) the Debian guest images the scenarios need, on
    the host: {kind: directory}. `image build --out` rebuilds only if the recipe or a
    package changed (it checks the manifest); offline, an existing image is used."""
    kinds = sorted({GUEST_IMAGE_SCENARIOS[n] for n in names if n in GUEST_IMAGE_SCENARIOS}
                   | {k for n in names for k in e2e_kernel.EXTRA_KINDS.get(n, [])})
    images = {}
    for kind in kinds:
        out = os.path.join(WORK, f"image-{kind}")
        cmd = [aivmm, "image", "build", "--out", out] + (["--no-claude"] if kind == "noclaude" else [])
        cmd += (e2e_builder.IMAGE_FLAGS.get(kind, []) + e2e_kernel.IMAGE_FLAGS.get(kind, [])
                + e2e_bench.IMAGE_FLAGS.get(kind, []))
        t = time.monotonic()
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        complete = all(os.path.exists(os.path.join(out, f))
                       for f in ("vmlinuz", "initrd.cpio", "rootfs.ext4", "manifest.txt"))
        if r.returncode != 0:
            if not complete:
                die(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
            note(f"image build {kind} failed; using the existing {out}: {r.stderr.strip()[-300:]}")
        size = os.path.getsize(os.path.join(out, "rootfs.ext4"))
        used = os.stat(os.path.join(out, "rootfs.ext4")).st_blocks * 512
        note(f"guest image {kind}: {out} (rootfs {size >> 20} MiB, {used >> 20} MiB allocated), "
             f"image build took {time.monotonic() - t:.1f} s")
        images[kind] = out
    return images


def add_guest_images(cpio, moddir, images):
    """L1 side of the guest images: their kernels and initrds in the initramfs (the
    rootfs is a virtio disk, not RAM), the virtio-pci/blk modules to see it, and
    aivmm-agent beside aivmm (aivmm shares it with the guest)."""
    if not images:
        return
    mods = module_closure(moddir, ["virtio_pci", "virtio_blk"])
    add_modules(cpio, moddir, mods, "l1-disk-order")
    for kind, d in images.items():
        cpio.copy(f"guest/{kind}/vmlinuz", os.path.join(d, "vmlinuz"), 0o644)
        cpio.copy(f"guest/{kind}/initrd.cpio", os.path.join(d, "initrd.cpio"), 0o644)
    agent = os.environ.get("AIVMM_AGENT_BIN") or os.path.join(ROOT, "target/release/aivmm-agent")
    if not os.path.exists(agent):
        die(f"no aivmm-agent at {agent} (cargo build --release builds it)")
    add_binary(cpio, "usr/local/aivmm/aivmm-agent", agent, strip=True)
    if os.environ.get("E2E_GUEST_CMDLINE"):
        cpio.file("e2e/guest-cmdline", os.environ["E2E_GUEST_CMDLINE"].encode() + b"\n")


def guest_image_drives(images):
    """QEMU options attaching each guest rootfs to L1, read-only, found by serial."""
    opts = []
    for kind, d in images.items():
        opts += ["-drive", f"file={os.path.join(d, 'rootfs.ext4')},format=raw,if=none,id=gi-{kind},readonly=on",
                 "-device", f"virtio-blk-pci,drive=gi-{kind},serial=e2e-{kind}"]
    return opts


def build_l1(kernel, moddir, l2_initrd, aivmm, vmmrun, names=()):
    cpio = Cpio()
    add_busybox(cpio)
    kvm = module_closure(moddir, ["kvm"])
    add_modules(cpio, moddir, kvm, "kvm-order")
    for vendor in ("kvm_amd", "kvm_intel"):
        for m in module_closure(moddir, [vendor]):
            if m not in kvm:
                cpio.file(f"lib/modules/{mod_basename(m)}", read_module(moddir, m))
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        die("no qemu-system-x86_64 (install qemu-system-x86)")
    add_binary(cpio, "usr/local/qemu/qemu-system-x86_64", qemu)
    cpio.symlink("bin/qemu-system-x86_64", "/usr/local/qemu/qemu-system-x86_64")
    for fw in ("bios-256k.bin", "bios.bin", "linuxboot_dma.bin", "linuxboot.bin", "kvmvapic.bin",
               "qboot.rom", "bios-microvm.bin", "pvh.bin", "multiboot_dma.bin"):
        p = find_firmware(fw)
        if p:
            cpio.copy(f"fw/{fw}", p, 0o644)
        elif fw in ("bios-256k.bin", "linuxboot_dma.bin", "bios-microvm.bin"):
            die(f"QEMU firmware {fw} not found")
    if aivmm:
        add_binary(cpio, "usr/local/aivmm/aivmm", aivmm, strip=True)
        cpio.symlink("bin/aivmm", "/usr/local/aivmm/aivmm")
    add_binary(cpio, "bin/vmmrun", vmmrun)
    cpio.copy("bin/kvm-keeper", build_static("kvm-keeper"), 0o755)
    cpio.copy("bin/l1-heartbeat", build_static("l1-heartbeat"), 0o755)
    cpio.copy("l2/vmlinuz", L2_KERNEL or kernel, 0o644)
    cpio.copy("l2/initrd.cpio", l2_initrd, 0o644)
    e2e_io.l1_extras(cpio, moddir, sys.modules[__name__])
    e2e_run.l1_extras(cpio, moddir, sys.modules[__name__])
    e2e_builder.l1_extras(cpio, moddir, sys.modules[__name__], names)
    e2e_kernel.l1_extras(cpio, moddir, sys.modules[__name__])
    e2e_hard.l1_extras(cpio)
    e2e_bench.l1_extras(cpio, moddir, sys.modules[__name__], names)
    cpio.copy("init", os.path.join(HERE, "l1-init.sh"), 0o755)
    if os.environ.get("E2E_AIVMM_LOG"):
        cpio.file("e2e/aivmm-log", os.environ["E2E_AIVMM_LOG"].encode() + b"\n")
    if os.environ.get("E2E_KVM_STATS"):
        cpio.file("e2e/kvm-stats", b"1\n")
    if os.environ.get("E2E_L2_CMDLINE"):
        cpio.file("e2e/l2-cmdline", os.environ["E2E_L2_CMDLINE"].encode() + b"\n")
    if os.environ.get("E2E_QC_KINDS"):
        cpio.file("e2e/qc-kinds", os.environ["E2E_QC_KINDS"].encode() + b"\n")
    out = os.path.join(WORK, "l1-initrd.cpio")
    cpio.write(out)
    return out


def build_static(name):
    """Builds tests/e2e/NAME.c into a static binary in WORK (when it changed); its path."""
    src = os.path.join(HERE, f"{name}.c")
    out = os.path.join(WORK, name)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        r = subprocess.run(["gcc", "-static", "-O2", "-o", out, src], capture_output=True, text=True)
        if r.returncode != 0:
            die(f"building {name} failed (gcc -static; needs libc6-dev):\n{r.stderr}")
    return out


# ---------------------------------------------------------------- parsing


class Run:
    def __init__(self, tag):
        self.tag = tag
        self.out = []  # (ms, line)
        self.err = []
        self.seq = []  # (kind, ms, line) in arrival order, for tails
        self.exit = None
        self.timeout = False
        self.wall_ms = None

    def first(self, needle):
        for ms, line in self.out:
            if needle in line:
                return ms
        return None

    def results(self):
        kv = {}
        for _, line in self.out:
            i = line.find("E2E-RESULT ")
            if i >= 0:
                for m in re.finditer(r"(\w+)=(\S*)", line[i + 11:]):
                    kv[m.group(1)] = m.group(2)
        return kv

    def boot_timer_ms(self):
        for _, line in self.err:
            m = re.search(r"aivmm: boot-timer: guest marker \S+ at (\d+(?:\.\d+)?) ms", line)
            if m:
                return float(m.group(1))
        return None

    def setup_ms(self):
        """aivmm's own exec -> first vCPU run, from its debug line `setup took 12.3ms since exec`."""
        for _, line in self.err:
            m = re.search(r"setup took ([\d.]+)(ns|µs|us|ms|s) since exec", line)
            if m:
                scale = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1000.0}[m.group(2)]
                return float(m.group(1)) * scale
        return None

    def qemu_reset(self):
        """For a QEMU run (QEMU_DIAG traces in l1-init.sh): why it ended, if not by a
        power-off: a guest reset (QEMU's runstate turned to shutdown, under -no-reboot,
        with no shutdown request), named with what the console showed before it."""
        traced = [l for _, l in self.err if l.startswith(("runstate_set", "qemu_system_shutdown_request"))]
        if not traced:
            return None
        if any(l.startswith("qemu_system_shutdown_request") for l in traced):
            return None
        if not any("(shutdown)" in l for l in traced if l.startswith("runstate_set")):
            return None
        said = [l for _, l in self.out if re.search(r"Kernel panic|reboot: Restarting|Restarting system", l)]
        if said:
            return f"QEMU: the guest reset itself after `{said[-1].strip()}`"
        return ("QEMU: the guest reset with no power-off request and no panic or reboot line on its console "
                "(a triple fault, as aivmm reports `the guest triple-faulted`)")

    def tail(self, n=TAIL):
        return [f"[{self.tag} {kind} {ms}ms] {l}" for kind, ms, l in self.seq[-n:]]

    def broke(self):
        """Why this boot run is not a clean boot-to-poweroff, or None."""
        if self.exit is None:
            return "no exit report (L1 lost it)"
        for _, l in self.err + self.out:
            if "panicked" in l or "Kernel panic" in l:
                return f"panic (exit={self.exit}): {l.strip()}"
        if self.timeout:
            quiet = "" if self.out else "; no guest console output"
            return f"timed out after {self.wall_ms} ms, killed (E2E_VMM_TIMEOUT){quiet}"
        errors = [l for _, l in self.err if l.startswith("aivmm: error:")]
        reset = self.qemu_reset()
        if self.first("E2E-MARKER") is None:
            return (f"no E2E-MARKER on the console (exit={self.exit})" + (f": {errors[0]}" if errors else "")
                    + (f"; {reset}" if reset else ""))
        if self.first("E2E-DONE") is None:
            return (f"guest init did not finish (exit={self.exit})" + (f": {errors[0]}" if errors else "")
                    + (f"; {reset}" if reset else ""))
        if self.exit != "0":
            return f"exit status {self.exit}" + (f": {errors[0]}" if errors else "")
        return None


class Scenario:
    def __init__(self, name):
        self.name = name
        self.runs = {}
        self.order = []
        self.kernel_log = []
        self.heartbeat = []
        self.lines = []
        self.ended = False

    def run(self, tag):
        if tag not in self.runs:
            self.runs[tag] = Run(tag)
            self.order.append(tag)
        return self.runs[tag]

    def tail(self):
        out = []
        for t in self.order:
            out += self.runs[t].tail()
        out += [f"[L1] {l}" for l in self.heartbeat[-2:]]
        noise = re.compile(r"Unhandled [WR]DMSR|unstable TSC")
        out += [f"[L1 kernel] {l}" for l in self.kernel_log if not noise.search(l)][-10:]
        return out[-(TAIL * 2):]


def fmt_ms(v):
    return "n/a" if v is None else f"{v:.0f}"


def judge_guest(sc):
    """guest-exit-status / guest-claude: one `aivmm run --workdir` with the Debian image.
    Boot-to-ready is exec -> the command's first stdout line (the agent connected,
    got the command and ran it)."""
    r = sc.runs.get(sc.name)
    if r is None:
        return False, "aivmm did not run", []
    res = {}
    for t in sc.order:  # E2E-RESULT lines L1 prints after the run
        res.update(sc.runs[t].results())
    allt = [l for _, l in r.out + r.err]
    errs = [l for _, l in r.err if l.startswith("aivmm: error:")]
    why = None
    if r.exit is None:
        why = "no exit report (L1 lost it)"
    elif any("panicked" in l for l in allt):
        why = f"Rust panic: {next(l for l in allt if 'panicked' in l).strip()}"
    elif r.timeout:
        why = f"timed out after {r.wall_ms} ms, killed" + ("; no output" if not r.out else "")
    if sc.name == "guest-exit-status":
        want = "7"
        ready = r.first("hello-from-guest")
        if why is None and r.exit != want:
            why = f"aivmm exit status {r.exit}, want {want}" + (f": {errs[0]}" if errs else "")
        if why is None and ready is None:
            why = "`echo hello-from-guest` output did not reach aivmm's stdout"
        if why is None and res.get("host_sees") != "E2E-GUEST-FILE":
            why = f"L1 finds {res.get('host_sees')!r} in workdir/from-guest.txt, want 'E2E-GUEST-FILE'"
        figs = (f"exit 7 passed through, stdout relayed, /work write seen by L1; boot-to-ready "
                f"(exec -> first command output) {fmt_ms(ready)} ms, aivmm exit after {r.wall_ms} ms")
    else:
        want = "0"
        line = next((l for _, l in r.out if "Claude Code" in l), None)
        ready = r.first("Claude Code")
        if why is None and r.exit != want:
            why = f"aivmm exit status {r.exit}, want {want}" + (f": {errs[0]}" if errs else "")
        if why is None and line is None:
            why = "`claude --version` printed no 'Claude Code'"
        figs = (f"{(line or '').strip()!r}; exec -> version line {fmt_ms(ready)} ms, "
                f"aivmm exit after {r.wall_ms} ms")
    if res.get("rootfs_dev"):
        figs += f"; rootfs {res.get('rootfs_dev')}"
    if why:
        return False, why, []
    return True, figs, []


def judge(sc, vmm_mode):
    """Returns (ok, message, extra lines)."""
    if not sc.ended:
        return False, "did not finish", []
    if sc.name in ("boot", "smp", "rng", "blk", "fs"):
        r = sc.runs.get(sc.name)
        if r is None:
            return False, "VMM did not run", []
        why = r.broke()
        if why:
            return False, why, []
        res = r.results()
        warn = any("E2E-WARN" in l for _, l in r.out)
        bt = r.boot_timer_ms()
        figs = (f"marker {fmt_ms(r.first('E2E-MARKER'))} ms, boot-timer {fmt_ms(bt)} ms, "
                f"guest uptime {res.get('uptime_s', '?')} s, exit after {r.wall_ms} ms")
        if r.setup_ms() is not None:
            figs += f", aivmm setup {r.setup_ms():.1f} ms"
        if vmm_mode == "aivmm" and bt is None and not any("devmem-failed" in l for _, l in r.out):
            return False, f"guest wrote the boot-timer but aivmm printed no boot-timer line ({figs})", []
        if warn:
            figs += "; " + ", ".join(l.split("E2E-WARN", 1)[1].strip() for _, l in r.out if "E2E-WARN" in l)
        if sc.name == "smp":
            cpus = int(res.get("cpus", "0") or 0)
            mem = int(res.get("memtotal_kb", "0") or 0)
            if cpus != 4:
                return False, f"guest sees {cpus} CPUs (online={res.get('online')}), want 4", []
            if mem <= 1.8 * 1024 * 1024:
                return False, f"MemTotal {mem} kB, want > 1.8 GiB", []
            figs = f"cpus={cpus} MemTotal={mem} kB; " + figs
        if sc.name == "rng":
            cur = res.get("rng_current", "")
            n = int(res.get("rng_bytes", "0") or 0)
            hexs = res.get("rng_hex", "")
            if "virtio" not in cur:
                return False, f"rng_current={cur!r} (available: {res.get('rng_available')}), want virtio", []
            if n < 64:
                return False, f"read {n} bytes from /dev/hwrng, want >= 64", []
            if not re.search(r"[1-9a-f]", hexs):
                return False, f"/dev/hwrng bytes are all zero ({hexs})", []
            figs = f"rng_current={cur}, {n} bytes; " + figs
        if sc.name == "blk":
            if res.get("blk_sectors") in (None, "none", "0"):
                return False, f"no /dev/vda in the guest (sectors={res.get('blk_sectors')})", []
            if res.get("blk_head") != "E2E-DISK-PATTERN":
                return False, f"guest read {res.get('blk_head')!r} at sector 0, want 'E2E-DISK-PATTERN'", []
            if res.get("blk_readback") != "E2E-GUEST-WROTE":
                return False, (f"guest write failed (rc={res.get('blk_write_rc')}, read back "
                               f"{res.get('blk_readback')!r})"), []
            if res.get("host_readback") != "E2E-GUEST-WROTE":
                return False, f"host reads {res.get('host_readback')!r} where the guest wrote", []
            figs = f"vda {res.get('blk_sectors')} sectors, read+write+fsync ok; " + figs
        if sc.name == "fs":
            if res.get("fs_mount_rc") != "0":
                return False, f"mount -t virtiofs failed (rc={res.get('fs_mount_rc')})", []
            if res.get("fs_read") != "E2E-FS-HELLO":
                return False, f"guest read {res.get('fs_read')!r} from sub/hello.txt (ls: {res.get('fs_ls')})", []
            if res.get("fs_write_rc") != "0" or res.get("host_sees") != "E2E-FS-GUEST":
                return False, f"guest write rc={res.get('fs_write_rc')}, host sees {res.get('host_sees')!r}", []
            figs = "read and write through virtiofs ok; " + figs
        if sc.name in ("fs", "blk"):  # the extended checks (e2e_io.py)
            problems, info = e2e_io.extend(sc, [sc.name] + (["blk/ext4"] if sc.name == "blk" else []))
            if problems:
                return False, "; ".join(problems), info
            return True, figs, info
        return True, figs, []
    if sc.name in e2e_builder.SCENARIOS:
        return e2e_builder.judge(sc)
    if sc.name in e2e_run.SCENARIOS:
        return e2e_run.judge(sc)
    if sc.name in e2e_kernel.SCENARIOS:
        return e2e_kernel.judge(sc)
    if sc.name in e2e_bench.SCENARIOS:
        return e2e_bench.judge(sc, vmm_mode)
    if sc.name in GUEST_IMAGE_SCENARIOS:
        return judge_guest(sc)
    if sc.name in e2e_io.SCENARIOS:
        return e2e_io.judge(sc)
    if sc.name in e2e_hard.SCENARIOS:
        return e2e_hard.judge(sc)
    if sc.name == "harness-selftest":
        marks = " ".join(l for l in sc.lines if "E2E-SELFTEST" in l)
        problems = []
        if "idle-end" not in marks:
            problems.append("the scenario did not finish its idle phase")
        if not EVENTS["busy"]:
            problems.append("the busy silence was not seen as busy")
        if not EVENTS["stalls_recovered"]:
            problems.append("the idle silence was not seen as a stall that a keyboard interrupt ended")
        if EVENTS["retries"]:
            problems.append(f"retried: {EVENTS['retries']}")
        if problems:
            return False, "; ".join(problems), []
        return True, "busy silence waited out; stuck L1 woken by sysrq and went on", []
    if sc.name == "bad-kernel":
        problems = []
        for case in ("garbage", "empty", "truncated"):
            r = sc.runs.get(f"bad-kernel/{case}")
            if r is None or r.exit is None:
                problems.append(f"{case}: no result")
                continue
            errs = [l for _, l in r.err if l.strip()]
            allt = [l for _, l in r.out + r.err]
            if r.timeout:
                problems.append(f"{case}: still running after {r.wall_ms} ms")
            elif r.exit == "0":
                problems.append(f"{case}: exit status 0")
            elif not r.exit.isdigit():
                problems.append(f"{case}: killed by {r.exit}")
            if any("panicked" in l for l in allt):
                problems.append(f"{case}: Rust panic: {next(l for l in allt if 'panicked' in l)!r}")
            elif len(errs) != 1 or not errs[0].startswith("aivmm: error:"):
                shown = " | ".join(errs[:3]) if errs else "(nothing)"
                problems.append(f"{case}: stderr should be one `aivmm: error:` line, got {len(errs)}: {shown}")
        if problems:
            return False, "; ".join(problems), []
        msgs = [f"{c}: {sc.runs[f'bad-kernel/{c}'].err[0][1]}" for c in ("garbage", "empty", "truncated")]
        return True, "3 bad kernels rejected", ["  " + m for m in msgs]
    if sc.name == "qemu-compare":
        # The four default kinds, then any others E2E_QC_KINDS named (e.g. aivmm+nokaslr).
        kinds = ["aivmm", "aivmm-bzimage", "qemu-microvm", "qemu-pc"]
        kinds += sorted({t.split("/")[1] for t in sc.order if t.count("/") == 2} - set(kinds))
        marker = {k: [] for k in kinds}
        uptime = {k: [] for k in kinds}
        bt = []
        broken = []
        for tag in sc.order:
            parts = tag.split("/")
            if len(parts) != 3:
                continue
            k, r = parts[1], sc.runs[tag]
            why = r.broke()
            if why:
                broken.append(f"{k} run {parts[2]}: {why}")
                continue
            marker[k].append(r.first("E2E-MARKER"))
            try:
                uptime[k].append(float(r.results().get("uptime_s", "nan")))
            except ValueError:
                pass
            if k == "aivmm" and r.boot_timer_ms() is not None:
                bt.append(r.boot_timer_ms())

        def med(v):
            return statistics.median(v) if v else None

        extra = ["  boot median ms (exec -> E2E-MARKER console line): "
                 + " ".join(f"{k}={fmt_ms(med(marker[k]))}" for k in kinds)
                 + f" (runs: " + ", ".join(f"{k}={len(marker[k])}" for k in kinds) + ")"]
        for q in ("qemu-microvm", "qemu-pc"):
            a, b = med(marker["aivmm"]), med(marker[q])
            extra.append(f"  boot ratio aivmm/{q}: {a / b:.2f}" if a and b else f"  boot ratio aivmm/{q}: n/a")
        a, b = med(marker["aivmm"]), med(marker["aivmm-bzimage"])
        extra.append(f"  vmlinux cache: aivmm (cached vmlinux)/aivmm-bzimage (--no-kernel-cache, the guest's decompressor): "
                     + (f"{a / b:.2f}" if a and b else "n/a"))
        extra.append("  guest uptime at marker median s: "
                     + " ".join(f"{k}={med(uptime[k]):.2f}" if uptime[k] else f"{k}=n/a" for k in kinds))
        extra.append(f"  aivmm boot-timer median ms: {fmt_ms(med(bt))}")
        extra.append("  all runs ms: " + "; ".join(f"{k}=" + ",".join(fmt_ms(x) for x in marker[k]) for k in kinds))
        if vmm_mode == "qemu":
            extra.append("  (E2E_VMM=qemu: the 'aivmm' column is QEMU microvm)")
        if broken:
            return False, "; ".join(broken), extra
        return True, "figures below", extra
    return False, "unknown scenario", []


# ---------------------------------------------------------------- main


def main():
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        print(__doc__)
        print("usage: tests/e2e/run [--list] [SCENARIO...]")
        return 0
    if "--list" in args:
        for n, d in SCENARIOS.items():
            print(f"{n:14} {d}")
        return 0
    names = args or [n for n in SCENARIOS if n not in NOT_DEFAULT]
    for n in names:
        if n not in SCENARIOS:
            die(f"unknown scenario {n!r} (try --list)")

    vmm_mode = os.environ.get("E2E_VMM", "aivmm")
    if vmm_mode not in ("aivmm", "qemu"):
        die("E2E_VMM must be aivmm or qemu")
    # One round by default: in the default set qemu-compare checks that each kind
    # boots (12 boots were 157 s of a slow L1's run); medians want E2E_BOOT_RUNS=5+.
    runs = int(os.environ.get("E2E_BOOT_RUNS", "1"))
    vto = int(os.environ.get("E2E_VMM_TIMEOUT", "60"))
    aivmm = os.environ.get("AIVMM_BIN") or os.path.join(ROOT, "target/release/aivmm")
    if not os.path.exists(aivmm):
        if vmm_mode == "aivmm":
            die(f"no aivmm binary at {aivmm}")
        aivmm = None
    else:
        aivmm = os.path.abspath(aivmm)

    os.makedirs(WORK, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = os.path.join(WORK, "logs", stamp)
    os.makedirs(logdir, exist_ok=True)
    latest = os.path.join(WORK, "logs", "latest")
    try:
        if os.path.islink(latest):
            os.unlink(latest)
        os.symlink(stamp, latest)
    except OSError:
        pass

    t0 = time.monotonic()
    kernel, moddir = find_kernel()
    vmmrun = build_vmmrun()
    l2, l2mods = build_l2(kernel, moddir)
    guest_images = build_guest_images(names, aivmm) if aivmm else {}
    l1 = build_l1(kernel, moddir, l2, aivmm, vmmrun, names)
    if guest_images:  # appended to the L1 initramfs as a second cpio archive
        gi = Cpio()
        add_guest_images(gi, moddir, guest_images)
        gi.write(os.path.join(WORK, "l1-guest-initrd.cpio"))
        with open(l1, "ab") as f, open(os.path.join(WORK, "l1-guest-initrd.cpio"), "rb") as g:
            shutil.copyfileobj(g, f)
    if L2_KERNEL and not os.access(L2_KERNEL, os.R_OK):
        die(f"cannot read E2E_L2_KERNEL {L2_KERNEL}")
    note(f"kernel {kernel}{f'; L2 kernel {L2_KERNEL}' if L2_KERNEL else ''}; "
         f"L2 modules {' '.join(l2mods) or '(none)'}; L1 initramfs "
         f"{os.path.getsize(l1) >> 20} MiB; built in {time.monotonic() - t0:.1f} s; logs {logdir}")

    budget = {"harness-selftest": 400, "blk": vto, "fs": vto, "boot": vto, "smp": vto, "rng": vto, "bad-kernel": 90, "qemu-compare": 4 * runs * vto}
    for n in GUEST_IMAGE_SCENARIOS:
        budget.setdefault(n, max(vto, GUEST_TIMEOUT))
    budget.update(e2e_io.BUDGET)
    budget.update(e2e_run.BUDGET)
    budget.update(e2e_builder.BUDGET)
    budget.update(e2e_kernel.BUDGET)
    budget.update(e2e_hard.BUDGET)
    budget.update(e2e_bench.BUDGET)
    for n, extra in e2e_io.EXTRA_BUDGET.items():
        budget[n] += extra
    overall = int(os.environ.get("E2E_TIMEOUT", 0)) or 150 + sum(budget[n] + 20 for n in names)
    # E2E_END_BY (Unix time; .ci/run sets it to fit CI's limit): the whole run ends by
    # then, whatever the retries, with the scenarios it could not run failed by name
    # rather than killed from outside with nothing said.
    end_by = float(os.environ.get("E2E_END_BY", 0) or 0)
    # An L1 hang (nested SVM under TCG freezes L1 now and then, right as a VMM starts)
    # is not a scenario's failure: boot a fresh L1 for what it left unfinished, at
    # most L1_HANG_RETRIES times, and say so. Scenario failures are never retried,
    # except an L2 triple fault, once (see watch's report).
    passed = failed = 0
    todo = names
    # Fresh L1s: up to L1_HANG_RETRIES for hung or dead ones, and one for each batch
    # of L2 triple faults (watch bounds those by TRIPLE_FAULT_RETRIES).
    hangs = 0
    for attempt in range(L1_HANG_RETRIES + TRIPLE_FAULT_RETRIES + 1):
        left = end_by - time.time() if end_by else overall
        if left < 120:
            for n in todo:
                print(f"FAIL {n}: not run: the run's end time (E2E_END_BY) came first, "
                      f"{max(0, left):.0f} s left", flush=True)
            failed += len(todo)
            break
        p, f, rerun, why = run_l1(kernel, l1, todo, vmm_mode, runs, vto, min(overall, int(left)), logdir, t0,
                                  guest_images, budget,
                                  retry_hang=hangs < L1_HANG_RETRIES,
                                  console_name="l1-console.log" if attempt == 0 else f"l1-console-{attempt + 1}.log")
        passed, failed = passed + p, failed + f
        if rerun:
            EVENTS["retries"].append(f"L1 #{attempt + 1}: {why}; ran again: {', '.join(rerun)}")
            if why != TRIPLE_WHY:
                hangs += 1
        todo = rerun
        if not todo:
            break
    print(f"{passed} passed, {failed} failed", flush=True)
    print_events()
    return 0 if failed == 0 else 1


def scenario_deadline(budget):
    """Seconds a scenario may run before it counts as stuck (its own fault, if L1's
    heartbeat is still coming): twice its budget plus two minutes, so a slow L1 is
    never mistaken for a stuck scenario."""
    return 2 * budget + 120


def print_events():
    """The harness's own line after the results: every L1 boot, retry and stall, so
    flakiness is visible rather than absorbed."""
    e = EVENTS
    print(f"harness: {e['l1_boots']} L1 boot{'s' if e['l1_boots'] != 1 else ''}, {len(e['retries'])} "
          f"retr{'ies' if len(e['retries']) != 1 else 'y'}, {e['triple']} L2 triple fault"
          f"{'s' if e['triple'] != 1 else ''}, {len(e['stalls_recovered'])} L1 stall"
          f"{'s' if len(e['stalls_recovered']) != 1 else ''} recovered, {len(e['busy'])} busy silence"
          f"{'s' if len(e['busy']) != 1 else ''}, {e['soft_lockups']} L1 soft lockup line"
          f"{'s' if e['soft_lockups'] != 1 else ''}, {len(e['overruns'])} scenario overrun"
          f"{'s' if len(e['overruns']) != 1 else ''}; heartbeat lateness max {e['hb_late_max_ms']} ms", flush=True)
    for r in e["retries"]:
        print(f"  retry: {r}", flush=True)
    for r in e["stalls_recovered"]:
        print(f"  stall: {r}", flush=True)
    for r in e["busy"]:
        print(f"  busy: {r}", flush=True)
    # Where the time went (the longest five, BEGIN to END in L1), for a run near its limit.
    slow = sorted(e["durations"].items(), key=lambda kv: -kv[1])[:5]
    if slow:
        print("  longest: " + ", ".join(f"{n} {d:.0f} s" for n, d in slow), flush=True)


#: Seconds between L1's `@@L1 hb` lines (l1-heartbeat.c, started by l1-init.sh).
HB_PERIOD = 10
#: Seconds between the harness's own `e2e: ... running for` lines while L1 runs.
PROGRESS_EVERY = int(os.environ.get("E2E_PROGRESS_EVERY", "300"))
#: How many times an L1 that hung is booted again for the scenarios it left unfinished.
L1_HANG_RETRIES = int(os.environ.get("E2E_L1_HANG_RETRIES", "6"))
#: aivmm's error for an L2 triple fault, and how many such failures a whole run
#: may send to a fresh L1 (watch's report) before they count as failures; each
#: scenario gets one such retry (a guest that really triple-faults does it again).
TRIPLE_FAULT = "the guest triple-faulted"
TRIPLE_FAULT_RETRIES = 5
triple_retries = [0]
triple_retried = set()
TRIPLE_WHY = "an L2 triple fault"


def run_l1(kernel, l1, names, vmm_mode, runs, vto, overall, logdir, t0, guest_images, budgets, retry_hang,
           console_name):
    """Boots one L1 that runs `names`; returns (passed, failed, rerun, why) as watch does."""
    EVENTS["l1_boots"] += 1
    # nokaslr: RIPs of a hung L1 are comparable between runs.
    # init_on_free=1: L1 zeroes pages as they are freed, not as they are next
    # allocated. A VM's RAM held its kernel's code, which L0's TCG translated; the
    # first write to such a page makes TCG invalidate those translations, ~50,000 per
    # boot, ~1-1.5 s. Without it that cost lands at random in the NEXT VM's boot (in
    # its setup, its decompressor or its initramfs unpacking: whichever first writes
    # the recycled pages), whichever VMM it is; with it, in the previous VM's exit,
    # which no figure times and settle() waits out.
    l1_extra = os.environ.get("E2E_L1_CMDLINE", "init_on_free=1")
    append = (f"console=ttyS0 quiet panic=-1 mitigations=off nokaslr {l1_extra} e2e.scenarios={','.join(names)} "
              f"e2e.vmm={vmm_mode} e2e.runs={runs} e2e.timeout={vto} e2e.guest_timeout={GUEST_TIMEOUT}")
    cmd = [os.environ.get("E2E_L0_QEMU") or "qemu-system-x86_64", "-accel", L1_ACCEL, "-M", "pc", "-cpu", "max",
           "-m", L1_MEM, "-smp", L1_SMP, "-nographic", "-no-reboot", "-net", "none",
           "-kernel", kernel, "-initrd", l1, "-append", append]
    cmd += guest_image_drives(guest_images)
    # Why L1 ends, for an L1 that ends early: QEMU logs a TCG triple fault ("Triple
    # fault", -d cpu_reset) and every shutdown request with its reason (6 = the guest
    # powered off; a reset under -no-reboot has none) into l1-qemu*.log.
    qlog = os.path.join(logdir, console_name.replace("console", "qemu"))
    cmd += ["-d", "cpu_reset", "-D", qlog, "-trace", "qemu_system_shutdown_request"]
    mondir = tempfile.mkdtemp(prefix="aivmm-e2e-")
    monitor = os.path.join(mondir, "l1-monitor.sock")
    cmd += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    with open(os.path.join(logdir, "l1-command.txt"), "a") as f:
        f.write(" ".join(cmd) + "\n")

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return watch(proc, names, vmm_mode, runs, overall, logdir, t0, monitor, budgets,
                     retry_hang=retry_hang, console_name=console_name)
    finally:
        shutil.rmtree(mondir, ignore_errors=True)
        if proc.poll() is None:  # interrupted: don't leave L1 running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass


def monitor_cmd(path, command, wait=2.0):
    """Runs one QEMU monitor command on L1; returns its output (best effort)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(wait)
            s.connect(path)
            s.sendall(command.encode() + b"\n")
            buf = b""
            end = time.monotonic() + wait
            prompts = command.count("\n") + 2  # the greeting's prompt, then one per command
            while time.monotonic() < end and buf.count(b"(qemu)") < prompts:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                buf += chunk
            text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", buf.decode("utf-8", "replace").replace("\r", ""))
            return "".join(l + "\n" for l in text.split("\n")
                           if l.strip() and not l.startswith(("(qemu)", "QEMU ")))
    except OSError as e:
        return f"(monitor: {e})"


def l1_panic(console_path):
    """L1's own kernel panic, from the end of its console log (lines without an
    @@ tag are L1's kernel): the BUG or Oops line, the task, and the panic line;
    None if L1 did not panic."""
    try:
        with open(console_path, errors="replace") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (1 << 20)))  # a recursive-fault trace runs long
            lines = [l.rstrip() for l in f.read().splitlines() if "@@" not in l]
    except OSError:
        return None
    strip = lambda l: re.sub(r"^\s*[\d.]+\s+(\[\s*[\d.]+\]\s*)?", "", l)
    panic = next((strip(l) for l in reversed(lines) if "Kernel panic - not syncing" in l), None)
    if not panic:
        return None
    bug = next((strip(l) for l in reversed(lines) if re.search(r"\bBUG: |Oops: |general protection", l)), "")
    comm = next((m.group(1) for l in reversed(lines) for m in [re.search(r"\bComm: (\S+)", l)] if m), "?")
    why = f"{bug} in task {comm}; " if bug else ""
    hint = (" (an interrupt let into L1's KVM right after VMRUN, before the host GS base is back: "
            "QEMU TCG's nested SVM, see tests/e2e/README.md)") if "stack guard page" in bug else ""
    return f"L1 kernel panic: {why}{panic}{hint}"


def l1_end_reason(logdir, console_name):
    """Why L1's QEMU ended, from its -d cpu_reset / trace log (see run_l1)."""
    path = os.path.join(logdir, console_name.replace("console", "qemu"))
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return "no QEMU log"
    panic = l1_panic(os.path.join(logdir, console_name))
    if panic:
        return panic
    if "Triple fault" in text:
        return f"L1 triple-faulted (QEMU TCG's nested SVM; {os.path.basename(path)} has its registers)"
    m = re.findall(r"qemu_system_shutdown_request reason=(\d+)", text)
    if m:
        return f"a shutdown request, reason {m[-1]} (6 = guest-shutdown: L1 powered off; 7 = guest-reset)"
    return "a reset with no triple fault logged and no shutdown request (L1 reset itself)"


def sample_vcpus(monitor, path, label, samples=3):
    """Samples L1's vCPUs through QEMU's monitor (appending to `path`) and classifies
    them: ("busy" | "stuck", summary lines). A vCPU is busy when its registers
    change between samples while it is not halted: L1 is working (a long page clear,
    an RCU stall that ends), only silent. "stuck": every vCPU is halted (HLT=1) or
    frozen in all samples, as in an L1 whose timer interrupt was lost. (Debian's
    System.map is a stub: symbols come from the sysrq-l backtraces, if any.)"""
    dumps = []
    with open(path, "a") as f:
        for i in range(samples):
            regs = monitor_cmd(monitor, "info registers -a")
            f.write(f"=== {label}: info registers -a, sample {i}\n{regs}\n")
            dumps.append(regs)
            time.sleep(1)
        if label.startswith("stuck") or label.startswith("hang"):
            n = len(re.findall(r"RIP=", dumps[0]))
            for c in range(n):
                f.write(f"=== cpu {c} code\n" + monitor_cmd(monitor, f"cpu {c}\nx/12i $pc", 1.5))
        f.write("=== info cpus\n" + monitor_cmd(monitor, "info cpus") + "\n")

    def per_cpu(regs):
        # "CPU#0\nRAX=... RIP=... HLT=0 ..." -> [(rip, halted, registers), ...]
        out = []
        for block in re.split(r"(?m)^CPU#\d+", regs)[1:]:
            rip = re.search(r"RIP=([0-9a-f]+)", block)
            # The general-purpose registers only: a CPU looping through the same
            # entry code (an interrupt storm, a livelock) moves RIP, RSP and the
            # flags but none of these; `rep stosb` clearing a page moves RCX/RDI.
            gprs = " ".join(re.findall(r"\b(?:RAX|RBX|RCX|RDX|RSI|RDI|RBP|R8|R9|R1[0-5]) ?=[0-9a-f]+", block))
            out.append((rip.group(1) if rip else "?", "HLT=1" in block, gprs))
        return out

    cpus = [per_cpu(d) for d in dumps]
    ncpu = min((len(c) for c in cpus), default=0)
    busy = False
    summary = []
    for n in range(ncpu):
        seen = [c[n] for c in cpus]
        # Idle CPUs wake for the odd interrupt: a CPU counts as working only if it was
        # running in most samples and its general-purpose registers changed (RIP, RSP
        # and flags alone moving is a loop that makes no progress: stuck).
        halted = sum(1 for _, h, _ in seen if h) * 2 > len(seen)
        moving = not halted and len({g for _, _, g in seen}) > 1
        busy = busy or moving
        looping = not halted and not moving and len({r for r, _, _ in seen}) > 1
        state = "halted" if halted else "moving" if moving else "looping" if looping else "frozen"
        summary.append(f"CPU#{n} RIP={','.join(dict.fromkeys(r for r, _, _ in seen))} ({state})")
    return ("busy" if busy else "stuck"), summary


#: What the watchdog saw over the whole run (all L1 boots), printed after the results.
EVENTS = {"l1_boots": 0, "retries": [], "triple": 0, "stalls_recovered": [], "busy": [], "soft_lockups": 0,
          "hb_late_max_ms": 0, "overruns": [], "durations": {}}


def watch(proc, names, vmm_mode, runs, overall, logdir, t0, monitor, budgets, retry_hang=False,
          console_name="l1-console.log"):
    """Streams L1's console and reports each scenario as it ends.

    Returns (passed, failed, rerun): with `retry_hang`, an L1 hang does not fail the
    scenarios it left unfinished; they come back in `rerun` for a fresh L1.
    """
    console = open(os.path.join(logdir, console_name), "w")
    lines = queue.Queue()

    def pump():
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").replace("\r", "").rstrip("\n")
            lines.put(re.sub(r"\x1b(\[[0-9;?]*[A-Za-z]|c)", "", text))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    # A scenario named twice runs twice (to chase a flaky one): ids smp, smp#2, ...
    ids = []
    for n in names:
        k = names[:len(ids) + 1].count(n)
        ids.append(n if k == 1 else f"{n}#{k}")
    scen = {i: Scenario(i.split("#")[0]) for i in ids}
    started = set()
    cur = None
    console_tail = []
    reported = set()
    results = {}
    triple = []  # scenarios whose guest triple-faulted, to run again (see report)
    verbose = os.environ.get("E2E_VERBOSE") == "1"
    start = time.monotonic()
    deadline = start + overall
    stall = int(os.environ.get("E2E_STALL", "60"))
    last_line = start
    l1_status = []
    killed = None
    hung = False

    def report(name):
        sc = scen[name]
        ok, msg, extra = judge(sc, vmm_mode)
        results[name] = ok
        reported.add(name)
        with open(os.path.join(logdir, f"scenario-{name.replace('#', '-')}.log"), "w") as f:
            f.write("\n".join(sc.lines) + "\n")
        # The judge's message may name another line of a run whose VM triple-faulted
        # (trust/narrow's named its first stderr line): look at every run's errors.
        triple_faulted = TRIPLE_FAULT in msg or any(
            TRIPLE_FAULT in l for r in sc.runs.values() for _, l in r.err if l.startswith("aivmm: error:"))
        if (not ok and retry_hang and triple_faulted and triple_retries[0] < TRIPLE_FAULT_RETRIES
                and name not in triple_retried):
            # An L2 that triple-faults at a random point (its state corrupted in a
            # world switch: the same nested-SVM-under-TCG fault that crashes L1 under
            # port-exit storms) is the emulator's, not the scenario's. Run it once
            # more in a fresh L1; a real fault comes back and fails.
            triple_retries[0] += 1
            triple_retried.add(name)
            EVENTS["triple"] += 1
            triple.append(name.split("#")[0])
            del results[name]
            kept = os.path.join(logdir, f"scenario-{name.replace('#', '-')}-triple-fault-{triple_retries[0]}.log")
            os.replace(os.path.join(logdir, f"scenario-{name.replace('#', '-')}.log"), kept)
            note(f"{name}: {msg}; it will run once more in a fresh L1 (logs {kept})")
            return
        if ok:
            print(f"PASS {name}: {msg}" if msg else f"PASS {name}", flush=True)
            for e in extra:
                print(e, flush=True)
        else:
            print(f"FAIL {name}: {msg}", flush=True)
            for e in extra:
                print(e, flush=True)
            for t in sc.tail():
                print(f"  | {t}", flush=True)
            print(f"  logs: {os.path.join(logdir, f'scenario-{name.replace(chr(35), chr(45))}.log')} "
                  f"and {console.name}", flush=True)

    scen_begin, scen_deadline = {}, {}
    last_hb = [start]  # when the last `@@L1 hb` line came (a list: set inside helpers)
    hang_log = os.path.join(logdir, "l1-hang.txt")
    # 420 s: L1's slowest known work, a 2 GiB VM's memory freed under init_on_free,
    # takes 70-150 s; past this a fresh L1 costs less than waiting on (was 900 s).
    busy_max = int(os.environ.get("E2E_BUSY_MAX", "420"))
    silent_since = None  # set once a silence passed `stall` and L1 was found busy
    next_sample = None
    overrun = None  # (scenario id, deadline s) of a scenario past its deadline
    # Every PROGRESS_EVERY s, one line on where L1 is, for a log read from its end.
    next_progress = start + PROGRESS_EVERY

    pending = []  # lines read while the watchdog waited: parsed by the main loop next

    def collect(seconds, until_hb=False):
        """Reads L1's console for `seconds` into `pending` (the sysrq dumps, and
        whatever else L1 says meanwhile); with `until_hb`, stops at a heartbeat.
        Returns whether a heartbeat line came."""
        end = time.monotonic() + seconds
        hb = False
        while time.monotonic() < end:
            try:
                extra = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            pending.append(extra)
            if extra is None:
                break
            if extra.startswith("@@L1 hb n="):
                hb = True
                if until_hb:
                    break
        return hb

    while True:
        try:
            line = pending.pop(0) if pending else lines.get(timeout=2.0)
            if line is not None and "@@" in line:
                # Only L1's userspace (whose every line carries "@@", the heartbeat's
                # too) shows L1 going on: a kernel that prints a soft lockup every 20 s
                # while nothing else runs is still silent.
                last_line = time.monotonic()
                silent_since = None
        except queue.Empty:
            line = ""
        if line is None:
            break
        now = time.monotonic()
        if now >= deadline:
            killed = (f"L1 exceeded the overall bound of {overall} s"
                      + (" (E2E_END_BY: the run's end time)" if os.environ.get("E2E_END_BY") else ""))
            break
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            where = (f"{cur} running for {now - scen_begin[cur]:.0f} s" if cur in scen_begin
                     else "between scenarios" if started else "before the first scenario")
            hb = f"its heartbeat {now - last_hb[0]:.0f} s ago" if last_hb[0] > start else "no heartbeat yet"
            note(f"{where}; L1 up {now - start:.0f} s, {hb}, its last userspace line {now - last_line:.0f} s ago")
        if line and "BUG: soft lockup" in line:
            # L1's own watchdog: a CPU ran kernel code for 20+ s without scheduling. That
            # is slowness (a long clear under TCG), not a hang; the silence rules decide.
            EVENTS["soft_lockups"] += 1
        if cur and cur in scen_deadline and now >= scen_deadline[cur] and proc.poll() is None:
            # A scenario past its own deadline while L1 answers (its heartbeat came
            # recently) is stuck itself: that is a failure, not L1's trouble.
            if now - last_hb[0] < 3 * HB_PERIOD:
                overrun = (cur, int(scen_deadline[cur] - scen_begin[cur]))
                killed = (f"{cur} did not finish within its deadline of {overrun[1]} s while L1 was alive "
                          f"(heartbeat {now - last_hb[0]:.0f} s ago)")
                break
        if now >= last_line + stall and proc.poll() is None and (next_sample is None or now >= next_sample):
            silence = now - last_line
            kind, cpus = sample_vcpus(monitor, hang_log, f"silence {silence:.0f}s", samples=3)
            console.write(f"{now - start:9.3f} [watchdog] {silence:.0f} s of silence; vCPUs {kind}: "
                          f"{'; '.join(cpus)}\n")
            if kind == "busy" and silence < busy_max:
                # Slow, not stuck: keep waiting, and look again in 30 s.
                if silent_since is None:
                    silent_since = last_line
                    EVENTS["busy"].append(f"{cur or 'between scenarios'}: L1 silent {silence:.0f}+ s with "
                                          f"vCPUs working ({'; '.join(cpus)})")
                else:
                    EVENTS["busy"][-1] = (f"{cur or 'between scenarios'}: L1 silent {silence:.0f}+ s with "
                                          f"vCPUs working ({'; '.join(cpus)})")
                note(f"L1 silent for {silence:.0f} s but its vCPUs are working; waiting (up to {busy_max} s)")
                next_sample = time.monotonic() + 30
                continue
            # Stuck (or busy past busy_max). The sysrq keys are keyboard interrupts: they
            # wake a CPU whose timer interrupt was lost, and their dumps show where L1 is.
            # sysrq 9: console loglevel 9, so the dumps reach the console; l: backtraces
            # of busy CPUs; w: blocked (D state) tasks.
            for key in ("9", "l", "w"):
                monitor_cmd(monitor, f"sendkey alt-sysrq-{key}", 0.5)
            # Did L1 come back? Its heartbeat (every HB_PERIOD s) must come on its own.
            recovered = collect(15) or collect(2 * HB_PERIOD + 5, until_hb=True)
            woke = "the sysrq keyboard interrupts"
            if not recovered:
                # Not even the keyboard's interrupt got in: what do the local APICs hold
                # (a vector stuck in service blocks all below it)? Then an NMI, which
                # no APIC priority or cleared IF holds back.
                with open(hang_log, "a") as f:
                    for c in range(len(cpus)):
                        f.write(f"=== cpu {c}: info lapic\n" + monitor_cmd(monitor, f"cpu {c}\ninfo lapic", 2.0))
                    f.write("=== info pic\n" + monitor_cmd(monitor, "info pic", 2.0))
                monitor_cmd(monitor, "nmi", 0.5)
                recovered = collect(2 * HB_PERIOD + 5, until_hb=True)
                woke = "an NMI (the keyboard interrupt did not get in)"
            if recovered:
                EVENTS["stalls_recovered"].append(
                    f"{cur or 'between scenarios'}: L1 silent {silence:.0f} s with its vCPUs {', '.join(cpus)}; "
                    f"it went on after {woke} (see {hang_log})")
                note(f"L1 was stuck for {silence:.0f} s ({'; '.join(cpus)}) and went on after {woke}")
                console.write(f"{time.monotonic() - start:9.3f} [watchdog] L1 went on after {woke}\n")
                last_line = time.monotonic()
                next_sample = None
                continue
            killed = (f"L1 hung: no console output (not even its {HB_PERIOD} s heartbeat) for {silence:.0f} s; "
                      f"vCPUs {kind}: {'; '.join(cpus) or 'unknown'} (see {hang_log})")
            console.write(f"[watchdog] {killed}\n")
            hung = True
            break
        if line == "":
            continue
        elapsed = time.monotonic() - start
        console.write(f"{elapsed:9.3f} {line}\n")
        console.flush()
        if verbose:
            print(f"  l1 {elapsed:7.1f} {line}", file=sys.stderr, flush=True)
        console_tail = (console_tail + [line])[-TAIL:]
        i = line.find("@@")
        if i < 0:
            if cur:
                scen[cur].lines.append(line)
            continue
        body = line[i + 2:]
        kind, _, rest = body.partition(" ")
        if kind == "L1":
            if rest.startswith("hb "):
                last_hb[0] = time.monotonic()
                m = re.search(r"late_ms=(\d+)", rest)
                if m:
                    EVENTS["hb_late_max_ms"] = max(EVENTS["hb_late_max_ms"], int(m.group(1)))
                continue
            l1_status.append(rest)
            if cur:
                scen[cur].lines.append(body)
                scen[cur].heartbeat.append(rest)
            if rest.startswith("kvm=missing"):
                note("L1 has no /dev/kvm")
            if rest.startswith("up "):
                note(f"L1 userspace after {elapsed:.1f} s ({rest})")
            continue
        if kind == "BEGIN":
            n = rest.split()[0]
            cur = next((i for i in ids if scen[i].name == n and i not in started), None)
            if cur:
                started.add(cur)
                scen_begin[cur] = time.monotonic()
                # Progress, for a log read from its end (CI's): where the run is, and when.
                note(f"{cur} begins ({len(started)}/{len(ids)} in this L1, {elapsed:.0f} s into it, "
                     f"{time.monotonic() - t0:.0f} s into the run)")
                scen_deadline[cur] = scen_begin[cur] + scenario_deadline(budgets.get(n, 120))
            continue
        if kind == "END":
            if cur in scen_begin:
                EVENTS["durations"][cur] = time.monotonic() - scen_begin[cur]
            if cur and cur not in reported:
                scen[cur].ended = True
                report(cur)
            cur = None
            continue
        if cur is None:
            continue
        sc = scen[cur]
        sc.lines.append(body)
        if kind in ("O", "E"):
            parts = rest.split(" ", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                r = sc.run(parts[0])
                ms, text = int(parts[1]), parts[2] if len(parts) > 2 else ""
                (r.out if kind == "O" else r.err).append((ms, text))
                r.seq.append(("out" if kind == "O" else "err", ms, text))
        elif kind == "X":
            parts = rest.split()
            r = sc.run(parts[0])
            kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            r.exit = kv.get("exit")
            r.timeout = kv.get("timeout") == "1"
            r.wall_ms = int(kv.get("wall_ms", "0") or 0)
        elif kind == "K":
            sc.kernel_log.append(rest.split(" ", 1)[1] if " " in rest else rest)

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            proc.kill()
    proc.wait()
    console.close()
    wall = time.monotonic() - t0

    if overrun:
        # The scenario that overran fails; the ones after it run in a fresh L1.
        name = overrun[0]
        results[name] = False
        reported.add(name)
        print(f"FAIL {name}: did not finish within its deadline of {overrun[1]} s (L1 alive: its heartbeat "
              f"kept coming)", flush=True)
        for t in scen[name].tail():
            print(f"  | {t}", flush=True)
        with open(os.path.join(logdir, f"scenario-{name.replace('#', '-')}.log"), "w") as f:
            f.write("\n".join(scen[name].lines) + "\n")
        print(f"  logs: {os.path.join(logdir, f'scenario-{name.replace(chr(35), chr(45))}.log')} and "
              f"{console.name}", flush=True)
        rerun = triple + [n.split("#")[0] for n in ids if n not in reported]
        passed = sum(1 for v in results.values() if v)
        if rerun and retry_hang:
            note(f"{killed}; {', '.join(rerun)} will run in a fresh L1")
            EVENTS["overruns"].append(f"{name} ({overrun[1]} s)")
            return passed, len(results) - passed, rerun, f"{name} overran its deadline"
        killed = killed + " (the scenarios after it did not run)"

    # An L1 that ends on its own with scenarios unreported died (a reset or panic of
    # L1 itself, seen with nested SVM under TCG): like a hang, not the scenarios' fault.
    died = killed is None and any(n not in reported for n in ids)
    if died:
        killed = f"L1 exited (status {proc.returncode}) before its scenarios finished: {l1_end_reason(logdir, console_name)}"
    if (hung or died) and retry_hang:
        rerun = triple + [n.split("#")[0] for n in ids if n not in reported]
        why = killed
        note(f"{why}; {', '.join(rerun)} will run again in a fresh L1 (logs {console.name})")
        passed = sum(1 for v in results.values() if v)
        return passed, len(results) - passed, rerun, why

    shown = False
    for n in ids:
        if n in reported:
            continue
        why = killed
        results[n] = False
        if n not in started:
            print(f"FAIL {n}: {why} (not started)", flush=True)
            continue
        print(f"FAIL {n}: {why}", flush=True)
        for t in scen[n].tail():
            print(f"  | {t}", flush=True)
        if not shown:
            shown = True
            for t in console_tail[-TAIL:]:
                print(f"  | [L1 console] {t}", flush=True)
        print(f"  logs: {console.name}", flush=True)
    if not shown and len(reported) < len(ids):
        for t in console_tail[-TAIL:]:
            print(f"  | [L1 console] {t}", flush=True)
        print(f"  logs: {console.name}", flush=True)

    passed = sum(1 for v in results.values() if v)
    failed = len(ids) - passed - len(triple)
    note(f"wall time {wall:.1f} s (L1 {time.monotonic() - start:.1f} s); logs {logdir}")
    return passed, failed, triple, (TRIPLE_WHY if triple else None)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
