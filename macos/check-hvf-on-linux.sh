#!/usr/bin/env bash
# Type-checks the macOS-only HVF files (hypervisor/hvf/{ffi,darwin}.rs,
# vmm_hvf_darwin.rs) and the aarch64-only trait impls on a Linux host, where they
# are normally cfg'd out.
#
# It copies vmm/src/hypervisor/{mod.rs,hvf/}, vmm/src/arch/aarch64/ and
# vmm/src/vmm_hvf{,_darwin}.rs into a scratch crate, drops the macOS/aarch64 cfg
# gates and the x86-only trait items, stands in a two-variant `vmm::VmExit` for
# vmm.rs (which needs the whole crate), and runs `cargo clippy` there (no
# linking, so the missing framework does not matter).
#
# The macOS virtio-fs passthrough (devices/src/virtio/fs/macos/) goes in as
# `fs_macos`, built the way a Mac builds it: its `target_os = "macos"` branches
# kept and its Linux branches (and the Linux-only `fuse` adapter) cut. This
# checks names and types against the libc crate's Linux items, so macOS struct
# layouts (stat, dirent, statvfs) are not checked by it. The kqueue poller in hvf/notify.rs stays macOS-only: the libc crate
# has no kqueue items for Linux.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src/hypervisor" "$work/src/arch"
cp -r "$root/vmm/src/hypervisor/hvf" "$work/src/hypervisor/"
cp -r "$root/vmm/src/arch/aarch64" "$work/src/arch/"
cp "$root/vmm/src/vmm_hvf.rs" "$root/vmm/src/vmm_hvf_darwin.rs" "$work/src/"
mkdir -p "$work/src/fs_macos"
cp "$root"/devices/src/virtio/fs/macos/{mod,attr,errno,flags,passthrough,server,xattr}.rs "$work/src/fs_macos/"
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
pub mod vmm_hvf;
pub mod vmm_hvf_darwin;
/// Stands in for vmm.rs, which needs the whole crate.
pub mod vmm {
    /// How the guest ended.
    #[derive(Debug)]
    pub enum VmExit {
        /// Power-off.
        PowerOff,
        /// Reset.
        Reset,
    }
}
RS
python3 - "$root" "$work" <<'PY'
import sys
root, work = sys.argv[1], sys.argv[2]
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
for cut in ['#[cfg(target_os = "linux")]\npub mod kvm;\n',
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
cut = '#[cfg(target_os = "linux")]\npub mod fuse;\n'
assert mod.count(cut) == 1, cut
open(f"{fsm}/mod.rs", "w").write(mod.replace(cut, ""))
p = open(f"{fsm}/passthrough.rs").read()
other = r'(?:///[^\n]*\n)*#\[cfg\((?:not\(target_os = "macos"\)|target_os = "linux")\)\]\n(?:pub )?fn .*?\n}\n'
p, n = re.subn(other, "", p, flags=re.S)
assert n >= 6, n
gate = '#[cfg(target_os = "macos")]\n'
assert p.count(gate) >= 6
p = p.replace(gate, "")
assert "cfg(target_os" not in p.split("#[cfg(test)]")[0]
open(f"{fsm}/passthrough.rs", "w").write(p)
PY
cd "$work"
# Reuse compiled dependencies between runs.
export CARGO_TARGET_DIR="${AIVMM_HVF_CHECK_TARGET:-$root/target/hvf-check}"
cargo clippy --quiet -- -D warnings -A clippy::unwrap_used
echo "macOS HVF files type-check: OK"
