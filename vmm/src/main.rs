//! The aivmm binary: parses the command line and runs the VM.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aivmm::cli::{Cli, Command, RunArgs};
use aivmm::config::VmConfig;
use aivmm::hypervisor::kvm::KvmHypervisor;
use aivmm::vmm::{VmExit, Vmm};
use aivmm_devices::legacy::serial::Serial;
use clap::Parser;
use vmm_sys_util::terminal::Terminal;

/// Ctrl-A, the escape key of the console.
const ESCAPE: u8 = 0x01;

fn main() -> ExitCode {
    let started = Instant::now();
    env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("AIVMM_LOG", "warn,virtio_queue=off"),
    )
    .format_timestamp_micros()
    .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args, started),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aivmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Restores the terminal's canonical mode when dropped.
struct RawTerminal(bool);

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        Self(tty && std::io::stdin().lock().set_raw_mode().is_ok())
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

fn run(args: &RunArgs, started: Instant) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(workdir) = &args.workdir {
        let hv = KvmHypervisor::new()?;
        let code = aivmm::launch::run(&hv, args, workdir, started)?;
        let _ = std::io::stdout().flush();
        // Exit at once: vCPU and device threads end with the process.
        std::process::exit(code);
    }
    let config = VmConfig::try_from(args)?;
    let hv = KvmHypervisor::new()?;
    let vmm = Vmm::build(&hv, &config, started, Box::new(std::io::stdout()))?;
    let raw = RawTerminal::enter();
    spawn_stdin_pump(vmm.serial(), raw.0);
    let exit = vmm.run();
    let _ = std::io::stdout().flush();
    drop(raw);
    match exit? {
        VmExit::PowerOff => log::info!("guest powered off"),
        VmExit::Reset => log::info!("guest reset; stopping"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies stdin to the serial console. On a terminal, Ctrl-A x stops the VM and
/// Ctrl-A Ctrl-A sends one Ctrl-A.
fn spawn_stdin_pump(serial: Arc<Mutex<Serial>>, tty: bool) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            let mut escaped = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if tty && escaped {
                        escaped = false;
                        match b {
                            b'x' | b'X' => {
                                let _ = std::io::stdin().lock().set_canon_mode();
                                eprintln!("\r\naivmm: stopped from the console");
                                std::process::exit(0);
                            }
                            ESCAPE => out.push(ESCAPE),
                            _ => out.extend([ESCAPE, b]),
                        }
                    } else if tty && b == ESCAPE {
                        escaped = true;
                    } else {
                        out.push(b);
                    }
                }
                let mut rest = &out[..];
                while !rest.is_empty() {
                    let taken = serial
                        .lock()
                        .map(|mut s| s.enqueue_input(rest))
                        .unwrap_or(rest.len());
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}
