//! The builder VM's life, driven by one manager thread ([`Vm::manage`]):
//!
//! ```text
//!   off ──connection waits (or --always-on)──▶ booting ──guest says `ready`──▶ running
//!    ▲                                           │ fails: waiters get the error      │
//!    └──────────── stopping ◀── no connection for --idle, or serve ends ◀───────────┘
//! ```
//! Each boot is a child process, `aivmm run --kernel …` with the guest image, the
//! read-only key share, the persistent disk and a vsock device: a crash of the VM
//! cannot take `serve` down, and the guest's memory goes back to the host when it
//! stops. The child gets SIGKILL if the thread that started it (the manager, which
//! lives as long as `serve`) dies.
//!
//! The control channel: before the child starts, `serve` listens on
//! `vsock.sock_10022`; the guest's init connects there (CID 2, port
//! [`super::CONTROL_PORT`]) and writes `ready …` once its sshd answers on vsock
//! port 22. A stop writes `poweroff`; the guest syncs and powers off, and the
//! child exits. A guest that does not go within [`STOP_TIMEOUT`] is killed.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
#[cfg(target_os = "linux")]
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::state::{now_secs, Log, Status};
use super::{io_err, Error, Result, CONTROL_PORT, KEY_TAG};
use crate::image::GuestImage;

/// How long a guest has to power off after `poweroff`.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the manager looks at the VM when nothing wakes it.
const TICK: Duration = Duration::from_millis(200);
/// The pause before an always-on VM that failed to boot is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// Set by SIGTERM/SIGINT: stop the VM cleanly and exit.
pub static QUIT: AtomicBool = AtomicBool::new(false);

/// What a boot needs.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The aivmm executable that runs the VM.
    pub exe: PathBuf,
    /// The guest image.
    pub image: GuestImage,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// `--net` of the VM.
    pub net: String,
    /// The persistent disk.
    pub disk: PathBuf,
    /// The directory shared read-only as [`KEY_TAG`].
    pub keys_dir: PathBuf,
    /// The vsock socket.
    pub vsock: PathBuf,
    /// The guest console log.
    pub console: PathBuf,
    /// How long a boot may take.
    pub boot_timeout: Duration,
}

impl VmSpec {
    /// The arguments of the VM process after the executable.
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "run".into(),
            "--kernel".into(),
            self.image.kernel.clone().into(),
        ];
        if !self.image.initrd.as_os_str().is_empty() {
            a.push("--initrd".into());
            a.push(self.image.initrd.clone().into());
        }
        // uid 0: the agent image's stage 1 makes no `user` (the builder has its own).
        a.push("--cmdline".into());
        a.push(format!("{} aivmm.uid=0 aivmm.gid=0", self.image.cmdline).into());
        a.push("--cpus".into());
        a.push(self.cpus.to_string().into());
        a.push("--memory".into());
        a.push(self.memory.to_string().into());
        let mut disk = |path: &Path, ro: bool| {
            let mut s = OsString::from(path.as_os_str());
            if ro {
                s.push(":ro");
            }
            a.push("--disk".into());
            a.push(s);
        };
        disk(&self.image.rootfs, true);
        disk(&self.disk, false);
        let mut share = OsString::from(self.keys_dir.as_os_str());
        share.push(format!(":{KEY_TAG}:ro"));
        a.push("--share".into());
        a.push(share);
        a.push("--vsock".into());
        a.push(self.vsock.clone().into());
        a.push("--net".into());
        a.push(self.net.clone().into());
        a
    }

    /// The host socket the guest's control channel reaches.
    pub fn control_path(&self) -> PathBuf {
        let mut p = self.vsock.clone().into_os_string();
        p.push(format!("_{CONTROL_PORT}"));
        PathBuf::from(p)
    }
}

/// The phases of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No VM.
    Off,
    /// A VM is starting.
    Booting,
    /// The guest said `ready`.
    Running,
    /// The guest was asked to power off.
    Stopping,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Off => "off",
            Phase::Booting => "booting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
struct Shared {
    phase: Phase,
    /// A connection waits for a VM.
    want: bool,
    sessions: usize,
    /// The last connection's end (or a boot), for the idle TTL.
    active: Instant,
    last_use: Option<u64>,
    vm_since: Option<u64>,
    boots: u64,
    failures: u64,
    last_boot_ms: Option<u64>,
    error: Option<String>,
    quit: bool,
}

/// A running VM as the manager holds it.
#[derive(Debug)]
struct Running {
    child: Child,
    control: UnixStream,
    since: Instant,
}

/// The builder VM, shared by the manager and the connection threads.
#[derive(Debug)]
pub struct Vm {
    spec: VmSpec,
    idle: Option<Duration>,
    listen: String,
    state_dir: PathBuf,
    log: Arc<Log>,
    shared: Mutex<Shared>,
    cv: Condvar,
}

/// An open connection: keeps the VM up; its drop counts as the last use.
#[derive(Debug)]
pub struct Session {
    vm: Arc<Vm>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut g = self.vm.lock();
        g.sessions = g.sessions.saturating_sub(1);
        g.active = Instant::now();
        g.last_use = Some(now_secs());
        self.vm.publish(&g);
        self.vm.cv.notify_all();
    }
}

impl Vm {
    /// A VM that is off. `idle` None means always on.
    pub fn new(
        spec: VmSpec,
        idle: Option<Duration>,
        listen: String,
        state_dir: PathBuf,
        log: Arc<Log>,
    ) -> Self {
        let vm = Vm {
            spec,
            idle,
            listen,
            state_dir,
            log,
            shared: Mutex::new(Shared {
                phase: Phase::Off,
                want: false,
                sessions: 0,
                active: Instant::now(),
                last_use: None,
                vm_since: None,
                boots: 0,
                failures: 0,
                last_boot_ms: None,
                error: None,
                quit: false,
            }),
            cv: Condvar::new(),
        };
        vm.publish(&vm.lock());
        vm
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The spec the VM boots with.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn publish(&self, g: &Shared) {
        let s = Status {
            pid: std::process::id(),
            listen: self.listen.clone(),
            state: g.phase.name().to_string(),
            vm_since: g.vm_since,
            last_use: g.last_use,
            sessions: g.sessions,
            boots: g.boots,
            last_boot_ms: g.last_boot_ms,
            idle_secs: self.idle.map(|d| d.as_secs()),
            error: g.error.clone(),
        };
        if let Err(e) = s.write(&self.state_dir) {
            self.log
                .line(format_args!("cannot write the status file: {e}"));
        }
    }

    /// Waits until the VM runs (booting it if it is off) and counts a connection.
    pub fn acquire(self: &Arc<Self>) -> Result<Session> {
        let deadline = Instant::now() + self.spec.boot_timeout + STOP_TIMEOUT;
        let mut g = self.lock();
        let failures = g.failures;
        g.last_use = Some(now_secs());
        loop {
            if g.quit {
                return Err(Error::ShuttingDown);
            }
            if g.phase == Phase::Running {
                g.sessions += 1;
                self.publish(&g);
                return Ok(Session {
                    vm: Arc::clone(self),
                });
            }
            if g.failures != failures {
                return Err(Error::Boot(g.error.clone().unwrap_or_default()));
            }
            if matches!(g.phase, Phase::Off | Phase::Stopping) && !g.want {
                g.want = true;
                self.cv.notify_all();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Boot(format!(
                    "still {} after {} s",
                    g.phase.name(),
                    (self.spec.boot_timeout + STOP_TIMEOUT).as_secs()
                )));
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Asks the manager to stop the VM and end (SIGTERM does the same).
    pub fn quit(&self) {
        self.lock().quit = true;
        self.cv.notify_all();
    }

    /// The manager loop: boots on demand (or at once when always on), notices a VM
    /// that died, stops an idle one. Returns when asked to quit, or, with
    /// `exit_when_idle` (a service manager holds the socket), once an idle VM is
    /// stopped and nobody waits.
    pub fn manage(self: &Arc<Self>, exit_when_idle: bool) {
        let mut running: Option<Running> = None;
        let mut retry_at = Instant::now();
        loop {
            let mut g = self.lock();
            if QUIT.load(Ordering::SeqCst) {
                g.quit = true;
            }
            if g.quit {
                self.cv.notify_all();
                if let Some(r) = running.take() {
                    g.phase = Phase::Stopping;
                    self.publish(&g);
                    drop(g);
                    self.stop(r, "serve is ending");
                    g = self.lock();
                }
                g.phase = Phase::Off;
                g.vm_since = None;
                self.publish(&g);
                return;
            }
            if let Some(r) = running.as_mut() {
                if let Ok(Some(st)) = r.child.try_wait() {
                    let why = format!(
                        "the VM exited on its own ({st}) after {} s{}",
                        r.since.elapsed().as_secs(),
                        console_tail(&self.spec.console, 10)
                    );
                    self.log.line(&why);
                    running = None;
                    g.phase = Phase::Off;
                    g.vm_since = None;
                    g.error = Some(why);
                    retry_at = Instant::now() + RETRY;
                    self.publish(&g);
                    self.cv.notify_all();
                    continue;
                }
                let idle_for = g.active.elapsed();
                if let Some(ttl) = self.idle.filter(|ttl| g.sessions == 0 && idle_for >= *ttl) {
                    g.phase = Phase::Stopping;
                    self.publish(&g);
                    drop(g);
                    if let Some(r) = running.take() {
                        self.stop(
                            r,
                            &format!(
                                "idle for {} s (ttl {} s)",
                                idle_for.as_secs(),
                                ttl.as_secs()
                            ),
                        );
                    }
                    g = self.lock();
                    g.phase = Phase::Off;
                    g.vm_since = None;
                    self.publish(&g);
                    self.cv.notify_all();
                    if exit_when_idle && !g.want && g.sessions == 0 {
                        self.log.line("the service manager keeps the socket: exiting until the next connection");
                        g.quit = true;
                        return;
                    }
                    continue;
                }
            } else if (g.want || self.idle.is_none()) && Instant::now() >= retry_at {
                g.phase = Phase::Booting;
                self.publish(&g);
                drop(g);
                let t = Instant::now();
                let r = self.boot();
                g = self.lock();
                g.want = false;
                match r {
                    Ok(r) => {
                        let ms = t.elapsed().as_millis() as u64;
                        g.phase = Phase::Running;
                        g.boots += 1;
                        g.vm_since = Some(now_secs());
                        g.last_boot_ms = Some(ms);
                        g.active = Instant::now();
                        g.error = None;
                        self.log.line(format_args!(
                            "VM ready in {ms} ms (boot {}, pid {})",
                            g.boots,
                            r.child.id()
                        ));
                        running = Some(r);
                    }
                    Err(e) => {
                        g.phase = Phase::Off;
                        g.failures += 1;
                        g.error = Some(e.to_string());
                        self.log.line(&e);
                        retry_at = Instant::now()
                            + if self.idle.is_none() {
                                RETRY
                            } else {
                                Duration::ZERO
                            };
                    }
                }
                self.publish(&g);
                self.cv.notify_all();
                continue;
            }
            drop(
                self.cv
                    .wait_timeout(g, TICK)
                    .unwrap_or_else(|p| p.into_inner()),
            );
        }
    }

    /// Starts the VM process and waits for the guest's `ready`.
    fn boot(&self) -> Result<Running> {
        let started = Instant::now();
        let deadline = started + self.spec.boot_timeout;
        let vsock = &self.spec.vsock;
        // Whatever a killed VM left behind.
        let _ = std::fs::remove_file(vsock);
        if let (Some(dir), Some(name)) = (vsock.parent(), vsock.file_name()) {
            let prefix = format!("{}_", name.to_string_lossy());
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        let ctl_path = self.spec.control_path();
        let ctl = UnixListener::bind(&ctl_path).map_err(io_err(&ctl_path))?;
        ctl.set_nonblocking(true).map_err(io_err(&ctl_path))?;
        let console = crate::state_fs::create(&self.spec.console).map_err(io_err(&self.spec.console))?;
        self.log.line(format_args!(
            "booting the VM: {} {}",
            self.spec.exe.display(),
            self.spec
                .argv()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        ));
        let mut cmd = Command::new(&self.spec.exe);
        cmd.args(self.spec.argv())
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(Stdio::inherit());
        // SAFETY: between fork and exec the child only calls prctl, which is
        // async-signal-safe and touches no memory of ours. (macOS has no
        // parent-death signal: there the VM outlives a killed builder server.)
        #[cfg(target_os = "linux")]
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err(&self.spec.exe))?;
        let fail = |child: &mut Child, why: String| {
            let _ = child.kill();
            let _ = child.wait();
            Error::Boot(format!("{why}{}", console_tail(&self.spec.console, 15)))
        };
        let stream = loop {
            match ctl.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(&mut child, format!("control socket: {e}"))),
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Error::Boot(format!(
                    "the VM process exited ({st}) before the guest was ready{}",
                    console_tail(&self.spec.console, 15)
                )));
            }
            if QUIT.load(Ordering::SeqCst) {
                return Err(fail(&mut child, "serve is ending".into()));
            }
            if Instant::now() >= deadline {
                return Err(fail(
                    &mut child,
                    format!(
                        "no word from the guest within {} s",
                        self.spec.boot_timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = std::fs::remove_file(&ctl_path);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let ready = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(left)))
            .and_then(|()| stream.try_clone())
            .and_then(|s| {
                let mut line = String::new();
                BufReader::new(s).take_line(&mut line).map(|()| line)
            });
        match ready {
            Ok(line) if line.starts_with("ready") => {
                let _ = stream.set_read_timeout(None);
                self.log.line(format_args!("guest: {}", line.trim().escape_debug()));
                Ok(Running {
                    child,
                    control: stream,
                    since: Instant::now(),
                })
            }
            Ok(line) => Err(fail(
                &mut child,
                format!("the guest said {:?} instead of ready", line.trim()),
            )),
            Err(e) => Err(fail(
                &mut child,
                format!("waiting for the guest's ready: {e}"),
            )),
        }
    }

    /// Powers the guest off through the control channel; kills it if it does not go.
    fn stop(&self, mut r: Running, why: &str) {
        self.log.line(format_args!("stopping the VM: {why}"));
        let t = Instant::now();
        let asked = r.control.write_all(b"poweroff\n").is_ok();
        while t.elapsed() < STOP_TIMEOUT && asked {
            match r.child.try_wait() {
                Ok(Some(st)) => {
                    self.log.line(format_args!(
                        "VM stopped in {} ms ({st}), up {} s",
                        t.elapsed().as_millis(),
                        r.since.elapsed().as_secs()
                    ));
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        self.log.line(format_args!(
            "the guest did not power off{}: killing the VM",
            if asked {
                " in time"
            } else {
                " (control channel closed)"
            }
        ));
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

/// `read_line` with a byte limit, for a peer that is not trusted to send a newline.
trait TakeLine {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<()>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(&mut self, out: &mut String) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let mut limited = std::io::Read::take(self, 256);
        limited.read_until(b'\n', &mut buf)?;
        if buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the guest closed the control channel",
            ));
        }
        *out = String::from_utf8_lossy(&buf).into_owned();
        Ok(())
    }
}

/// The last `n` lines of the console log, as a note for a message.
pub fn console_tail(path: &Path, n: usize) -> String {
    // The guest writes the log without limit; only its end is read.
    let Ok(text) = crate::state_fs::read_tail(path, 64 * 1024) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "; the guest console ({}) ended with: {}",
        path.display(),
        lines[lines.len().saturating_sub(n)..].join(" | ")
    )
}

/// The system time as epoch seconds, for tests of the status.
pub fn epoch(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Opens the log file for appending (also used as the VM process's stderr).
pub fn open_append(path: &Path) -> Result<File> {
    crate::state_fs::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(dir: &Path) -> VmSpec {
        VmSpec {
            exe: "/bin/false".into(),
            image: GuestImage {
                kernel: "/img/vmlinuz".into(),
                initrd: "/img/initrd.cpio".into(),
                rootfs: "/img/rootfs.ext4".into(),
                cmdline: "console=ttyS0 quiet".into(),
            },
            cpus: 2,
            memory: 1 << 30,
            net: "none".into(),
            disk: dir.join("disk.img"),
            keys_dir: dir.join("guest"),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            boot_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_vm_process_gets_the_builder_devices() {
        let s = spec(Path::new("/st"));
        let argv: Vec<String> = s
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let text = argv.join(" ");
        assert_eq!(
            text,
            "run --kernel /img/vmlinuz --initrd /img/initrd.cpio --cmdline console=ttyS0 quiet aivmm.uid=0 aivmm.gid=0 \
             --cpus 2 --memory 1073741824 --disk /img/rootfs.ext4:ro --disk /st/disk.img \
             --share /st/guest:aivmm-builder:ro --vsock /st/vsock.sock --net none"
        );
        // The arguments parse as a real `aivmm run`, rootfs first (vda), disk second (vdb).
        let mut full = vec!["aivmm".to_string()];
        full.extend(argv);
        let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(full).unwrap();
        let crate::cli::Command::Run(r) = cli.command else {
            panic!("not run")
        };
        let c = crate::config::VmConfig::try_from(&r).unwrap();
        assert_eq!((c.cpus, c.memory), (2, 1 << 30));
        assert!(c.disks[0].read_only && !c.disks[1].read_only);
        assert_eq!(c.shares[0].tag, KEY_TAG);
        assert!(c.shares[0].read_only);
        assert_eq!(s.control_path(), PathBuf::from("/st/vsock.sock_10022"));
    }

    #[test]
    fn a_vm_that_never_gets_ready_fails_the_waiting_connection() {
        // /bin/false exits at once: the boot fails, the waiter gets the error,
        // and the status says so.
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Log::open(&dir.path().join("builder.log")).unwrap());
        let vm = Arc::new(Vm::new(
            spec(dir.path()),
            Some(Duration::from_secs(60)),
            "127.0.0.1:1".into(),
            dir.path().to_path_buf(),
            log,
        ));
        let m = Arc::clone(&vm);
        let manager = std::thread::spawn(move || m.manage(false));
        let err = vm.acquire().unwrap_err().to_string();
        assert!(err.contains("exited"), "{err}");
        let st = super::super::state::read_status(dir.path()).unwrap();
        assert_eq!(st["state"], "off");
        assert!(st["error"].contains("exited"), "{st:?}");
        vm.quit();
        manager.join().unwrap();
        assert!(matches!(vm.acquire(), Err(Error::ShuttingDown)));
    }
}
