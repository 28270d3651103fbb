//! A notifier and an event loop for macOS, where `EventFd` and epoll (and so
//! `event-manager`) do not exist.
//!
//! [`Notifier`] is a non-blocking pipe: `notify` writes a byte (a full pipe means
//! a notification is already pending, which is all a waiter needs), the read end
//! polls readable, and `drain` empties it. It plays the role of a counter-less
//! `EventFd` for queue notifications and for stopping threads.
//!
//! [`EventLoop`] dispatches readiness of file descriptors to handlers by token,
//! over a [`Poller`]: [`Kqueue`] on macOS (level-triggered `EVFILT_READ`, like
//! epoll's default) and [`PollPoller`] (`poll(2)`) everywhere, which is what the
//! tests on Linux run.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_nonblock_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd this module owns, with integer arguments only.
    unsafe {
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
        let fd_fl = cvt(libc::fcntl(fd, libc::F_GETFD))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, fd_fl | libc::FD_CLOEXEC))?;
    }
    Ok(())
}

/// A pipe-based notifier.
#[derive(Debug)]
pub struct Notifier {
    read: OwnedFd,
    write: OwnedFd,
}

impl Notifier {
    /// A new notifier with nothing pending.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        // SAFETY: pipe() succeeded, so both descriptors are open and now owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_nonblock_cloexec(read.as_raw_fd())?;
        set_nonblock_cloexec(write.as_raw_fd())?;
        Ok(Self { read, write })
    }

    /// Signals the notifier.
    pub fn notify(&self) -> io::Result<()> {
        let b = 1u8;
        // SAFETY: writes one byte from a live local to an fd owned by `self`.
        let n = unsafe { libc::write(self.write.as_raw_fd(), (&b as *const u8).cast(), 1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A full pipe already holds a pending notification.
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Clears pending notifications; whether there were any.
    pub fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 64];
        let mut any = false;
        loop {
            // SAFETY: reads into a live local buffer of the given length.
            let n =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return Ok(any),
                n if n > 0 => any = true,
                _ => {
                    let e = io::Error::last_os_error();
                    return match e.kind() {
                        io::ErrorKind::WouldBlock => Ok(any),
                        io::ErrorKind::Interrupted => continue,
                        _ => Err(e),
                    };
                }
            }
        }
    }
}

impl AsRawFd for Notifier {
    /// The read end, to register with a poller.
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

/// Readiness of one registered descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The token it was registered with.
    pub token: u64,
    /// Data can be read (or the peer closed).
    pub readable: bool,
    /// The peer hung up or the descriptor failed.
    pub hangup: bool,
}

/// An OS readiness interface.
pub trait Poller {
    /// Watches `fd` for reading, reporting `token`.
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()>;
    /// Stops watching `fd`.
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
    /// Waits for readiness (forever with `None`); appends events to `out`.
    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()>;
}

/// `poll(2)`: portable, O(n) per wait; fine for the handful of fds a VM has.
#[derive(Debug, Default)]
pub struct PollPoller {
    fds: Vec<(RawFd, u64)>,
}

fn timeout_ms(t: Option<Duration>) -> libc::c_int {
    t.map_or(-1, |d| {
        libc::c_int::try_from(d.as_millis()).unwrap_or(libc::c_int::MAX)
    })
}

impl Poller for PollPoller {
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        if self.fds.iter().any(|&(f, _)| f == fd) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        self.fds.push((fd, token));
        Ok(())
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        let before = self.fds.len();
        self.fds.retain(|&(f, _)| f != fd);
        if self.fds.len() == before {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        let mut pfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|&(fd, _)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a live array of exactly `pfds.len()` pollfd structs.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                timeout_ms(timeout),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for (p, &(_, token)) in pfds.iter().zip(&self.fds) {
            if p.revents != 0 {
                out.push(Event {
                    token,
                    readable: p.revents & (libc::POLLIN | libc::POLLHUP) != 0,
                    hangup: p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
                });
            }
        }
        Ok(())
    }
}

/// kqueue(2), level-triggered read filters.
#[cfg(target_os = "macos")]
#[derive(Debug)]
pub struct Kqueue {
    kq: OwnedFd,
}

#[cfg(target_os = "macos")]
impl Kqueue {
    /// A new kqueue.
    pub fn new() -> io::Result<Self> {
        // SAFETY: kqueue() takes no arguments and returns a new fd or -1.
        let fd = cvt(unsafe { libc::kqueue() })?;
        // SAFETY: the fd was just created and is owned here from now on.
        let kq = unsafe { OwnedFd::from_raw_fd(fd) };
        set_nonblock_cloexec(kq.as_raw_fd())?;
        Ok(Self { kq })
    }

    fn change(&self, fd: RawFd, flags: u16, token: u64) -> io::Result<()> {
        // SAFETY: kevent is plain data; all-zero is a valid value.
        let mut ev: libc::kevent = unsafe { std::mem::zeroed() };
        ev.ident = fd as libc::uintptr_t;
        ev.filter = libc::EVFILT_READ;
        ev.flags = flags;
        ev.udata = token as usize as *mut libc::c_void;
        // SAFETY: one change record, no event list, no timeout; all pointers live.
        cvt(unsafe {
            libc::kevent(
                self.kq.as_raw_fd(),
                &ev,
                1,
                std::ptr::null_mut(),
                0,
                std::ptr::null(),
            )
        })?;
        Ok(())
    }
}

#[cfg(target_os = "macos")]
impl Poller for Kqueue {
    fn add(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        self.change(fd, libc::EV_ADD | libc::EV_ENABLE, token)
    }

    fn remove(&mut self, fd: RawFd) -> io::Result<()> {
        self.change(fd, libc::EV_DELETE, 0)
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Event>) -> io::Result<()> {
        // SAFETY: plain data; zeroed is valid.
        let mut evs: [libc::kevent; 32] = unsafe { std::mem::zeroed() };
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `evs` has room for its length in events; `tsp` is null or live.
        let n = unsafe {
            libc::kevent(
                self.kq.as_raw_fd(),
                std::ptr::null(),
                0,
                evs.as_mut_ptr(),
                evs.len() as libc::c_int,
                tsp,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        for ev in &evs[..n as usize] {
            out.push(Event {
                token: ev.udata as usize as u64,
                readable: ev.filter == libc::EVFILT_READ,
                hangup: ev.flags & (libc::EV_EOF | libc::EV_ERROR) != 0,
            });
        }
        Ok(())
    }
}

/// What a handler wants after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep watching.
    Keep,
    /// Stop watching this descriptor.
    Remove,
}

type Handler = Box<dyn FnMut(&Event) -> Action + Send>;

/// Dispatches readiness to handlers.
pub struct EventLoop<P: Poller> {
    poller: P,
    handlers: HashMap<u64, (RawFd, Handler)>,
    next: u64,
    events: Vec<Event>,
}

impl<P: Poller> EventLoop<P> {
    /// An empty loop over `poller`.
    pub fn new(poller: P) -> Self {
        Self {
            poller,
            handlers: HashMap::new(),
            next: 1,
            events: Vec::new(),
        }
    }

    /// Calls `handler` whenever `fd` is readable; returns its token.
    pub fn add(
        &mut self,
        fd: RawFd,
        handler: impl FnMut(&Event) -> Action + Send + 'static,
    ) -> io::Result<u64> {
        let token = self.next;
        self.poller.add(fd, token)?;
        self.next += 1;
        self.handlers.insert(token, (fd, Box::new(handler)));
        Ok(token)
    }

    /// Stops watching the descriptor registered as `token`.
    pub fn remove(&mut self, token: u64) -> io::Result<()> {
        match self.handlers.remove(&token) {
            Some((fd, _)) => self.poller.remove(fd),
            None => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    /// How many descriptors are watched.
    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    /// Waits once and runs the handlers of ready descriptors; how many ran.
    pub fn run_once(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        self.events.clear();
        self.poller.wait(timeout, &mut self.events)?;
        let mut ran = 0;
        for ev in std::mem::take(&mut self.events) {
            let Some((_, handler)) = self.handlers.get_mut(&ev.token) else {
                continue;
            };
            ran += 1;
            if handler(&ev) == Action::Remove {
                self.remove(ev.token)?;
            }
        }
        Ok(ran)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn notifications_coalesce_and_drain() {
        let n = Notifier::new().unwrap();
        assert!(!n.drain().unwrap());
        for _ in 0..100_000 {
            // Far more than a pipe holds: a full pipe is not an error.
            n.notify().unwrap();
        }
        assert!(n.drain().unwrap());
        assert!(!n.drain().unwrap());
    }

    #[test]
    fn event_loop_dispatches_by_token_and_times_out() {
        let a = Arc::new(Notifier::new().unwrap());
        let b = Arc::new(Notifier::new().unwrap());
        let hits = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let mut lp = EventLoop::new(PollPoller::default());
        for (i, n) in [a.clone(), b.clone()].into_iter().enumerate() {
            let hits = hits.clone();
            let fd = n.as_raw_fd();
            lp.add(fd, move |ev| {
                assert!(ev.readable);
                n.drain().unwrap();
                hits[i].fetch_add(1, Ordering::SeqCst);
                Action::Keep
            })
            .unwrap();
        }
        assert_eq!(lp.run_once(Some(Duration::from_millis(10))).unwrap(), 0);
        b.notify().unwrap();
        assert_eq!(lp.run_once(None).unwrap(), 1);
        assert_eq!(
            (
                hits[0].load(Ordering::SeqCst),
                hits[1].load(Ordering::SeqCst)
            ),
            (0, 1)
        );
        // Drained: level-triggered readiness is gone.
        assert_eq!(lp.run_once(Some(Duration::ZERO)).unwrap(), 0);
    }

    #[test]
    fn handler_can_remove_itself_and_wakeups_cross_threads() {
        let n = Arc::new(Notifier::new().unwrap());
        let mut lp = EventLoop::new(PollPoller::default());
        let fd = n.as_raw_fd();
        let n2 = n.clone();
        let token = lp
            .add(fd, move |_| {
                n2.drain().unwrap();
                Action::Remove
            })
            .unwrap();
        let waker = n.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            waker.notify().unwrap();
        });
        assert_eq!(lp.run_once(Some(Duration::from_secs(10))).unwrap(), 1);
        t.join().unwrap();
        assert!(lp.is_empty());
        assert!(lp.remove(token).is_err());
        assert!(PollPoller::default().remove(fd).is_err());
    }

    #[test]
    fn closed_writer_reports_hangup() {
        let mut fds = [0; 2];
        // SAFETY: room for two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe() returned two fresh fds owned from here.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut p = PollPoller::default();
        p.add(r.as_raw_fd(), 9).unwrap();
        assert!(p.add(r.as_raw_fd(), 10).is_err(), "registered twice");
        drop(w);
        let mut out = Vec::new();
        p.wait(Some(Duration::from_secs(1)), &mut out).unwrap();
        assert_eq!(
            out,
            vec![Event {
                token: 9,
                readable: true,
                hangup: true
            }]
        );
    }
}
