//! `aivmm run --workdir DIR [-- COMMAND…]`: from the command line to a command
//! running in the guest, attached to this terminal.
//!
//! The flow: lock the workdir's state ([`crate::workdir`]) and start its log file,
//! plan the extras (`--share-ro`/`--share-rw` at the same path in the guest,
//! `--claude-auth`, `--ssh`), find the guest image (flags, then `AIVMM_GUEST_*`
//! variables, then the cached Debian-built image, built on first use), make the
//! per-workdir disk, listen for the guest agent on the vsock socket, build the VM
//! and run it on its own thread. The main thread runs the [`Session`]: the agent
//! connects, gets the [`Setup`] (mounts, links, sshd) and the command, and relays
//! the terminal until the command exits; aivmm then waits for the guest to power
//! off and exits with the command's status.
//!
//! Nothing secret goes on the kernel command line (every guest process can read
//! it): `--env` values travel in the `Start` message over vsock.
//!
//! The VM is a [`machine::Machine`]: KVM's x86 VMM on Linux, the arm64 VM on
//! Hypervisor.framework on macOS (whose default network is none: no passt).
//!
//! `aivmm stop` sends aivmm SIGTERM; aivmm presses the VM's power button (an
//! ACPI Generic Event Device on x86, a GPIO line under `gpio-keys` on arm64:
//! [`machine::Machine::power_button`]) and holds it, pressing again
//! every [`PRESS_INTERVAL`] until the guest is gone, so a guest still booting sees
//! it once its button driver is up. The guest agent stops the command (SIGHUP and
//! SIGTERM, SIGKILL after 5 s) and exits; the guest's init unmounts `/work` and
//! powers off (ACPI S5 on x86, PSCI SYSTEM_OFF on arm64), which ends the VM. A guest that ignores the
//! button is killed by `aivmm stop` after its `--timeout`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use aivmm_devices::virtio::fs::gitconfig;

use crate::cli::RunArgs;
use crate::config::{self, FsConfig, Forward, NetMode, VmConfig};
use crate::image::{self, GuestImage};
use crate::plan::{self, Mode};
use crate::session::{self, Io, Mount, Session, Setup, Spec};
use crate::settings::RunConfig;
use crate::machine::{self, MachineBuilder, PowerButton};
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use crate::vmm as vm;
use crate::workdir::{self, Meta, Phase, WorkdirState};

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
    /// A `--share-ro`/`--share-rw` path cannot be shared.
    #[error("--{flag} {path}: {why}")]
    Share {
        /// `share-ro` or `share-rw`.
        flag: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why, with a hint.
        why: String,
    },
    /// `--claude-auth` cannot find or prepare the user's Claude files.
    #[error("--claude-auth: {0}")]
    ClaudeAuth(#[from] crate::claude_auth::Error),
    /// `--ssh` cannot be set up.
    #[error("--ssh: {0}")]
    Ssh(String),
    /// The workdir state could not be opened or prepared.
    #[error(transparent)]
    Workdir(#[from] workdir::Error),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] crate::control::Error),
    /// The guest image could not be found or built.
    #[error("guest image: {0}")]
    Image(#[from] image::Error),
    /// The VM could not be built.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[error(transparent)]
    Vm(#[from] vm::Error),
    /// The VM could not be built or failed.
    #[error(transparent)]
    Machine(#[from] machine::Error),
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
pub const DEFAULT_CPUS: u32 = 4;
/// Guest memory of a workdir run unless `--memory` or `aivmm.toml` says otherwise.
pub const DEFAULT_MEMORY: u64 = 4 << 30;
/// The persistent disk of a workdir run unless `--disk-size` or `aivmm.toml` says otherwise.
pub const DEFAULT_DISK_SIZE: u64 = 16 << 30;
/// The mount tag of the workdir share.
pub const WORK_TAG: &str = "work";
/// How long aivmm waits for the guest to power off after the command exited.
const POWEROFF_WAIT: Duration = Duration::from_secs(15);
/// Where the guest sees `--claude-auth`'s copy of `~/.claude.json`.
const GUEST_CLAUDE_STATE: &str = "/run/aivmm/claude";

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
    let progress = if crate::logging::quiet() {
        image::Progress::quiet()
    } else {
        image::Progress::auto()
    };
    let mut img = image::default_image(&image::BuildOptions::default(), &progress)?;
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

/// The guest's home directory for host uid `uid` (see guest-image/README.md).
pub fn guest_home(uid: u32) -> &'static str {
    if uid == 0 {
        "/root"
    } else {
        "/home/user"
    }
}

/// Guest directories a share may not cover: the system's own, and /work.
const RESERVED: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr", "/var", "/work", "/tmp", "/home", "/root", "/mnt", "/opt", "/srv", "/media",
];
/// Of those, the ones nothing may be mounted below either.
const RESERVED_TREES: &[&str] = &["/dev", "/proc", "/run", "/sys", "/usr", "/etc", "/boot", "/work"];

/// Checks a `--share-ro`/`--share-rw` path and returns it canonical (the guest
/// mounts it at that same path).
fn share_path(flag: &'static str, path: &Path) -> Result<PathBuf> {
    let fail = |why: String| Error::Share {
        flag,
        path: path.to_path_buf(),
        why,
    };
    let canon = std::fs::canonicalize(path)
        .map_err(|e| fail(format!("{e} (give an existing directory)")))?;
    if !canon.is_dir() {
        return Err(fail("not a directory (share the directory that holds it)".into()));
    }
    let c = canon.to_string_lossy();
    if canon == Path::new("/")
        || RESERVED.contains(&c.as_ref())
        || RESERVED_TREES.iter().any(|t| canon.starts_with(t))
    {
        return Err(fail(format!(
            "the guest needs {c} for itself; share a directory below your home or project instead"
        )));
    }
    if c.contains('\n') || c.len() > 1024 {
        return Err(fail("the path is too long or has a newline".into()));
    }
    Ok(canon)
}

/// What a workdir run adds to the plain VM: shares, the guest [`Setup`] and port
/// forwards.
#[derive(Debug, Default)]
pub struct Extras {
    /// Extra virtio-fs shares (after `work` and `aivmm`).
    pub shares: Vec<FsConfig>,
    /// What the agent does before the command.
    pub setup: Setup,
    /// All port forwards (`--forward` and `--ssh`'s).
    pub forwards: Vec<Forward>,
    /// With `--ssh`: the host port and the `ssh -F` config file.
    pub ssh: Option<(u16, PathBuf)>,
    /// With `--claude-auth`: the copies, for handing a refreshed token back.
    pub claude: Option<crate::claude_auth::ClaudeFiles>,
}

/// A free TCP port on 127.0.0.1 (the kernel picks it; passt binds it next).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::Ssh(format!("no free port on 127.0.0.1: {e}")))?;
    let port = l
        .local_addr()
        .map_err(|e| Error::Ssh(e.to_string()))?
        .port();
    Ok(port)
}

/// `--ssh`: the workdir's key pair (made once, `<state>/ssh/id_ed25519`) and an
/// `ssh -F` config for `port`; returns the public key line and the config path.
pub fn ssh_files(dir: &Path, port: u16, user: &str) -> Result<(String, PathBuf)> {
    use ssh_key::rand_core::OsRng;
    let err = |e: String| Error::Ssh(e);
    let ssh = dir.join("ssh");
    crate::state_fs::dir(&ssh).map_err(|e| err(format!("{}: {e}", ssh.display())))?;
    let key = ssh.join("id_ed25519");
    let public = ssh.join("id_ed25519.pub");
    if !key.is_file() || !public.is_file() {
        let k = ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519)
            .map_err(|e| err(e.to_string()))?;
        let pem = k
            .to_openssh(ssh_key::LineEnding::LF)
            .map_err(|e| err(e.to_string()))?;
        let line = k.public_key().to_openssh().map_err(|e| err(e.to_string()))?;
        use std::io::Write;
        let _ = std::fs::remove_file(&key);
        let mut f = crate::state_fs::options()
            .write(true)
            .create_new(true)
            .open(&key)
            .map_err(|e| err(format!("{}: {e}", key.display())))?;
        f.write_all(pem.as_bytes())
            .map_err(|e| err(format!("{}: {e}", key.display())))?;
        crate::state_fs::create(&public)
            .and_then(|mut f| f.write_all(format!("{line} aivmm\n").as_bytes()))
            .map_err(|e| err(format!("{}: {e}", public.display())))?;
    }
    let line = std::fs::read_to_string(&public)
        .map_err(|e| err(format!("{}: {e}", public.display())))?;
    let config = ssh.join("config");
    // Host keys live on the state disk, made at its first boot: the known-hosts
    // file is the workdir's own, learns the key on the first connection and then
    // holds ssh to it (`run` empties it when it makes a new state disk).
    let text = format!(
        "Host aivmm\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {}\n  \
         IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking accept-new\n  LogLevel ERROR\n",
        key.display(),
        ssh.join("known_hosts").display()
    );
    crate::state_fs::create(&config)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(|e| err(format!("{}: {e}", config.display())))?;
    Ok((line.trim().to_string(), config))
}

/// Plans the extras of a run for host user `ids`, with per-workdir state in
/// `state_dir` and aivmm's state root `state_root`.
pub fn plan_extras(
    args: &RunArgs,
    settings: &RunConfig,
    ids: (u32, u32),
    state_dir: &Path,
    state_root: &Path,
) -> Result<Extras> {
    let home = guest_home(ids.0);
    let mut x = Extras {
        setup: Setup {
            uid: ids.0,
            gid: ids.1,
            home: home.to_string(),
            ..Setup::default()
        },
        forwards: settings.forward.iter().map(|f| f.value).collect(),
        ..Extras::default()
    };
    let add = |x: &mut Extras, host: PathBuf, guest: String, read_only: bool, cache| {
        let tag = format!("share{}", x.shares.len());
        x.shares.push(config::share(host, tag.clone(), read_only, cache));
        x.setup.mounts.push(Mount {
            tag,
            path: guest,
            read_only,
        });
    };
    let mut seen = Vec::new();
    for (flag, paths, ro) in [("share-ro", &settings.share_ro, true), ("share-rw", &settings.share_rw, false)] {
        for p in paths.iter().map(|p| &p.value) {
            let canon = share_path(flag, p)?;
            if seen.contains(&canon) {
                return Err(Error::Share {
                    flag,
                    path: p.clone(),
                    why: "shared twice".into(),
                });
            }
            seen.push(canon.clone());
            let guest = canon.to_string_lossy().into_owned();
            add(&mut x, canon, guest, ro, args.fs_cache);
        }
    }
    if settings.claude_auth.value {
        let host_home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .ok_or(crate::claude_auth::Error::NoHome)?;
        // The guest's ~/.claude is the workdir's copy, never the host's.
        let c = crate::claude_auth::prepare(&host_home, state_root, state_dir)?;
        add(&mut x, c.dir.clone(), format!("{home}/.claude"), false, config::FsCache::Auto);
        add(&mut x, c.state.clone(), GUEST_CLAUDE_STATE.to_string(), false, config::FsCache::Auto);
        x.setup.links.push((
            format!("{home}/.claude.json"),
            format!("{GUEST_CLAUDE_STATE}/.claude.json"),
        ));
        x.claude = Some(c);
    }
    if settings.ssh.value {
        match settings.net.value {
            NetMode::User | NetMode::Passt => {}
            _ => {
                return Err(Error::Ssh(machine::user_net_needed(std::env::consts::OS).into()))
            }
        }
        if x.forwards.iter().any(|f| f.guest == 22 && !f.udp) {
            return Err(Error::Ssh("port 22 is already forwarded with --forward".into()));
        }
        let port = free_port()?;
        let user = if ids.0 == 0 { "root" } else { "user" };
        let (key, config) = ssh_files(state_dir, port, user)?;
        x.setup.ssh_key = Some(key);
        x.forwards.push(Forward {
            host: port,
            guest: 22,
            udp: false,
        });
        x.ssh = Some((port, config));
    }
    Ok(x)
}

/// The most bytes of the console log read back for an error message.
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;

/// A note for an error message: where the guest console log is and its last
/// line (the whole log is one `less` away; the error stays one line). The last
/// `n` lines go to aivmm's log file.
fn console_tail(path: &Path, n: usize) -> String {
    // The guest writes the log without limit; only its end is read.
    let Ok(text) = crate::state_fs::read_tail(path, CONSOLE_TAIL_BYTES) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    for l in &lines[start..] {
        tracing::info!("guest console: {l}");
    }
    match lines.last() {
        Some(last) => format!(
            "; see the guest console log {} (last line: {})",
            path.display(),
            last.trim()
        ),
        None => format!("; the guest console log {} is empty", path.display()),
    }
}

/// How often aivmm presses the power button again while the guest is still up.
const PRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Set once a termination signal pressed the power button.
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once the guest is off and `vm.json` says `ended`: a late signal must not
/// turn it back into `stopping`.
static VM_ENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set by the SIGTERM/SIGHUP handler; read by the thread [`forward_termination`] starts.
static TERMINATE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The last of those signals, for the exit status of a run stopped while booting.
static LAST_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(libc::SIGTERM);

extern "C" fn note_termination(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(sig, std::sync::atomic::Ordering::SeqCst);
    LAST_SIGNAL.store(sig, std::sync::atomic::Ordering::SeqCst);
}

/// How long a guest whose agent is not up yet gets to power off by the button
/// before aivmm gives up on it: a guest stuck in its boot never will, and a stop
/// must not wait for the agent timeout; a guest still booting (7 s under nested
/// TCG, seen in e2e `stop`) brings up its button driver and powers off cleanly
/// within it. Shorter than `aivmm stop`'s default 15 s, after which it kills.
const BOOT_STOP_GRACE: Duration = Duration::from_secs(12);

/// What the signal thread does, as plain data so the timing can be tested.
#[derive(Debug, Default)]
struct Stopper {
    /// When the first termination signal came.
    since: Option<Instant>,
    /// When to press the power button next.
    next_press: Option<Instant>,
    /// Termination signals seen.
    signals: u32,
    /// Whether the session was told to stop waiting for the agent.
    gave_up: bool,
}

/// One step of the [`Stopper`].
#[derive(Debug, Default, PartialEq, Eq)]
struct StopStep {
    /// Press the power button now.
    press: bool,
    /// Stop waiting for the agent: the run ends as stopped.
    give_up: bool,
}

impl Stopper {
    /// At `now`, with a new termination signal or not, and the agent ready or not.
    fn step(&mut self, now: Instant, signalled: bool, ready: bool) -> StopStep {
        let mut out = StopStep::default();
        if signalled {
            self.signals += 1;
            if self.since.is_none() {
                self.since = Some(now);
                self.next_press = Some(now);
            }
        }
        if let Some(at) = self.next_press.filter(|at| now >= *at) {
            out.press = true;
            self.next_press = Some(at + PRESS_INTERVAL);
        }
        // Before the agent is up nothing in the guest may handle the button: a
        // second signal, or the grace running out, ends the wait at once.
        if let (Some(since), false, false) = (self.since, ready, self.gave_up) {
            if self.signals > 1 || now.duration_since(since) >= BOOT_STOP_GRACE {
                self.gave_up = true;
                out.give_up = true;
            }
        }
        out
    }
}

/// Turns SIGTERM and SIGHUP to aivmm (`aivmm stop`, a closed terminal), and SIGINT
/// when there is no terminal in raw mode to carry Ctrl-C, into presses of the
/// guest's ACPI power button: one at once, then one every [`PRESS_INTERVAL`]
/// while the process lives (the guest may not have its button driver yet). While
/// the guest agent is not `ready`, a guest that is not off after
/// [`BOOT_STOP_GRACE`] (or a second signal) ends the run through `control`:
/// [`Session::run`] returns `StoppedEarly` instead of waiting for the agent.
fn forward_termination(
    button: Arc<dyn PowerButton>,
    control: session::Control,
    ready: Arc<std::sync::atomic::AtomicBool>,
    state_dir: PathBuf,
    meta: Meta,
    tty: bool,
) {
    let mut signals = vec![libc::SIGTERM, libc::SIGHUP];
    if !tty {
        signals.push(libc::SIGINT);
    }
    for sig in signals {
        if let Err(e) = crate::signals::register_handler(sig, note_termination) {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopper = Stopper::default();
            let mut presses = 0u32;
            loop {
                let sig = TERMINATE.swap(0, std::sync::atomic::Ordering::SeqCst);
                if sig != 0 && stopper.since.is_none() {
                    tracing::info!("signal {sig}: pressing the power button; the guest shuts down");
                    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if sig != 0 && stopper.since.is_none() && !VM_ENDED.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = workdir::write_meta_at(
                        &state_dir,
                        &Meta {
                            phase: Phase::Stopping,
                            ..meta.clone()
                        },
                    );
                }
                let ready = ready.load(std::sync::atomic::Ordering::SeqCst);
                let step = stopper.step(Instant::now(), sig != 0, ready);
                if step.press {
                    match button.press() {
                        Ok(()) if presses == 0 => tracing::info!("power button pressed"),
                        Ok(()) => tracing::debug!("power button pressed again ({presses})"),
                        Err(e) => tracing::warn!("cannot press the power button: {e}"),
                    }
                    presses += 1;
                }
                if step.give_up {
                    tracing::info!("the guest agent is not up and the guest did not power off; stopping");
                    control.shutdown(0);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// What the agent runs for `argv` (or `default` if empty): in /work as `ids`, on a
/// pty if stdin and stdout are this process's terminal.
pub fn command_spec(argv: &[String], default: &str, env: Vec<(String, String)>, ids: (u32, u32)) -> Spec {
    let tty = is_tty(libc::STDIN_FILENO) && is_tty(libc::STDOUT_FILENO);
    Spec {
        argv: if argv.is_empty() {
            vec![default.to_string()]
        } else {
            argv.to_vec()
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
    }
}

/// A spinner on stderr while the guest boots (a terminal only, not with -q).
fn boot_spinner(first_boot: bool) -> Option<indicatif::ProgressBar> {
    if crate::logging::quiet() || !is_tty(libc::STDERR_FILENO) {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        pb.set_style(style);
    }
    pb.set_message(if first_boot {
        "first boot: formatting the workdir's state disk and starting the guest"
    } else {
        "starting the guest"
    });
    pb.enable_steady_tick(Duration::from_millis(120));
    Some(pb)
}

/// Runs the command of `args` in a VM on its workdir; returns its exit status.
/// `aivmm run --workdir`: `settings` are the merged settings of `args` and the
/// config files ([`crate::settings::apply`]).
pub fn run(
    builder: &dyn MachineBuilder,
    args: &RunArgs,
    settings: &RunConfig,
    workdir: &Path,
    started: Instant,
) -> Result<i32> {
    let root = workdir::state_root()?;
    let state = WorkdirState::open(&root, workdir)?;
    if let Err(e) = crate::logging::to_file(&state.log_path()) {
        tracing::warn!("{e}");
    }
    tracing::info!(
        "aivmm {} run on {} (state {})",
        env!("CARGO_PKG_VERSION"),
        state.workdir.display(),
        state.dir.display()
    );
    let env = command_env(&settings.env.iter().map(|e| e.value.clone()).collect::<Vec<_>>())?;
    // SAFETY: getuid and getgid cannot fail.
    let ids = unsafe { (libc::getuid(), libc::getgid()) };
    let extras = plan_extras(args, settings, ids, &state.dir, &root)?;
    // A bad size is refused now, not after a first image build of minutes.
    config::check_size(settings.cpus.value, settings.memory.value)?;
    let image = resolve_image(args)?;
    tracing::info!(
        "guest image: kernel {}, rootfs {}",
        image.kernel.display(),
        image.rootfs.display()
    );
    let first_boot = !state.has_state_disk();
    if first_boot {
        // A new state disk means new guest host keys (see ssh_files).
        let _ = std::fs::remove_file(state.dir.join("ssh").join("known_hosts"));
    }
    let state_disk = state.state_disk(
        settings.disk_size.value,
        settings.disk_size.source != crate::settings::Source::Default,
    )?;
    let agent_dir = state.stage_agent(&agent_binary()?)?;
    let config = VmConfig::try_from(Mode::Workdir(plan::Workdir {
        args,
        settings,
        image: &image,
        state: &state,
        state_disk: &state_disk,
        agent_dir: &agent_dir,
        ids,
        extras: &extras,
    }))?;
    tracing::info!(
        "VM: {} vCPUs, {} MiB, {} shares, net {:?}, forwards {:?}",
        config.cpus,
        config.memory >> 20,
        config.shares.len(),
        config.net,
        config.forwards
    );

    let vsock = state.vsock_path();
    let mut sess = Session::listen(&vsock).map_err(|e| Error::Session(e, String::new()))?;
    sess.set_connect_timeout(Duration::from_secs(args.agent_timeout));
    sess.set_setup(extras.setup.clone());

    let log_path = state.console_log();
    let console = crate::state_fs::create(&log_path).map_err(|e| Error::Io(log_path.clone(), e))?;
    // What the workdir's git configs are before the guest can touch them.
    let git_configs = gitconfig::snapshot(&state.workdir);
    let vmm = builder.build(&config, started, Box::new(console))?;
    if let Some(b) = vmm.balloon() {
        crate::control::serve(&state.control_path(), Some(b))?;
    }
    let forwards = extras
        .forwards
        .iter()
        .map(|f| format!("{}:{}{}", f.host, f.guest, if f.udp { "/udp" } else { "" }))
        .collect();
    let mut meta = Meta::now(&state.workdir, forwards);
    meta.cpus = config.cpus;
    meta.memory = config.memory;
    meta.phase = if first_boot { Phase::FirstBoot } else { Phase::Booting };
    meta.ssh = extras.ssh.as_ref().map(|(_, c)| c.clone());
    state.write_meta(&meta)?;

    if let (Some((port, cfg)), false) = (&extras.ssh, crate::logging::quiet()) {
        eprintln!(
            "aivmm: ssh: `ssh -F {} aivmm` (127.0.0.1 port {port}) once the guest is up",
            cfg.display()
        );
    }
    let spinner = boot_spinner(first_boot);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (dir, meta, spinner, t) = (state.dir.clone(), meta.clone(), spinner.clone(), Instant::now());
        let ready = ready.clone();
        sess.on_ready(Box::new(move || {
            ready.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(pb) = spinner {
                pb.finish_and_clear();
            }
            tracing::info!("the guest agent is ready after {:?}", t.elapsed());
            let running = Meta {
                phase: Phase::Running,
                ..meta
            };
            if let Err(e) = workdir::write_meta_at(&dir, &running) {
                tracing::warn!("{e}");
            }
        }));
    }

    let tty = is_tty(libc::STDIN_FILENO) && is_tty(libc::STDOUT_FILENO);
    let button = vmm.power_button();
    forward_termination(
        button.clone(),
        sess.control(),
        ready,
        state.dir.clone(),
        meta.clone(),
        tty,
    );
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

    let spec = command_spec(&args.command, "claude", env, ids);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let io = Io {
        input: Some(stdin.as_fd()),
        terminal: tty.then(|| stdin.as_fd()),
        output: &mut out,
        errors: &mut err,
    };
    let result = sess.run(&spec, io);
    if let Some(pb) = &spinner {
        pb.finish_and_clear();
    }
    let outcome = finish(result, &done_rx, &log_path, &*button);
    // The guest is off: what is left is this process's exit, and the host
    // kernel freeing the guest's memory, which `aivmm stop` must not take for a
    // guest that ignored its power button.
    VM_ENDED.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = state.write_meta(&Meta {
        phase: Phase::Ended,
        ..meta
    });
    if let Some(c) = &extras.claude {
        hand_back_claude_login(c);
    }
    warn_git_configs(&state.workdir, &git_configs);
    outcome
}

/// `--claude-auth` at the end of a run: a token the guest refreshed goes back to
/// the host's `~/.claude/.credentials.json`; anything else it left is ignored.
fn hand_back_claude_login(c: &crate::claude_auth::ClaudeFiles) {
    use crate::claude_auth::WriteBack;
    match c.write_back() {
        Ok(WriteBack::Written) => tracing::info!("the guest's refreshed Claude login is now the host's"),
        Ok(WriteBack::Rejected(why)) => {
            tracing::warn!("the guest's Claude credentials are not taken back: {why}")
        }
        Ok(r) => tracing::debug!("Claude login not handed back: {r:?}"),
        Err(e) => tracing::warn!("cannot hand the refreshed Claude login back: {e}"),
    }
}

/// Warns, one line each, of the workdir's `.git/config` files that the guest made
/// or changed and that set a key making git run a command.
fn warn_git_configs(workdir: &Path, before: &gitconfig::Snapshot) {
    for (path, keys) in gitconfig::risky_git_configs(workdir, before) {
        let msg = format!(
            "the guest set {} in {}; git on this machine would run it",
            keys.join(", "),
            path.display()
        );
        tracing::warn!("{msg}");
        eprintln!("aivmm: warning: {msg}");
    }
}

/// Waits up to [`POWEROFF_WAIT`] for the VM thread's report on `done_rx` and logs
/// it (`the VM ended{after}: PowerOff`); a guest still up then is stopped by the
/// exit that follows.
fn wait_for_vm_end<T: std::fmt::Debug, E: std::fmt::Display>(
    done_rx: &mpsc::Receiver<std::result::Result<T, E>>,
    after: &str,
) {
    match done_rx.recv_timeout(POWEROFF_WAIT) {
        Ok(Ok(exit)) => tracing::info!("the VM ended{after}: {exit:?}"),
        Ok(Err(e)) => tracing::warn!("the VM stopped with an error{after}: {e}"),
        Err(_) => tracing::warn!("the guest did not power off within {POWEROFF_WAIT:?}{after}; stopping it"),
    }
}

/// The exit status of a run whose session ended with `result`, once the VM
/// thread (reporting on `done_rx`) has ended too.
fn finish<T: std::fmt::Debug, E: std::fmt::Display>(
    result: std::result::Result<i32, session::Error>,
    done_rx: &mpsc::Receiver<std::result::Result<T, E>>,
    log_path: &Path,
    button: &dyn PowerButton,
) -> Result<i32> {
    match result {
        Ok(code) => {
            tracing::info!("the command exited with status {code}");
            // The agent has exited; the guest's init powers off now.
            wait_for_vm_end(done_rx, "");
            Ok(code)
        }
        Err(session::Error::StoppedEarly) => {
            let sig = LAST_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
            tracing::info!("stopped by signal {sig} while the guest was starting");
            // The VM thread may still run a guest that never came up: the exit
            // that follows ends it (and passt, by its death signal).
            let name = match sig {
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGHUP => " (SIGHUP)",
                libc::SIGINT => " (SIGINT)",
                _ => "",
            };
            eprintln!("aivmm: stopped by signal {sig}{name} while the guest was starting");
            Ok(128 + sig)
        }
        // The power button ended the guest before its command ran.
        Err(e) if STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst) => {
            tracing::info!("stopped while the guest was starting ({e})");
            wait_for_vm_end(done_rx, "");
            Ok(128 + LAST_SIGNAL.load(std::sync::atomic::Ordering::SeqCst))
        }
        Err(session::Error::Cancelled) => {
            let why = match done_rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Err(e)) => format!(": {e}"),
                _ => String::new(),
            };
            Err(Error::VmStopped(format!(
                "{why}{}",
                console_tail(log_path, 15)
            )))
        }
        // The guest broke the agent protocol: the session closed that channel
        // (and logged why). The VM goes on: its init stops it as after any
        // agent's end (ends what is left, unmounts /work, powers off), and the
        // button asks for that too. The error is reported once the guest is off,
        // so its disks are left clean; one that stays up is stopped after
        // POWEROFF_WAIT, as after a command's exit.
        Err(e) if e.is_guest_fault() => {
            if let Err(b) = button.press() {
                tracing::warn!("cannot press the power button: {b}");
            }
            wait_for_vm_end(done_rx, " after its agent's connection was closed");
            Err(Error::Session(e, console_tail(log_path, 15)))
        }
        // The agent's connection ended without its command's status: the agent
        // died or the guest is in trouble. The guest's init says how the agent
        // ended when it powers off (`aivmm-init: powering off (status N)`, 128+N
        // for signal N), so wait for that power-off (as after a command's exit)
        // before quoting the console.
        Err(session::Error::Disconnected) => {
            wait_for_vm_end(done_rx, " after its agent disconnected");
            Err(Error::Session(session::Error::Disconnected, console_tail(log_path, 15)))
        }
        Err(e) => Err(Error::Session(e, console_tail(log_path, 15))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    /// The settings of `a` alone (no config files), as `settings::load` merges them.
    fn settings_of(a: &RunArgs) -> RunConfig {
        crate::settings::merge(None, None, &crate::settings::Layer::from_args(a))
    }

    fn extras_of(a: &RunArgs, ids: (u32, u32), dir: &Path, root: &Path) -> Result<Extras> {
        plan_extras(a, &settings_of(a), ids, dir, root)
    }

    fn vm_of(
        a: &RunArgs,
        image: &GuestImage,
        state: &WorkdirState,
        state_disk: &Path,
        agent_dir: &Path,
        ids: (u32, u32),
        extras: &Extras,
    ) -> std::result::Result<VmConfig, config::Error> {
        VmConfig::try_from(Mode::Workdir(plan::Workdir {
            args: a,
            settings: &settings_of(a),
            image,
            state,
            state_disk,
            agent_dir,
            ids,
            extras,
        }))
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["aivmm", "run"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(v).unwrap().command {
            crate::cli::Command::Run(r) => r,
            _ => unreachable!(),
        }
    }

    /// Counts presses.
    #[derive(Default)]
    struct Button(std::sync::atomic::AtomicU32);
    impl PowerButton for Button {
        fn press(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_hostile_agent_ends_the_session_not_the_vm() {
        let log = tempfile::NamedTempFile::new().unwrap();
        let button = Button::default();
        let (tx, rx) = mpsc::channel::<std::result::Result<&str, String>>();
        // The guest powers off a moment after its agent's channel was closed.
        let vm = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            tx.send(Ok("PowerOff")).unwrap();
        });
        let t = Instant::now();
        let fault = session::Error::Protocol(aivmm_protocol::Error::UnknownType(0x42));
        assert!(fault.is_guest_fault());
        let r = finish(Err(fault), &rx, log.path(), &button);
        assert!(matches!(r, Err(Error::Session(session::Error::Protocol(_), _))), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(300), "the error came before the VM was off");
        assert_eq!(button.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        vm.join().unwrap();
        // A disconnected agent: the guest's own power-off is waited for (its init
        // says on the console how the agent ended), with no press.
        let (tx, rx) = mpsc::channel::<std::result::Result<&str, String>>();
        let vm = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            tx.send(Ok("PowerOff")).unwrap();
        });
        let t = Instant::now();
        let r = finish(Err(session::Error::Disconnected), &rx, log.path(), &button);
        assert!(matches!(r, Err(Error::Session(session::Error::Disconnected, _))), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(200), "reported before the guest was off");
        assert_eq!(button.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        vm.join().unwrap();
        // A host-side failure is reported at once, with no press.
        let (_tx, rx) = mpsc::channel::<std::result::Result<&str, String>>();
        let t = Instant::now();
        let r = finish(Err(session::Error::Timeout(Duration::from_secs(60))), &rx, log.path(), &button);
        assert!(matches!(r, Err(Error::Session(session::Error::Timeout(_), _))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(button.0.load(std::sync::atomic::Ordering::SeqCst), 1);
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
        let x = extras_of(&a, (1000, 100), &state.dir, root.path()).unwrap();
        let c = vm_of(&a, &img, &state, Path::new("/s.img"), Path::new("/ag"), (1000, 100), &x).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 aivmm.uid=1000 aivmm.gid=100");
        assert_eq!((c.cpus, c.memory), (DEFAULT_CPUS, DEFAULT_MEMORY));
        assert_eq!(
            c.disks[0],
            config::disk("/r.ext4", true)
        );
        assert_eq!(
            c.disks[1],
            config::disk("/s.img", false)
        );
        assert_eq!(
            (c.shares[0].tag.as_str(), c.shares[0].read_only),
            (WORK_TAG, false)
        );
        assert_eq!(c.shares[0].root, state.workdir);
        assert_eq!((c.shares[1].tag.as_str(), c.shares[1].read_only), (AGENT_TAG, true));
        assert_eq!(c.shares[1].root, PathBuf::from("/ag"));
        // Only the workdir share protects its git config, hooks and config files.
        let protect: Vec<bool> = c.shares.iter().map(|s| s.protect_workdir).collect();
        assert_eq!(protect, vec![true, false, false]);
        assert_eq!((c.shares[2].tag.as_str(), c.shares[2].read_only), ("tmp", true));
        assert_eq!(c.net, NetMode::User);
        assert_eq!(
            c.vsock.as_ref().map(|v| v.uds_path.clone()),
            Some(state.vsock_path())
        );
        assert_eq!(a.command, vec!["echo".to_string(), "hi".to_string()]);
        let dup = args(&["--workdir", ".", "--share", "/tmp:work"]);
        assert!(matches!(
            vm_of(&dup, &img, &state, Path::new("/s"), Path::new("/ag"), (0, 0), &Extras::default()),
            Err(config::Error::DuplicateTag(_))
        ));
    }

    #[test]
    fn extra_shares_mount_at_the_same_path() {
        let root = tempfile::tempdir().unwrap();
        let a_dir = tempfile::tempdir().unwrap();
        let b_dir = tempfile::tempdir().unwrap();
        let (a_p, b_p) = (a_dir.path().to_str().unwrap(), b_dir.path().to_str().unwrap());
        let a = args(&["--workdir", ".", "--share-ro", a_p, "--share-rw", b_p]);
        let x = extras_of(&a, (1000, 100), root.path(), root.path()).unwrap();
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap();
        assert_eq!(x.shares.len(), 2);
        assert_eq!((x.shares[0].tag.as_str(), x.shares[0].read_only), ("share0", true));
        assert_eq!(x.shares[0].root, canon(a_dir.path()));
        assert_eq!((x.shares[1].tag.as_str(), x.shares[1].read_only), ("share1", false));
        assert_eq!(
            x.setup.mounts,
            vec![
                Mount {
                    tag: "share0".into(),
                    path: canon(a_dir.path()).display().to_string(),
                    read_only: true
                },
                Mount {
                    tag: "share1".into(),
                    path: canon(b_dir.path()).display().to_string(),
                    read_only: false
                },
            ]
        );
        assert_eq!((x.setup.uid, x.setup.gid, x.setup.home.as_str()), (1000, 100, "/home/user"));
        assert!(x.setup.ssh_key.is_none() && x.ssh.is_none());
        // Bad paths: one line each, naming the flag and the path.
        let file = a_dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        for (flag, p, want) in [
            ("--share-ro", "/no/such/dir", "No such file"),
            ("--share-rw", file.to_str().unwrap(), "not a directory"),
            ("--share-ro", "/", "the guest needs"),
            ("--share-rw", "/usr/share", "the guest needs"),
            ("--share-ro", "/etc", "the guest needs"),
            ("--share-ro", "/tmp", "the guest needs"),
        ] {
            let a = args(&["--workdir", ".", flag, p]);
            let e = extras_of(&a, (1000, 100), root.path(), root.path()).unwrap_err().to_string();
            assert!(e.starts_with(&flag[2..]) || e.starts_with(flag), "{e}");
            assert!(e.contains(want) && !e.contains('\n'), "{p}: {e}");
        }
        let a = args(&["--workdir", ".", "--share-ro", a_p, "--share-rw", a_p]);
        assert!(extras_of(&a, (1000, 100), root.path(), root.path()).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn claude_auth_copies_the_login_and_keeps_a_copy_of_the_config() {
        let home = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = state.path().join("aivmm/vms");
        let claude_files = |h: &Path, r: &Path| crate::claude_auth::prepare(h, r, &r.join("w"));
        std::fs::write(home.path().join(".claude.json"), "{\"oauthAccount\":1}").unwrap();
        let c = claude_files(home.path(), &root).unwrap();
        assert!(c.dir.is_dir() && c.dir == root.join("w/claude"));
        assert!(!home.path().join(".claude").exists(), "the host's ~/.claude is not shared");
        assert_eq!(c.state, state.path().join("aivmm/claude"));
        let copy = c.state.join(".claude.json");
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "{\"oauthAccount\":1}\n");
        // What the guest wrote survives while the host's file is older.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&copy, "{\"guest\":1}").unwrap();
        claude_files(home.path(), &root).unwrap();
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "{\"guest\":1}");
        // A newer host file (a new login on the host) wins.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(home.path().join(".claude.json"), "{\"host\":2,\"userID\":\"u\"}").unwrap();
        claude_files(home.path(), &root).unwrap();
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "{\"userID\":\"u\"}\n");
        // No host file at all: an empty config.
        let bare = tempfile::tempdir().unwrap();
        let st2 = tempfile::tempdir().unwrap();
        let c = claude_files(bare.path(), &st2.path().join("vms")).unwrap();
        assert_eq!(std::fs::read_to_string(c.state.join(".claude.json")).unwrap(), "{}\n");
    }

    /// A stop during a boot that never comes up ends the wait for the agent
    /// after the grace (or at a second signal), and never once the agent is up.
    #[test]
    fn a_stop_while_booting_does_not_wait_for_the_agent() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let grace = BOOT_STOP_GRACE.as_millis() as u64;
        let mut s = Stopper::default();
        assert_eq!(s.step(at(0), false, false), StopStep::default());
        // The first signal presses at once.
        assert_eq!(s.step(at(10), true, false), StopStep { press: true, give_up: false });
        assert_eq!(s.step(at(60), false, false), StopStep::default());
        // Pressed again every interval while the guest is up.
        let again = 10 + PRESS_INTERVAL.as_millis() as u64;
        assert!(s.step(at(again), false, false).press);
        // The grace runs out with no agent: give up, once.
        assert!(s.step(at(10 + grace), false, false).give_up);
        assert!(!s.step(at(20 + grace), false, false).give_up);
        // A second signal gives up at once.
        let mut s = Stopper::default();
        s.step(at(0), true, false);
        assert!(s.step(at(100), true, false).give_up);
        // With the agent up the guest powers off by the button: no giving up.
        let mut s = Stopper::default();
        s.step(at(0), true, true);
        assert!(!s.step(at(10 * grace), true, true).give_up);
    }

    /// The guest writes the claude state directory: symlinks it plants there are
    /// replaced, never written through, and the directory is 0700.
    #[test]
    fn claude_state_does_not_follow_guest_symlinks() {
        let claude_files = |h: &Path, r: &Path| crate::claude_auth::prepare(h, r, &r.join("w"));
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = state.path().join("aivmm/vms");
        let dir = state.path().join("aivmm/claude");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let victim = home.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".claude.json.new")).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".claude.json")).unwrap();
        std::fs::write(home.path().join(".claude.json"), "{\"userID\":\"h\"}").unwrap();
        claude_files(home.path(), &root).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        let copy = dir.join(".claude.json");
        assert!(std::fs::symlink_metadata(&copy).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&copy).unwrap(), "{\"userID\":\"h\"}\n");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn ssh_makes_a_key_once_and_a_config() {
        let d = tempfile::tempdir().unwrap();
        let (key, cfg) = ssh_files(d.path(), 40022, "user").unwrap();
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains("Port 40022") && text.contains("User user"), "{text}");
        assert!(text.contains("StrictHostKeyChecking accept-new"), "{text}");
        let priv_key = d.path().join("ssh/id_ed25519");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&priv_key).unwrap().permissions().mode() & 0o777, 0o600);
        let (again, _) = ssh_files(d.path(), 40023, "user").unwrap();
        assert_eq!(again, key, "the key is kept");
        // --ssh needs user networking and a free guest port 22.
        let a = args(&["--workdir", ".", "--ssh", "--net", "none"]);
        let e = extras_of(&a, (1000, 100), d.path(), d.path()).unwrap_err().to_string();
        assert!(e.contains("--net user"), "{e}");
        let a = args(&["--workdir", ".", "--ssh", "--forward", "2222:22"]);
        assert!(extras_of(&a, (1000, 100), d.path(), d.path()).is_err());
        let a = args(&["--workdir", ".", "--ssh"]);
        let x = extras_of(&a, (0, 0), d.path(), d.path()).unwrap();
        let (port, _) = x.ssh.unwrap();
        assert_eq!(x.forwards.last().map(|f| (f.host, f.guest)), Some((port, 22)));
        assert!(x.setup.ssh_key.is_some());
        assert_eq!(x.setup.home, "/root");
    }
}
