#!/usr/bin/env python3
"""Prepares a scratch copy of the aivmm workspace as a Mac would compile it.

Usage: macos-build-check.py ROOT WORK LIBC_SRC VMM_SYS_UTIL_SRC

`cargo check` of WORK (run by check-hvf-on-linux.sh) then type-checks every
crate a Mac builds (aivmm, aivmm-devices, aivmm-protocol: libraries, binary,
tests and benches) with the code a Mac compiles, on this Linux host:

- cfg predicates are rewritten to macOS/aarch64 values: `target_os = "linux"`,
  `"android"` and `target_arch = "x86_64"` become `any()` (false),
  `target_os = "macos"`, `target_vendor = "apple"` and
  `target_arch = "aarch64"` become `all()` (true);
- Linux-only dependency tables are dropped (kvm-ioctls, kvm-bindings,
  seccompiler, fuse-backend-rs);
- `libc` is a shim that re-exports only the items the libc crate also defines
  for macOS (names read from its apple/bsd/unix sources), plus a stand-in for
  the few macOS-only items aivmm uses (kqueue, `SO_NOSIGPIPE`, ...);
- `vmm-sys-util` is a shim that re-exports only the modules vmm-sys-util has on
  macOS (its Linux `eventfd`, `epoll`, `signal`, `ioctl`, ... modules are not).

What it cannot check: the types and fields of libc items (Linux's are used),
items libc gates per OS inside its shared unix sources (the name set is a
superset there), `std::os::linux` (std is Linux's; the script greps for it),
and the dependencies' own macOS builds.
"""

import os
import re
import shutil
import subprocess
import sys

root, work, libc_src, sysutil_src = sys.argv[1:5]

# The libc crate's sources compiled for aarch64-apple-darwin (and the Linux ones).
MAC_SOURCES = ["lib.rs", "primitives.rs", "types.rs", "unix/mod.rs", "unix/bsd/mod.rs",
               "unix/bsd/apple", "new/mod.rs", "new/common", "new/apple"]
LINUX_SOURCES = ["lib.rs", "primitives.rs", "types.rs", "unix/mod.rs", "unix/linux_like",
                 "new/mod.rs", "new/common", "new/linux_uapi", "new/glibc"]
ITEM = re.compile(
    r"\bpub\s+(?:const\s+|unsafe\s+|extern\s+\"C\"\s+|safe\s+)*"
    r"(?:fn|const|static|struct|union|type|enum)\s+(?:mut\s+)?([A-Za-z_][A-Za-z0-9_]*)")


def names(base, parts):
    out = set()
    for part in parts:
        path = os.path.join(base, part)
        files = []
        if os.path.isdir(path):
            for d, _, fs in os.walk(path):
                files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
        elif os.path.exists(path):
            files.append(path)
        for f in files:
            out.update(ITEM.findall(open(f).read()))
    return out


# primitives.rs re-exports core::ffi's C types.
CORE_FFI = {"c_char", "c_double", "c_float", "c_int", "c_long", "c_longlong", "c_schar",
            "c_short", "c_uchar", "c_uint", "c_ulong", "c_ulonglong", "c_ushort"}
mac = names(libc_src, MAC_SOURCES) | CORE_FFI
linux = names(libc_src, LINUX_SOURCES) | CORE_FFI
# The parse must see macOS's own items and none of the well-known Linux-only ones.
for n in ["kqueue", "kevent", "SO_NOSIGPIPE", "F_NOCACHE", "renameatx_np", "c_int", "stat",
          "openat", "sigaction", "SA_SIGINFO"]:
    assert n in mac, n
for n in ["pipe2", "accept4", "dup3", "SOCK_NONBLOCK", "SOCK_CLOEXEC",
          "epoll_create1", "eventfd", "O_DIRECT", "O_PATH", "O_TMPFILE", "fallocate",
          "memfd_create", "prctl", "SIGRTMIN", "statx", "renameat2", "__errno_location",
          "signalfd", "timerfd_create", "MADV_HUGEPAGE", "MAP_NORESERVE_", "RLIMIT_RTTIME",
          "SYS_accept4", "PR_SET_NAME", "syncfs", "posix_fadvise", "preadv2"]:
    assert n not in mac, n

# Items the code names that exist on macOS only (stand-ins written from Apple's
# headers; the values do not matter to a type check). The kqueue ones match the
# libc crate's macOS definitions, which check-hvf-on-linux.sh compares.
MAC_ONLY = {
    "kevent": open(os.path.join(root, "macos", "kqueue-standin.rs")).read(),
    "SO_NOSIGPIPE": "pub const SO_NOSIGPIPE: c_int = 0x1022;",
    "F_NOCACHE": "pub const F_NOCACHE: c_int = 48;",
    "F_FULLFSYNC": "pub const F_FULLFSYNC: c_int = 51;",
    "__error": 'extern "C" { pub fn __error() -> *mut c_int; }',
    "renameatx_np": 'extern "C" { pub fn renameatx_np(fromfd: c_int, from: *const c_char, '
                    'tofd: c_int, to: *const c_char, flags: c_uint) -> c_int; }',
    "RENAME_SWAP": "pub const RENAME_SWAP: c_uint = 0x2;",
    "RENAME_EXCL": "pub const RENAME_EXCL: c_uint = 0x4;",
}
for n in list(MAC_ONLY) + ["kqueue", "EVFILT_READ", "EVFILT_WRITE", "EV_ADD", "EV_DELETE",
                          "EV_ENABLE", "EV_ERROR", "EV_EOF"]:
    assert n in mac, n

both = sorted(mac & linux)
shim = os.path.join(work, "shim")
os.makedirs(os.path.join(shim, "libc", "src"))
open(os.path.join(shim, "libc", "Cargo.toml"), "w").write("""[package]
name = "mac-libc"
version = "0.0.0"
edition = "2021"
[lib]
name = "libc"
[dependencies]
real-libc = { package = "libc", version = "0.2" }
""")
lib = ["//! The libc crate as far as macOS has it (see macos-build-check.py).",
       "#![allow(non_camel_case_types, deprecated, clippy::all)]", "pub use real_libc::c_void;"]
lib.append("pub use real_libc::{" + ", ".join(n for n in both if n not in MAC_ONLY) + "};")
lib += MAC_ONLY.values()
open(os.path.join(shim, "libc", "src", "lib.rs"), "w").write("\n".join(lib) + "\n")

# vmm-sys-util as a Mac has it: its lib.rs's modules plus its unix ones.
os.makedirs(os.path.join(shim, "vmm-sys-util", "src"))
open(os.path.join(shim, "vmm-sys-util", "Cargo.toml"), "w").write("""[package]
name = "mac-vmm-sys-util"
version = "0.0.0"
edition = "2021"
[lib]
name = "vmm_sys_util"
[dependencies]
real = { package = "vmm-sys-util", version = "0.15" }
""")
mods = re.findall(r"^pub mod (\w+);", open(os.path.join(sysutil_src, "lib.rs")).read(), re.M)
mods += re.findall(r"^pub mod (\w+);",
                   open(os.path.join(sysutil_src, "unix", "mod.rs")).read(), re.M)
assert "terminal" in mods and "eventfd" not in mods and "signal" not in mods, mods
open(os.path.join(shim, "vmm-sys-util", "src", "lib.rs"), "w").write(
    "//! vmm-sys-util's macOS modules.\npub use real::{" + ", ".join(sorted(mods)) + "};\n")

# The workspace, as a Mac compiles it.
for d in ["vmm", "benches", "devices", "protocol", "guest/agent"]:
    shutil.copytree(os.path.join(root, d), os.path.join(work, d),
                    ignore=shutil.ignore_patterns("target", "results"))
os.makedirs(os.path.join(work, "tests"))
for f in os.listdir(os.path.join(root, "tests")):
    if f.endswith(".rs"):
        shutil.copy(os.path.join(root, "tests", f), os.path.join(work, "tests"))
shutil.copy(os.path.join(root, "Cargo.lock"), work)
# Files the sources include (guest-image scripts, ...), as they are.
for f in os.listdir(root):
    if not os.path.exists(os.path.join(work, f)) and f not in ("target", ".git", "Cargo.toml"):
        os.symlink(os.path.join(root, f), os.path.join(work, f))

LINUX_TABLE = re.compile(r"^\[target\.'cfg\(target_os = \"linux\"\)'\.(dev-)?dependencies\]\n"
                         r"(?:(?!\[).*\n)*", re.M)


def root_manifest(s):
    for old, new in [
        ('members = [".", "devices", "protocol", "guest/agent"]',
         'members = [".", "devices", "protocol", "guest/agent", "shim/libc", "shim/vmm-sys-util"]'),
        ('vmm-sys-util = "0.15"',
         'vmm-sys-util = { package = "mac-vmm-sys-util", path = "shim/vmm-sys-util" }'),
        ('\nlibc = "0.2"\n', '\nlibc = { package = "mac-libc", path = "shim/libc" }\n'),
    ]:
        assert s.count(old) == 1, old
        s = s.replace(old, new)
    return s


def devices_manifest(s):
    old = '\nlibc = "0.2"\n'
    assert s.count(old) == 1
    return s.replace(old, '\nlibc = { package = "mac-libc", path = "../shim/libc" }\n')


s = open(os.path.join(root, "Cargo.toml")).read()
s, n = LINUX_TABLE.subn("", s)
assert n == 2, n  # dependencies and dev-dependencies
open(os.path.join(work, "Cargo.toml"), "w").write(root_manifest(s))
s = open(os.path.join(work, "devices", "Cargo.toml")).read()
s, n = LINUX_TABLE.subn("", s)
assert n == 1, n
open(os.path.join(work, "devices", "Cargo.toml"), "w").write(devices_manifest(s))
# The guest agent is a Linux program; on a Mac it builds to a stub that says so.
s = open(os.path.join(work, "guest", "agent", "Cargo.toml")).read()
old = '\nlibc = "0.2"\n'
assert s.count(old) == 1
open(os.path.join(work, "guest", "agent", "Cargo.toml"), "w").write(
    s.replace(old, '\nlibc = { package = "mac-libc", path = "../../shim/libc" }\n'))

CFG = [('target_os = "linux"', "any()"), ('target_os = "android"', "any()"),
       ('target_arch = "x86_64"', "any()"), ('target_os = "macos"', "all()"),
       ('target_vendor = "apple"', "all()"), ('target_arch = "aarch64"', "all()")]
linux_std = []
for d in ["vmm", "benches", "devices", "protocol", "tests", "guest/agent"]:
    for dirpath, _, files in os.walk(os.path.join(work, d)):
        for f in files:
            if not f.endswith(".rs"):
                continue
            p = os.path.join(dirpath, f)
            s = open(p).read()
            for a, b in CFG:
                s = s.replace(a, b)
            # The framework link kind exists on Apple targets only; check, not link.
            s = s.replace('kind = "framework"', 'kind = "dylib"')
            if "std::os::linux" in s:
                linux_std.append(os.path.relpath(p, work))
            open(p, "w").write(s)
if linux_std:
    print("note: std::os::linux named in (check that it is cfg-gated):", ", ".join(linux_std))

# The Linux name set is a superset too (other libcs and architectures): drop the
# names this host's libc does not have, as rustc lists them.
shim_lib = os.path.join(shim, "libc", "src", "lib.rs")
for _ in range(5):
    r = subprocess.run(["cargo", "check", "--quiet", "--message-format", "short", "-p", "mac-libc"],
                       cwd=work, capture_output=True, text=True)
    if r.returncode == 0:
        break
    missing = set(re.findall(r"`real_libc::(\w+)`", r.stderr))
    assert missing, r.stderr[-3000:]
    text = open(shim_lib).read()
    for n in missing:
        text = re.sub(r"(?<=[{ ])" + n + r", ", "", text, count=1)
    open(shim_lib, "w").write(text)
else:
    sys.exit("the libc shim does not build")
