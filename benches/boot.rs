//! VMM start to guest init, timed from the host as the design's boot method says.
//!
//! - `boot/hello_exec_to_exit`: `aivmm run --kernel <hello.elf>`, the freestanding
//!   test guest of `tests/guests/hello.c` (built here with gcc and the flags
//!   `tests/kvm_guests.rs` uses). It prints a line, writes boot-timer marker 42 and
//!   powers off; the figure is process spawn to process exit. The VMM's own
//!   boot-timer figure (exec to marker, as aivmm logs it) is printed beside it.
//! - `boot/linux_exec_to_marker`, only when `AIVMM_BENCH_KERNEL` is set (with
//!   `AIVMM_BENCH_INITRD`, `AIVMM_BENCH_CMDLINE`, `AIVMM_BENCH_MEMORY` optional):
//!   spawn to the first boot-timer marker the guest writes, or to the first console
//!   line holding `AIVMM_BENCH_MARKER` (default `E2E-MARKER`, what tests/e2e's
//!   init prints); the VMM is then killed.
//!
//! Without a usable `/dev/kvm` (or without gcc) the bench says why and exits 0; on
//! a KVM that cannot boot Linux (PVM) the Linux part says why and is skipped.
//! `cargo test` runs both once (criterion's test mode), so they cannot rot.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::Criterion;

const AIVMM: &str = env!("CARGO_BIN_EXE_aivmm");
const GUEST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guests");
/// Guest RAM for the tiny guest, as the KVM tests use.
const HELLO_MEMORY: &str = "128M";
/// The longest one Linux boot may take before the bench gives up.
const LINUX_TIMEOUT: Duration = Duration::from_secs(600);
/// aivmm's boot-timer log line, up to the value.
const BOOT_TIMER_LINE: &str = "aivmm: boot-timer: guest marker ";

/// Why the bench cannot run here, if it cannot.
fn unusable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) => return Some(format!("/dev/kvm cannot be opened read-write: {e}")),
    }
    match Command::new("gcc").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("gcc --version failed: {}", o.status)),
        Err(e) => Some(format!(
            "gcc cannot be run (needed to build the test guest): {e}"
        )),
    }
}

/// Compiles `tests/guests/<name>.c` into a freestanding ELF linked at 1 MiB, with
/// the flags of tests/kvm_guests.rs.
fn build_guest(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(GUEST_DIR).join(format!("{name}.c"));
    let elf = dir.join(format!("{name}.elf"));
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
        .unwrap();
    assert!(
        out.status.success(),
        "gcc failed to build {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    elf
}

/// The first boot-timer figure (ms since exec) in aivmm's stderr.
fn boot_timer_ms(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|l| {
        let rest = l.split(BOOT_TIMER_LINE).nth(1)?;
        rest.split_whitespace().nth(2)?.parse().ok()
    })
}

/// One run of the tiny guest: (spawn to exit, aivmm's exec-to-marker ms).
fn run_hello(elf: &Path) -> (Duration, Option<f64>) {
    let t = Instant::now();
    let out = Command::new(AIVMM)
        .arg("run")
        .arg("--kernel")
        .arg(elf)
        .args(["--memory", HELLO_MEMORY])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "aivmm run --kernel {}: {}\n{stderr}",
        elf.display(),
        out.status
    );
    (took, boot_timer_ms(&stderr))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn hello(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("aivmm-bench-guest-")
        .tempdir()
        .unwrap();
    let elf = build_guest(dir.path(), "hello");
    // A checked run first: it prints, marks, and powers off cleanly.
    let out = Command::new(AIVMM)
        .arg("run")
        .arg("--kernel")
        .arg(&elf)
        .args(["--memory", HELLO_MEMORY])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from the aivmm test guest"),
        "the hello guest did not run: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut marker_ms = Vec::new();
    let mut g = c.benchmark_group("boot");
    g.sample_size(10);
    g.bench_function("hello_exec_to_exit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (took, ms) = run_hello(&elf);
                total += took;
                marker_ms.extend(ms);
            }
            total
        })
    });
    g.finish();
    if !marker_ms.is_empty() {
        println!(
            "boot/hello: aivmm's boot-timer, exec to marker 42: median {:.3} ms over {} runs",
            median(&mut marker_ms),
            marker_ms.len()
        );
    }
}

/// What one Linux boot run saw first.
enum Seen {
    /// The boot-timer line, with aivmm's own exec-to-marker figure.
    BootTimer(Option<f64>),
    /// The console marker.
    Console,
}

/// Boots the Linux kernel until its marker; returns spawn-to-marker and what marked it.
fn run_linux(kernel: &str, marker: &str) -> (Duration, Option<f64>) {
    let mut cmd = Command::new(AIVMM);
    cmd.arg("run").arg("--kernel").arg(kernel);
    if let Ok(initrd) = std::env::var("AIVMM_BENCH_INITRD") {
        cmd.arg("--initrd").arg(initrd);
    }
    let cmdline = std::env::var("AIVMM_BENCH_CMDLINE")
        .unwrap_or_else(|_| "console=ttyS0 reboot=acpi panic=-1 quiet".into());
    let memory = std::env::var("AIVMM_BENCH_MEMORY").unwrap_or_else(|_| "256M".into());
    cmd.args(["--cmdline", &cmdline, "--memory", &memory])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let watch = |pipe: Box<dyn Read + Send>, tx: mpsc::Sender<(Instant, Seen)>, marker: String| {
        thread::spawn(move || {
            let mut log = String::new();
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let seen = if line.contains(BOOT_TIMER_LINE) {
                    Some(Seen::BootTimer(boot_timer_ms(&line)))
                } else if line.contains(&marker) {
                    Some(Seen::Console)
                } else {
                    None
                };
                if let Some(s) = seen {
                    let _ = tx.send((Instant::now(), s));
                }
                if log.len() < 1 << 16 {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
            log
        })
    };
    let out = watch(
        Box::new(child.stdout.take().unwrap()),
        tx.clone(),
        marker.into(),
    );
    let err = watch(Box::new(child.stderr.take().unwrap()), tx, marker.into());
    let first = rx.recv_timeout(LINUX_TIMEOUT);
    // The child is ours: stop it whether or not the marker came.
    let _ = child.kill();
    let status = child.wait().unwrap();
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    match first {
        Ok((at, Seen::BootTimer(ms))) => (at - t, ms),
        Ok((at, Seen::Console)) => (at - t, None),
        Err(_) => panic!(
            "aivmm run --kernel {kernel}: no boot-timer marker and no console line with \
             {marker:?} ({status} after {:?})\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
            t.elapsed()
        ),
    }
}

/// Why this host's KVM cannot boot a Linux guest, if it is known not to.
fn linux_unbootable() -> Option<String> {
    // PVM (the kvm_pvm module) runs guests as ordinary host processes with every
    // privileged instruction emulated: freestanding guests work, a Linux kernel's
    // early boot does not get far, and a bench would only wait out its timeout.
    Path::new("/sys/module/kvm_pvm").exists().then(|| {
        "/dev/kvm is PVM (the kvm_pvm module), which runs freestanding guests but cannot boot \
         Linux; run this bench on a host with hardware KVM or inside L1 of tests/e2e (see \
         `tests/e2e/run bench` for the side-by-side boot figures)"
            .to_string()
    })
}

fn linux(c: &mut Criterion) {
    let Ok(kernel) = std::env::var("AIVMM_BENCH_KERNEL") else {
        println!("boot/linux: skipped: set AIVMM_BENCH_KERNEL (and AIVMM_BENCH_INITRD) to boot a Linux kernel");
        return;
    };
    if let Some(why) = linux_unbootable() {
        println!("boot/linux: skipped: {why}");
        return;
    }
    let marker = std::env::var("AIVMM_BENCH_MARKER").unwrap_or_else(|_| "E2E-MARKER".into());
    let mut marker_ms = Vec::new();
    let mut g = c.benchmark_group("boot");
    g.sample_size(10);
    g.bench_function("linux_exec_to_marker", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (took, ms) = run_linux(&kernel, &marker);
                total += took;
                marker_ms.extend(ms);
            }
            total
        })
    });
    g.finish();
    if !marker_ms.is_empty() {
        println!(
            "boot/linux: aivmm's boot-timer, exec to first marker: median {:.3} ms over {} runs",
            median(&mut marker_ms),
            marker_ms.len()
        );
    }
}

fn main() {
    if let Some(why) = unusable() {
        println!("boot bench skipped: {why}");
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    hello(&mut c);
    linux(&mut c);
    c.final_summary();
}
