#!/usr/bin/env bash
# Type-checks the macOS-only HVF files (hypervisor/hvf/{ffi,darwin}.rs,
# vmm_hvf_darwin.rs) and the aarch64-only trait impls on a Linux host, where they
# are normally cfg'd out.
#
# It copies vmm/src/hypervisor/{mod.rs,hvf/}, vmm/src/arch/aarch64/ and
# vmm/src/vmm_hvf{,_darwin}.rs into a scratch crate, drops the macOS/aarch64 cfg
# gates and the x86-only trait items, stands in a two-variant `machine::VmExit`
# for machine.rs (which needs the whole crate), and runs `cargo clippy` there (no
# linking, so the missing framework does not matter).
#
# console.rs (host stdin into the UART, raw terminal) goes in as it is: it is
# portable, and this checks it against what a Mac has (vmm-sys-util's unix
# terminal, no Linux-only items).
#
# The macOS virtio-fs passthrough (devices/src/virtio/fs/macos/) goes in as
# `fs_macos`, built the way a Mac builds it: its `target_os = "macos"` branches
# kept and its Linux branches (and the Linux-only `fuse` adapter) cut. This
# checks names and types against the libc crate's Linux items, so macOS struct
# layouts (stat, dirent, statvfs) are not checked by it.
#
# The devices' OS layer (devices/src/sys/) goes in as `sys`, as a Mac builds it:
# the pipe notifier, the epoll emulation, and kqueue.rs, whose kqueue items
# (absent from the libc crate on Linux) come from a stand-in written from
# Apple's <sys/event.h>. The stand-in is first compared, field by field and
# constant by constant, with the libc crate's own macOS definitions (read from
# its source in the cargo registry), so kqueue.rs is checked against those.
# Still unchecked here: that those definitions match the SDK (libc's own CI
# does that), and kqueue's behaviour, which only a Mac can show.
#
# Then the whole workspace as a Mac compiles it (macos-build-check.py): aivmm
# (library, binary, tests, benches), aivmm-devices and aivmm-protocol are copied
# with their cfg predicates rewritten to macOS/aarch64 values, without their
# Linux-only dependencies, and against a libc that has only the items the libc
# crate also defines for macOS and a vmm-sys-util with only its macOS modules;
# `cargo check` must pass. Unchecked by it: libc's struct layouts and signatures
# (Linux's are used), items libc gates per OS inside its shared unix sources,
# the dependencies' own macOS builds, and the guest agent (a Linux program).
#
# Last, the devices' unit tests run on Linux with `--cfg aivmm_portable_sys`:
# every device over the macOS notifier (a pipe) and the epoll emulation (over
# poll(2) in kqueue's place). The proptests are skipped there (CI runs them in
# the normal build).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/hypervisor" "$work/src/arch"
cp -r "$root/vmm/src/hypervisor/hvf" "$work/src/hypervisor/"
cp -r "$root/vmm/src/arch/aarch64" "$work/src/arch/"
cp "$root/vmm/src/vmm_hvf.rs" "$root/vmm/src/vmm_hvf_darwin.rs" "$root/vmm/src/console.rs" "$work/src/"
mkdir -p "$work/src/fs_macos"
cp "$root"/devices/src/virtio/fs/macos/{mod,attr,errno,flags,passthrough,server,xattr}.rs "$work/src/fs_macos/"
mkdir -p "$work/src/sys"
cp "$root"/devices/src/sys/{epoll,kqueue,pipe_event}.rs "$work/src/sys/"
libc_src="$(cd "$root" && cargo metadata --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
print([p["manifest_path"] for p in m["packages"] if p["name"] == "libc"][0])')"
libc_src="$(dirname "$libc_src")/src/unix/bsd"
cat >"$work/Cargo.toml" <<TOML
[package]
name = "hvf-check"
version = "0.0.0"
edition = "2021"
rust-version = "1.85"
[dependencies]
vm-memory = { version = "=0.17.1", features = ["backend-mmap"] }
vmm-sys-util = "0.15"
thiserror = "2"
log = "0.4"
tracing = "0.1"
libc = "0.2"
vm-fdt = "0.3.0"
virtio-queue = "0.17"
aivmm-devices = { path = "$root/devices" }
[workspace]
TOML
cat >"$work/src/lib.rs" <<'RS'
pub mod arch {
    pub mod aarch64;
}
pub mod hypervisor;
pub mod fs_macos;
pub mod sys;
pub mod console;
pub mod vmm_hvf;
pub mod vmm_hvf_darwin;
/// Stands in for machine.rs (it needs the whole crate): the power button trait
/// the HVF machine implements, and how a VM ends.
pub mod machine {
    /// A button the host presses.
    pub trait PowerButton: Send + Sync {
        /// Presses it once.
        fn press(&self) -> std::io::Result<()>;
    }
    /// How the guest ended.
    #[derive(Debug)]
    pub enum VmExit {
        /// Power-off.
        PowerOff,
        /// Reset.
        Reset,
    }
}
/// Stands in for cli.rs (only the type is named here).
pub mod cli {
    /// `aivmm run`'s arguments.
    #[derive(Debug)]
    pub struct RunArgs {
        /// `--workdir`.
        pub workdir: Option<std::path::PathBuf>,
    }
}
/// Stands in for vmm_hvf_run.rs (portable, built and tested in the real crate),
/// with `run_cli`'s signature.
pub mod vmm_hvf_run {
    use std::io::Write;
    use std::time::Instant;

    use crate::cli::RunArgs;
    use crate::hypervisor::hvf::{HvfApi, HvfHypervisor};
    use crate::machine::VmExit;

    /// `Result` of the path.
    pub type Result<T> = std::result::Result<T, crate::vmm_hvf::Error>;

    /// How `aivmm run` ended.
    #[derive(Debug)]
    pub enum Outcome {
        /// A workdir command's status.
        Command(i32),
        /// The VM's end.
        Vm(VmExit),
    }

    /// `aivmm run` on `hyp`.
    pub fn run_cli<A: HvfApi>(
        _hyp: &HvfHypervisor<A>,
        _args: &RunArgs,
        _console: Box<dyn Write + Send>,
        _stdin_tty: Option<bool>,
        _started: Instant,
    ) -> Result<Outcome> {
        Ok(Outcome::Vm(VmExit::PowerOff))
    }
}
/// Apple's <sys/event.h>, for kqueue.rs (the libc crate has it for macOS only).
#[allow(non_camel_case_types)]
pub mod kq_shim {
    use libc::{c_int, c_void, intptr_t, timespec, uintptr_t};
RS
cat "$root/macos/kqueue-standin.rs" >>"$work/src/lib.rs"
echo "}" >>"$work/src/lib.rs"
python3 - "$root" "$work" "$libc_src" <<'PY'
import sys
root, work, libc_src = sys.argv[1], sys.argv[2], sys.argv[3]
hvf = f"{work}/src/hypervisor/hvf/mod.rs"
s = open(hvf).read()
for gate, item in [('#[cfg(target_os = "macos")]\n', 'mod darwin;'),
                   ('#[cfg(target_os = "macos")]\n', 'mod ffi;'),
                   ('#[cfg(target_os = "macos")]\n', 'pub use darwin::Framework;'),
                   ('#[cfg(target_arch = "aarch64")]\n', 'mod traits')]:
    assert s.count(gate + item) == 1, item
    s = s.replace(gate + item, item)
open(hvf, "w").write(s)
ffi = f"{work}/src/hypervisor/hvf/ffi.rs"
f = open(ffi).read().replace('kind = "framework"', 'kind = "dylib"')
open(ffi, "w").write(f)
m = open(f"{root}/vmm/src/hypervisor/mod.rs").read()
for cut in ['#[cfg(all(target_os = "linux", target_arch = "x86_64"))]\npub mod kvm;\n',
            '#[cfg(target_arch = "x86_64")]\npub mod x86_64;\n',
            '    /// CPUID entries the hypervisor can expose to a guest.\n    #[cfg(target_arch = "x86_64")]\n    fn supported_cpuid(&self) -> Result<Vec<x86_64::CpuIdEntry>>;\n',
            '    /// The x86 register interface.\n    #[cfg(target_arch = "x86_64")]\n    fn x86(&self) -> &dyn x86_64::X86Vcpu;\n']:
    assert m.count(cut) == 1, cut
    m = m.replace(cut, "")
open(f"{work}/src/hypervisor/mod.rs", "w").write(m)
# The macOS passthrough as a Mac builds it.
import re
fsm = f"{work}/src/fs_macos"
mod = open(f"{fsm}/mod.rs").read()
for cut in ['#[cfg(target_os = "linux")]\npub mod fuse;\n', 'pub mod backend;\n']:
    assert mod.count(cut) == 1, cut
    mod = mod.replace(cut, "")
open(f"{fsm}/mod.rs", "w").write(mod)
p = open(f"{fsm}/passthrough.rs").read()
other = r'(?:///[^\n]*\n)*#\[cfg\((?:not\(target_os = "macos"\)|target_os = "linux")\)\]\n(?:pub )?fn .*?\n}\n'
p, n = re.subn(other, "", p, flags=re.S)
assert n >= 6, n
gate = '#[cfg(target_os = "macos")]\n'
assert p.count(gate) >= 6
p = p.replace(gate, "")
assert "cfg(target_os" not in p.split("#[cfg(test)]")[0]
open(f"{fsm}/passthrough.rs", "w").write(p)
# The devices' OS layer as macOS builds it (mirrors the macOS lines of sys/mod.rs).
sysmod = open(f"{root}/devices/src/sys/mod.rs").read()
for item in ['#[cfg(target_os = "macos")]\nmod kqueue;',
             '#[cfg(any(not(target_os = "linux"), aivmm_portable_sys))]\npub use pipe_event::{PipeEventFd as EventFd, EFD_NONBLOCK};',
             '#[cfg(target_os = "macos")]\npub type Epoll = epoll::Emulated<kqueue::Kqueue>;']:
    assert item in sysmod, item
open(f"{work}/src/sys/mod.rs", "w").write("""//! devices/src/sys as macOS builds it.
#![allow(dead_code)]
pub mod epoll;
mod kqueue;
pub mod pipe_event;
pub use epoll::{ControlOperation, EpollEvent, EventSet};
pub use pipe_event::{PipeEventFd as EventFd, EFD_NONBLOCK};
/// kqueue.
pub type Epoll = epoll::Emulated<kqueue::Kqueue>;
""")
kq = f"{work}/src/sys/kqueue.rs"
k = open(kq).read()
assert k.count("use libc as kq;") == 1
open(kq, "w").write(k.replace("use libc as kq;", "use crate::kq_shim as kq;"))
# The stand-in must say what the libc crate says for macOS.
import re
apple = open(f"{libc_src}/apple/mod.rs").read()
shim = open(f"{work}/src/lib.rs").read()
def fields(text, struct):
    body = re.search(r"pub struct " + struct + r" \{(.*?)\n\s*\}", text, re.S).group(1)
    out = []
    for name, ty in re.findall(r"pub (\w+): ([\w:* ]+),", body):
        out.append((name, ty.replace("crate::", "").replace("libc::", "").strip()))
    return out
assert fields(apple, "kevent") == fields(shim, "kevent"), (fields(apple, "kevent"), fields(shim, "kevent"))
for const in ["EVFILT_READ", "EVFILT_WRITE", "EV_ADD", "EV_DELETE", "EV_ENABLE", "EV_ERROR", "EV_EOF"]:
    pat = r"pub const " + const + r": (\w+) = (-?\w+);"
    a, b = re.search(pat, apple), re.search(pat, shim)
    assert a and b and a.groups() == b.groups(), (const, a and a.groups(), b and b.groups())
bsd = open(f"{libc_src}/mod.rs").read()
assert "pub fn kqueue() -> c_int;" in bsd
sig = re.search(r"pub fn kevent\((.*?)\) -> c_int;", apple, re.S).group(1)
want = re.search(r"pub fn kevent\((.*?)\) -> c_int;", shim, re.S).group(1)
norm = lambda s: re.sub(r"\s+|crate::|,$", "", s)
assert norm(sig) == norm(want), (sig, want)
PY
cd "$work"
# Reuse compiled dependencies between runs.
export CARGO_TARGET_DIR="${AIVMM_HVF_CHECK_TARGET:-$root/target/hvf-check}"
cargo clippy --quiet -- -D warnings -A clippy::unwrap_used
echo "macOS HVF files type-check: OK"

# The workspace as a Mac compiles it.
mac="$work/mac"
mkdir "$mac"
sysutil_src="$(cd "$root" && cargo metadata --format-version 1 | python3 -c '
import json, sys
m = json.load(sys.stdin)
print([p["manifest_path"] for p in m["packages"] if p["name"] == "vmm-sys-util"][0])')"
export CARGO_TARGET_DIR="${AIVMM_MAC_CHECK_TARGET:-$root/target/mac-check}"
python3 "$root/macos/macos-build-check.py" "$root" "$mac" "$libc_src/../.." \
    "$(dirname "$sysutil_src")/src"
(cd "$mac" && cargo check --quiet --workspace --all-targets)
echo "the workspace type-checks as macOS/aarch64 builds it: OK"

# The devices over the macOS notifier and poller emulation.
cd "$root"
RUSTFLAGS="--cfg aivmm_portable_sys" \
    CARGO_TARGET_DIR="${AIVMM_PORTABLE_SYS_TARGET:-$root/target/portable-sys}" \
    cargo test --quiet -p aivmm-devices --lib -- --skip proptests
echo "devices over the portable notifier and poller: OK"
