//! The aivmm binary: parses the command line and runs the VM.

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use aivmm::cli::{Cli, Command, ImageCommand};
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use aivmm::{
    cli::RunArgs,
    config::VmConfig,
    hypervisor::kvm::KvmHypervisor,
    vmm::{VmExit, Vmm},
};
use clap::Parser;

/// Makes every allocation of 256 KiB or more a mapping of its own, for the whole
/// run. The user-mode network gives each busy TCP connection 512 KiB buffers
/// each way; as mappings they start as untouched zero pages and go back to the
/// kernel when the connection closes. glibc's default moves its threshold up
/// after the first such free, and from then on serves them from the heap, where
/// calloc clears the whole megabyte on every connect (a fifth of the guest's
/// connect rate in the bench).
fn large_allocations_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; no other thread allocates yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    aivmm::logging::init(cli.verbose, cli.quiet);
    raise_fd_limit();
    large_allocations_mapped();
    ignore_sigxfsz();
    let code = |r: Result<i32, aivmm::manage::Error>| {
        r.map(|c| ExitCode::from(c.clamp(0, 255) as u8))
            .map_err(Box::<dyn std::error::Error>::from)
    };
    let result = match cli.command {
        // macOS: Hypervisor.framework (vmm_hvf_run); Linux: KVM.
        #[cfg(target_os = "macos")]
        Command::Run(args) => aivmm::vmm_hvf_darwin::run_cli(&args, started)
            .map(|c| ExitCode::from(c.clamp(0, 255) as u8))
            .map_err(Into::into),
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        Command::Run(args) => run(&args, started),
        // No backend (arm64 Linux has no KVM VMM yet): one clear error.
        #[cfg(not(any(target_os = "macos", all(target_os = "linux", target_arch = "x86_64"))))]
        Command::Run(_) => Err(aivmm::vmm_hvf_run::Error::Host {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
        }
        .into()),
        Command::Image { command } => image(command),
        Command::Builder { command } => match aivmm::builder::run(command) {
            Ok(c) => Ok(ExitCode::from(c.clamp(0, 255) as u8)),
            Err(e) => Err(e.into()),
        },
        Command::Ps => code(aivmm::manage::ps()),
        Command::Stop { target, timeout } => code(aivmm::manage::stop(&target, timeout)),
        Command::Exec(args) => code(aivmm::manage::exec(&args)),
        Command::Balloon(args) => code(aivmm::manage::balloon(&args)),
        Command::Trust(args) => aivmm::pins::default_path()
            .map_err(aivmm::trust::Error::from)
            .and_then(|pins| {
                aivmm::trust::run(
                    &args.action(),
                    &pins,
                    &aivmm::settings::Limits::host(),
                    &mut std::io::stdout(),
                )
            })
            .map(|c| ExitCode::from(c.clamp(0, 255) as u8))
            .map_err(Into::into),
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
            // macOS refuses RLIM_INFINITY (its usual hard limit) for open files:
            // OPEN_MAX is the most it takes.
            #[cfg(target_os = "macos")]
            {
                lim.rlim_cur = lim.rlim_cur.min(10240);
            }
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("cannot raise the open-file limit");
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn run(args: &RunArgs, started: Instant) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if let Some(workdir) = args.workdir.clone() {
        // Before anything is built: a workdir file that widens the sandbox
        // without the user's approval stops here.
        let settings = aivmm::settings::apply(args, &workdir)?;
        let hv = KvmHypervisor::new()?;
        let code = aivmm::launch::run(&aivmm::machine::Kvm(&hv), args, &settings, &workdir, started)?;
        let _ = std::io::stdout().flush();
        // Exit at once: vCPU and device threads end with the process.
        std::process::exit(code);
    }
    let config = VmConfig::try_from(args)?;
    let hv = KvmHypervisor::new()?;
    let vmm = Vmm::build(&hv, &config, started, Box::new(std::io::stdout()))?;
    if let Some(path) = &args.control {
        aivmm::control::serve(path, vmm.balloon())?;
    }
    let raw = aivmm::console::RawTerminal::enter();
    aivmm::console::spawn_stdin_pump(vmm.serial(), raw.is_raw());
    let exit = vmm.run();
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::io::stdout().flush();
    drop(raw);
    match exit? {
        VmExit::PowerOff => tracing::info!("guest powered off"),
        VmExit::Reset => tracing::info!("guest reset; stopping"),
    }
    Ok(ExitCode::SUCCESS)
}
