//! Bad input to the real `aivmm` binary: every case must end with a non-zero
//! status and exactly one line on stderr that says what is wrong (`aivmm: error:`
//! from aivmm, `error:` from the argument parser), never a Rust panic.
//!
//! Cases that get as far as attaching devices need `/dev/kvm`; without it they are
//! skipped with a note (set `AIVMM_SKIP_KVM_TESTS=1` as for `kvm_guests.rs`).

use std::path::Path;
use std::process::{Command, Stdio};

/// Runs `aivmm args…`; returns (exit code, stderr lines).
fn aivmm(args: &[&str]) -> (Option<i32>, Vec<String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running aivmm");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (out.status.code(), lines)
}

/// Checks one bad invocation: non-zero, one error line containing `want`.
fn refused(args: &[&str], want: &str) {
    let (code, lines) = aivmm(args);
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "{args:?}: {lines:?}"
    );
    assert!(
        matches!(code, Some(c) if c != 0),
        "{args:?}: exit {code:?}, {lines:?}"
    );
    let errors: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("aivmm: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: want one error line, got {lines:?}"
    );
    assert!(
        errors[0].contains(want),
        "{args:?}: {:?} lacks {want:?}",
        errors[0]
    );
    // aivmm's own errors are one line; clap adds a usage hint after its line.
    if errors[0].starts_with("aivmm: error:") {
        assert_eq!(lines.len(), 1, "{args:?}: {lines:?}");
    }
}

/// Without XDG_STATE_HOME and HOME there is no state directory, and no shared
/// fallback such as /tmp: a clear error.
#[test]
fn no_state_directory_is_a_clear_error() {
    let work = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(["run", "--workdir"])
        .arg(work.path())
        .env_remove("HOME")
        .env_remove("XDG_STATE_HOME")
        .stdin(Stdio::null())
        .output()
        .expect("running aivmm");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.trim() == "aivmm: error: no state directory: set XDG_STATE_HOME or HOME \
                       (aivmm keeps no state in a shared directory such as /tmp)",
        "{err}"
    );
}

#[test]
fn out_of_range_flags_are_one_line_errors() {
    let k = ["run", "--kernel", "/nonexistent-kernel"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut v = k.to_vec();
        v.extend_from_slice(extra);
        v
    };
    refused(&with(&["--cpus", "0"]), "cpus must be between 1 and 254");
    refused(&with(&["--cpus", "255"]), "cpus must be between 1 and 254");
    refused(&with(&["--cpus", "-1"]), "'-1'");
    refused(&with(&["--memory", "1M"]), "memory must be between");
    refused(&with(&["--memory", "2T"]), "memory must be between");
    refused(&with(&["--memory", "lots"]), "bad size 'lots'");
    refused(
        &with(&["--disk-size", "1M"]),
        "--disk-size must be between 64 MiB and 64 TiB",
    );
    refused(&with(&["--agent-timeout", "0"]), "--agent-timeout");
    refused(&with(&["--seccomp", "maybe"]), "--seccomp");
    refused(&with(&["--net", "slirp"]), "bad --net 'slirp'");
    refused(
        &with(&["--forward", "0:22", "--net", "user"]),
        "bad --forward '0:22'",
    );
    refused(
        &with(&["--forward", "2222:22"]),
        "--forward needs user-mode networking",
    );
    refused(
        &with(&["--vsock", "/tmp/v.sock", "--vsock-cid", "2"]),
        "vsock guest CID",
    );
    refused(
        &with(&["--vsock", "/tmp/v.sock", "--vsock-cid", "4294967295"]),
        "vsock guest CID",
    );
    refused(
        &with(&["--net", "user", "--forward", "2222:22", "--forward", "2222:23"]),
        "host port 2222/tcp is forwarded twice",
    );
    refused(&with(&["--share", "/tmp"]), "bad --share '/tmp'");
    refused(
        &with(&["--share", "/a:t", "--share", "/b:t"]),
        "share tag 't' is used twice",
    );
    refused(&with(&["--disk", ":ro"]), "bad --disk ':ro'");
    refused(
        &with(&["--cpus", "2", "--no-acpi"]),
        "--no-acpi supports one vCPU only",
    );
    let long = "x".repeat(3000);
    let mut v = k.to_vec();
    v.extend_from_slice(&["--cmdline", &long]);
    refused(&v, "command line is 3000 bytes");
    refused(&["run"], "nothing to run");
}

fn kvm_usable() -> bool {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        eprintln!("skipped: these cases boot the x86 KVM VMM");
        return false;
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    if std::env::var("AIVMM_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: /dev/kvm is not usable");
        return false;
    }
    panic!("/dev/kvm is not usable; set AIVMM_SKIP_KVM_TESTS=1 to skip");
}

#[test]
fn bad_files_are_one_line_errors() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name).display().to_string();
    let check = |args: Vec<String>, want: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&a, want);
    };
    std::fs::write(p("garbage"), vec![0x5a; 8192]).expect("write");
    std::fs::write(p("odd.img"), vec![0; 1000]).expect("write");
    std::fs::write(p("empty.img"), b"").expect("write");
    std::fs::write(p("kernel.elf"), tiny_elf()).expect("write");
    // A 200 MiB initrd (sparse) for a 64 MiB guest.
    let big = std::fs::File::create(p("big.initrd")).expect("create");
    big.set_len(200 << 20).expect("size");
    check(
        vec!["run", "--kernel", &p("garbage")]
            .into_iter()
            .map(String::from)
            .collect(),
        "is not a Linux kernel",
    );
    check(
        vec!["run", "--kernel", &p("missing")]
            .into_iter()
            .map(String::from)
            .collect(),
        "missing",
    );
    let kernel = p("kernel.elf");
    let run = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["run".to_string(), "--kernel".into(), kernel.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    check(
        run(&["--memory", "64M", "--initrd", &p("big.initrd")]),
        "does not fit in guest memory",
    );
    // Kernels too large for the VM: 100 MiB of image, and a 1 GiB bss.
    std::fs::write(p("big.elf"), elf(100 << 20, 100 << 20)).expect("write");
    std::fs::File::options()
        .write(true)
        .open(p("big.elf"))
        .and_then(|f| f.set_len(ELF_IMAGE + (100 << 20)))
        .expect("size");
    std::fs::write(p("bss.elf"), elf(4, 1 << 30)).expect("write");
    for k in ["big.elf", "bss.elf"] {
        let a = vec!["run".to_string(), "--memory".into(), "64M".into(), "--kernel".into(), p(k)];
        check(a, "give the VM more memory");
    }
    // A truncated kernel: the program header table is cut off.
    std::fs::write(p("cut.elf"), &tiny_elf()[..100]).expect("write");
    check(
        vec!["run".into(), "--kernel".into(), p("cut.elf")],
        "is not a Linux kernel",
    );
    // A FIFO never blocks the open: kernel, initrd and a read-only disk.
    let fifo = p("fifo");
    let c = std::ffi::CString::new(fifo.as_str()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let want = format!("{fifo}: is a FIFO, not a regular file");
    check(vec!["run".into(), "--kernel".into(), fifo.clone()], &want);
    check(run(&["--initrd", &fifo]), &want);
    check(
        run(&["--disk", &format!("{fifo}:ro")]),
        &format!("{fifo} is a FIFO, not a regular file or a block device"),
    );
    // One image twice is named as such, not as a lock held by "another process".
    std::fs::write(p("a.img"), vec![0; 4096]).expect("write");
    check(
        run(&["--disk", &p("a.img"), "--disk", &p("a.img")]),
        &format!("disk image {} is given twice", p("a.img")),
    );
    check(run(&["--disk", &p("odd.img")]), "not a multiple of 512");
    check(run(&["--disk", &p("empty.img")]), "is empty");
    check(run(&["--disk", &p("missing.img")]), "does not exist");
    check(
        run(&["--disk", dir.path().to_str().expect("utf-8")]),
        "is a directory",
    );
    check(
        run(&["--share", &format!("{}:t", p("missing"))]),
        "cannot be opened",
    );
    check(
        run(&["--share", &format!("{}:t", p("odd.img"))]),
        "is not a directory",
    );
    assert!(Path::new(&p("odd.img")).exists());
}

/// Makes `path` unwritable, even for root: the immutable flag as root (where the
/// file system has it), mode 0444 otherwise. Returns false if it could not.
#[cfg(target_os = "linux")]
fn make_unwritable(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).is_ok();
    }
    const FS_IMMUTABLE_FL: libc::c_long = 0x10;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long through the pointer.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return false;
        }
        flags |= FS_IMMUTABLE_FL;
        libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) == 0
    }
}

/// Undoes [`make_unwritable`]'s immutable flag, so the file can be removed.
#[cfg(target_os = "linux")]
fn clear_immutable(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        let mut flags: libc::c_long = 0;
        // SAFETY: as in make_unwritable.
        unsafe {
            if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0 {
                flags &= !0x10;
                libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
            }
        }
    }
}

/// Elsewhere (no FS_IOC_*FLAGS): mode 0444 only.
#[cfg(not(target_os = "linux"))]
fn make_unwritable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).is_ok()
}

#[cfg(not(target_os = "linux"))]
fn clear_immutable(_: &Path) {}

#[test]
fn disk_images_unwritable_or_in_use_are_one_line_errors() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("kernel.elf");
    std::fs::write(&kernel, tiny_elf()).expect("write");
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("write");
    let run = |disk: &str| {
        let k = kernel.to_str().expect("utf-8");
        vec!["run".to_string(), "--kernel".into(), k.into(), "--disk".into(), disk.into()]
    };
    let disk = img.to_str().expect("utf-8");
    // Another VM (here: this process) holds the image.
    {
        use std::os::fd::AsRawFd;
        let held = std::fs::File::open(&img).expect("open");
        // SAFETY: flock on an open file.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
        for d in [disk.to_string(), format!("{disk}:ro")] {
            let a = run(&d);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            refused(&a, "is locked by another process");
        }
    }
    if make_unwritable(&img) {
        let a = run(disk);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        refused(&a, &format!("opening disk image {disk} failed"));
        clear_immutable(&img);
    } else {
        eprintln!("note: cannot make an unwritable file here; that case is skipped");
    }
}

/// Where an ELF from [`elf`] has its image (after the header and program header).
const ELF_IMAGE: u64 = 120;

/// The smallest x86_64 ELF kernel aivmm loads: one PT_LOAD segment at 1 MiB holding
/// `hlt; jmp .` (it never runs here: the bad device or initrd stops aivmm first).
fn tiny_elf() -> Vec<u8> {
    elf(4, 4)
}

/// An x86_64 ELF kernel with one PT_LOAD segment at 1 MiB of `filesz` bytes in the
/// file (only the first 4 written: `hlt; jmp .`) and `memsz` in memory.
fn elf(filesz: u64, memsz: u64) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let code: [u8; 4] = [0xf4, 0xeb, 0xfd, 0x90];
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [ELF_IMAGE, LOAD, LOAD, filesz, memsz, 16] {
        e.extend_from_slice(&v.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
    }
    e.extend_from_slice(&code);
    e
}

#[test]
fn an_untrusted_workdir_config_is_refused_before_anything_exists() {
    let t = tempfile::tempdir().expect("tempdir");
    let (proj, state) = (t.path().join("proj"), t.path().join("state"));
    std::fs::create_dir(&proj).expect("mkdir");
    let toml = proj.join("aivmm.toml");
    let hostile = format!(
        "share = [\"{}:secret\"]\nenv = [\"AWS_SECRET_ACCESS_KEY\"]\nclaude_auth = true\n",
        t.path().display()
    );
    std::fs::write(&toml, &hostile).expect("write");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
            .args(args)
            .env("HOME", t.path())
            .env("XDG_STATE_HOME", &state)
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .env("AIVMM_GUEST_KERNEL", "/nonexistent-kernel")
            .stdin(Stdio::null())
            .output()
            .expect("running aivmm");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let p = proj.to_str().expect("utf-8 temp path");
    let (code, _, err) = run(&["run", "--workdir", p, "--", "true"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("aivmm: error: ")
            && err.contains("aivmm.toml asks for share, env, claude_auth, which widen the sandbox")
            && err.contains("(run `aivmm trust "),
        "{err}"
    );
    assert!(!state.exists(), "nothing was made before the refusal");

    let (code, out, err) = run(&["trust", p]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("  share = [") && out.contains("  claude_auth = true"), "{out}");
    let (_, out, _) = run(&["trust", "--list"]);
    assert!(out.contains(p) && out.trim_end().ends_with("trusted"), "{out}");

    // One byte changed (the guest or a `git pull`): refused again.
    std::fs::write(&toml, hostile.replacen("true", "true ", 1)).expect("write");
    let (code, _, err) = run(&["run", "--workdir", p, "--", "true"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("it changed since you trusted it"), "{err}");
}
