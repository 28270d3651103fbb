//! The host side of `aivmm run -- COMMAND`: one command run by the guest agent.
//!
//! [`Session::listen`] binds `<uds_path>_1024` before the VM starts, so the agent's
//! vsock connection to the host (CID 2, port [`AGENT_PORT`]) finds a listener as soon
//! as the guest is up. [`Session::run`] accepts that connection, waits for `Ready`,
//! sends `Start(spec)` and then relays in one `poll` loop:
//!
//! - the host's input → `Input` frames; its end of file → `CloseInput`. On a
//!   terminal the input is in raw mode, so Ctrl-C is byte 3 that the guest pty turns
//!   into SIGINT for the guest's foreground job;
//! - SIGWINCH on the host → the terminal's new size (TIOCGWINSZ) → `Resize`;
//! - [`Control`] requests from other threads → `Resize`, `Signal`, or cancelling;
//! - `Output`/`Stderr` frames → the output writers; `Exited` ends the run with the
//!   command's status.
//!
//! Frames to the agent are queued and written as the socket takes them, so a guest
//! that does not read its input cannot block the relay of its output.
//!
//! The agent is the guest's, and the guest is hostile (docs/threats.md, "The agent
//! channel"). Each poll wake-up reads at most one 64 KiB piece from the socket and
//! takes every whole message before the next read, so the decoder holds less than
//! one frame and one piece, and output goes out no faster than the host's writers
//! take it. A message that is not the protocol, out of range or out of turn ends
//! the run with one warning naming it; the caller then stops the VM. Only one
//! agent connection is taken: the socket is unlinked once it is accepted, so a
//! second guest connection to [`AGENT_PORT`] is refused by the vsock device.
//!
//! [`Session::exec`] is the same relay the other way round, for `aivmm exec`: it
//! connects to the running VM's hybrid vsock socket, asks for the agent's
//! [`EXEC_PORT`] with a `CONNECT` line, and then speaks the same protocol.
//! [`Control::shutdown`] asks the agent to stop the command and power the guest off.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use aivmm_protocol::{self as proto, Decoder, ToGuest, ToHost, MAX_CHUNK, VERSION};
pub use aivmm_protocol::{ExitStatus, Mount, Setup, Spec, AGENT_PORT, EXEC_PORT};

/// Errors of a session.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent's socket could not be created.
    #[error("cannot listen for the guest agent on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The agent did not connect (or did not say Ready) in time.
    #[error("the guest agent did not connect within {} s (a slow or busy host? --agent-timeout SECS waits longer)", .0.as_secs_f64())]
    Timeout(Duration),
    /// The connection ended before `Exited`.
    #[error("the guest agent disconnected without an exit status")]
    Disconnected,
    /// The agent speaks another protocol version.
    #[error("the guest agent speaks protocol version {0}, this aivmm speaks {VERSION}: rebuild the guest image")]
    Version(u32),
    /// The agent sent bytes that are not the protocol.
    #[error("bad message from the guest agent: {0}")]
    Protocol(#[from] proto::Error),
    /// The agent sent a message out of turn.
    #[error("the guest agent sent {msg} {when}")]
    Unexpected {
        /// The message's name.
        msg: &'static str,
        /// When it came, e.g. "before Ready".
        when: &'static str,
    },
    /// [`Control::cancel`] was called.
    #[error("the session was cancelled")]
    Cancelled,
    /// [`Control::shutdown`] was called before the command started.
    #[error("stopped before the command started")]
    StoppedEarly,
    /// `aivmm exec` could not reach the agent through the VM's vsock socket.
    #[error("cannot reach the guest agent through {path}: {why}")]
    Exec {
        /// The VM's vsock socket.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Host-side I/O failed.
    #[error("session I/O: {0}")]
    Io(#[from] io::Error),
}

/// `Result` of session operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the guest caused this by what it sent (rather than the host, a
    /// timeout or a clean hang-up).
    pub fn is_guest_fault(&self) -> bool {
        matches!(
            self,
            Self::Protocol(_) | Self::Unexpected { .. } | Self::Version(_)
        )
    }
}

/// How long [`Session::run`] waits for the agent unless told otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The most bytes queued for the agent before host input is no longer read.
const OUT_LIMIT: usize = 1 << 20;
/// The most bytes read from the agent's socket at a time.
const READ_PIECE: usize = 64 * 1024;

/// Where a session gets input and puts output.
pub struct Io<'a> {
    /// The command's input; `None` sends `CloseInput` at once. The descriptor is
    /// only read when poll says it is readable, and its flags are left alone.
    pub input: Option<BorrowedFd<'a>>,
    /// The host terminal, if any (normally the same as `input`): it is put in raw
    /// mode for the session, its size fills a zero `rows`/`cols` in a tty spec, and
    /// its size changes (SIGWINCH) become `Resize` frames.
    pub terminal: Option<BorrowedFd<'a>>,
    /// Where the command's output (pty or stdout) goes.
    pub output: &'a mut (dyn Write + Send),
    /// Where its stderr (pipe mode) and the agent's error messages go.
    pub errors: &'a mut (dyn Write + Send),
}

/// Where the agent's connection comes from.
enum Source {
    /// The agent connects to this listener (the main command).
    Listen(UnixListener),
    /// aivmm connects to the agent's exec port through the VM's vsock socket.
    Exec,
}

/// A listener for the guest agent, bound before the VM starts, or a connection to
/// a running VM's agent ([`Session::exec`]).
pub struct Session {
    source: Source,
    path: PathBuf,
    connect_timeout: Duration,
    control_rx: OwnedFd,
    control: Control,
    setup: Option<Setup>,
    on_ready: std::sync::Mutex<Option<ReadyHook>>,
}

/// Called once when the agent has said Ready (e.g. to end a boot spinner).
pub type ReadyHook = Box<dyn FnOnce() + Send>;

/// Asks a running [`Session`] to do something; cheap to clone and `Send`.
#[derive(Clone, Debug)]
pub struct Control {
    tx: Arc<OwnedFd>,
}

const CMD_RESIZE: u8 = 1;
const CMD_SIGNAL: u8 = 2;
const CMD_CANCEL: u8 = 3;
const CMD_WINCH: u8 = 4;
const CMD_SHUTDOWN: u8 = 5;
/// A control command: one kind byte and a 4-byte argument. Pipe writes of this
/// size are atomic, so reads never split one.
const CMD_LEN: usize = 5;

fn write_cmd(fd: RawFd, kind: u8, arg: [u8; 4]) {
    let cmd = [kind, arg[0], arg[1], arg[2], arg[3]];
    // SAFETY: writes CMD_LEN bytes from a valid buffer. A full pipe (thousands of
    // unread commands) drops this one, which is harmless for sizes and signals.
    unsafe { libc::write(fd, cmd.as_ptr().cast(), CMD_LEN) };
}

impl Control {
    /// Sends the guest terminal a new size.
    pub fn resize(&self, rows: u16, cols: u16) {
        let (r, c) = (rows.to_le_bytes(), cols.to_le_bytes());
        write_cmd(self.tx.as_raw_fd(), CMD_RESIZE, [r[0], r[1], c[0], c[1]]);
    }

    /// Sends a signal to the guest command's foreground process group.
    pub fn signal(&self, sig: i32) {
        write_cmd(self.tx.as_raw_fd(), CMD_SIGNAL, sig.to_le_bytes());
    }

    /// Makes [`Session::run`] return [`Error::Cancelled`] (e.g. the VM stopped).
    pub fn cancel(&self) {
        write_cmd(self.tx.as_raw_fd(), CMD_CANCEL, [0; 4]);
    }

    /// Asks the agent to stop the command (SIGHUP and SIGTERM, SIGKILL after
    /// `grace_ms`) so the guest powers off. Before the command has started,
    /// [`Session::run`] returns [`Error::StoppedEarly`] instead.
    pub fn shutdown(&self, grace_ms: u32) {
        write_cmd(self.tx.as_raw_fd(), CMD_SHUTDOWN, grace_ms.to_le_bytes());
    }
}

#[cfg(target_os = "linux")]
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors to a valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded; both are new descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// macOS has no pipe2: pipe, then the flags with fcntl (aivmm does not fork
/// between the two).
#[cfg(not(target_os = "linux"))]
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe writes two descriptors to a valid array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe succeeded; both are new descriptors that nothing else owns.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in fds {
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        let ok = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
                && fl >= 0
                && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(pair)
}

/// The socket the agent's connections arrive on: `<uds_path>_<AGENT_PORT>`.
pub fn agent_socket_path(uds_path: &Path) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{AGENT_PORT}"));
    s.into()
}

impl Session {
    /// Listens for the agent on `<uds_path>_1024`, where the vsock device sends the
    /// guest's connections to port [`AGENT_PORT`]. A stale socket there is replaced.
    pub fn listen(uds_path: &Path) -> Result<Self> {
        Self::listen_at(&agent_socket_path(uds_path))
    }

    /// Listens for the agent on exactly `path`.
    pub fn listen_at(path: &Path) -> Result<Self> {
        let err = |source| Error::Listen {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let (control_rx, tx) = pipe().map_err(err)?;
        Ok(Self {
            source: Source::Listen(listener),
            path: path.to_path_buf(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            control_rx,
            control: Control { tx: Arc::new(tx) },
            setup: None,
            on_ready: std::sync::Mutex::new(None),
        })
    }

    /// A session that runs one more command in a running VM: [`run`](Self::run)
    /// connects to the VM's vsock socket `uds_path` and asks for the agent's
    /// [`EXEC_PORT`].
    pub fn exec(uds_path: &Path) -> Result<Self> {
        let (control_rx, tx) = pipe()?;
        Ok(Self {
            source: Source::Exec,
            path: uds_path.to_path_buf(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            control_rx,
            control: Control { tx: Arc::new(tx) },
            setup: None,
            on_ready: std::sync::Mutex::new(None),
        })
    }

    /// Calls `hook` once the agent has connected and said Ready.
    pub fn on_ready(&mut self, hook: ReadyHook) {
        self.on_ready = std::sync::Mutex::new(Some(hook));
    }

    /// Sends `setup` to the agent before the command (mounts, links, sshd).
    pub fn set_setup(&mut self, setup: Setup) {
        self.setup = Some(setup);
    }

    /// Sets how long [`run`](Self::run) waits for the agent to connect and say Ready.
    pub fn set_connect_timeout(&mut self, timeout: Duration) {
        self.connect_timeout = timeout;
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle to resize, signal or cancel the session from another thread.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Runs `spec` in the guest and relays its I/O; returns its exit status as a
    /// shell reports it (128 + N for signal N).
    pub fn run(&self, spec: &Spec, io: Io<'_>) -> Result<i32> {
        let r = self.run_inner(spec, io);
        if let Err(e) = &r {
            if e.is_guest_fault() {
                tracing::warn!("closing the guest agent's connection: {e}");
            }
        }
        r
    }

    fn run_inner(&self, spec: &Spec, io: Io<'_>) -> Result<i32> {
        let deadline = Instant::now() + self.connect_timeout;
        let stream = self.accept(deadline)?;
        let mut conn = Conn {
            stream,
            decoder: Decoder::new(),
            out: Vec::new(),
        };
        conn.wait_ready(deadline, self.connect_timeout, &self.control_rx)?;
        if let Some(hook) = self.on_ready.lock().ok().and_then(|mut h| h.take()) {
            hook();
        }
        conn.queue(&clock())?;
        if let Some(setup) = &self.setup {
            conn.queue(&ToGuest::Setup(setup.clone()))?;
        }
        let mut spec = spec.clone();
        if let (true, Some(t)) = (spec.tty, io.terminal) {
            if let Some((rows, cols)) = terminal_size(t) {
                if spec.rows == 0 || spec.cols == 0 {
                    (spec.rows, spec.cols) = (rows, cols);
                }
            }
        }
        conn.queue(&ToGuest::Start(spec))?;
        let _raw = io.terminal.and_then(RawMode::enter);
        let _winch = match io.terminal {
            Some(_) => Some(WinchSlot::register(&self.control.tx)?),
            None => None,
        };
        Relay {
            conn,
            io,
            control_rx: self.control_rx.as_raw_fd(),
            size: None,
            next_clock: Instant::now() + Duration::from_secs(proto::CLOCK_RESYNC_SECS),
        }
        .run()
    }

    fn accept(&self, deadline: Instant) -> Result<UnixStream> {
        let listener = match &self.source {
            Source::Listen(l) => l,
            Source::Exec => return self.connect_exec(deadline),
        };
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)?;
                    // One agent per run: later guest connections to the agent port
                    // find no socket and are refused, instead of waiting unread
                    // in the backlog (and holding vsock connection slots).
                    let _ = std::fs::remove_file(&self.path);
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
            let mut fds = [
                poll_fd(listener.as_raw_fd(), libc::POLLIN),
                poll_fd(self.control_rx.as_raw_fd(), libc::POLLIN),
            ];
            poll(
                &mut fds,
                deadline
                    .checked_duration_since(Instant::now())
                    .ok_or(Error::Timeout(self.connect_timeout))?,
            )?;
            if fds[1].revents != 0 {
                early_stop(drain_control(self.control_rx.as_raw_fd())?)?;
            }
        }
    }

    /// Connects to the agent's exec port through the hybrid vsock socket: writes
    /// `CONNECT <port>` and waits for the device's `OK <n>` line.
    fn connect_exec(&self, deadline: Instant) -> Result<UnixStream> {
        let fail = |why: String| Error::Exec {
            path: self.path.clone(),
            why,
        };
        let mut s = UnixStream::connect(&self.path).map_err(|e| fail(e.to_string()))?;
        s.write_all(format!("CONNECT {EXEC_PORT}\n").as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while line.len() < 64 {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(Error::Timeout(self.connect_timeout))?;
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match s.read(&mut b) {
                Ok(0) => {
                    return Err(fail(
                        "the guest refused the connection (its agent is not listening yet, or the image is older than this aivmm)".into(),
                    ))
                }
                Ok(_) if b[0] == b'\n' => break,
                Ok(_) => line.push(b[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(Error::Timeout(self.connect_timeout))
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        if !line.starts_with(b"OK ") {
            return Err(fail(format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&line)
            )));
        }
        s.set_read_timeout(None)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// The host's wall clock, for the agent to set the guest's by.
fn clock() -> ToGuest {
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    ToGuest::Clock { unix_ns }
}

/// The most characters of a guest `Error` message shown to the user.
const MAX_ERROR_SHOWN: usize = 1024;

/// A guest's `Error` message made safe for the host's terminal: control
/// characters (escape sequences, carriage returns that would overwrite aivmm's own
/// prefix) are escaped, and it is cut at [`MAX_ERROR_SHOWN`] characters.
fn printable(m: &str) -> String {
    let mut out = String::new();
    for (i, c) in m.chars().enumerate() {
        if i == MAX_ERROR_SHOWN {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// What control commands mean before the command starts: cancel or stop.
fn early_stop(cmds: Vec<(u8, [u8; 4])>) -> Result<()> {
    for (kind, _) in cmds {
        match kind {
            CMD_CANCEL => return Err(Error::Cancelled),
            CMD_SHUTDOWN => return Err(Error::StoppedEarly),
            _ => {}
        }
    }
    Ok(())
}

impl Drop for Session {
    fn drop(&mut self) {
        if matches!(self.source, Source::Listen(_)) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn poll_fd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Polls `fds`; `timeout` of `Duration::MAX` waits for ever. EINTR counts as a
/// wake-up with nothing ready.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = if timeout == Duration::MAX {
        -1
    } else {
        // Round up so a short remaining time does not become a busy loop.
        libc::c_int::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
    };
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            fds.iter_mut().for_each(|f| f.revents = 0);
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

/// Reads every queued control command.
fn drain_control(fd: RawFd) -> io::Result<Vec<(u8, [u8; 4])>> {
    let mut cmds = Vec::new();
    let mut buf = [0u8; CMD_LEN * 64];
    loop {
        // SAFETY: reads into a valid buffer of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(cmds),
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Ok(cmds);
        }
        for c in buf[..n as usize].chunks_exact(CMD_LEN) {
            cmds.push((c[0], [c[1], c[2], c[3], c[4]]));
        }
    }
}

/// Rows and columns of the terminal `fd`.
pub fn terminal_size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; all-zero is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize to the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// A terminal in raw mode; the old settings come back on drop.
struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: BorrowedFd<'_>) -> Option<Self> {
        let fd = fd.as_raw_fd();
        // SAFETY: termios is plain data; all-zero is a valid value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios to the pointer, which is valid.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads one termios from a valid pointer.
        (unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } == 0).then_some(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr reads one termios from a valid pointer; the descriptor
        // is borrowed for the whole run, which outlives this guard.
        unsafe { libc::tcsetattr(self.fd, libc::TCSADRAIN, &self.saved) };
    }
}

/// Sessions that want SIGWINCH: write ends of their control pipes. The handler is
/// process-wide, so it fans out to every registered session.
static WINCH_FDS: [AtomicI32; 8] = [const { AtomicI32::new(-1) }; 8];
/// Handlers running now; a slot's descriptor is closed only when this is zero.
static IN_WINCH_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// This thread's errno slot.
#[cfg(target_os = "linux")]
fn errno_slot() -> *mut libc::c_int {
    // SAFETY: __errno_location has no preconditions.
    unsafe { libc::__errno_location() }
}

/// This thread's errno slot (macOS names it `__error`).
#[cfg(not(target_os = "linux"))]
fn errno_slot() -> *mut libc::c_int {
    // SAFETY: __error has no preconditions.
    unsafe { libc::__error() }
}

extern "C" fn on_winch(_: libc::c_int) {
    IN_WINCH_HANDLER.fetch_add(1, Ordering::SeqCst);
    // SAFETY: errno is thread-local; the handler saves and restores it.
    let errno = unsafe { *errno_slot() };
    for slot in &WINCH_FDS {
        let fd = slot.load(Ordering::SeqCst);
        if fd >= 0 {
            write_cmd(fd, CMD_WINCH, [0; 4]);
        }
    }
    // SAFETY: as above.
    unsafe { *errno_slot() = errno };
    IN_WINCH_HANDLER.fetch_sub(1, Ordering::SeqCst);
}

/// A registration for SIGWINCH, removed on drop.
struct WinchSlot {
    index: usize,
    /// The descriptor the handler writes to; open while registered.
    _fd: OwnedFd,
}

impl WinchSlot {
    fn register(tx: &OwnedFd) -> Result<Self> {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            // SAFETY: sigaction is plain data; all-zero is a valid value.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_winch as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: installs a handler that only makes async-signal-safe calls
            // (write) and touches atomics; `sa` is valid.
            unsafe { libc::sigaction(libc::SIGWINCH, &sa, std::ptr::null_mut()) };
        });
        let fd = tx.try_clone()?;
        for (index, slot) in WINCH_FDS.iter().enumerate() {
            if slot
                .compare_exchange(-1, fd.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(Self { index, _fd: fd });
            }
        }
        // More terminal sessions than slots: this one misses resizes.
        Ok(Self {
            index: usize::MAX,
            _fd: fd,
        })
    }
}

impl Drop for WinchSlot {
    fn drop(&mut self) {
        if let Some(slot) = WINCH_FDS.get(self.index) {
            slot.store(-1, Ordering::SeqCst);
            // A handler may have read the descriptor just before; let it finish
            // before the descriptor is closed (and its number reused).
            while IN_WINCH_HANDLER.load(Ordering::SeqCst) > 0 {
                std::hint::spin_loop();
            }
        }
    }
}

/// The connection to the agent.
struct Conn {
    stream: UnixStream,
    decoder: Decoder,
    /// Frames not yet written.
    out: Vec<u8>,
}

impl Conn {
    fn queue(&mut self, msg: &ToGuest) -> Result<()> {
        proto::encode_into(msg, &mut self.out)?;
        self.flush()
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) -> Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(Error::Disconnected),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // EPIPE / ECONNRESET: the guest went away; a pending Exited may still
                // be readable, so let the reader decide.
                Err(_) => {
                    self.out.clear();
                    break;
                }
            }
        }
        Ok(())
    }

    /// Reads one piece (at most [`READ_PIECE`] bytes) into the decoder; `Ok(false)`
    /// at end of stream. One piece per call: the caller takes every whole message
    /// before reading more, which bounds the decoder (see the module docs).
    fn fill(&mut self) -> Result<bool> {
        let mut buf = [0u8; READ_PIECE];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.decoder.feed(&buf[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn wait_ready(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        control: &OwnedFd,
    ) -> Result<()> {
        loop {
            if let Some(msg) = self.decoder.next_message::<ToHost>()? {
                return match msg {
                    ToHost::Ready { version: VERSION } => Ok(()),
                    ToHost::Ready { version } => Err(Error::Version(version)),
                    m => Err(Error::Unexpected {
                        msg: m.name(),
                        when: "before Ready",
                    }),
                };
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(Error::Timeout(timeout))?;
            let mut fds = [
                poll_fd(self.stream.as_raw_fd(), libc::POLLIN),
                poll_fd(control.as_raw_fd(), libc::POLLIN),
            ];
            poll(&mut fds, left)?;
            if fds[1].revents != 0 {
                early_stop(drain_control(control.as_raw_fd())?)?;
            }
            if fds[0].revents != 0 && !self.fill()? {
                return Err(Error::Disconnected);
            }
        }
    }
}

struct Relay<'a> {
    conn: Conn,
    io: Io<'a>,
    control_rx: RawFd,
    /// The terminal size last sent.
    size: Option<(u16, u16)>,
    /// When the guest's clock is set again.
    next_clock: Instant,
}

impl Relay<'_> {
    fn run(mut self) -> Result<i32> {
        if self.io.input.is_none() {
            self.conn.queue(&ToGuest::CloseInput)?;
        }
        self.size = self.io.terminal.and_then(terminal_size);
        let mut buf = vec![0u8; MAX_CHUNK];
        // What came in the same read as Ready: nothing may wake the poll for it.
        while let Some(msg) = self.conn.decoder.next_message::<ToHost>()? {
            if let Some(code) = self.handle(msg)? {
                return Ok(code);
            }
        }
        loop {
            // Slots: 0 agent socket, 1 input, 2 control pipe.
            let sock_events = libc::POLLIN
                | if self.conn.out.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                };
            let mut fds = [
                poll_fd(self.conn.stream.as_raw_fd(), sock_events),
                poll_fd(-1, 0),
                poll_fd(self.control_rx, libc::POLLIN),
            ];
            if let (Some(fd), true) = (self.io.input, self.conn.out.len() < OUT_LIMIT) {
                fds[1] = poll_fd(fd.as_raw_fd(), libc::POLLIN);
            }
            poll(&mut fds, self.next_clock.saturating_duration_since(Instant::now()))?;
            if Instant::now() >= self.next_clock {
                // The guest's clock drifts from the host's (NTP slews the host's).
                self.conn.queue(&clock())?;
                self.next_clock = Instant::now() + Duration::from_secs(proto::CLOCK_RESYNC_SECS);
            }
            if fds[0].revents & libc::POLLOUT != 0 {
                self.conn.flush()?;
            }
            if fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let open = self.conn.fill()?;
                while let Some(msg) = self.conn.decoder.next_message::<ToHost>()? {
                    if let Some(code) = self.handle(msg)? {
                        return Ok(code);
                    }
                }
                if !open {
                    return Err(if self.conn.decoder.has_partial() {
                        proto::Error::Eof.into()
                    } else {
                        Error::Disconnected
                    });
                }
            }
            // Control first: a resize or signal asked for before input was written
            // must reach the guest before that input.
            if fds[2].revents != 0 {
                self.control()?;
            }
            if fds[1].revents != 0 {
                self.read_input(&mut buf)?;
            }
        }
    }

    fn handle(&mut self, msg: ToHost) -> Result<Option<i32>> {
        match msg {
            ToHost::Output(d) => {
                self.io.output.write_all(&d)?;
                self.io.output.flush()?;
            }
            ToHost::Stderr(d) => {
                self.io.errors.write_all(&d)?;
                self.io.errors.flush()?;
            }
            ToHost::Error(m) => {
                let nl = if self.io.terminal.is_some() {
                    "\r\n"
                } else {
                    "\n"
                };
                write!(self.io.errors, "aivmm: in the guest: {}{nl}", printable(&m))?;
                self.io.errors.flush()?;
            }
            ToHost::Exited(status) => return Ok(Some(status.code())),
            ToHost::Ready { .. } => {
                return Err(Error::Unexpected {
                    msg: "a second Ready",
                    when: "after the command started",
                })
            }
        }
        Ok(None)
    }

    fn read_input(&mut self, buf: &mut [u8]) -> Result<()> {
        let Some(fd) = self.io.input else {
            return Ok(());
        };
        let n = loop {
            // SAFETY: reads into a valid buffer of the given length.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Ok(()),
                // EIO: the terminal hung up. Treat it as the end of input.
                _ if e.raw_os_error() == Some(libc::EIO) => break 0,
                _ => return Err(e.into()),
            }
        };
        if n == 0 {
            self.io.input = None;
            return self.conn.queue(&ToGuest::CloseInput);
        }
        self.conn.queue(&ToGuest::Input(buf[..n].to_vec()))
    }

    fn control(&mut self) -> Result<()> {
        for (kind, arg) in drain_control(self.control_rx)? {
            match kind {
                CMD_RESIZE => {
                    let rows = u16::from_le_bytes([arg[0], arg[1]]);
                    let cols = u16::from_le_bytes([arg[2], arg[3]]);
                    self.size = Some((rows, cols));
                    self.conn.queue(&ToGuest::Resize { rows, cols })?;
                }
                CMD_SIGNAL => self.conn.queue(&ToGuest::Signal(i32::from_le_bytes(arg)))?,
                CMD_SHUTDOWN => self.conn.queue(&ToGuest::Shutdown {
                    grace_ms: u32::from_le_bytes(arg),
                })?,
                CMD_CANCEL => return Err(Error::Cancelled),
                CMD_WINCH => {
                    let size = self.io.terminal.and_then(terminal_size);
                    if let (Some((rows, cols)), true) = (size, size != self.size) {
                        self.size = size;
                        self.conn.queue(&ToGuest::Resize { rows, cols })?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec() -> Spec {
        Spec {
            argv: vec!["true".into()],
            ..Spec::default()
        }
    }

    /// Runs a session against `agent`, a fake agent on the other end of the socket.
    fn with_fake_agent(
        agent: impl FnOnce(UnixStream) + Send + 'static,
        timeout: Duration,
    ) -> (Result<i32>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock");
        let mut session = Session::listen(&uds).unwrap();
        session.set_connect_timeout(timeout);
        assert_eq!(session.path(), dir.path().join("vsock_1024"));
        let path = session.path().to_path_buf();
        let t = std::thread::spawn(move || {
            if let Ok(s) = UnixStream::connect(path) {
                agent(s);
            }
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = session.run(
            &spec(),
            Io {
                input: None,
                terminal: None,
                output: &mut out,
                errors: &mut err,
            },
        );
        t.join().unwrap();
        (r, out)
    }

    #[test]
    fn a_well_behaved_agent() {
        let (r, out) = with_fake_agent(
            |mut s| {
                proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
                // First the host's clock, as it was just now.
                let Some(ToGuest::Clock { unix_ns }) = proto::read_message(&mut s).unwrap() else {
                    panic!("no clock first");
                };
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                let sent = Duration::from_nanos(unix_ns);
                assert!(sent <= now && now - sent < Duration::from_secs(5), "{sent:?} vs {now:?}");
                let start: ToGuest = proto::read_message(&mut s).unwrap().unwrap();
                assert_eq!(start, ToGuest::Start(spec()));
                assert_eq!(
                    proto::read_message::<ToGuest>(&mut s).unwrap(),
                    Some(ToGuest::CloseInput)
                );
                proto::write_message(&mut s, &ToHost::Output(b"hello".to_vec())).unwrap();
                proto::write_message(&mut s, &ToHost::Exited(ExitStatus::Signal(15))).unwrap();
            },
            Duration::from_secs(10),
        );
        assert_eq!(r.unwrap(), 143);
        assert_eq!(out, b"hello");
    }

    #[test]
    fn an_oversized_frame_is_an_error() {
        let (r, _) = with_fake_agent(
            |mut s| {
                proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
                let _ = s.write_all(&u32::MAX.to_le_bytes());
                let _ = s.write_all(&[2; 64]);
                std::thread::sleep(Duration::from_millis(200));
            },
            Duration::from_secs(10),
        );
        assert!(
            matches!(r, Err(Error::Protocol(proto::Error::TooLarge(_)))),
            "{r:?}"
        );
    }

    #[test]
    fn garbage_and_hangups() {
        let (r, _) = with_fake_agent(
            |mut s| s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap(),
            Duration::from_secs(10),
        );
        assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
        let (r, _) = with_fake_agent(
            |mut s| proto::write_message(&mut s, &ToHost::Ready { version: 99 }).unwrap(),
            Duration::from_secs(10),
        );
        assert!(matches!(r, Err(Error::Version(99))), "{r:?}");
        let (r, _) = with_fake_agent(
            |mut s| {
                proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
                proto::write_message(&mut s, &ToHost::Output(b"x".to_vec())).unwrap();
            },
            Duration::from_secs(10),
        );
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Disconnected), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the guest agent disconnected without an exit status"
        );
        let (r, _) = with_fake_agent(
            |mut s| {
                proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
                s.write_all(&[9, 0, 0, 0, 2, 1]).unwrap();
            },
            Duration::from_secs(10),
        );
        assert!(
            matches!(r, Err(Error::Protocol(proto::Error::Eof))),
            "{r:?}"
        );
    }

    /// Sends Ready, reads the host's first frames, then writes `bytes`.
    fn ready_then(bytes: Vec<u8>) -> impl FnOnce(UnixStream) + Send + 'static {
        move |mut s| {
            proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
            let _ = s.write_all(&bytes);
            // Let the host read before the hang-up.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn frames(msgs: &[ToHost]) -> Vec<u8> {
        msgs.iter()
            .flat_map(|m| proto::encode(m).unwrap())
            .collect()
    }

    /// A name, the bytes after Ready, and the error they must end in.
    type Case = (&'static str, Vec<u8>, fn(&Error) -> bool);

    #[test]
    fn hostile_messages_close_the_channel() {
        let cases: Vec<Case> = vec![
            ("unknown type", vec![1, 0, 0, 0, 0x42], |e| {
                matches!(e, Error::Protocol(proto::Error::UnknownType(0x42)))
            }),
            ("a host-bound type", vec![1, 0, 0, 0, 0x85], |e| {
                matches!(e, Error::Protocol(proto::Error::UnknownType(0x85)))
            }),
            ("empty frame", vec![0, 0, 0, 0], |e| {
                matches!(e, Error::Protocol(proto::Error::Empty))
            }),
            ("exit code 256", vec![6, 0, 0, 0, 4, 0, 0, 1, 0, 0], |e| {
                matches!(e, Error::Protocol(proto::Error::BadValue(_)))
            }),
            (
                "signal -1",
                vec![6, 0, 0, 0, 4, 1, 0xff, 0xff, 0xff, 0xff],
                |e| matches!(e, Error::Protocol(proto::Error::BadValue(_))),
            ),
            (
                "Error not UTF-8",
                vec![7, 0, 0, 0, 5, 2, 0, 0, 0, 0xc3, 0x28],
                |e| matches!(e, Error::Protocol(proto::Error::BadValue(_))),
            ),
            ("Ready padded", vec![6, 0, 0, 0, 1, 2, 0, 0, 0, 0], |e| {
                matches!(e, Error::Protocol(proto::Error::Trailing(1)))
            }),
            (
                "a second Ready",
                frames(&[ToHost::Ready { version: VERSION }]),
                |e| matches!(e, Error::Unexpected { .. }),
            ),
            ("cut in the header", vec![5, 0], |e| {
                matches!(e, Error::Protocol(proto::Error::Eof))
            }),
        ];
        for (what, bytes, ok) in cases {
            let (r, _) = with_fake_agent(ready_then(bytes), Duration::from_secs(10));
            let e = r.unwrap_err();
            assert!(ok(&e), "{what}: {e:?}");
            assert!(e.is_guest_fault(), "{what}");
        }
    }

    /// A bad frame in the same read as Ready ends the run at once, without
    /// waiting for more bytes or the agent's hang-up.
    #[test]
    fn a_bad_frame_right_after_ready_is_seen_at_once() {
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = closed.clone();
        let (r, _) = with_fake_agent(
            move |mut s| {
                let mut b = proto::encode(&ToHost::Ready { version: VERSION }).unwrap();
                b.extend([1, 0, 0, 0, 0x42]);
                s.write_all(&b).unwrap();
                // The host must hang up without this side writing or closing.
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut sink = Vec::new();
                if s.read_to_end(&mut sink).is_ok() {
                    seen.store(true, Ordering::SeqCst);
                }
            },
            Duration::from_secs(10),
        );
        assert!(
            matches!(r, Err(Error::Protocol(proto::Error::UnknownType(0x42)))),
            "{r:?}"
        );
        assert!(closed.load(Ordering::SeqCst));
    }

    #[test]
    fn messages_before_ready_are_out_of_turn() {
        for m in [
            ToHost::Exited(ExitStatus::Code(0)),
            ToHost::Output(b"spoof".to_vec()),
            ToHost::Error("x".into()),
        ] {
            let name = m.name();
            let (r, out) = with_fake_agent(
                move |mut s| {
                    proto::write_message(&mut s, &m).unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                },
                Duration::from_secs(10),
            );
            let e = r.unwrap_err();
            assert!(
                matches!(e, Error::Unexpected { msg, .. } if msg == name),
                "{e:?}"
            );
            assert_eq!(
                e.to_string(),
                format!("the guest agent sent {name} before Ready")
            );
            assert!(out.is_empty());
        }
    }

    /// 64 MiB of output in frames of every size reaches the writer whole; the
    /// session reads 64 KiB at a time and takes each message before reading on.
    #[test]
    fn a_flood_of_output_is_relayed() {
        let (r, out) = with_fake_agent(
            |mut s| {
                proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
                let mut sent = 0;
                let mut n = 0usize;
                while sent < 64 << 20 {
                    let len = [0, 1, proto::MAX_FRAME - 1, MAX_CHUNK, 7][n % 5];
                    n += 1;
                    proto::write_message(&mut s, &ToHost::Output(vec![b'x'; len])).unwrap();
                    sent += len;
                }
                proto::write_message(&mut s, &ToHost::Exited(ExitStatus::Code(7))).unwrap();
            },
            Duration::from_secs(30),
        );
        assert_eq!(r.unwrap(), 7);
        assert!(out.len() >= 64 << 20 && out.iter().all(|&b| b == b'x'));
    }

    /// Random bytes after Ready (and a few without it): the session ends with a
    /// status or an error, never a panic or a hang.
    #[test]
    fn random_agent_streams_end_cleanly() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..300 {
            let len = (next() % 256) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly plausible headers, so the bodies reach the message decoder.
            if case % 3 != 0 && bytes.len() > 5 {
                let body = (bytes.len() - 4) as u32;
                bytes[..4].copy_from_slice(&body.to_le_bytes());
                bytes[4] = [1, 2, 3, 4, 5][(next() % 5) as usize];
            }
            let (r, _) = if case % 10 == 0 {
                with_fake_agent(
                    move |mut s| {
                        let _ = s.write_all(&bytes);
                    },
                    Duration::from_secs(10),
                )
            } else {
                with_fake_agent(ready_then(bytes), Duration::from_secs(10))
            };
            if let Err(e) = r {
                assert!(
                    !matches!(e, Error::Timeout(_) | Error::Io(_)),
                    "case {case}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn only_one_agent_connection_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let session = Session::listen(&dir.path().join("v")).unwrap();
        let path = session.path().to_path_buf();
        let t = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&path).unwrap();
            proto::write_message(&mut s, &ToHost::Ready { version: VERSION }).unwrap();
            let _: Option<ToGuest> = proto::read_message(&mut s).unwrap();
            // The first connection is running; a second finds no socket.
            assert!(UnixStream::connect(&path).is_err());
            proto::write_message(&mut s, &ToHost::Exited(ExitStatus::Code(0))).unwrap();
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = session.run(
            &spec(),
            Io {
                input: None,
                terminal: None,
                output: &mut out,
                errors: &mut err,
            },
        );
        t.join().unwrap();
        assert_eq!(r.unwrap(), 0);
    }

    #[test]
    fn guest_errors_are_printable() {
        assert_eq!(printable("no such file"), "no such file");
        assert_eq!(printable("a\r\x1b[2Jb\n"), "a\\r\\u{1b}[2Jb\\n");
        let long = printable(&"é".repeat(5000));
        assert_eq!(long.chars().count(), MAX_ERROR_SHOWN + 3);
    }

    #[test]
    fn an_agent_that_never_comes() {
        let dir = tempfile::tempdir().unwrap();
        let mut session = Session::listen(&dir.path().join("v")).unwrap();
        session.set_connect_timeout(Duration::from_millis(200));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let t = Instant::now();
        let r = session.run(
            &spec(),
            Io {
                input: None,
                terminal: None,
                output: &mut out,
                errors: &mut err,
            },
        );
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("the guest agent did not connect within 0.2 s ("),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(200));
        // An agent that connects but never says Ready times out too.
        let (r, _) = with_fake_agent(
            |_s| std::thread::sleep(Duration::from_millis(400)),
            Duration::from_millis(200),
        );
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    }

    /// `shutdown` before the agent is up ends `run` at once with StoppedEarly,
    /// whether no agent has connected or one connected but never said Ready,
    /// instead of waiting out the connect timeout.
    #[test]
    fn shutdown_while_waiting_for_the_agent_stops_at_once() {
        let run = |session: &Session| {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            session.run(
                &spec(),
                Io {
                    input: None,
                    terminal: None,
                    output: &mut out,
                    errors: &mut err,
                },
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v");
        let mut session = Session::listen(&uds).unwrap();
        session.set_connect_timeout(Duration::from_secs(60));
        let control = session.control();
        let stopper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            control.shutdown(0);
        });
        let t = Instant::now();
        assert!(matches!(run(&session), Err(Error::StoppedEarly)));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        stopper.join().unwrap();
        // An agent that connects and then says nothing.
        let control = session.control();
        let path = agent_socket_path(&uds);
        let agent = std::thread::spawn(move || {
            let s = std::os::unix::net::UnixStream::connect(path).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            control.shutdown(0);
            std::thread::sleep(Duration::from_millis(500));
            drop(s);
        });
        let t = Instant::now();
        let r = run(&session);
        assert!(matches!(r, Err(Error::StoppedEarly)), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        agent.join().unwrap();
    }

    #[test]
    fn cancel_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v");
        // A stale socket from an earlier run is replaced; other files are not.
        drop(UnixListener::bind(agent_socket_path(&uds)).unwrap());
        let session = Session::listen(&uds).unwrap();
        let control = session.control();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            control.cancel();
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = session.run(
            &spec(),
            Io {
                input: None,
                terminal: None,
                output: &mut out,
                errors: &mut err,
            },
        );
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        t.join().unwrap();
        drop(session);
        assert!(!agent_socket_path(&uds).exists());
        std::fs::write(agent_socket_path(&uds), "not a socket").unwrap();
        assert!(matches!(Session::listen(&uds), Err(Error::Listen { .. })));
    }
}
