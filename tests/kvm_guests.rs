//! Host KVM tests: tiny freestanding C guests booted by the real `aivmm` binary.
//!
//! Each test compiles one guest from `tests/guests/` with gcc into a temporary
//! directory, runs `aivmm run --kernel <guest> --memory 128M` with a timeout, and
//! checks the exit status and what the guest printed on the serial console
//! (aivmm's stdout) and what aivmm logged (stderr). The guests are a few thousand
//! instructions each, because on the PVM test host every guest instruction is
//! emulated and every port or MMIO access is a ~10 µs exit.
//!
//! Without `/dev/kvm` these tests fail, unless `AIVMM_SKIP_KVM_TESTS=1` is set.
//! The guests are x86: elsewhere (macOS) the file is empty.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one guest may run before it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Guest RAM for every run.
const MEMORY: &str = "128M";
/// Where the guest sources, their header and linker script live.
const GUEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests");
/// Set to 1 to skip (rather than fail) these tests on a host without KVM.
const SKIP_ENV: &str = "AIVMM_SKIP_KVM_TESTS";

/// Returns whether the tests can run: `/dev/kvm` opens read-write. Panics with
/// the reason if not, unless [`SKIP_ENV`] is `1`, in which case it says why it
/// skips and returns false.
fn kvm_usable(test: &str) -> bool {
    let problem = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => return true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "/dev/kvm does not exist".to_string(),
        Err(e) => format!("/dev/kvm cannot be opened read-write: {e}"),
    };
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("{test}: skipped: {problem} ({SKIP_ENV}=1)");
        return false;
    }
    panic!(
        "{test}: {problem}. These tests boot real guests with KVM; run them on a host \
         with KVM, or set {SKIP_ENV}=1 to skip them."
    );
}

/// A guest ELF in its own temporary directory (removed on drop).
struct Guest {
    _dir: tempfile::TempDir,
    elf: PathBuf,
}

/// Compiles `tests/guests/<name>.c` into a freestanding x86_64 ELF linked at 1 MiB.
fn build_guest(name: &str) -> Guest {
    let dir = tempfile::Builder::new()
        .prefix(&format!("aivmm-guest-{name}-"))
        .tempdir()
        .expect("creating a temporary directory");
    let src = Path::new(GUEST_DIR).join(format!("{name}.c"));
    let elf = dir.path().join(format!("{name}.elf"));
    let out = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-O2",
            "-fno-pic",
            "-no-pie",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
        ])
        .arg("-T")
        .arg(Path::new(GUEST_DIR).join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("running gcc to build the test guest {name} failed: {e} (is gcc installed?)")
        });
    assert!(
        out.status.success(),
        "gcc failed to build {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Guest { _dir: dir, elf }
}

/// The outcome of one `aivmm run`.
struct Run {
    guest: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "aivmm run --kernel {} --memory {MEMORY}: {} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.guest, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

impl Run {
    /// Lines of stderr that report a VMM error.
    fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("aivmm: error:"))
            .collect()
    }

    fn assert_success(&self) {
        assert!(self.status.success(), "expected exit 0:\n{self}");
        assert!(
            self.error_lines().is_empty(),
            "unexpected error line:\n{self}"
        );
        self.assert_no_panic();
    }

    fn assert_no_panic(&self) {
        assert!(!self.stderr.contains("panicked"), "aivmm panicked:\n{self}");
    }

    fn assert_stdout_has(&self, needle: &str) {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}:\n{self}"
        );
    }
}

/// Reads a child's pipe to the end on a thread of its own, so neither pipe fills up.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` until `deadline`; kills it if it is still running then.
/// Returns its status and whether it timed out.
fn wait_until(child: &mut Child, deadline: Instant) -> (ExitStatus, bool) {
    loop {
        if let Some(status) = child.try_wait().expect("waiting for aivmm") {
            return (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("reaping aivmm"), true);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs aivmm on `guest` and collects its output. A run past [`TIMEOUT`] fails the test.
fn run_guest(guest: &Guest) -> Run {
    run_guest_with(guest, |_| {})
}

/// [`run_guest`], with `extra` adding to the command (more options, a `pre_exec`).
fn run_guest_with(guest: &Guest, extra: impl FnOnce(&mut Command)) -> Run {
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aivmm"));
    cmd.arg("run")
        .arg("--kernel")
        .arg(&guest.elf)
        .args(["--memory", MEMORY]);
    extra(&mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting aivmm");
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let (status, timed_out) = wait_until(&mut child, started + TIMEOUT);
    let run = Run {
        guest: guest.elf.display().to_string(),
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    assert!(!timed_out, "aivmm was killed after {TIMEOUT:?}:\n{run}");
    eprintln!(
        "{}: {} in {:?}",
        guest.elf.display(),
        run.status,
        run.elapsed
    );
    run
}

/// Builds and runs one guest, or returns `None` when KVM tests are skipped.
fn boot(name: &str) -> Option<Run> {
    if !kvm_usable(name) {
        return None;
    }
    Some(run_guest(&build_guest(name)))
}

#[test]
fn hello_prints_marks_boot_time_and_powers_off() {
    let Some(run) = boot("hello") else { return };
    run.assert_success();
    run.assert_stdout_has("hello from the aivmm test guest\n");
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with("aivmm: boot-timer: guest marker 42 at ")
                && l.ends_with(" ms since exec")),
        "no boot-timer line for marker 42:\n{run}"
    );
}

#[test]
fn vcpus_that_never_started_are_stopped_at_power_off() {
    // Only vCPU 0 runs the guest; the others wait in KVM_RUN for a start-up IPI
    // that never comes, and must be kicked out when the guest powers off.
    if !kvm_usable("vcpus_that_never_started_are_stopped_at_power_off") {
        return;
    }
    let run = run_guest_with(&build_guest("hello"), |c| {
        c.args(["--cpus", "4"]).env("AIVMM_LOG", "aivmm=warn");
    });
    run.assert_success();
    run.assert_stdout_has("hello from the aivmm test guest\n");
    assert!(
        !run.stderr.contains("did not stop"),
        "a waiting vCPU was not kicked out of KVM_RUN:\n{run}"
    );
}

#[test]
fn reset_through_i8042_stops_the_vm() {
    let Some(run) = boot("reset_i8042") else {
        return;
    };
    run.assert_success();
    run.assert_stdout_has("resetting via i8042\n");
}

#[test]
fn guest_kernel_panic_then_reset_is_an_error_naming_the_panic() {
    let Some(run) = boot("panic_reset") else {
        return;
    };
    run.assert_no_panic();
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert_eq!(
        run.error_lines(),
        vec!["aivmm: error: guest kernel panic: Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300"],
        "{run}"
    );
}

#[test]
fn guest_kernel_panic_without_a_reset_is_stopped() {
    let Some(run) = boot("panic_hang") else {
        return;
    };
    run.assert_no_panic();
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert_eq!(
        run.error_lines(),
        vec!["aivmm: error: guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"],
        "{run}"
    );
    assert!(run.elapsed < Duration::from_secs(10), "{run}");
}

#[test]
fn reset_through_acpi_reset_register_stops_the_vm() {
    let Some(run) = boot("reset_acpi") else {
        return;
    };
    run.assert_success();
    run.assert_stdout_has("resetting via ACPI\n");
}

#[test]
fn triple_fault_is_one_clean_error() {
    let Some(run) = boot("triple_fault") else {
        return;
    };
    assert!(
        !run.status.success(),
        "a triple fault must fail the run:\n{run}"
    );
    run.assert_no_panic();
    let errors = run.error_lines();
    assert_eq!(errors.len(), 1, "expected exactly one error line:\n{run}");
    assert!(
        errors[0].contains("triple"),
        "the error should name the triple fault:\n{run}"
    );
    run.assert_stdout_has("triple faulting\n");
    assert!(
        !run.stdout.contains("FAIL"),
        "the guest ran past the fault:\n{run}"
    );
}

/// The first 8 random bytes (as hex) from a guest's `RNG OK 64 <hex>` line.
fn rng_bytes(run: &Run) -> String {
    run.assert_success();
    let Some(line) = run.stdout.lines().find(|l| l.starts_with("RNG ")) else {
        panic!("no RNG line:\n{run}");
    };
    let Some(hex) = line.strip_prefix("RNG OK 64 ") else {
        panic!("the guest's virtio-rng request failed: {line}\n{run}");
    };
    assert!(
        hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "malformed RNG line {line:?}:\n{run}"
    );
    hex.to_string()
}

#[test]
fn virtio_rng_serves_a_driver_end_to_end() {
    if !kvm_usable("virtio_rng") {
        return;
    }
    let guest = build_guest("virtio_rng");
    let first = rng_bytes(&run_guest(&guest));
    let second = rng_bytes(&run_guest(&guest));
    assert_ne!(first, second, "two runs returned the same random bytes");
}

#[test]
fn virtio_mmio_survives_a_hostile_driver() {
    let Some(run) = boot("virtio_bad_driver") else {
        return;
    };
    run.assert_success();
    let failed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("CHECK FAIL"))
        .collect();
    assert!(
        failed.is_empty(),
        "the device accepted what it must refuse: {failed:?}\n{run}"
    );
    for needed in [
        "CHECK ok narrow/wide/misaligned status writes ignored",
        // Not a power of two, zero, above QueueNumMax, above 16 bits.
        "CHECK ok queue size 3 refused",
        "CHECK ok queue size 6 refused",
        "CHECK ok queue size 0 refused",
        "CHECK ok queue size 512 refused",
        "CHECK ok queue size 65544 refused",
        "CHECK ok refused device stays refused",
        // Rings past RAM, in the device's own window, straddling the end, misaligned.
        "CHECK ok bad rings 0 refused",
        "CHECK ok bad rings 5 refused",
        "CHECK ok valid queue accepted",
        "CHECK ok reset after hostile requests",
    ] {
        run.assert_stdout_has(needed);
    }
    run.assert_stdout_has("\nRECOVERED 64\n");
    run.assert_stdout_has("\nSURVIVED\n");
}

#[test]
fn no_guest_code_runs_after_power_off() {
    let Some(run) = boot("after_poweroff") else {
        return;
    };
    run.assert_success();
    run.assert_stdout_has("powering off\n");
    assert!(
        !run.stdout.contains("still"),
        "the vCPU ran on after S5:\n{run}"
    );
}

/// The pattern `blk_flush.c` writes to sectors 8..16.
fn blk_pattern() -> Vec<u8> {
    let pat = b"AIVMM-DURABLE-";
    (0..4096usize).map(|i| if i % 16 < pat.len() { pat[i % 16] } else { b'0' + (i / 16 % 10) as u8 }).collect()
}

/// A host file that cannot grow (here RLIMIT_FSIZE below the sector the guest
/// writes; a full disk gives ENOSPC the same way) fails the request with an I/O
/// error the guest sees and aivmm logs; aivmm is not killed (SIGXFSZ).
#[test]
fn host_write_limit_gives_the_guest_an_io_error_not_a_crash() {
    if !kvm_usable("blk_flush") {
        return;
    }
    let guest = build_guest("blk_flush");
    let img = tempfile::NamedTempFile::new().expect("image");
    img.as_file().set_len(1 << 20).expect("sizing the image");
    let r = run_guest_with(&guest, |cmd| {
        cmd.arg("--no-rng").arg("--disk").arg(img.path());
        // SAFETY: setrlimit between fork and exec only changes the child's limit.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 2048, rlim_max: 2048 };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    r.assert_no_panic();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(r.status.signal(), None, "aivmm was killed: {r}");
    assert!(r.stdout.contains("BLK FAIL request status is not OK"), "{r}");
    assert!(r.stderr.contains("File too large"), "the failure is not logged: {r}");
    assert!(!r.stdout.contains("FLUSHED"), "{r}");
    let data = std::fs::read(img.path()).expect("reading the image");
    assert!(data.iter().all(|&b| b == 0), "the refused write changed the image");
}

#[test]
fn flushed_block_write_survives_kill_9() {
    if !kvm_usable("blk_flush") {
        return;
    }
    let guest = build_guest("blk_flush");
    let img = tempfile::NamedTempFile::new().expect("image");
    img.as_file().set_len(1 << 20).expect("sizing the image");
    let mut child = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(["run", "--no-rng", "--memory", MEMORY, "--kernel"])
        .arg(&guest.elf)
        .arg("--disk")
        .arg(img.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting aivmm");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("FLUSHED") || seen.windows(8).any(|w| w == b"BLK FAIL") {
                let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
                return;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let seen = rx.recv_timeout(TIMEOUT).unwrap_or_default();
    // SIGKILL right after the guest saw its flush complete: no clean shutdown.
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(seen.contains("FLUSHED"), "the guest did not finish its flush: {seen:?}");
    let data = std::fs::read(img.path()).expect("reading the image");
    assert_eq!(&data[8 * 512..8 * 512 + 4096], &blk_pattern()[..], "flushed data lost after kill -9");
    assert!(data[..8 * 512].iter().all(|&b| b == 0), "bytes before the write changed");
}
