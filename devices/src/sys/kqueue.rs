//! macOS only: the [`KernelQueue`] of the epoll emulation on kqueue(2).
//!
//! Each direction is one level-triggered filter (`EVFILT_READ`,
//! `EVFILT_WRITE`; no `EV_CLEAR`, so it keeps firing while the condition
//! holds, like epoll without `EPOLLET`), carrying the token in `udata`. Apple's
//! `kevent(2)`: with no room for events, a failed change makes the call return
//! -1 with its errno. Everything else (interest, merging) is in `epoll.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// The check script (macos/check-hvf-on-linux.sh) swaps this for a stand-in
// with Apple's declarations, since the libc crate has no kqueue on Linux.
use libc as kq;

use super::epoll::{Change, Filter, KernelQueue, Ready};

/// A kqueue descriptor.
#[derive(Debug)]
pub struct Kqueue {
    kq: OwnedFd,
}

fn filter(f: Filter) -> i16 {
    match f {
        Filter::Read => kq::EVFILT_READ,
        Filter::Write => kq::EVFILT_WRITE,
    }
}

impl Kqueue {
    fn kevent(
        &self,
        changes: &[kq::kevent],
        events: &mut [kq::kevent],
        timeout: Option<&libc::timespec>,
    ) -> io::Result<usize> {
        let tsp = timeout.map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: both slices are live for the call, and their lengths (at most
        // a few hundred) are what the kernel reads and writes; `tsp` is null or
        // points at a live timespec.
        let n = unsafe {
            kq::kevent(
                self.kq.as_raw_fd(),
                changes.as_ptr(),
                changes.len() as libc::c_int,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                tsp,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn zeroed_kevent() -> kq::kevent {
    // SAFETY: kevent is plain data (integers and a pointer); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

impl KernelQueue for Kqueue {
    fn new() -> io::Result<Self> {
        // SAFETY: kqueue() takes no arguments and returns a new fd or -1.
        let fd = unsafe { kq::kqueue() };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the fd was just created and is owned here from now on.
        let kq = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on the fd owned here, integer arguments only.
        if unsafe { libc::fcntl(kq.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { kq })
    }

    fn change(&self, fd: RawFd, token: u64, changes: &[Change]) -> io::Result<()> {
        // One call per change, so a delete the kernel no longer has (the fd
        // was closed, which drops its filters) does not hide another's error.
        for c in changes {
            let mut ev = zeroed_kevent();
            ev.ident = fd as libc::uintptr_t;
            ev.filter = filter(c.filter);
            ev.flags = if c.add {
                kq::EV_ADD | kq::EV_ENABLE
            } else {
                kq::EV_DELETE
            };
            ev.udata = token as usize as *mut libc::c_void;
            match self.kevent(&[ev], &mut [], None) {
                Err(e) if !c.add && e.raw_os_error() == Some(libc::ENOENT) => {}
                r => {
                    r?;
                }
            }
        }
        Ok(())
    }

    fn wait(&self, timeout_ms: i32, max: usize, out: &mut Vec<Ready>) -> io::Result<()> {
        let mut evs = vec![zeroed_kevent(); max.max(1)];
        let ts = (timeout_ms >= 0).then(|| libc::timespec {
            tv_sec: libc::time_t::from(timeout_ms / 1000),
            tv_nsec: libc::c_long::from((timeout_ms % 1000) * 1_000_000),
        });
        let n = self.kevent(&[], &mut evs, ts.as_ref())?;
        for ev in &evs[..n] {
            let filter = if ev.filter == kq::EVFILT_WRITE {
                Filter::Write
            } else {
                Filter::Read
            };
            out.push(Ready {
                token: ev.udata as usize as u64,
                filter,
                eof: ev.flags & kq::EV_EOF != 0,
                error: ev.flags & kq::EV_ERROR != 0,
            });
        }
        Ok(())
    }
}
