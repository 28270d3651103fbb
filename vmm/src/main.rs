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
    let cli = Cli::parse();
    aivmm::logging::init(cli.verbose, cli.quiet);
    raise_fd_limit();
    ignore_sigxfsz();
    let code = |r: Result<i32, aivmm::manage::Error>| {
        r.map(|c| ExitCode::from(c.clamp(0, 255) as u8))
            .map_err(Box::<dyn std::error::Error>::from)
    };
    let result = match cli.command {
        Command::Run(mut args) => run(&mut args, started),
        Command::Image { command } => image(command),
        Command::Builder { command } => match aivmm::builder::run(command) {
            Ok(c) => Ok(ExitCode::from(c.clamp(0, 255) as u8)),
            Err(e) => Err(e.into()),
        },
        Command::Ps => code(aivmm::manage::ps()),
        Command::Stop { target, timeout } => code(aivmm::manage::stop(&target, timeout)),
        Command::Exec(args) => code(aivmm::manage::exec(&args)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "aivmm", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map(|_| ExitCode::SUCCESS)
                .map_err(Into::into)
        }
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
        builder,
        kernel_from_source,
    } = cmd;
    let opts = aivmm::image::BuildOptions {
        with_claude: !no_claude && !builder,
        extra_packages: package,
        out,
        force,
        variant: if builder {
            aivmm::image::Variant::Builder
        } else {
            aivmm::image::Variant::Agent
        },
        kernel_from_source,
    };
    let progress = if aivmm::logging::quiet() {
        aivmm::image::Progress::quiet()
    } else {
        aivmm::image::Progress::auto()
    };
    let img = aivmm::image::build(&opts, &progress)?;
    println!("kernel  {}", img.kernel.display());
    println!("initrd  {}", img.initrd.display());
    println!("rootfs  {}", img.rootfs.display());
    Ok(ExitCode::SUCCESS)
}

/// A device write past the file-size limit (RLIMIT_FSIZE) must fail with EFBIG,
/// which the guest sees as an I/O error, rather than kill aivmm with SIGXFSZ.
fn ignore_sigxfsz() {
    // SAFETY: setting a signal's disposition to SIG_IGN touches no memory.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
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
