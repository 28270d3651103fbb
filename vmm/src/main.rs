//! The aivmm binary: parses the command line and runs the VM.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aivmm::cli::{Cli, Command, ImageCommand, RunArgs};
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
    raise_fd_limit();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(mut args) => run(&mut args, started),
        Command::Image { command } => image(command),
        Command::Ps => ps(),
        Command::Stop { target, timeout } => stop(&target, timeout),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aivmm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn image(cmd: ImageCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let ImageCommand::Build {
        no_claude,
        package,
        force,
        out,
    } = cmd;
    let opts = aivmm::image::BuildOptions {
        with_claude: !no_claude,
        extra_packages: package,
        out,
        force,
    };
    let img = aivmm::image::build(&opts, &aivmm::image::Progress::auto())?;
    println!("kernel  {}", img.kernel.display());
    println!("initrd  {}", img.initrd.display());
    println!("rootfs  {}", img.rootfs.display());
    Ok(ExitCode::SUCCESS)
}

fn ps() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!("{:<8} {:>9}  {:<16} WORKDIR", "PID", "UPTIME", "PORTS");
    for (_, m) in aivmm::workdir::running(&aivmm::workdir::state_root()) {
        let up = now.saturating_sub(m.started);
        let uptime = format!("{}:{:02}:{:02}", up / 3600, up / 60 % 60, up % 60);
        let ports = if m.forwards.is_empty() {
            "-".to_string()
        } else {
            m.forwards.join(",")
        };
        println!(
            "{:<8} {:>9}  {:<16} {}",
            m.pid,
            uptime,
            ports,
            m.workdir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn stop(target: &str, timeout: u64) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let running = aivmm::workdir::running(&aivmm::workdir::state_root());
    let canon = std::fs::canonicalize(target).ok();
    let found = running.iter().find(|(_, m)| {
        target.parse::<u32>().ok() == Some(m.pid) || canon.as_deref() == Some(m.workdir.as_path())
    });
    let Some((_, m)) = found else {
        return Err(format!("no running VM for '{target}' (see `aivmm ps`)").into());
    };
    let pid = m.pid as libc::pid_t;
    // SAFETY: kill only sends a signal to the recorded aivmm process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(timeout);
    // SAFETY: signal 0 only checks that the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 {
        if Instant::now() >= deadline {
            eprintln!(
                "aivmm: {} did not stop within {timeout} s; killing it",
                m.workdir.display()
            );
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(ExitCode::SUCCESS)
}

/// virtio-fs keeps one descriptor per guest-visible inode: lift the soft limit on
/// open files to the hard limit, so a share with many files does not hit 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::debug!("cannot raise the open-file limit");
            }
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

fn run(args: &mut RunArgs, started: Instant) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(workdir) = args.workdir.clone() {
        if let Some(file) = aivmm::settings::apply(args, &workdir)? {
            log::info!("settings from {}", file.display());
        }
        let workdir = &workdir;
        let hv = KvmHypervisor::new()?;
        let code = aivmm::launch::run(&hv, args, workdir, started)?;
        let _ = std::io::stdout().flush();
        // Exit at once: vCPU and device threads end with the process.
        std::process::exit(code);
    }
    let config = VmConfig::try_from(&*args)?;
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
