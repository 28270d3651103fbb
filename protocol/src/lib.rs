//! The wire protocol between aivmm (the host) and `aivmm-agent` (in the guest).
//!
//! The agent connects from the guest to the host's vsock CID 2, port [`AGENT_PORT`];
//! aivmm's hybrid vsock hands that connection to the unix socket `<uds_path>_1024`,
//! where the host-side session listens. One connection runs one command:
//!
//! ```text
//! agent → host   Ready { version }
//! host  → agent  Clock(now)                              (first, then now and then)
//! host  → agent  Setup(Setup)                            (optional, before Start)
//! host  → agent  Start(Spec)
//! host  → agent  Input… Resize… Signal… CloseInput      (any order, any number)
//! agent → host   Output… Stderr…                         (interleaved with the above)
//! agent → host   Exited(status)                          (last frame; the agent exits)
//! ```
//!
//! `aivmm exec` uses the same exchange the other way round: the agent listens on
//! guest vsock port [`EXEC_PORT`], the host connects (through the hybrid vsock's
//! `CONNECT` line), and each connection runs one more command beside the first.
//! [`ToGuest::Shutdown`] on the first connection ends the guest: the agent stops
//! the command (SIGHUP and SIGTERM, SIGKILL after the grace time), reports
//! `Exited` and exits, and the guest's init powers off.
//!
//! If the command cannot be started, the agent sends [`ToHost::Error`] and then
//! `Exited(Code(127))`.
//!
//! # Framing
//!
//! Every message is one frame: a `u32` little-endian length, then that many bytes:
//! one type byte and the payload. The length counts the type byte, so it is at least
//! 1 and at most [`MAX_FRAME`]; a reader refuses anything else before allocating.
//! Integers are little-endian. A string or byte string is a `u32` length and the
//! bytes (strings are UTF-8 without NUL). An option is a byte 0 (none) or 1 (some)
//! and then the value. A list is a `u32` count and the items.
//!
//! | type | direction | payload |
//! |------|-----------|---------|
//! | 0x01 `Ready` | guest→host | `u32 version` |
//! | 0x02 `Output` | guest→host | the rest of the frame: stdout (or pty) bytes |
//! | 0x03 `Stderr` | guest→host | the rest of the frame: stderr bytes (pipe mode only) |
//! | 0x04 `Exited` | guest→host | `u8 kind` (0 code, 1 signal), `i32 value` |
//! | 0x05 `Error` | guest→host | `string message` |
//! | 0x81 `Start` | host→guest | [`Spec`], see [`Spec`]'s docs for the field order |
//! | 0x82 `Input` | host→guest | the rest of the frame: bytes for the command's stdin |
//! | 0x83 `Resize` | host→guest | `u16 rows`, `u16 cols` |
//! | 0x84 `Signal` | host→guest | `i32 signal number` |
//! | 0x85 `CloseInput` | host→guest | nothing |
//! | 0x86 `Setup` | host→guest | [`Setup`], see its docs for the field order |
//! | 0x87 `Shutdown` | host→guest | `u32 grace_ms` |
//! | 0x88 `Clock` | host→guest | `u64 unix_ns` |
//!
//! The two directions use separate type ranges, so a frame sent the wrong way is an
//! unknown type. A decoding error leaves the stream out of step: drop the connection.

use std::io::{self, Read, Write};

/// The vsock port the agent connects to on the host (CID 2).
pub const AGENT_PORT: u32 = 1024;
/// The guest vsock port the agent listens on for `aivmm exec` connections.
pub const EXEC_PORT: u32 = 1025;
/// The protocol version in [`ToHost::Ready`]. Bumped on any incompatible change.
pub const VERSION: u32 = 3;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;
/// The largest frame body (type byte and payload) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The most data bytes a sender puts in one `Output`, `Stderr` or `Input` frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// The largest signal number in [`ExitStatus::Signal`]: a shell's `128 + N` stays
/// an exit status (at most 255).
pub const MAX_SIGNAL: i32 = 127;

/// Errors while encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame's length prefix is over the limit.
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME} bytes")]
    TooLarge(u64),
    /// A frame has no type byte.
    #[error("empty frame (length 0)")]
    Empty,
    /// A frame's type byte is not a message of this direction.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A frame is shorter than its message.
    #[error("truncated message")]
    Truncated,
    /// A frame is longer than its message.
    #[error("{0} stray bytes after the message")]
    Trailing(usize),
    /// A field holds a value that is not allowed.
    #[error("bad {0}")]
    BadValue(&'static str),
    /// The stream ended inside a frame.
    #[error("the connection closed in the middle of a frame")]
    Eof,
    /// Reading or writing the stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// `Result` of protocol operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What the host asks the agent to run.
///
/// Wire order: `argv` (list of strings), `env` (list of string pairs), `cwd`
/// (option string), `uid` (option u32), `gid` (option u32), `home` (option string),
/// `term` (option string), `rows` (u16), `cols` (u16), `tty` (u8 0 or 1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The program and its arguments; `argv[0]` is looked up in `PATH`. Never empty.
    pub argv: Vec<String>,
    /// Environment variables, applied last (they override `HOME`, `TERM`, `PATH`).
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's own if `None`.
    pub cwd: Option<String>,
    /// Run as this user id (after `setgid`).
    pub uid: Option<u32>,
    /// Run with this group id (and no supplementary groups).
    pub gid: Option<u32>,
    /// `HOME` for the command.
    pub home: Option<String>,
    /// `TERM` for the command (tty mode).
    pub term: Option<String>,
    /// Terminal rows (tty mode; 0 leaves the pty's default).
    pub rows: u16,
    /// Terminal columns (tty mode; 0 leaves the pty's default).
    pub cols: u16,
    /// Run on a new pseudo-terminal (stdout and stderr merged) instead of pipes.
    pub tty: bool,
}

/// A virtio-fs share the agent mounts before the command starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mount {
    /// The virtio-fs tag.
    pub tag: String,
    /// The absolute guest path (created if missing).
    pub path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// What the agent prepares, as root, before the first command starts.
///
/// Wire order: `mounts` (list of `tag`, `path`, `u8 read_only`), `links` (list of
/// string pairs: link path, target), `ssh_key` (option string), `uid` (u32), `gid`
/// (u32), `home` (string).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Setup {
    /// Shares to mount, in order.
    pub mounts: Vec<Mount>,
    /// Symbolic links to make (path, target), owned by `uid`:`gid`; an existing
    /// file at the path is replaced.
    pub links: Vec<(String, String)>,
    /// An OpenSSH public key: authorize it for the user and start sshd.
    pub ssh_key: Option<String>,
    /// The user's id.
    pub uid: u32,
    /// The user's group id.
    pub gid: u32,
    /// The user's home directory in the guest.
    pub home: String,
}

/// How the guest command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 plus the signal number.
    pub fn code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => s.saturating_add(128),
        }
    }

    /// Whether a process can end this way: a code of 0..=255 or a signal of
    /// 1..=[`MAX_SIGNAL`]. The decoder refuses anything else.
    pub fn is_valid(self) -> bool {
        match self {
            Self::Code(c) => (0..=255).contains(&c),
            Self::Signal(s) => (1..=MAX_SIGNAL).contains(&s),
        }
    }
}

/// Messages from the guest agent to the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToHost {
    /// The agent is connected and waits for [`ToGuest::Start`].
    Ready {
        /// The agent's [`VERSION`].
        version: u32,
    },
    /// Output of the command: its pty, or its stdout in pipe mode.
    Output(Vec<u8>),
    /// The command's stderr (pipe mode only).
    Stderr(Vec<u8>),
    /// The command ended; all its output was sent before this.
    Exited(ExitStatus),
    /// The agent could not do what was asked (e.g. the program does not exist).
    Error(String),
}

impl ToHost {
    /// The message's name, for log lines about messages out of turn.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready { .. } => "Ready",
            Self::Output(_) => "Output",
            Self::Stderr(_) => "Stderr",
            Self::Exited(_) => "Exited",
            Self::Error(_) => "Error",
        }
    }
}

/// Messages from the host to the guest agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToGuest {
    /// Run a command. Sent once, after [`ToHost::Ready`].
    Start(Spec),
    /// Bytes for the command's input.
    Input(Vec<u8>),
    /// The host terminal changed size.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Send this signal to the command's (foreground) process group.
    Signal(i32),
    /// No more input: close the command's stdin (pipe mode) or send the terminal's
    /// end-of-file character (tty mode).
    CloseInput,
    /// Prepare the guest (mounts, links, sshd). Sent at most once, before `Start`.
    Setup(Setup),
    /// Stop the command and let the guest power off: SIGHUP and SIGTERM now,
    /// SIGKILL to what is left after `grace_ms`.
    Shutdown {
        /// Milliseconds between SIGTERM and SIGKILL.
        grace_ms: u32,
    },
    /// The host's wall clock as it sent this. Files in /work carry the host's
    /// times, so the guest's clock must not lag it (make would see files from the
    /// future): the agent moves the guest's clock forward to it. Sent first on
    /// every connection, then every [`CLOCK_RESYNC_SECS`] while a command runs.
    Clock {
        /// Nanoseconds since the Unix epoch.
        unix_ns: u64,
    },
}

/// How often the host sends [`ToGuest::Clock`] during a command.
pub const CLOCK_RESYNC_SECS: u64 = 30;

/// A message type of one direction.
pub trait Message: Sized {
    /// Appends the type byte and the payload to `out`.
    fn encode_body(&self, out: &mut Vec<u8>);
    /// Parses a frame body (type byte and payload).
    fn decode_body(body: &[u8]) -> Result<Self>;
}

const READY: u8 = 0x01;
const OUTPUT: u8 = 0x02;
const STDERR: u8 = 0x03;
const EXITED: u8 = 0x04;
const ERROR: u8 = 0x05;
const START: u8 = 0x81;
const INPUT: u8 = 0x82;
const RESIZE: u8 = 0x83;
const SIGNAL: u8 = 0x84;
const CLOSE_INPUT: u8 = 0x85;
const SETUP: u8 = 0x86;
const SHUTDOWN: u8 = 0x87;
const CLOCK: u8 = 0x88;

impl Message for ToHost {
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Self::Ready { version } => {
                out.push(READY);
                out.extend(version.to_le_bytes());
            }
            Self::Output(d) => {
                out.push(OUTPUT);
                out.extend(d);
            }
            Self::Stderr(d) => {
                out.push(STDERR);
                out.extend(d);
            }
            Self::Exited(s) => {
                out.push(EXITED);
                let (kind, v) = match s {
                    ExitStatus::Code(c) => (0u8, c),
                    ExitStatus::Signal(n) => (1, n),
                };
                out.push(kind);
                out.extend(v.to_le_bytes());
            }
            Self::Error(m) => {
                out.push(ERROR);
                put_str(out, m);
            }
        }
    }

    fn decode_body(body: &[u8]) -> Result<Self> {
        let (&kind, payload) = body.split_first().ok_or(Error::Empty)?;
        let mut r = Cursor(payload);
        let msg = match kind {
            READY => Self::Ready { version: r.u32()? },
            OUTPUT => Self::Output(r.rest()),
            STDERR => Self::Stderr(r.rest()),
            EXITED => {
                let k = r.u8()?;
                let v = r.i32()?;
                let status = match k {
                    0 => ExitStatus::Code(v),
                    1 => ExitStatus::Signal(v),
                    _ => return Err(Error::BadValue("exit status kind")),
                };
                if !status.is_valid() {
                    return Err(Error::BadValue("exit status: out of range"));
                }
                Self::Exited(status)
            }
            ERROR => Self::Error(r.string()?),
            k => return Err(Error::UnknownType(k)),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl Message for ToGuest {
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Self::Start(s) => {
                out.push(START);
                s.encode(out);
            }
            Self::Input(d) => {
                out.push(INPUT);
                out.extend(d);
            }
            Self::Resize { rows, cols } => {
                out.push(RESIZE);
                out.extend(rows.to_le_bytes());
                out.extend(cols.to_le_bytes());
            }
            Self::Signal(n) => {
                out.push(SIGNAL);
                out.extend(n.to_le_bytes());
            }
            Self::CloseInput => out.push(CLOSE_INPUT),
            Self::Setup(s) => {
                out.push(SETUP);
                s.encode(out);
            }
            Self::Shutdown { grace_ms } => {
                out.push(SHUTDOWN);
                out.extend(grace_ms.to_le_bytes());
            }
            Self::Clock { unix_ns } => {
                out.push(CLOCK);
                out.extend(unix_ns.to_le_bytes());
            }
        }
    }

    fn decode_body(body: &[u8]) -> Result<Self> {
        let (&kind, payload) = body.split_first().ok_or(Error::Empty)?;
        let mut r = Cursor(payload);
        let msg = match kind {
            START => Self::Start(Spec::decode(&mut r)?),
            INPUT => Self::Input(r.rest()),
            RESIZE => Self::Resize {
                rows: r.u16()?,
                cols: r.u16()?,
            },
            SIGNAL => Self::Signal(r.i32()?),
            CLOSE_INPUT => Self::CloseInput,
            SETUP => Self::Setup(Setup::decode(&mut r)?),
            SHUTDOWN => Self::Shutdown {
                grace_ms: r.u32()?,
            },
            CLOCK => Self::Clock { unix_ns: r.u64()? },
            k => return Err(Error::UnknownType(k)),
        };
        r.finish()?;
        Ok(msg)
    }
}

impl Spec {
    fn encode(&self, out: &mut Vec<u8>) {
        put_len(out, self.argv.len());
        for a in &self.argv {
            put_str(out, a);
        }
        put_len(out, self.env.len());
        for (k, v) in &self.env {
            put_str(out, k);
            put_str(out, v);
        }
        put_opt(out, &self.cwd, |o, s| put_str(o, s));
        put_opt(out, &self.uid, |o, v| o.extend(v.to_le_bytes()));
        put_opt(out, &self.gid, |o, v| o.extend(v.to_le_bytes()));
        put_opt(out, &self.home, |o, s| put_str(o, s));
        put_opt(out, &self.term, |o, s| put_str(o, s));
        out.extend(self.rows.to_le_bytes());
        out.extend(self.cols.to_le_bytes());
        out.push(u8::from(self.tty));
    }

    fn decode(r: &mut Cursor<'_>) -> Result<Self> {
        // Each list item takes at least 4 bytes, which bounds the counts by the frame
        // size; the vectors grow as items parse, never from the count alone.
        let n = r.u32()?;
        let mut argv = Vec::new();
        for _ in 0..n {
            argv.push(r.string()?);
        }
        if argv.is_empty() {
            return Err(Error::BadValue("argv: it is empty"));
        }
        let n = r.u32()?;
        let mut env = Vec::new();
        for _ in 0..n {
            let k = r.string()?;
            if k.is_empty() || k.contains('=') {
                return Err(Error::BadValue("environment variable name"));
            }
            env.push((k, r.string()?));
        }
        Ok(Self {
            argv,
            env,
            cwd: r.opt(Cursor::string)?,
            uid: r.opt(Cursor::u32)?,
            gid: r.opt(Cursor::u32)?,
            home: r.opt(Cursor::string)?,
            term: r.opt(Cursor::string)?,
            rows: r.u16()?,
            cols: r.u16()?,
            tty: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(Error::BadValue("tty flag")),
            },
        })
    }
}

/// A guest path for a mount or link: absolute, no `..`, no empty name.
fn check_guest_path(p: &str) -> Result<()> {
    let ok = p.starts_with('/') && p.split('/').skip(1).all(|c| !c.is_empty() && c != "..");
    if ok && p != "/" {
        Ok(())
    } else {
        Err(Error::BadValue("guest path"))
    }
}

impl Setup {
    fn encode(&self, out: &mut Vec<u8>) {
        put_len(out, self.mounts.len());
        for m in &self.mounts {
            put_str(out, &m.tag);
            put_str(out, &m.path);
            out.push(u8::from(m.read_only));
        }
        put_len(out, self.links.len());
        for (path, target) in &self.links {
            put_str(out, path);
            put_str(out, target);
        }
        put_opt(out, &self.ssh_key, |o, s| put_str(o, s));
        out.extend(self.uid.to_le_bytes());
        out.extend(self.gid.to_le_bytes());
        put_str(out, &self.home);
    }

    fn decode(r: &mut Cursor<'_>) -> Result<Self> {
        let n = r.u32()?;
        let mut mounts = Vec::new();
        for _ in 0..n {
            let tag = r.string()?;
            let path = r.string()?;
            check_guest_path(&path)?;
            let read_only = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(Error::BadValue("read-only flag")),
            };
            if tag.is_empty() {
                return Err(Error::BadValue("mount tag"));
            }
            mounts.push(Mount {
                tag,
                path,
                read_only,
            });
        }
        let n = r.u32()?;
        let mut links = Vec::new();
        for _ in 0..n {
            let path = r.string()?;
            check_guest_path(&path)?;
            links.push((path, r.string()?));
        }
        let ssh_key = r.opt(Cursor::string)?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let home = r.string()?;
        check_guest_path(&home)?;
        Ok(Self {
            mounts,
            links,
            ssh_key,
            uid,
            gid,
            home,
        })
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Anything this long cannot fit a frame; `encode` refuses the frame.
    out.extend(u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend(s.as_bytes());
}

fn put_opt<T>(out: &mut Vec<u8>, v: &Option<T>, f: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            f(out, v);
        }
    }
}

/// Reads fields off a frame payload; every read checks the length.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(Error::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = usize::try_from(self.u32()?).map_err(|_| Error::Truncated)?;
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| Error::BadValue("string: not UTF-8"))?;
        if s.contains('\0') {
            return Err(Error::BadValue("string: contains NUL"));
        }
        Ok(s.to_string())
    }

    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            _ => Err(Error::BadValue("option flag")),
        }
    }

    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }

    fn finish(&self) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(Error::Trailing(n)),
        }
    }
}

/// Appends one frame holding `msg` to `out`. Fails, leaving `out` as it was, if the
/// message does not fit in [`MAX_FRAME`].
pub fn encode_into<M: Message>(msg: &M, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend([0u8; HEADER_LEN]);
    msg.encode_body(out);
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(Error::TooLarge(len as u64));
    }
    // `len` is at most MAX_FRAME, which fits a u32.
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// One frame holding `msg`.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    encode_into(msg, &mut v)?;
    Ok(v)
}

/// Writes one frame to a blocking stream.
pub fn write_message<M: Message>(w: &mut impl Write, msg: &M) -> Result<()> {
    w.write_all(&encode(msg)?)?;
    Ok(())
}

/// Checks a length prefix.
fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize> {
    let len = u32::from_le_bytes(header);
    match usize::try_from(len) {
        Ok(0) => Err(Error::Empty),
        Ok(n) if n <= MAX_FRAME => Ok(n),
        _ => Err(Error::TooLarge(u64::from(len))),
    }
}

/// Reads one frame from a blocking stream. `Ok(None)` is a clean end of stream
/// between frames.
pub fn read_message<M: Message>(r: &mut impl Read) -> Result<Option<M>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Eof),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Eof,
        _ => Error::Io(e),
    })?;
    M::decode_body(&body).map(Some)
}

/// Splits a byte stream that arrives in arbitrary pieces (non-blocking reads) into
/// messages. It holds less than one whole frame ([`HEADER_LEN`] + [`MAX_FRAME`])
/// plus the last piece fed, so a reader that feeds bounded pieces and takes every
/// complete message before feeding again holds a bounded buffer whatever the
/// stream says.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
}

impl Decoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.len() + data.len() > HEADER_LEN + MAX_FRAME {
            // Drop the messages already taken before growing past one frame.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The bytes the decoder holds now (taken messages not yet dropped included).
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if one is buffered. An error means the stream is
    /// corrupt; the decoder must not be used again.
    pub fn next_message<M: Message>(&mut self) -> Result<Option<M>> {
        let avail = &self.buf[self.pos..];
        let Some(header) = avail.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        let len = frame_len(h)?;
        let Some(body) = avail.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        let msg = M::decode_body(body)?;
        self.pos += HEADER_LEN + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Some(msg))
    }

    /// Whether bytes of an incomplete frame are buffered (so an end of stream now
    /// would cut a frame).
    pub fn has_partial(&self) -> bool {
        self.pos < self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec() -> Spec {
        Spec {
            argv: vec!["sh".into(), "-c".into(), "echo héllo".into()],
            env: vec![("A".into(), "1".into()), ("EMPTY".into(), String::new())],
            cwd: Some("/work".into()),
            uid: Some(1000),
            gid: None,
            home: Some("/home/u".into()),
            term: Some("xterm-256color".into()),
            rows: 24,
            cols: 80,
            tty: true,
        }
    }

    fn all_to_guest() -> Vec<ToGuest> {
        vec![
            ToGuest::Start(spec()),
            ToGuest::Start(Spec {
                argv: vec!["true".into()],
                ..Spec::default()
            }),
            ToGuest::Input(vec![]),
            ToGuest::Input(b"\x03abc\n".to_vec()),
            ToGuest::Resize {
                rows: 50,
                cols: 200,
            },
            ToGuest::Signal(15),
            ToGuest::CloseInput,
            ToGuest::Setup(setup()),
            ToGuest::Setup(Setup {
                home: "/root".into(),
                ..Setup::default()
            }),
            ToGuest::Shutdown { grace_ms: 5000 },
            ToGuest::Clock {
                unix_ns: 1_796_000_000_123_456_789,
            },
        ]
    }

    fn setup() -> Setup {
        Setup {
            mounts: vec![
                Mount {
                    tag: "share0".into(),
                    path: "/home/me/notes".into(),
                    read_only: true,
                },
                Mount {
                    tag: "claude".into(),
                    path: "/home/user/.claude".into(),
                    read_only: false,
                },
            ],
            links: vec![("/home/user/.claude.json".into(), "/run/aivmm/claude/.claude.json".into())],
            ssh_key: Some("ssh-ed25519 AAAA test".into()),
            uid: 1000,
            gid: 100,
            home: "/home/user".into(),
        }
    }

    #[test]
    fn setup_paths_are_checked() {
        let body = |s: Setup| encode(&ToGuest::Setup(s)).unwrap()[HEADER_LEN..].to_vec();
        for bad in ["relative", "/", "/a/../etc", "/a//b", ""] {
            let mut s = setup();
            s.mounts[0].path = bad.into();
            assert!(matches!(ToGuest::decode_body(&body(s)), Err(Error::BadValue(_))), "{bad}");
            let mut s = setup();
            s.links[0].0 = bad.into();
            assert!(matches!(ToGuest::decode_body(&body(s)), Err(Error::BadValue(_))), "{bad}");
        }
        let mut s = setup();
        s.mounts[0].tag = String::new();
        assert!(matches!(ToGuest::decode_body(&body(s)), Err(Error::BadValue(_))));
        assert_eq!(
            encode(&ToGuest::Shutdown { grace_ms: 258 }).unwrap(),
            [5, 0, 0, 0, 0x87, 2, 1, 0, 0]
        );
    }

    fn all_to_host() -> Vec<ToHost> {
        vec![
            ToHost::Ready { version: VERSION },
            ToHost::Output(b"hi\n".to_vec()),
            ToHost::Output(vec![0; MAX_CHUNK]),
            ToHost::Stderr(b"oops".to_vec()),
            ToHost::Exited(ExitStatus::Code(3)),
            ToHost::Exited(ExitStatus::Code(255)),
            ToHost::Exited(ExitStatus::Signal(9)),
            ToHost::Exited(ExitStatus::Signal(MAX_SIGNAL)),
            ToHost::Error("no such file".into()),
        ]
    }

    #[test]
    fn round_trip() {
        for m in all_to_guest() {
            let f = encode(&m).unwrap();
            assert_eq!(read_message::<ToGuest>(&mut &f[..]).unwrap(), Some(m));
        }
        for m in all_to_host() {
            let f = encode(&m).unwrap();
            assert_eq!(read_message::<ToHost>(&mut &f[..]).unwrap(), Some(m));
        }
    }

    #[test]
    fn wire_bytes_are_stable() {
        assert_eq!(
            encode(&ToHost::Ready { version: 1 }).unwrap(),
            [5, 0, 0, 0, 1, 1, 0, 0, 0]
        );
        assert_eq!(
            encode(&ToGuest::Resize { rows: 24, cols: 80 }).unwrap(),
            [5, 0, 0, 0, 0x83, 24, 0, 80, 0]
        );
        assert_eq!(
            encode(&ToHost::Exited(ExitStatus::Signal(2))).unwrap(),
            [6, 0, 0, 0, 4, 1, 2, 0, 0, 0]
        );
        assert_eq!(encode(&ToGuest::CloseInput).unwrap(), [1, 0, 0, 0, 0x85]);
        let s = Spec {
            argv: vec!["a".into()],
            ..Spec::default()
        };
        let want = [
            &[24u8, 0, 0, 0, 0x81][..],
            &[1, 0, 0, 0, 1, 0, 0, 0, b'a'],
            &[0, 0, 0, 0],
            &[0, 0, 0, 0, 0],
            &[0, 0, 0, 0, 0],
        ]
        .concat();
        assert_eq!(encode(&ToGuest::Start(s)).unwrap(), want);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(ExitStatus::Code(3).code(), 3);
        assert_eq!(ExitStatus::Signal(2).code(), 130);
        assert_eq!(ExitStatus::Signal(i32::MAX).code(), i32::MAX);
    }

    #[test]
    fn exit_statuses_out_of_range_are_refused() {
        let frame = |kind: u8, v: i32| {
            let mut b = vec![EXITED, kind];
            b.extend(v.to_le_bytes());
            ToHost::decode_body(&b)
        };
        for (kind, v) in [
            (0, -1),
            (0, 256),
            (0, i32::MIN),
            (0, i32::MAX),
            (1, 0),
            (1, -9),
            (1, MAX_SIGNAL + 1),
            (1, i32::MAX),
        ] {
            assert!(
                matches!(frame(kind, v), Err(Error::BadValue(_))),
                "{kind} {v}"
            );
        }
        assert!(frame(0, 0).is_ok() && frame(0, 255).is_ok() && frame(1, 1).is_ok());
    }

    /// A guest that writes frames faster than the host takes them: a reader that
    /// feeds 64 KiB pieces and takes every message in between never holds more
    /// than one frame and one piece.
    #[test]
    fn a_flood_is_held_in_bounded_memory() {
        let frames: Vec<u8> = [
            ToHost::Output(vec![1; MAX_FRAME - 1]),
            ToHost::Output(vec![2; 3]),
            ToHost::Output(vec![]),
            ToHost::Stderr(vec![3; MAX_CHUNK]),
        ]
        .iter()
        .flat_map(|m| encode(m).unwrap())
        .collect();
        let stream = frames.repeat(8);
        for piece in [MAX_CHUNK, 4097, MAX_FRAME + HEADER_LEN + 1] {
            let mut d = Decoder::new();
            let mut n = 0;
            for p in stream.chunks(piece) {
                d.feed(p);
                assert!(d.held() < HEADER_LEN + MAX_FRAME + p.len(), "{}", d.held());
                while d.next_message::<ToHost>().unwrap().is_some() {
                    n += 1;
                }
            }
            assert_eq!(n, 32);
            assert!(!d.has_partial());
        }
    }

    mod props {
        #![allow(clippy::unwrap_used)]

        use super::super::*;
        use super::all_to_host;
        use proptest::prelude::*;

        /// Feeds `stream` in pieces of the given sizes (cycled) and takes every
        /// message in between, as the host's session does. Returns the messages
        /// and the first error.
        fn run(stream: &[u8], pieces: &[usize]) -> (Vec<ToHost>, Option<Error>) {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            let mut rest = stream;
            let mut i = 0;
            while !rest.is_empty() {
                let n = pieces[i % pieces.len()].clamp(1, rest.len());
                i += 1;
                let (p, tail) = rest.split_at(n);
                rest = tail;
                d.feed(p);
                assert!(d.held() < HEADER_LEN + MAX_FRAME + p.len());
                loop {
                    match d.next_message::<ToHost>() {
                        Ok(Some(m)) => got.push(m),
                        Ok(None) => break,
                        Err(e) => return (got, Some(e)),
                    }
                }
            }
            (got, None)
        }

        /// A frame as a hostile agent might write it: a valid or random length,
        /// a known or random type byte, random payload bytes.
        fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
            (
                prop_oneof![
                    Just(READY),
                    Just(OUTPUT),
                    Just(STDERR),
                    Just(EXITED),
                    Just(ERROR),
                    any::<u8>()
                ],
                proptest::collection::vec(any::<u8>(), 0..64),
                prop_oneof![
                    3 => Just(None),
                    1 => any::<u32>().prop_map(Some),
                ],
            )
                .prop_map(|(kind, payload, len)| {
                    let body_len = payload.len() as u32 + 1;
                    let mut f = len.unwrap_or(body_len).to_le_bytes().to_vec();
                    f.push(kind);
                    f.extend(payload);
                    f
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn random_bytes_never_panic(
                stream in proptest::collection::vec(any::<u8>(), 0..4096),
                pieces in proptest::collection::vec(1usize..600, 1..8),
            ) {
                let _ = run(&stream, &pieces);
                let _ = read_message::<ToHost>(&mut &stream[..]);
            }

            #[test]
            fn hostile_frames_never_panic(
                frames in proptest::collection::vec(hostile_frame(), 0..16),
                pieces in proptest::collection::vec(1usize..200, 1..8),
            ) {
                let stream = frames.concat();
                let _ = run(&stream, &pieces);
                let mut r = &stream[..];
                while let Ok(Some(_)) = read_message::<ToHost>(&mut r) {}
            }

            /// Good messages, then one bad frame: every good message comes out in
            /// order, then the error, whatever the split.
            #[test]
            fn good_messages_then_a_bad_frame(
                picks in proptest::collection::vec(0usize..9, 0..12),
                bad in 0usize..6,
                pieces in proptest::collection::vec(1usize..300, 1..8),
            ) {
                let all = all_to_host();
                let good: Vec<ToHost> = picks.iter().map(|&i| all[i % all.len()].clone()).collect();
                let mut stream: Vec<u8> = good.iter().flat_map(|m| encode(m).unwrap()).collect();
                let bad_frame: Vec<u8> = match bad {
                    0 => (MAX_FRAME as u32 + 1).to_le_bytes().to_vec(),
                    1 => vec![0, 0, 0, 0],
                    2 => vec![1, 0, 0, 0, 0x42],
                    3 => vec![6, 0, 0, 0, EXITED, 0, 0, 1, 0, 0],
                    4 => vec![5, 0, 0, 0, ERROR, 1, 0, 0, 0],
                    _ => vec![2, 0, 0, 0, READY, 1],
                };
                stream.extend(&bad_frame);
                let (got, err) = run(&stream, &pieces);
                prop_assert_eq!(got, good);
                prop_assert!(err.is_some());
            }
        }
    }

    #[test]
    fn decoder_handles_any_split() {
        let msgs = all_to_host();
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for chunk in [1, 2, 3, 5, 7, 4096, stream.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                d.feed(piece);
                while let Some(m) = d.next_message::<ToHost>().unwrap() {
                    got.push(m);
                }
            }
            assert!(!d.has_partial());
            assert_eq!(got, msgs, "chunk {chunk}");
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        for len in [MAX_FRAME as u32 + 1, u32::MAX] {
            let mut f = len.to_le_bytes().to_vec();
            f.push(OUTPUT);
            assert!(matches!(
                read_message::<ToHost>(&mut &f[..]),
                Err(Error::TooLarge(_))
            ));
            let mut d = Decoder::new();
            d.feed(&f);
            assert!(matches!(
                d.next_message::<ToHost>(),
                Err(Error::TooLarge(_))
            ));
        }
        // The largest frame is fine.
        let big = ToHost::Output(vec![7; MAX_FRAME - 1]);
        let f = encode(&big).unwrap();
        assert_eq!(read_message::<ToHost>(&mut &f[..]).unwrap(), Some(big));
        // One more byte is refused by the encoder too.
        assert!(matches!(
            encode(&ToHost::Output(vec![7; MAX_FRAME])),
            Err(Error::TooLarge(_))
        ));
        let huge = Spec {
            argv: vec!["x".repeat(MAX_FRAME)],
            ..Spec::default()
        };
        let mut out = vec![1, 2];
        assert!(encode_into(&ToGuest::Start(huge), &mut out).is_err());
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn truncated_streams() {
        let f = encode(&ToGuest::Start(spec())).unwrap();
        assert!(read_message::<ToGuest>(&mut &[][..]).unwrap().is_none());
        for cut in 1..f.len() {
            let r = read_message::<ToGuest>(&mut &f[..cut]);
            assert!(matches!(r, Err(Error::Eof)), "cut {cut}: {r:?}");
            let mut d = Decoder::new();
            d.feed(&f[..cut]);
            assert!(d.next_message::<ToGuest>().unwrap().is_none());
            assert!(d.has_partial());
        }
    }

    #[test]
    fn truncated_and_padded_payloads() {
        // A frame whose length is consistent but whose payload is cut short.
        let body = encode(&ToGuest::Start(spec())).unwrap()[HEADER_LEN..].to_vec();
        for cut in 1..body.len() {
            assert!(ToGuest::decode_body(&body[..cut]).is_err(), "cut {cut}");
        }
        let mut long = body.clone();
        long.push(0);
        assert!(matches!(
            ToGuest::decode_body(&long),
            Err(Error::Trailing(1))
        ));
        assert!(matches!(
            ToHost::decode_body(&[READY, 1, 0]),
            Err(Error::Truncated)
        ));
        assert!(matches!(
            ToGuest::decode_body(&[CLOSE_INPUT, 0]),
            Err(Error::Trailing(1))
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            read_message::<ToHost>(&mut &[0, 0, 0, 0][..]),
            Err(Error::Empty)
        ));
        assert!(matches!(
            ToHost::decode_body(&[0x42]),
            Err(Error::UnknownType(0x42))
        ));
        // Each direction refuses the other's messages.
        assert!(matches!(
            ToHost::decode_body(&[START]),
            Err(Error::UnknownType(START))
        ));
        assert!(matches!(
            ToGuest::decode_body(&[READY, 1, 0, 0, 0]),
            Err(Error::UnknownType(READY))
        ));
        assert!(matches!(
            ToHost::decode_body(&[EXITED, 2, 0, 0, 0, 0]),
            Err(Error::BadValue(_))
        ));
        // A list count far beyond the frame: fails on the first missing item.
        let mut b = vec![START];
        b.extend(u32::MAX.to_le_bytes());
        assert!(matches!(ToGuest::decode_body(&b), Err(Error::Truncated)));
        // A string length beyond the frame.
        let mut b = vec![ERROR];
        b.extend(u32::MAX.to_le_bytes());
        assert!(matches!(ToHost::decode_body(&b), Err(Error::Truncated)));
        // Bad UTF-8, NUL, empty argv, bad env name, bad flags.
        let bad = |s: Spec| encode(&ToGuest::Start(s)).unwrap()[HEADER_LEN..].to_vec();
        let mut b = bad(Spec {
            argv: vec!["ab".into()],
            ..Spec::default()
        });
        b[9] = 0xff;
        assert!(matches!(ToGuest::decode_body(&b), Err(Error::BadValue(_))));
        for s in [
            Spec {
                argv: vec!["a\0b".into()],
                ..Spec::default()
            },
            Spec::default(),
            Spec {
                argv: vec!["a".into()],
                env: vec![("A=B".into(), "c".into())],
                ..Spec::default()
            },
            Spec {
                argv: vec!["a".into()],
                env: vec![(String::new(), "c".into())],
                ..Spec::default()
            },
        ] {
            assert!(matches!(
                ToGuest::decode_body(&bad(s)),
                Err(Error::BadValue(_))
            ));
        }
        let mut b = bad(Spec {
            argv: vec!["a".into()],
            ..Spec::default()
        });
        *b.last_mut().unwrap() = 2;
        assert!(matches!(ToGuest::decode_body(&b), Err(Error::BadValue(_))));
        let mut b = bad(Spec {
            argv: vec!["a".into()],
            ..Spec::default()
        });
        b[14] = 7; // the cwd option flag
        assert!(matches!(ToGuest::decode_body(&b), Err(Error::BadValue(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift generator: deterministic, no extra dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = body.first_mut() {
                *b = [
                    READY,
                    OUTPUT,
                    EXITED,
                    ERROR,
                    START,
                    RESIZE,
                    SIGNAL,
                    CLOSE_INPUT,
                    SETUP,
                    SHUTDOWN,
                ][(next() % 10) as usize];
            }
            let _ = ToHost::decode_body(&body);
            let _ = ToGuest::decode_body(&body);
            let mut d = Decoder::new();
            d.feed(&body);
            let _ = d.next_message::<ToGuest>();
        }
    }
}
