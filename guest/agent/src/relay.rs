//! One session with the host: handshake, start the command, relay until it exits.
//!
//! A single `poll` loop watches the host socket, the command's pty master (or its
//! pipes) and a pidfd of the command. Host frames are decoded as they arrive; input
//! for the command is queued and written when the pty or pipe can take it, so a
//! command that does not read never stalls the relay of its output. Output is sent
//! as soon as it is read; writes to the socket block, which is the back-pressure when
//! the host reads slowly. When the command exits, whatever output is still in
//! flight is drained (until end of file, or until nothing has come for
//! [`DRAIN_IDLE`], since a background process may hold the terminal open) and then
//! `Exited` is the last frame.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use aivmm_protocol::{self as proto, Decoder, ExitStatus, ToGuest, ToHost, MAX_CHUNK};

use crate::child::{self, ChildIo, Running};
use crate::{clock, power, setup, Error};

/// After the command exits, output that has not arrived within this long is dropped.
pub const DRAIN_IDLE: Duration = Duration::from_millis(100);
/// The most host input queued for a command that does not read it; beyond this the
/// agent stops reading the socket.
const INPUT_LIMIT: usize = 1 << 20;

/// Runs one session on the connected socket; returns how the command ended.
/// `first` is the session of the guest's main command: only it may `Setup`.
pub fn serve(mut sock: File, first: bool) -> Result<ExitStatus, Error> {
    proto::write_message(
        &mut sock,
        &ToHost::Ready {
            version: proto::VERSION,
        },
    )?;
    let spec = loop {
        match proto::read_message::<ToGuest>(&mut sock)? {
            None => return Err(Error::HostGone),
            Some(ToGuest::Start(spec)) => break spec,
            Some(ToGuest::Setup(s)) if first => {
                for problem in setup::apply(&s) {
                    proto::write_message(&mut sock, &ToHost::Error(problem))?;
                }
            }
            Some(ToGuest::Setup(_)) => proto::write_message(
                &mut sock,
                &ToHost::Error("setup is only for the first command".into()),
            )?,
            Some(ToGuest::Clock { unix_ns }) => clock::follow_host(unix_ns),
            // Stopped before anything ran.
            Some(ToGuest::Shutdown { .. }) => {
                let status = ExitStatus::Signal(libc::SIGTERM);
                proto::write_message(&mut sock, &ToHost::Exited(status))?;
                return Ok(status);
            }
            // Anything else before Start has no command to go to.
            Some(_) => {}
        }
    };
    let running = match child::spawn(&spec) {
        Ok(r) => r,
        Err(e) => {
            let prog = spec.argv.first().map_or("", String::as_str);
            proto::write_message(&mut sock, &ToHost::Error(format!("cannot run {prog}: {e}")))?;
            let code = if e.kind() == io::ErrorKind::PermissionDenied {
                126
            } else {
                127
            };
            let status = ExitStatus::Code(code);
            proto::write_message(&mut sock, &ToHost::Exited(status))?;
            return Ok(status);
        }
    };
    let mut relay = Relay::new(sock, running);
    // The power button stops the main command (see `power`).
    if first {
        relay.power = power::presses();
        power::set_command_running(true);
    }
    let result = relay.run();
    if result.is_err() {
        // The host is gone or broke the protocol: hang up on the command.
        relay.signal(libc::SIGHUP);
    }
    result
}

struct Relay {
    sock: File,
    decoder: Decoder,
    running: Running,
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// Host input not yet written to the command.
    pending: Vec<u8>,
    /// The host sent CloseInput: close stdin once `pending` is written (pipes).
    close_after_flush: bool,
    /// Whether the pty's output side is still open (pty mode).
    pty_open: bool,
    /// The last input byte from the host.
    last_input: Option<u8>,
    /// After a Shutdown: when what is left of the command gets SIGKILL.
    kill_at: Option<Instant>,
    /// Where power button presses arrive (the main command only).
    power: Option<RawFd>,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; no memory arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn poll_fd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Reads what is there; `Ok(None)` when it would block.
fn read_some(f: &mut File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match f.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

impl Relay {
    fn new(sock: File, running: Running) -> Self {
        let pidfd = pidfd_open(running.child.id());
        Self {
            sock,
            decoder: Decoder::new(),
            running,
            pidfd,
            status: None,
            pending: Vec::new(),
            close_after_flush: false,
            pty_open: true,
            last_input: None,
            kill_at: None,
            power: None,
        }
    }

    fn send(&mut self, msg: &ToHost) -> Result<(), Error> {
        proto::write_message(&mut self.sock, msg).map_err(|e| match e {
            proto::Error::Io(_) => Error::HostGone,
            e => Error::Protocol(e),
        })
    }

    fn signal(&self, sig: i32) {
        let pgrp = child::signal_target(&self.running);
        if pgrp > 0 {
            // SAFETY: kill has no memory arguments; a stale group is only an error.
            unsafe { libc::kill(-pgrp, sig) };
        }
    }

    /// Signals the terminal's foreground group and the command's own group (a
    /// shell and the job it runs).
    fn signal_all(&self, sig: i32) {
        self.signal(sig);
        let own = libc::pid_t::try_from(self.running.child.id()).unwrap_or(0);
        if own > 0 {
            // SAFETY: as in `signal`.
            unsafe { libc::kill(-own, sig) };
        }
    }

    fn outputs_open(&self) -> bool {
        match &self.running.io {
            ChildIo::Pty(_) => self.pty_open,
            ChildIo::Pipes { stdout, stderr, .. } => stdout.is_some() || stderr.is_some(),
        }
    }

    fn reap(&mut self) -> Result<(), Error> {
        if self.status.is_none() {
            if let Some(s) = self.running.child.try_wait()? {
                self.status = Some(match (s.code(), s.signal()) {
                    (Some(c), _) => ExitStatus::Code(c),
                    (None, Some(sig)) => ExitStatus::Signal(sig),
                    (None, None) => ExitStatus::Code(255),
                });
            }
        }
        Ok(())
    }

    fn run(&mut self) -> Result<ExitStatus, Error> {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            self.reap()?;
            if let Some(status) = self.status {
                if !self.outputs_open() {
                    self.send(&ToHost::Exited(status))?;
                    return Ok(status);
                }
            }
            // Slots: 0 socket, 1 pty master or stdin, 2 stdout, 3 stderr, 4 pidfd,
            // 5 power button presses.
            let mut fds = [poll_fd(-1, 0); 6];
            if self.pending.len() < INPUT_LIMIT {
                fds[0] = poll_fd(self.sock.as_raw_fd(), libc::POLLIN);
            }
            let want_out = !self.pending.is_empty();
            match &self.running.io {
                ChildIo::Pty(m) if self.pty_open => {
                    let ev = libc::POLLIN | if want_out { libc::POLLOUT } else { 0 };
                    fds[1] = poll_fd(m.as_raw_fd(), ev);
                }
                ChildIo::Pty(_) => {}
                ChildIo::Pipes {
                    stdin,
                    stdout,
                    stderr,
                } => {
                    if let (Some(f), true) = (stdin, want_out) {
                        fds[1] = poll_fd(f.as_raw_fd(), libc::POLLOUT);
                    }
                    if let Some(f) = stdout {
                        fds[2] = poll_fd(f.as_raw_fd(), libc::POLLIN);
                    }
                    if let Some(f) = stderr {
                        fds[3] = poll_fd(f.as_raw_fd(), libc::POLLIN);
                    }
                }
            }
            if let (Some(p), None) = (&self.pidfd, self.status) {
                fds[4] = poll_fd(p.as_raw_fd(), libc::POLLIN);
            }
            if let (Some(p), None) = (self.power, self.status) {
                fds[5] = poll_fd(p, libc::POLLIN);
            }
            let mut timeout = if self.status.is_some() || self.pidfd.is_none() {
                DRAIN_IDLE.as_millis() as libc::c_int
            } else {
                -1
            };
            if let (Some(at), None) = (self.kill_at, self.status) {
                let now = Instant::now();
                if now >= at {
                    self.signal_all(libc::SIGKILL);
                    self.kill_at = None;
                } else {
                    let left = libc::c_int::try_from(at.duration_since(now).as_millis() + 1)
                        .unwrap_or(libc::c_int::MAX);
                    timeout = if timeout < 0 { left } else { timeout.min(left) };
                }
            }
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n == 0 && self.status.is_some() {
                // Exited and nothing more came: a background process holds the output.
                let status = self.status.unwrap_or(ExitStatus::Code(255));
                self.send(&ToHost::Exited(status))?;
                return Ok(status);
            }
            let ready = |i: usize| fds[i].revents != 0;
            if ready(2) {
                self.pump_output(&mut buf, false)?;
            }
            if ready(3) {
                self.pump_output(&mut buf, true)?;
            }
            if ready(1) {
                if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                    && matches!(self.running.io, ChildIo::Pty(_))
                {
                    self.pump_output(&mut buf, false)?;
                }
                self.flush_input()?;
            }
            if ready(0) {
                self.read_host(&mut buf)?;
            }
            if ready(5) && self.power.is_some_and(power::take_presses) && self.kill_at.is_none() {
                self.stop_command(power::GRACE);
            }
        }
    }

    /// Stops the command: SIGHUP and SIGTERM now, SIGKILL after `grace`.
    fn stop_command(&mut self, grace: Duration) {
        // An interactive shell ignores SIGTERM but not SIGHUP.
        self.signal_all(libc::SIGHUP);
        self.signal_all(libc::SIGTERM);
        self.signal_all(libc::SIGCONT);
        self.kill_at = Some(Instant::now() + grace);
    }

    /// Relays one read of the command's output (pty or stdout, or stderr).
    fn pump_output(&mut self, buf: &mut [u8], is_stderr: bool) -> Result<(), Error> {
        let (file, tty) = match &mut self.running.io {
            ChildIo::Pty(m) if self.pty_open => (m, true),
            ChildIo::Pty(_) => return Ok(()),
            ChildIo::Pipes {
                stderr: Some(f), ..
            } if is_stderr => (f, false),
            ChildIo::Pipes {
                stdout: Some(f), ..
            } if !is_stderr => (f, false),
            ChildIo::Pipes { .. } => return Ok(()),
        };
        let n = match read_some(file, buf) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            // EIO: every holder of the pty slave is gone.
            Err(e) if tty && e.raw_os_error() == Some(libc::EIO) => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            match &mut self.running.io {
                ChildIo::Pty(_) => {
                    self.pty_open = false;
                    self.pending.clear();
                }
                ChildIo::Pipes { stdout, stderr, .. } => {
                    *(if is_stderr { stderr } else { stdout }) = None;
                }
            }
            return Ok(());
        }
        let data = buf[..n].to_vec();
        self.send(&if is_stderr {
            ToHost::Stderr(data)
        } else {
            ToHost::Output(data)
        })
    }

    /// Writes queued input to the command, as much as it takes.
    fn flush_input(&mut self) -> Result<(), Error> {
        let target = match &mut self.running.io {
            ChildIo::Pty(m) if self.pty_open => Some(m),
            ChildIo::Pty(_) => None,
            ChildIo::Pipes { stdin, .. } => stdin.as_mut(),
        };
        let Some(f) = target else {
            self.pending.clear();
            return Ok(());
        };
        while !self.pending.is_empty() {
            match f.write(&self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The command closed its input (EPIPE) or the pty is gone (EIO).
                Err(_) => {
                    self.pending.clear();
                    if let ChildIo::Pipes { stdin, .. } = &mut self.running.io {
                        *stdin = None;
                    }
                    break;
                }
            }
        }
        if self.pending.is_empty() && self.close_after_flush {
            if let ChildIo::Pipes { stdin, .. } = &mut self.running.io {
                *stdin = None;
            }
        }
        Ok(())
    }

    fn read_host(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        let n = match read_some(&mut self.sock, buf) {
            Ok(Some(0)) => return Err(Error::HostGone),
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            Err(_) => return Err(Error::HostGone),
        };
        self.decoder.feed(&buf[..n]);
        while let Some(msg) = self.decoder.next_message::<ToGuest>()? {
            self.handle(msg)?;
        }
        Ok(())
    }

    fn handle(&mut self, msg: ToGuest) -> Result<(), Error> {
        match msg {
            ToGuest::Start(_) => {
                self.send(&ToHost::Error("a command is already running".into()))?
            }
            ToGuest::Input(d) => {
                if !self.close_after_flush {
                    self.last_input = d.last().copied().or(self.last_input);
                    self.pending.extend(d);
                    self.flush_input()?;
                }
            }
            ToGuest::Resize { rows, cols } => {
                if let ChildIo::Pty(m) = &self.running.io {
                    // A failure (the pty is gone) has nobody to tell.
                    let _ = child::set_winsize(m.as_raw_fd(), rows, cols);
                }
            }
            ToGuest::Signal(sig) if (1..=64).contains(&sig) => self.signal(sig),
            ToGuest::Signal(_) => {}
            ToGuest::Setup(_) => {
                self.send(&ToHost::Error("setup after the command started".into()))?
            }
            ToGuest::Shutdown { grace_ms } => {
                self.stop_command(Duration::from_millis(grace_ms.into()));
            }
            ToGuest::Clock { unix_ns } => clock::follow_host(unix_ns),
            ToGuest::CloseInput => {
                if let ChildIo::Pty(m) = &self.running.io {
                    // A pty has no half-close: send its end-of-file character. It
                    // ends the input of a program reading a line at a time; after a
                    // partial line, the first one only hands that line over.
                    let eof = child::eof_char(m);
                    if !matches!(self.last_input, None | Some(b'\n')) {
                        self.pending.push(eof);
                    }
                    self.pending.push(eof);
                }
                self.close_after_flush = true;
                self.flush_input()?;
            }
        }
        Ok(())
    }
}
