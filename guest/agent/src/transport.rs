//! Connecting to the host, and listening for `aivmm exec`: AF_VSOCK in a guest, a
//! unix socket in tests.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Where the host listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A vsock address: the host is CID 2.
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A unix stream socket (host-side tests, no VM).
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = String;

    /// `vsock:CID:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad address '{s}': use vsock:CID:PORT or unix:PATH");
        match s.split_once(':') {
            Some(("vsock", rest)) => {
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                Ok(Self::Vsock {
                    cid: cid.parse().map_err(|_| bad())?,
                    port: port.parse().map_err(|_| bad())?,
                })
            }
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(path.into())),
            _ => Err(bad()),
        }
    }
}

/// Where the agent listens for `aivmm exec` connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A vsock port on any CID.
    Vsock(u32),
    /// A unix stream socket (host-side tests).
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    /// `vsock:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("bad listen address '{s}': use vsock:PORT or unix:PATH");
        match s.split_once(':') {
            Some(("vsock", port)) => Ok(Self::Vsock(port.parse().map_err(|_| bad())?)),
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(path.into())),
            _ => Err(bad()),
        }
    }
}

/// A listening socket.
pub enum Listener {
    /// AF_VSOCK.
    Vsock(OwnedFd),
    /// AF_UNIX.
    Unix(UnixListener),
}

/// Listens on `addr`.
pub fn listen(addr: &Listen) -> io::Result<Listener> {
    match addr {
        Listen::Unix(p) => {
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).map(Listener::Unix)
        }
        Listen::Vsock(port) => {
            // SAFETY: socket has no memory arguments; the result is checked.
            let fd = unsafe {
                libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
            let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
            sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            sa.svm_cid = libc::VMADDR_CID_ANY;
            sa.svm_port = *port;
            // SAFETY: `sa` is a valid sockaddr_vm and the length says so.
            let r = unsafe {
                libc::bind(
                    fd,
                    std::ptr::from_ref(&sa).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            // SAFETY: listen has no memory arguments.
            if r != 0 || unsafe { libc::listen(fd, 16) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Listener::Vsock(owned))
        }
    }
}

/// Waits for the next connection; the stream is blocking and close-on-exec.
pub fn accept(l: &Listener) -> io::Result<File> {
    match l {
        Listener::Unix(u) => u.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
        Listener::Vsock(fd) => {
            // SAFETY: accept4 with null address pointers only returns a descriptor.
            let c = unsafe {
                libc::accept4(
                    fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }))
        }
    }
}

/// How often a refused connection is retried.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// Connects to `addr`, retrying refused attempts until `timeout` has passed (the
/// host may not listen yet). The stream is blocking and close-on-exec.
pub fn connect(addr: &Address, timeout: Duration) -> io::Result<File> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = match addr {
            Address::Vsock { cid, port } => connect_vsock(*cid, *port),
            Address::Unix(p) => UnixStream::connect(p).map(|s| File::from(OwnedFd::from(s))),
        };
        match attempt {
            Ok(f) => return Ok(f),
            Err(e) if Instant::now() + RETRY_INTERVAL < deadline && retryable(&e) => {
                std::thread::sleep(RETRY_INTERVAL);
            }
            Err(e) => return Err(e),
        }
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::ECONNRESET
                | libc::ENOENT
                | libc::ENODEV
                | libc::ETIMEDOUT
                | libc::EINTR
                | libc::EAGAIN
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
        )
    )
}

fn connect_vsock(cid: u32, port: u32) -> io::Result<File> {
    // SAFETY: socket has no memory arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    loop {
        // SAFETY: `sa` is a valid sockaddr_vm and the length says so.
        let r = unsafe {
            libc::connect(
                fd,
                std::ptr::from_ref(&sa).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "vsock:2:1024".parse(),
            Ok(Address::Vsock { cid: 2, port: 1024 })
        );
        assert_eq!("unix:/tmp/s".parse(), Ok(Address::Unix("/tmp/s".into())));
        for bad in ["", "vsock:2", "vsock:x:1", "unix:", "tcp:1:2", "/tmp/s"] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        assert_eq!("vsock:1025".parse(), Ok(Listen::Vsock(1025)));
        assert_eq!("unix:/e".parse(), Ok(Listen::Unix("/e".into())));
        for bad in ["", "vsock:", "vsock:2:3", "unix:", "none"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }

    #[test]
    fn connect_retries_until_the_listener_appears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(250));
            let l = std::os::unix::net::UnixListener::bind(&p2).unwrap();
            l.accept().unwrap();
        });
        connect(&Address::Unix(path.clone()), Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        let e = connect(
            &Address::Unix(dir.path().join("none")),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
