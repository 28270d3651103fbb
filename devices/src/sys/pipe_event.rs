//! [`PipeEventFd`]: `EventFd`'s interface over a pipe, for hosts without
//! eventfd(2) (macOS).
//!
//! `write` puts one byte in the pipe and `read` takes every byte there and
//! returns how many it took, so the value read is the number of writes since the
//! last read (an eventfd's counter when each write adds 1, which is all the
//! devices write). The write end is always non-blocking: a full pipe already
//! holds a pending notification, so a write that would block is dropped, which
//! is the coalescing a waiter needs. The read end is non-blocking when created
//! with [`EFD_NONBLOCK`]; a read with nothing pending then fails with
//! `WouldBlock`, as an eventfd's does. `as_raw_fd` gives the read end, which is
//! what a poller watches.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The flag asking for a non-blocking read end (eventfd's `EFD_NONBLOCK`).
pub const EFD_NONBLOCK: i32 = libc::O_NONBLOCK;

/// How many bytes one `read` call takes at most; a pipe holding more after a
/// blocking read is drained on by the loop in [`PipeEventFd::read`].
const READ_CHUNK: usize = 512;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Adds `O_NONBLOCK` (if `nonblock`) and `FD_CLOEXEC` to `fd`.
fn set_flags(fd: RawFd, nonblock: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd the caller owns, with integer arguments only.
    unsafe {
        if nonblock {
            let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
            cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
        }
        let fd_fl = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, fd_fl | libc::FD_CLOEXEC))?;
    }
    Ok(())
}

/// Whether `fd` has data to read now (a zero-timeout poll).
fn readable_now(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, zero timeout.
    let n = cvt(unsafe { libc::poll(&mut p, 1, 0) })?;
    Ok(n > 0 && p.revents & libc::POLLIN != 0)
}

/// A pipe with `EventFd`'s interface.
#[derive(Debug)]
pub struct PipeEventFd {
    read: OwnedFd,
    write: OwnedFd,
    nonblock: bool,
}

impl PipeEventFd {
    /// A new notifier with nothing pending; `flags` is 0 or [`EFD_NONBLOCK`].
    pub fn new(flags: i32) -> io::Result<Self> {
        if flags & !EFD_NONBLOCK != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        // SAFETY: pipe() succeeded, so both descriptors are open and now owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let nonblock = flags & EFD_NONBLOCK != 0;
        set_flags(read.as_raw_fd(), nonblock)?;
        set_flags(write.as_raw_fd(), true)?;
        Ok(Self {
            read,
            write,
            nonblock,
        })
    }

    /// Signals the notifier. `v` is only tested for zero (which, as for an
    /// eventfd, signals nothing).
    pub fn write(&self, v: u64) -> io::Result<()> {
        if v == 0 {
            return Ok(());
        }
        let b = 1u8;
        loop {
            // SAFETY: writes one byte from a live local to an fd owned by `self`.
            let n = unsafe { libc::write(self.write.as_raw_fd(), (&b as *const u8).cast(), 1) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                // A full pipe already holds a pending notification.
                io::ErrorKind::WouldBlock => return Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Takes every pending notification and returns how many there were. With
    /// nothing pending it fails with `WouldBlock` (non-blocking) or waits.
    pub fn read(&self) -> io::Result<u64> {
        let mut buf = [0u8; READ_CHUNK];
        let mut total = 0u64;
        loop {
            if total > 0 && !self.nonblock && !readable_now(self.read.as_raw_fd())? {
                return Ok(total);
            }
            // SAFETY: reads into a live local buffer of the given length.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                // Both ends live in `self`, so end of file cannot happen; be safe anyway.
                0 => return Ok(total),
                n if n > 0 => total += n as u64,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock if total > 0 => return Ok(total),
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    /// Another handle on the same notifier.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            read: self.read.try_clone()?,
            write: self.write.try_clone()?,
            nonblock: self.nonblock,
        })
    }
}

impl AsRawFd for PipeEventFd {
    /// The read end, to register with a poller.
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn sys_pipe_event_counts_writes_like_an_eventfd() {
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        e.write(1).unwrap();
        e.write(1).unwrap();
        e.write(0).unwrap();
        assert_eq!(e.read().unwrap(), 2);
        assert_eq!(e.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(PipeEventFd::new(0x4000_0000).is_err(), "unknown flag");
    }

    #[test]
    fn sys_pipe_event_full_pipe_coalesces() {
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        for _ in 0..200_000 {
            // Far more than a pipe holds: a full pipe is not an error.
            e.write(1).unwrap();
        }
        let n = e.read().unwrap();
        assert!((1..200_000).contains(&n), "{n}");
        assert!(e.read().is_err());
    }

    #[test]
    fn sys_pipe_event_clone_shares_and_blocking_read_waits() {
        let e = Arc::new(PipeEventFd::new(0).unwrap());
        let other = e.try_clone().unwrap();
        assert_ne!(other.as_raw_fd(), e.as_raw_fd());
        let t0 = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            other.write(1).unwrap();
            other.write(1).unwrap();
        });
        // Blocks until the first write; the second may or may not be in yet.
        let n = e.read().unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(25));
        t.join().unwrap();
        let rest = if n == 2 { 0 } else { e.read().unwrap() };
        assert_eq!(n + rest, 2);
    }
}
