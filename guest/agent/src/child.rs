//! Starting the command: on a new pseudo-terminal, or on pipes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use aivmm_protocol::Spec;

/// `PATH` unless the spec sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running command and the agent's ends of its input and output.
pub struct Running {
    /// The process (a session leader, so its pid is its process group).
    pub child: Child,
    /// How its input and output are connected.
    pub io: ChildIo,
}

/// The agent's ends of the command's standard streams.
pub enum ChildIo {
    /// The pty master: input and merged output.
    Pty(File),
    /// Pipes; `None` once closed.
    Pipes {
        /// The command's stdin.
        stdin: Option<File>,
        /// The command's stdout.
        stdout: Option<File>,
        /// The command's stderr.
        stderr: Option<File>,
    },
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory arguments.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no memory arguments.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Sets the terminal size of the pty behind `fd` (the kernel sends SIGWINCH to its
/// foreground process group).
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which is valid.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Opens a pty pair; both ends are close-on-exec.
fn open_pty(rows: u16, cols: u16) -> io::Result<(File, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let wsp = if rows > 0 && cols > 0 {
        &ws as *const libc::winsize
    } else {
        std::ptr::null()
    };
    // SAFETY: the out pointers are valid; a null name and termios are allowed, and
    // `wsp` is null or points to `ws`, which outlives the call.
    cvt(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            wsp,
        )
    })?;
    // SAFETY: openpty succeeded, so both are new descriptors that nothing else owns.
    let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    set_cloexec(master.as_raw_fd())?;
    set_cloexec(slave.as_raw_fd())?;
    Ok((master, slave))
}

/// The home directory of `uid` in /etc/passwd, if it has an entry.
fn passwd_home(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[5].to_string())
    })
}

/// Builds the command: identity, directory and environment from `spec`.
fn command(spec: &Spec) -> io::Result<Command> {
    let (prog, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty argv"))?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    cmd.env_clear().env("PATH", DEFAULT_PATH);
    match (&spec.home, spec.uid) {
        (Some(h), _) => {
            cmd.env("HOME", h);
        }
        // No home given: the guest's own passwd entry for the uid decides.
        (None, Some(uid)) => {
            if let Some(h) = passwd_home(uid) {
                cmd.env("HOME", h);
            }
        }
        (None, None) => {}
    }
    if let Some(t) = &spec.term {
        cmd.env("TERM", t);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = &spec.cwd {
        if !std::path::Path::new(dir).is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory {dir}"),
            ));
        }
        cmd.current_dir(dir);
    }
    // The identity changes in `become_user`, after the OOM score is reset.
    Ok(cmd)
}

/// Between fork and exec, as root still: the command goes back to the default OOM
/// score (the agent protects itself, see `protect_from_oom_killer`), then takes
/// `spec`'s identity (no supplementary groups). Only async-signal-safe calls.
fn become_user(gid: Option<u32>, uid: Option<u32>) -> io::Result<()> {
    // SAFETY: open, write and close of a constant path with a constant buffer.
    unsafe {
        let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
    if uid.is_some() || gid.is_some() {
        // SAFETY: setgroups with an empty list, setgid and setuid change only
        // this (forked) process's credentials.
        unsafe {
            // Without CAP_SETGID (an agent that is not root, in tests) there are
            // no groups to drop: EPERM is fine there, as std's own uid change has it.
            if libc::setgroups(0, std::ptr::null()) != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EPERM) {
                    return Err(e);
                }
            }
            if let Some(g) = gid {
                cvt(libc::setgid(g))?;
            }
            if let Some(u) = uid {
                cvt(libc::setuid(u))?;
            }
        }
    }
    Ok(())
}

/// Makes the agent the OOM killer's last choice (-1000, as root in the guest): a
/// build that runs the guest out of memory loses one of its own processes, not
/// the agent that reports how it ended. Each command goes back to the default
/// score before it runs ([`become_user`]). Returns why it could not.
pub fn protect_from_oom_killer() -> io::Result<()> {
    std::fs::write("/proc/self/oom_score_adj", "-1000")
}

/// Between fork and exec: every signal back to its default action. An ignored
/// signal stays ignored across exec, so a SIGHUP or SIGTERM that whatever started
/// the agent ignored (`nohup`, an init) would let the command outlive a stop.
/// (exec resets caught signals itself; std resets the mask and SIGPIPE.)
fn default_signals() {
    for sig in 1..65 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: sigaction with a zeroed action (SIG_DFL, empty mask) is
        // async-signal-safe and touches only the struct we pass; an error (a
        // signal number the kernel reserves) changes nothing.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Starts `spec`'s command in a new session.
pub fn spawn(spec: &Spec) -> io::Result<Running> {
    let mut cmd = command(spec)?;
    let (gid, uid) = (spec.gid, spec.uid);
    if spec.tty {
        let (master, slave) = open_pty(spec.rows, spec.cols)?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                default_signals();
                cvt(libc::setsid())?;
                // fd 0 is the pty slave; make it the session's controlling terminal.
                cvt(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
                become_user(gid, uid)
            });
        }
        let child = cmd.spawn()?;
        // `cmd` holds the parent's copies of the slave; drop them so reads of the
        // master end (EIO) when the command and its children are gone.
        drop(cmd);
        set_nonblocking(master.as_raw_fd())?;
        Ok(Running {
            child,
            io: ChildIo::Pty(master),
        })
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls (sigaction, setsid, become_user's).
        unsafe {
            cmd.pre_exec(move || {
                default_signals();
                cvt(libc::setsid())?;
                become_user(gid, uid)
            });
        }
        let mut child = cmd.spawn()?;
        let to_file = |fd: Option<OwnedFd>| -> io::Result<Option<File>> {
            fd.map(|fd| {
                set_nonblocking(fd.as_raw_fd())?;
                Ok(File::from(fd))
            })
            .transpose()
        };
        let stdin = to_file(child.stdin.take().map(OwnedFd::from))?;
        let stdout = to_file(child.stdout.take().map(OwnedFd::from))?;
        let stderr = to_file(child.stderr.take().map(OwnedFd::from))?;
        Ok(Running {
            child,
            io: ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            },
        })
    }
}

/// The process group to signal: the terminal's foreground group (a shell's current
/// job), else the command's own group.
pub fn signal_target(running: &Running) -> libc::pid_t {
    let own = libc::pid_t::try_from(running.child.id()).unwrap_or(0);
    if let ChildIo::Pty(m) = &running.io {
        let mut pgrp: libc::pid_t = 0;
        // SAFETY: TIOCGPGRP writes one pid_t to the pointer, which is valid.
        if unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCGPGRP, &mut pgrp) } == 0 && pgrp > 0 {
            return pgrp;
        }
    }
    own
}

/// The pty's end-of-file character (VEOF, normally Ctrl-D).
pub fn eof_char(master: &File) -> u8 {
    // SAFETY: termios is plain data; all-zero is a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios to the pointer, which is valid.
    if unsafe { libc::tcgetattr(master.as_raw_fd(), &mut t) } == 0 {
        t.c_cc[libc::VEOF]
    } else {
        4
    }
}
