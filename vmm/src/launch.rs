//! `aivmm run --workdir DIR [-- COMMAND…]`: from the command line to a command
//! running in the guest, attached to this terminal.
//!
//! The flow: lock the workdir's state ([`crate::workdir`]), find the guest image
//! (flags, then `AIVMM_GUEST_*` variables, then the cached Debian-built image,
//! built on first use), make the per-workdir disk, listen for the guest agent on
//! the vsock socket, build the VM and run it on its own thread. The main thread
//! runs the [`Session`]: the agent connects, gets the command, and relays the
//! terminal until the command exits; aivmm then waits for the guest to power off
//! and exits with the command's status.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cli::RunArgs;
use crate::config::{self, DiskConfig, NetMode, ShareConfig, VmConfig, VsockConfig};
use crate::hypervisor::Hypervisor;
use crate::image::{self, GuestImage};
use crate::session::{self, Io, Session, Spec};
use crate::vmm::{self as vm, Vmm};
use crate::workdir::{self, Meta, WorkdirState};

/// Errors of a workdir run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad arguments.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// A `--env` entry names a variable that is not set here.
    #[error("--env {0}: no such variable in this environment (use NAME=VALUE)")]
    EnvMissing(String),
    /// The guest agent binary is missing.
    #[error("the guest agent {0} is missing: build it with `cargo build --release -p aivmm-agent`, or set AIVMM_AGENT")]
    NoAgent(PathBuf),
    /// `--kernel` without a root filesystem.
    #[error("--kernel with --workdir needs --rootfs (or AIVMM_GUEST_ROOTFS)")]
    NoRootfs,
    /// The workdir state could not be opened or prepared.
    #[error(transparent)]
    Workdir(#[from] workdir::Error),
    /// The guest image could not be found or built.
    #[error("guest image: {0}")]
    Image(#[from] image::Error),
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// The guest channel failed.
    #[error("{0}{1}")]
    Session(session::Error, String),
    /// The VM stopped before the command finished.
    #[error("the VM stopped before the command finished{0}")]
    VmStopped(String),
    /// A file could not be made.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// `Result` of a workdir run.
pub type Result<T> = std::result::Result<T, Error>;

/// The defaults of a workdir run.
const DEFAULT_CPUS: u32 = 4;
const DEFAULT_MEMORY: u64 = 4 << 30;
const DEFAULT_DISK_SIZE: u64 = 16 << 30;
/// The mount tag of the workdir share.
pub const WORK_TAG: &str = "work";
/// How long aivmm waits for the guest to power off after the command exited.
const POWEROFF_WAIT: Duration = Duration::from_secs(15);

/// The guest image: `--kernel/--initrd/--rootfs`, else `AIVMM_GUEST_KERNEL`,
/// `AIVMM_GUEST_INITRD`, `AIVMM_GUEST_ROOTFS` (and `AIVMM_GUEST_CMDLINE_FILE`),
/// else the cached Debian-built image, built now if missing.
pub fn resolve_image(args: &RunArgs) -> Result<GuestImage> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let kernel = args.kernel.clone().or_else(|| env("AIVMM_GUEST_KERNEL"));
    if let Some(kernel) = kernel {
        let cmdline = match (&args.cmdline, env("AIVMM_GUEST_CMDLINE_FILE")) {
            (Some(c), _) => c.clone(),
            (None, Some(f)) => std::fs::read_to_string(&f)
                .map_err(|e| Error::Io(f, e))?
                .trim()
                .to_string(),
            (None, None) => image::CMDLINE.to_string(),
        };
        return Ok(GuestImage {
            kernel,
            initrd: args
                .initrd
                .clone()
                .or_else(|| env("AIVMM_GUEST_INITRD"))
                .unwrap_or_default(),
            rootfs: args
                .rootfs
                .clone()
                .or_else(|| env("AIVMM_GUEST_ROOTFS"))
                .ok_or(Error::NoRootfs)?,
            cmdline,
        });
    }
    let mut img = image::default_image(&image::BuildOptions::default(), &image::Progress::auto())?;
    if let Some(c) = &args.cmdline {
        img.cmdline = c.clone();
    }
    Ok(img)
}

/// The tag under which aivmm shares its guest agent.
pub const AGENT_TAG: &str = "aivmm";

/// The guest agent to share: `AIVMM_AGENT`, else `aivmm-agent` beside this executable.
pub fn agent_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("AIVMM_AGENT").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(|e| Error::Io("current executable".into(), e))?
            .with_file_name("aivmm-agent"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::NoAgent(path))
    }
}

/// The environment passed to the command: `NAME=VALUE` as given, `NAME` from here.
pub fn command_env(entries: &[String]) -> Result<Vec<(String, String)>> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            Some(_) => Err(Error::EnvMissing(e.clone())),
            None => std::env::var(e)
                .map(|v| (e.clone(), v))
                .map_err(|_| Error::EnvMissing(e.clone())),
        })
        .collect()
}

/// The VM of a workdir run.
pub fn vm_config(
    args: &RunArgs,
    image: &GuestImage,
    state: &WorkdirState,
    state_disk: &Path,
    agent_dir: &Path,
    ids: (u32, u32),
) -> Result<VmConfig> {
    let mut shares = vec![
        ShareConfig { path: state.workdir.clone(), tag: WORK_TAG.to_string(), read_only: false, cache: args.fs_cache },
        ShareConfig {
            path: agent_dir.to_path_buf(),
            tag: AGENT_TAG.to_string(),
            read_only: true,
            cache: config::FsCache::Always,
        },
    ];
    for s in &args.share {
        shares.push(config::parse_share(s, args.fs_cache)?);
    }
    let mut disks = vec![
        DiskConfig {
            path: image.rootfs.clone(),
            read_only: true,
        },
        DiskConfig {
            path: state_disk.to_path_buf(),
            read_only: false,
        },
    ];
    for d in &args.disk {
        disks.push(config::parse_disk(d)?);
    }
    let c = VmConfig {
        kernel: image.kernel.clone(),
        initrd: (!image.initrd.as_os_str().is_empty()).then(|| image.initrd.clone()),
        cmdline: format!("{} aivmm.uid={} aivmm.gid={}", image.cmdline, ids.0, ids.1),
        cpus: args.cpus.unwrap_or(DEFAULT_CPUS),
        memory: args.memory.unwrap_or(DEFAULT_MEMORY),
        acpi: !args.no_acpi,
        rng: !args.no_rng,
        disks,
        shares,
        net: args.net.clone().unwrap_or(NetMode::User),
        forwards: args.forward.clone(),
        vsock: Some(VsockConfig {
            guest_cid: args.vsock_cid,
            uds_path: state.vsock_path(),
        }),
    };
    c.validate()?;
    Ok(c)
}

/// The last `n` lines of the console log, as a note for an error message.
fn console_tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(|l| l.ok()).collect();
    if lines.is_empty() {
        return String::new();
    }
    let start = lines.len().saturating_sub(n);
    format!(
        "; the guest console ({}) ended with:\n  {}",
        path.display(),
        lines[start..].join("\n  ")
    )
}

/// Set by the SIGTERM/SIGHUP handler; read by the thread [`forward_termination`] starts.
static TERMINATE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn note_termination(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// Turns SIGTERM and SIGHUP to aivmm (`aivmm stop`, a closed terminal) into the
/// same signal for the guest command, so it ends and the guest powers off
/// cleanly; `aivmm stop` kills aivmm if that takes too long.
fn forward_termination(control: session::Control) {
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, note_termination) {
            log::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let sig = TERMINATE.swap(0, std::sync::atomic::Ordering::SeqCst);
        if sig != 0 {
            log::info!("signal {sig}: passing it to the guest command");
            control.signal(sig);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Runs the command of `args` in a VM on its workdir; returns its exit status.
pub fn run(hv: &dyn Hypervisor, args: &RunArgs, workdir: &Path, started: Instant) -> Result<i32> {
    let state = WorkdirState::open(&workdir::state_root(), workdir)?;
    let env = command_env(&args.env)?;
    let image = resolve_image(args)?;
    let state_disk = state.state_disk(args.disk_size.unwrap_or(DEFAULT_DISK_SIZE))?;
    let agent_dir = state.stage_agent(&agent_binary()?)?;
    // SAFETY: getuid and getgid cannot fail.
    let ids = unsafe { (libc::getuid(), libc::getgid()) };
    let config = vm_config(args, &image, &state, &state_disk, &agent_dir, ids)?;

    let vsock = state.vsock_path();
    let mut sess = Session::listen(&vsock).map_err(|e| Error::Session(e, String::new()))?;
    sess.set_connect_timeout(Duration::from_secs(args.agent_timeout));

    let log_path = state.console_log();
    let console = File::create(&log_path).map_err(|e| Error::Io(log_path.clone(), e))?;
    let vmm = Vmm::build(hv, &config, started, Box::new(console))?;
    let forwards = args
        .forward
        .iter()
        .map(|f| format!("{}:{}{}", f.host, f.guest, if f.udp { "/udp" } else { "" }))
        .collect();
    state.write_meta(&Meta::now(&state.workdir, forwards))?;

    forward_termination(sess.control());
    let control = sess.control();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("vm".into())
        .spawn(move || {
            let r = vmm.run();
            control.cancel();
            let _ = done_tx.send(r);
        })
        .map_err(|e| Error::Io("vm thread".into(), e))?;

    let tty = is_tty(libc::STDIN_FILENO) && is_tty(libc::STDOUT_FILENO);
    let spec = Spec {
        argv: if args.command.is_empty() {
            vec!["claude".to_string()]
        } else {
            args.command.clone()
        },
        env,
        cwd: Some("/work".to_string()),
        uid: Some(ids.0),
        gid: Some(ids.1),
        home: None,
        term: std::env::var("TERM").ok().filter(|_| tty),
        rows: 0,
        cols: 0,
        tty,
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let io = Io {
        input: Some(stdin.as_fd()),
        terminal: tty.then(|| stdin.as_fd()),
        output: &mut out,
        errors: &mut err,
    };
    match sess.run(&spec, io) {
        Ok(code) => {
            // The agent has exited; the guest's init powers off now.
            match done_rx.recv_timeout(POWEROFF_WAIT) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    log::warn!("the VM stopped with an error after the command exited: {e}")
                }
                Err(_) => {
                    log::warn!("the guest did not power off within {POWEROFF_WAIT:?}; stopping it")
                }
            }
            Ok(code)
        }
        Err(session::Error::Cancelled) => {
            let why = match done_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Err(e)) => format!(": {e}"),
                _ => String::new(),
            };
            Err(Error::VmStopped(format!(
                "{why}{}",
                console_tail(&log_path, 15)
            )))
        }
        Err(e) => Err(Error::Session(e, console_tail(&log_path, 15))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["aivmm", "run"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(v).unwrap().command {
            crate::cli::Command::Run(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn env_entries() {
        std::env::set_var("AIVMM_TEST_ENV_X", "x-value");
        let e = command_env(&["A=1".into(), "B=".into(), "AIVMM_TEST_ENV_X".into()]).unwrap();
        assert_eq!(
            e,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "".into()),
                ("AIVMM_TEST_ENV_X".into(), "x-value".into())
            ]
        );
        assert!(matches!(
            command_env(&["AIVMM_TEST_ENV_UNSET_Y".into()]),
            Err(Error::EnvMissing(_))
        ));
        assert!(matches!(
            command_env(&["=v".into()]),
            Err(Error::EnvMissing(_))
        ));
    }

    #[test]
    fn workdir_vm_layout() {
        let root = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let state = WorkdirState::open(root.path(), work.path()).unwrap();
        let a = args(&[
            "--workdir",
            ".",
            "--forward",
            "8080:80",
            "--share",
            "/tmp:tmp:ro",
            "--",
            "echo",
            "hi",
        ]);
        let img = GuestImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
            rootfs: "/r.ext4".into(),
            cmdline: "console=ttyS0".into(),
        };
        let c = vm_config(&a, &img, &state, Path::new("/s.img"), Path::new("/ag"), (1000, 100)).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 aivmm.uid=1000 aivmm.gid=100");
        assert_eq!((c.cpus, c.memory), (DEFAULT_CPUS, DEFAULT_MEMORY));
        assert_eq!(
            c.disks[0],
            DiskConfig {
                path: "/r.ext4".into(),
                read_only: true
            }
        );
        assert_eq!(
            c.disks[1],
            DiskConfig {
                path: "/s.img".into(),
                read_only: false
            }
        );
        assert_eq!(
            (c.shares[0].tag.as_str(), c.shares[0].read_only),
            (WORK_TAG, false)
        );
        assert_eq!(c.shares[0].path, state.workdir);
        assert_eq!((c.shares[1].tag.as_str(), c.shares[1].read_only), (AGENT_TAG, true));
        assert_eq!(c.shares[1].path, PathBuf::from("/ag"));
        assert_eq!((c.shares[2].tag.as_str(), c.shares[2].read_only), ("tmp", true));
        assert_eq!(c.net, NetMode::User);
        assert_eq!(
            c.vsock.as_ref().map(|v| v.uds_path.clone()),
            Some(state.vsock_path())
        );
        assert_eq!(a.command, vec!["echo".to_string(), "hi".to_string()]);
        let dup = args(&["--workdir", ".", "--share", "/tmp:work"]);
        assert!(matches!(
            vm_config(&dup, &img, &state, Path::new("/s"), Path::new("/ag"), (0, 0)),
            Err(Error::Config(_))
        ));
    }
}
