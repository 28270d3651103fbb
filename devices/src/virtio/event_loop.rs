//! The one event loop every device worker runs (blk, rng, fs, net, vsock).
//!
//! A worker is an [`EventHandler`]: it owns an epoll set (epoll on Linux, kqueue
//! on macOS, see [`crate::sys`]) in which each fd it waits on carries a token of
//! its choosing, plus the worker's stop `EventFd` under [`STOP`] (added by
//! [`add_stop`]). [`run`] waits on that set and hands every ready token to
//! [`EventHandler::handle`], then calls [`EventHandler::after_wake`] once for
//! the work those events asked for. The stop event wins: in a wake that has it,
//! no other event is handled and the loop returns at once. A worker with no stop
//! event (the user-mode network) ends when it says it is
//! [finished](EventHandler::finished). The stop `EventFd`
//! is never read, so one can stop several workers (virtio-fs has one per queue).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet};

/// The token of the stop `EventFd`; a worker's own tokens are below it.
pub const STOP: u64 = u64::MAX;

/// A device worker, as [`run`] drives it.
pub trait EventHandler {
    /// The epoll set to wait on, holding the worker's fds and its stop event.
    fn epoll(&self) -> &Epoll;

    /// One ready fd, by the token it was added with (never [`STOP`]).
    fn handle(&mut self, token: u64, events: EventSet);

    /// After each wake's events (and once before the first wait, for work
    /// posted before the worker started): does the work they asked for.
    fn after_wake(&mut self) {}

    /// How long the next wait may last: `None` for as long as it takes,
    /// `Some(Duration::ZERO)` to only poll (work is left over).
    fn timeout(&mut self) -> Option<Duration> {
        None
    }

    /// Whether the worker is done without being told to stop (its peer is gone:
    /// the user-mode network once its device end closes). Asked after each wake.
    fn finished(&self) -> bool {
        false
    }
}

/// What one turn of the loop saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// Events (or none, on a timeout) were handled.
    Handled,
    /// The stop event fired; nothing was handled.
    Stop,
}

/// Adds `stop` to `epoll` under [`STOP`].
pub fn add_stop(epoll: &Epoll, stop: &EventFd) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP),
    )
}

/// Runs `handler` until its stop event fires or it is [finished](EventHandler::finished)
/// (`Ok`), or waiting fails (`Err`). `capacity` bounds the events taken per wake.
pub fn run(handler: &mut dyn EventHandler, capacity: usize) -> io::Result<()> {
    let mut events = vec![EpollEvent::default(); capacity.max(1)];
    handler.after_wake();
    while !handler.finished() {
        let timeout = handler.timeout();
        if turn(handler, &mut events, timeout)? == Turn::Stop {
            break;
        }
    }
    Ok(())
}

/// One turn: waits up to `timeout` (`None`: for as long as it takes) for the
/// handler's events, hands them to it and calls [`EventHandler::after_wake`],
/// unless the stop event is among them. A wait cut short by a signal is a turn
/// with nothing ready.
pub fn turn(
    handler: &mut dyn EventHandler,
    events: &mut [EpollEvent],
    timeout: Option<Duration>,
) -> io::Result<Turn> {
    let timeout = match timeout {
        None => -1,
        // Rounded up, so a wake never comes before the time asked for.
        Some(d) if d.is_zero() => 0,
        Some(d) => i32::try_from(d.as_millis() + 1).unwrap_or(i32::MAX),
    };
    let n = match handler.epoll().wait(timeout, events) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e),
    };
    let ready = &events[..n];
    if ready.iter().any(|ev| ev.data() == STOP) {
        return Ok(Turn::Stop);
    }
    for ev in ready {
        handler.handle(ev.data(), ev.event_set());
    }
    handler.after_wake();
    Ok(Turn::Handled)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::sys::EFD_NONBLOCK;

    /// Records what the loop hands it; its one fd is `evt`, under token 7.
    struct Recorder {
        epoll: Epoll,
        evt: EventFd,
        handled: Arc<AtomicUsize>,
        wrong_token: bool,
        wakes: usize,
        timeouts_asked: usize,
    }

    impl EventHandler for Recorder {
        fn epoll(&self) -> &Epoll {
            &self.epoll
        }
        fn handle(&mut self, token: u64, _: EventSet) {
            let _ = self.evt.read();
            self.wrong_token |= token != 7;
            self.handled.fetch_add(1, Ordering::SeqCst);
        }
        fn after_wake(&mut self) {
            self.wakes += 1;
        }
        fn timeout(&mut self) -> Option<Duration> {
            self.timeouts_asked += 1;
            // One short timed wait first: a wake with no event still ends in after_wake.
            (self.timeouts_asked == 1).then_some(Duration::from_millis(5))
        }
    }

    fn recorder(stop: &EventFd) -> Recorder {
        let epoll = Epoll::new().unwrap();
        add_stop(&epoll, stop).unwrap();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        epoll
            .ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, 7))
            .unwrap();
        Recorder {
            epoll,
            evt,
            handled: Arc::new(AtomicUsize::new(0)),
            wrong_token: false,
            wakes: 0,
            timeouts_asked: 0,
        }
    }

    #[test]
    fn the_stop_event_wins_over_others_in_the_same_wake() {
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut r = recorder(&stop);
        r.timeouts_asked = 1; // no timed wait: straight to the one that stops
        r.evt.write(1).unwrap();
        stop.write(1).unwrap();
        run(&mut r, 4).unwrap();
        assert_eq!(r.handled.load(Ordering::SeqCst), 0, "nothing is handled in the wake that stops");
        assert_eq!(r.wakes, 1, "only the start-up round ran");
    }

    #[test]
    fn events_reach_their_handler_until_the_stop() {
        let stop = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = recorder(&stop);
        let handled = r.handled.clone();
        let evt = r.evt.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = r;
            run(&mut r, 4).unwrap();
            r
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        for want in 1..=3 {
            evt.write(1).unwrap();
            while handled.load(Ordering::SeqCst) < want {
                assert!(Instant::now() < deadline, "event {want} was never handled");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.write(1).unwrap();
        let r = t.join().unwrap();
        assert!(!r.wrong_token);
        // The start-up round and a wake per event (the short timed wait may have
        // ended with the first one, or on its own: one more).
        assert!(r.wakes >= 4, "{} wakes", r.wakes);
    }

    /// Finished after its third wake, with no stop event at all.
    struct Countdown(Epoll, usize);

    impl EventHandler for Countdown {
        fn epoll(&self) -> &Epoll {
            &self.0
        }
        fn handle(&mut self, _: u64, _: EventSet) {}
        fn after_wake(&mut self) {
            self.1 += 1;
        }
        fn timeout(&mut self) -> Option<Duration> {
            Some(Duration::from_millis(1))
        }
        fn finished(&self) -> bool {
            self.1 >= 3
        }
    }

    #[test]
    fn a_finished_handler_ends_the_loop_without_a_stop_event() {
        let mut c = Countdown(Epoll::new().unwrap(), 0);
        run(&mut c, 1).unwrap();
        assert_eq!(c.1, 3, "the start-up round and two timed-out waits");
    }
}
