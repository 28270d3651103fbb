//! The listening socket of `aivmm builder serve`: from the service manager when
//! one hands it over (systemd's `LISTEN_FDS`, launchd's `Listener`), else bound
//! here on 127.0.0.1. Either way it must be a TCP socket on a loopback address:
//! the builder accepts logins with a key that sits in a file, and that must not
//! be reachable from the network.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};

use super::{Error, Result};

/// Where the socket came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Bound by aivmm itself.
    Bound,
    /// Handed over by systemd (`LISTEN_FDS`).
    Systemd,
    /// Handed over by launchd (`launch_activate_socket`).
    Launchd,
}

impl Source {
    /// Whether a service manager holds the socket and restarts aivmm on the next
    /// connection (so aivmm may exit when the VM has gone idle).
    pub fn activated(self) -> bool {
        self != Source::Bound
    }
}

/// The first file descriptor systemd passes.
const SD_LISTEN_FDS_START: RawFd = 3;

/// The listening socket: handed over, or bound on 127.0.0.1:`port`.
pub fn listener(port: u16) -> Result<(TcpListener, Source)> {
    let (l, src) = if let Some(fd) = systemd_fd()? {
        // SAFETY: systemd passed this descriptor to this process (LISTEN_PID is
        // ours) and nothing else in the process owns it.
        (unsafe { TcpListener::from_raw_fd(fd) }, Source::Systemd)
    } else if let Some(l) = launchd()? {
        (l, Source::Launchd)
    } else {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .map_err(|source| Error::Bind { port, source })?;
        (l, Source::Bound)
    };
    check_loopback(&l)?;
    Ok((l, src))
}

/// Refuses a socket that is not a listening TCP socket on a loopback address.
pub fn check_loopback(l: &TcpListener) -> Result<SocketAddr> {
    let addr = l
        .local_addr()
        .map_err(|e| Error::BadActivation(format!("not a TCP socket ({e})")))?;
    if !addr.ip().is_loopback() {
        return Err(Error::NotLoopback(addr.to_string()));
    }
    Ok(addr)
}

/// The socket systemd passed, if `LISTEN_PID` names this process; the variables
/// are removed so the VM process started later does not see them.
fn systemd_fd() -> Result<Option<RawFd>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let n: i32 = fds
        .trim()
        .parse()
        .map_err(|_| Error::BadActivation(format!("LISTEN_FDS={fds}")))?;
    if n != 1 {
        return Err(Error::BadActivation(format!(
            "{n} sockets passed, want exactly one (ListenStream=127.0.0.1:PORT)"
        )));
    }
    let fd = SD_LISTEN_FDS_START;
    // SAFETY: plain fcntl calls on the descriptor systemd passed; they only read
    // and set its flags.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(Error::BadActivation(format!("fd {fd} is not open")));
        }
        // Not inherited by the VM process.
        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let mut listening: libc::c_int = 0;
    let mut len2 = len;
    // SAFETY: getsockopt writes at most `len` bytes into the ints we pass.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        ) == 0
            && libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut listening as *mut libc::c_int).cast(),
                &mut len2,
            ) == 0
    };
    if !ok || ty != libc::SOCK_STREAM || listening == 0 {
        return Err(Error::BadActivation(format!(
            "fd {fd} is not a listening stream socket (Accept=no is needed)"
        )));
    }
    Ok(Some(fd))
}

/// launchd's socket named `Listener` (the plist `aivmm builder install` writes).
#[cfg(target_os = "macos")]
fn launchd() -> Result<Option<TcpListener>> {
    extern "C" {
        fn launch_activate_socket(
            name: *const libc::c_char,
            fds: *mut *mut libc::c_int,
            cnt: *mut libc::size_t,
        ) -> libc::c_int;
    }
    let name = c"Listener";
    let mut fds: *mut libc::c_int = std::ptr::null_mut();
    let mut cnt: libc::size_t = 0;
    // SAFETY: launchd fills `fds` with a malloc'ed array of `cnt` descriptors.
    let rc = unsafe { launch_activate_socket(name.as_ptr(), &mut fds, &mut cnt) };
    if rc != 0 || fds.is_null() {
        // ESRCH: not started by launchd; ENOENT: no such socket in the plist.
        return Ok(None);
    }
    // SAFETY: `fds` holds `cnt` descriptors (checked non-null above).
    let all: Vec<libc::c_int> = unsafe { std::slice::from_raw_parts(fds, cnt).to_vec() };
    // SAFETY: the array was malloc'ed by launchd for us to free.
    unsafe { libc::free(fds.cast()) };
    let Some((&first, rest)) = all.split_first() else {
        return Ok(None);
    };
    for &fd in rest {
        // SAFETY: extra descriptors launchd gave us that we do not use.
        unsafe { libc::close(fd) };
    }
    // SAFETY: launchd passed this descriptor to us; nothing else owns it.
    Ok(Some(unsafe { TcpListener::from_raw_fd(first) }))
}

#[cfg(not(target_os = "macos"))]
fn launchd() -> Result<Option<TcpListener>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_loopback_is_served() {
        let lo = TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(check_loopback(&lo).unwrap().ip().is_loopback());
        let any = TcpListener::bind("0.0.0.0:0").unwrap();
        let err = check_loopback(&any).unwrap_err().to_string();
        assert!(err.contains("loopback addresses only"), "{err}");
        if let Ok(v6) = TcpListener::bind("[::1]:0") {
            assert!(check_loopback(&v6).is_ok());
        }
    }

    #[test]
    fn binding_uses_loopback_and_reports_a_taken_port() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = listener(port).unwrap_err().to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        drop(taken);
        let (l, src) = listener(port).unwrap();
        assert_eq!(src, Source::Bound);
        assert_eq!(l.local_addr().unwrap().ip().to_string(), "127.0.0.1");
    }

    #[test]
    fn a_foreign_listen_pid_is_ignored() {
        // LISTEN_PID of another process: not ours, nothing taken.
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "1");
        assert_eq!(systemd_fd().unwrap(), None);
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
    }
}
