//! The epoll interface of `vmm_sys_util::epoll` over a BSD-style kernel queue,
//! for hosts without epoll (macOS).
//!
//! The devices register descriptors with an interest set (`IN`, `OUT`) and a
//! token, and wait for level-triggered readiness. A kernel queue (kqueue) has one
//! filter per direction instead: [`Emulated`] keeps each descriptor's interest
//! and token, turns `ctl` into filter additions and deletions ([`Change`]), and
//! merges the per-filter readiness a wait returns ([`Ready`]) back into one
//! [`EpollEvent`] per token. The kernel side is the [`KernelQueue`] trait: kqueue
//! on macOS (`kqueue.rs`) and [`PollQueue`] (`poll(2)`) on any Unix, which is
//! what runs the emulation in the tests here.
//!
//! Where it differs from epoll:
//! - end of file on a read filter is reported as `IN | READ_HANG_UP | HANG_UP`:
//!   a kqueue cannot tell a half-closed socket from a closed one, and every
//!   device here treats either as the peer gone;
//! - a descriptor registered with an empty interest set reports nothing, not
//!   even a hang-up (epoll always reports `HANG_UP` and `ERROR`);
//! - `Add` of a descriptor number already known replaces it: the kernel drops a
//!   closed descriptor's registrations itself, and epoll's users rely on that,
//!   so a reused number is not an error.

use std::collections::HashMap;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::RawFd;
use std::sync::Mutex;

/// Readiness bits, with epoll's names and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EventSet(u32);

impl EventSet {
    /// Readable.
    pub const IN: EventSet = EventSet(0x001);
    /// Writable.
    pub const OUT: EventSet = EventSet(0x004);
    /// An error on the descriptor.
    pub const ERROR: EventSet = EventSet(0x008);
    /// The peer hung up.
    pub const HANG_UP: EventSet = EventSet(0x010);
    /// The peer shut down its writing side.
    pub const READ_HANG_UP: EventSet = EventSet(0x2000);

    /// No bits.
    pub const fn empty() -> Self {
        EventSet(0)
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: EventSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set.
    pub const fn intersects(self, other: EventSet) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for EventSet {
    type Output = EventSet;
    fn bitor(self, rhs: EventSet) -> EventSet {
        EventSet(self.0 | rhs.0)
    }
}

impl BitOrAssign for EventSet {
    fn bitor_assign(&mut self, rhs: EventSet) {
        self.0 |= rhs.0;
    }
}

/// One registration or one readiness report: a set and a token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EpollEvent {
    events: EventSet,
    data: u64,
}

impl EpollEvent {
    /// `events` for the descriptor registered as `data`.
    pub fn new(events: EventSet, data: u64) -> Self {
        Self { events, data }
    }

    /// The raw bits.
    pub fn events(&self) -> u32 {
        self.events.bits()
    }

    /// The set.
    pub fn event_set(&self) -> EventSet {
        self.events
    }

    /// The token.
    pub fn data(&self) -> u64 {
        self.data
    }
}

/// What `ctl` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOperation {
    /// Register a descriptor.
    Add,
    /// Change a registered descriptor's interest or token.
    Modify,
    /// Unregister a descriptor.
    Delete,
}

/// A kernel queue's per-direction filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Readable (kqueue's `EVFILT_READ`).
    Read,
    /// Writable (kqueue's `EVFILT_WRITE`).
    Write,
}

/// One filter to add (or update the token of) or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The filter.
    pub filter: Filter,
    /// Add (true) or delete (false).
    pub add: bool,
}

/// One filter's readiness, as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The descriptor's token.
    pub token: u64,
    /// The filter that fired.
    pub filter: Filter,
    /// The peer closed (kqueue's `EV_EOF`).
    pub eof: bool,
    /// The descriptor failed (kqueue's `EV_ERROR`).
    pub error: bool,
}

/// The kernel side of [`Emulated`].
pub trait KernelQueue: Sized + Send + Sync {
    /// A new, empty queue.
    fn new() -> io::Result<Self>;
    /// Applies `changes` to `fd`, reporting `token` from now on. Deleting a
    /// filter the kernel does not have (ENOENT) must not fail.
    fn change(&self, fd: RawFd, token: u64, changes: &[Change]) -> io::Result<()>;
    /// Waits up to `timeout_ms` (-1: forever) and appends up to `max` reports.
    /// An interrupted wait returns `Interrupted`.
    fn wait(&self, timeout_ms: i32, max: usize, out: &mut Vec<Ready>) -> io::Result<()>;
}

/// The filters `want` needs that `have` lacks (added) and the ones `have` has
/// that `want` does not (deleted). With a new token every wanted filter is
/// added again, which updates the token it reports.
pub fn changes(have: EventSet, want: EventSet, new_token: bool) -> Vec<Change> {
    let mut out = Vec::new();
    for (bit, filter) in [(EventSet::IN, Filter::Read), (EventSet::OUT, Filter::Write)] {
        match (have.contains(bit), want.contains(bit)) {
            (false, true) => out.push(Change { filter, add: true }),
            (true, true) if new_token => out.push(Change { filter, add: true }),
            (true, false) => out.push(Change { filter, add: false }),
            _ => {}
        }
    }
    out
}

/// Merges per-filter reports into one event per token, in order of first
/// report; returns how many of `events` were filled. Reports past
/// `events.len()` distinct tokens are left for the next wait (level-triggered).
pub fn merge(ready: &[Ready], events: &mut [EpollEvent]) -> usize {
    let mut n = 0;
    for r in ready {
        let mut set = match (r.filter, r.eof) {
            (Filter::Read, false) => EventSet::IN,
            (Filter::Read, true) => EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP,
            (Filter::Write, false) => EventSet::OUT,
            (Filter::Write, true) => EventSet::OUT | EventSet::HANG_UP,
        };
        if r.error {
            set |= EventSet::ERROR;
        }
        if let Some(e) = events[..n].iter_mut().find(|e| e.data == r.token) {
            e.events |= set;
        } else if n < events.len() {
            events[n] = EpollEvent::new(set, r.token);
            n += 1;
        }
    }
    n
}

/// epoll's interface over a [`KernelQueue`].
#[derive(Debug)]
pub struct Emulated<Q> {
    queue: Q,
    /// Each registered descriptor's interest and token.
    interest: Mutex<HashMap<RawFd, (EventSet, u64)>>,
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl<Q: KernelQueue> Emulated<Q> {
    /// A new, empty set.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            queue: Q::new()?,
            interest: Mutex::new(HashMap::new()),
        })
    }

    /// Adds, modifies or deletes `fd`'s registration (only `IN` and `OUT` of
    /// `event` count as interest).
    pub fn ctl(&self, op: ControlOperation, fd: RawFd, event: EpollEvent) -> io::Result<()> {
        let mut interest = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        let want = EventSet(event.events.0 & (EventSet::IN | EventSet::OUT).0);
        let token = event.data;
        match op {
            ControlOperation::Add => {
                if let Some((stale, _)) = interest.remove(&fd) {
                    self.queue
                        .change(fd, token, &changes(stale, EventSet::empty(), false))?;
                }
                self.queue
                    .change(fd, token, &changes(EventSet::empty(), want, false))?;
                interest.insert(fd, (want, token));
            }
            ControlOperation::Modify => {
                let &(have, old) = interest.get(&fd).ok_or_else(|| errno(libc::ENOENT))?;
                self.queue
                    .change(fd, token, &changes(have, want, token != old))?;
                interest.insert(fd, (want, token));
            }
            ControlOperation::Delete => {
                let (have, old) = interest.remove(&fd).ok_or_else(|| errno(libc::ENOENT))?;
                self.queue
                    .change(fd, old, &changes(have, EventSet::empty(), false))?;
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` ms (-1: forever) and fills `events`; how many.
    pub fn wait(&self, timeout: i32, events: &mut [EpollEvent]) -> io::Result<usize> {
        if events.is_empty() {
            return Err(errno(libc::EINVAL));
        }
        let mut ready = Vec::new();
        // Two filters per descriptor at most.
        self.queue.wait(timeout, events.len() * 2, &mut ready)?;
        Ok(merge(&ready, events))
    }
}

/// A [`KernelQueue`] over `poll(2)`: portable, O(n) per wait. A descriptor
/// changed by another thread during a wait is seen at the next wait.
#[derive(Debug, Default)]
pub struct PollQueue {
    fds: Mutex<HashMap<RawFd, (bool, bool, u64)>>,
}

impl KernelQueue for PollQueue {
    fn new() -> io::Result<Self> {
        Ok(Self::default())
    }

    fn change(&self, fd: RawFd, token: u64, changes: &[Change]) -> io::Result<()> {
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        let e = fds.entry(fd).or_insert((false, false, token));
        e.2 = token;
        for c in changes {
            match c.filter {
                Filter::Read => e.0 = c.add,
                Filter::Write => e.1 = c.add,
            }
        }
        if !e.0 && !e.1 {
            fds.remove(&fd);
        }
        Ok(())
    }

    fn wait(&self, timeout_ms: i32, max: usize, out: &mut Vec<Ready>) -> io::Result<()> {
        let regs: Vec<(RawFd, (bool, bool, u64))> = self
            .fds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&fd, &r)| (fd, r))
            .collect();
        let mut pfds: Vec<libc::pollfd> = regs
            .iter()
            .map(|&(fd, (r, w, _))| libc::pollfd {
                fd,
                events: if r { libc::POLLIN } else { 0 } | if w { libc::POLLOUT } else { 0 },
                revents: 0,
            })
            .collect();
        // SAFETY: `pfds` is a live array of exactly `pfds.len()` pollfd structs.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let start = out.len();
        for (p, &(_, (r, w, token))) in pfds.iter().zip(&regs) {
            let eof = p.revents & libc::POLLHUP != 0;
            let error = p.revents & (libc::POLLERR | libc::POLLNVAL) != 0;
            if r && (p.revents & libc::POLLIN != 0 || eof || error) {
                out.push(Ready {
                    token,
                    filter: Filter::Read,
                    eof,
                    error,
                });
            }
            if w && (p.revents & libc::POLLOUT != 0 || (!r && (eof || error))) {
                out.push(Ready {
                    token,
                    filter: Filter::Write,
                    eof,
                    error,
                });
            }
        }
        out.truncate(start + max);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::sys::pipe_event::{PipeEventFd, EFD_NONBLOCK};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    type Epoll = Emulated<PollQueue>;

    #[test]
    fn sys_epoll_changes_are_the_filter_difference() {
        let add = |filter| Change { filter, add: true };
        let del = |filter| Change { filter, add: false };
        let (i, o, none) = (EventSet::IN, EventSet::OUT, EventSet::empty());
        assert_eq!(
            changes(none, i | o, false),
            vec![add(Filter::Read), add(Filter::Write)]
        );
        assert_eq!(
            changes(i, o, false),
            vec![del(Filter::Read), add(Filter::Write)]
        );
        assert_eq!(changes(i | o, i, false), vec![del(Filter::Write)]);
        assert_eq!(changes(i, i, false), vec![]);
        assert_eq!(changes(i, i, true), vec![add(Filter::Read)], "new token");
        assert_eq!(
            changes(i | o, none, false),
            vec![del(Filter::Read), del(Filter::Write)]
        );
    }

    #[test]
    fn sys_epoll_merge_folds_filters_by_token() {
        let r = |token, filter, eof, error| Ready {
            token,
            filter,
            eof,
            error,
        };
        let ready = [
            r(7, Filter::Read, false, false),
            r(3, Filter::Write, true, false),
            r(7, Filter::Write, false, false),
            r(9, Filter::Read, true, true),
        ];
        let mut ev = [EpollEvent::default(); 2];
        assert_eq!(
            merge(&ready, &mut ev),
            2,
            "a third token waits for the next wait"
        );
        assert_eq!(ev[0], EpollEvent::new(EventSet::IN | EventSet::OUT, 7));
        assert_eq!(ev[1], EpollEvent::new(EventSet::OUT | EventSet::HANG_UP, 3));
        let mut ev = [EpollEvent::default(); 4];
        assert_eq!(merge(&ready, &mut ev), 3);
        let s = ev[2].event_set();
        assert_eq!(ev[2].data(), 9);
        assert!(s.contains(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP));
        assert!(s.contains(EventSet::ERROR) && !s.contains(EventSet::OUT));
        assert_eq!(ev[2].events(), s.bits());
    }

    #[test]
    fn sys_epoll_emulation_level_triggered_on_real_fds() {
        let ep = Epoll::new().unwrap();
        let a = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        let b = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        ep.ctl(
            ControlOperation::Add,
            a.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )
        .unwrap();
        ep.ctl(
            ControlOperation::Add,
            b.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 2),
        )
        .unwrap();
        let mut ev = [EpollEvent::default(); 4];
        assert_eq!(ep.wait(10, &mut ev).unwrap(), 0, "times out");
        b.write(1).unwrap();
        assert_eq!(ep.wait(-1, &mut ev).unwrap(), 1);
        assert_eq!((ev[0].data(), ev[0].event_set()), (2, EventSet::IN));
        // Level-triggered: still ready until read.
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        b.read().unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 0);
        // Modify the token; delete; unknown descriptors are ENOENT.
        ep.ctl(
            ControlOperation::Modify,
            a.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 5),
        )
        .unwrap();
        a.write(1).unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        assert_eq!(ev[0].data(), 5);
        ep.ctl(
            ControlOperation::Delete,
            a.as_raw_fd(),
            EpollEvent::default(),
        )
        .unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 0, "deleted");
        let e = ep
            .ctl(
                ControlOperation::Delete,
                a.as_raw_fd(),
                EpollEvent::default(),
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let e = ep
            .ctl(
                ControlOperation::Modify,
                1_000_000,
                EpollEvent::new(EventSet::IN, 1),
            )
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            ep.wait(0, &mut []).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn sys_epoll_emulation_out_interest_and_peer_close() {
        let ep = Epoll::new().unwrap();
        let (mut ours, mut peer) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 4))
            .unwrap();
        let mut ev = [EpollEvent::default(); 2];
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 0);
        // Asking for OUT too: a fresh socket is writable at once.
        ep.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::OUT, 4),
        )
        .unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        assert_eq!(ev[0].event_set(), EventSet::OUT);
        peer.write_all(b"x").unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        assert_eq!(
            ev[0].event_set(),
            EventSet::IN | EventSet::OUT,
            "one event per token"
        );
        let mut b = [0u8; 1];
        ours.read_exact(&mut b).unwrap();
        ep.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(EventSet::IN, 4),
        )
        .unwrap();
        drop(peer);
        assert_eq!(ep.wait(1000, &mut ev).unwrap(), 1);
        let s = ev[0].event_set();
        assert!(s.contains(EventSet::IN | EventSet::HANG_UP), "{s:?}");
        // A descriptor number registered again (closed and reused) replaces the old one.
        ep.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 8))
            .unwrap();
        assert_eq!(ep.wait(0, &mut ev).unwrap(), 1);
        assert_eq!(ev[0].data(), 8);
    }

    #[test]
    fn sys_epoll_emulation_wakes_across_threads() {
        let ep = Epoll::new().unwrap();
        let e = PipeEventFd::new(EFD_NONBLOCK).unwrap();
        ep.ctl(
            ControlOperation::Add,
            e.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .unwrap();
        let w = e.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            w.write(1).unwrap();
        });
        let mut ev = [EpollEvent::default(); 1];
        assert_eq!(ep.wait(10_000, &mut ev).unwrap(), 1);
        t.join().unwrap();
    }
}
