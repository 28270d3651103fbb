//! The virtio-net worker thread: the devices' event loop over the rx and tx queue
//! `EventFd`s, the backend's fd and a kill `EventFd`.
//!
//! Interest in the backend fd follows what the worker can do: readable only while
//! no received frame is waiting for guest buffers, writable only while a frame is
//! waiting for the backend. So a guest that posts no rx buffers costs nothing (the
//! host side backs up: passt's socket fills, the tap queue drops), and a slow
//! backend holds the tx chain, which backs up the guest. Work per wake-up is
//! bounded; leftover work makes the next wait a poll.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::backend::Backend;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};

use super::{complete_partial_csum, Error, MAX_FRAME_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet};
use crate::virtio::event_loop;
use crate::virtio::{VirtioInterrupt, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Epoll token: the driver added rx buffers.
const PROCESS_RX_QUEUE: u64 = 0;
/// Epoll token: the driver queued frames to send.
const PROCESS_TX_QUEUE: u64 = 1;
/// Epoll token: the backend is readable or writable.
const PROCESS_BACKEND: u64 = 2;

/// Frames moved in each direction per wake-up, so neither starves the other.
const BUDGET: usize = 64;

/// Where one reserved rx chain's writable buffers are in `rx_segs`.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    seg_start: usize,
    seg_end: usize,
    capacity: usize,
}

/// Rx chains popped from the ring and held, in ring order, until a frame fills them.
#[derive(Debug, Default)]
struct RxReserve {
    chains: Vec<RxChain>,
    /// The writable buffers of all held chains.
    segs: Vec<(GuestAddress, usize)>,
    /// The sum of the held chains' capacities.
    capacity: usize,
}

impl RxReserve {
    /// Holds `chain`, or returns it to the driver at once (with nothing written) if
    /// it is unusable: a device-readable buffer, one outside guest memory, or no
    /// room at all. Returns true if it put something on the used ring.
    fn add(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        rx: &mut Queue,
    ) -> bool {
        let head = chain.head_index();
        let seg_start = self.segs.len();
        let mut capacity = 0usize;
        let mut bad = false;
        for desc in chain {
            let len = desc.len() as usize;
            // A chain cut short (loop, out-of-table index) ends on a "next" flag.
            bad = desc.has_next();
            if !desc.is_write_only() || !mem.check_range(desc.addr(), len) {
                bad = true;
                break;
            }
            if len > 0 {
                self.segs.push((desc.addr(), len));
                capacity += len;
            }
        }
        if bad || capacity == 0 {
            debug!("virtio-net: malformed rx chain {head} returned unused");
            self.segs.truncate(seg_start);
            return match rx.add_used(mem, head, 0) {
                Ok(()) => true,
                Err(e) => {
                    debug!("virtio-net: returning rx chain {head} failed: {e}");
                    false
                }
            };
        }
        self.chains.push(RxChain {
            head,
            seg_start,
            seg_end: self.segs.len(),
            capacity,
        });
        self.capacity += capacity;
        false
    }
}

/// What became of a received frame.
enum Delivery {
    /// Written to the guest.
    Done,
    /// Thrown away (it can never fit).
    Dropped,
    /// Waiting for the driver to add buffers.
    NoBuffers,
}

/// The worker's state.
pub(super) struct NetWorker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    /// The stop event, held open while it is in `epoll` (kqueue forgets a
    /// closed descriptor's events).
    _kill: EventFd,
    epoll: Epoll,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend: Box<dyn Backend>,
    /// False once the backend is gone: frames are then dropped.
    alive: bool,
    /// What the backend fd is registered for.
    interest: EventSet,
    link_up: Arc<AtomicBool>,
    wakeups: Arc<AtomicU64>,
    mrg_rxbuf: bool,
    /// The driver takes frames with partial checksums (`VIRTIO_NET_F_GUEST_CSUM`).
    guest_csum: bool,
    /// Header bytes the device adds in front of received frames (0 for a backend
    /// that carries its own header).
    hdr_pad: usize,
    /// The received frame waiting for guest buffers is `rx_buf[..rx_len]`,
    /// header included; 0 if none.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// Rx chains popped and held for the waiting frame.
    reserve: RxReserve,
    tx_buf: Vec<u8>,
    /// A tx chain whose frame (`tx_buf[..len]`) the backend was too busy to take.
    tx_pending: Option<(u16, usize)>,
    rx_used: bool,
    tx_used: bool,
    /// A queue or the backend asked for rx / tx work in this wake.
    do_rx: bool,
    do_tx: bool,
    /// Work was left over: the next wait only polls.
    more: bool,
    /// The start-up round is done (it is not counted as a wake-up).
    started: bool,
}

impl NetWorker {
    /// Sets up the epoll set. On failure the backend is handed back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryMmap,
        [rx, tx]: [Queue; 2],
        [rx_evt, tx_evt]: [EventFd; 2],
        kill: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Box<dyn Backend>,
        acked_features: u64,
        link_up: Arc<AtomicBool>,
        wakeups: Arc<AtomicU64>,
    ) -> std::result::Result<Self, (Error, Box<dyn Backend>)> {
        let mrg_rxbuf = acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let guest_csum = acked_features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => return Err((Error::Event(e), backend)),
        };
        let alive = link_up.load(Ordering::SeqCst);
        let mut fds = vec![
            (rx_evt.as_raw_fd(), PROCESS_RX_QUEUE, EventSet::IN),
            (tx_evt.as_raw_fd(), PROCESS_TX_QUEUE, EventSet::IN),
        ];
        if alive {
            fds.push((backend.as_raw_fd(), PROCESS_BACKEND, EventSet::IN));
        }
        for (fd, token, events) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
                return Err((Error::Event(e), backend));
            }
        }
        if let Err(e) = event_loop::add_stop(&epoll, &kill) {
            return Err((Error::Event(e), backend));
        }
        let hdr_pad = VNET_HDR_LEN.saturating_sub(backend.vnet_hdr_len());
        Ok(Self {
            mem,
            rx,
            tx,
            rx_evt,
            tx_evt,
            _kill: kill,
            epoll,
            interrupt,
            backend,
            alive,
            interest: if alive {
                EventSet::IN
            } else {
                EventSet::empty()
            },
            link_up,
            wakeups,
            mrg_rxbuf,
            guest_csum,
            hdr_pad,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            rx_len: 0,
            reserve: RxReserve::default(),
            tx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_pending: None,
            rx_used: false,
            tx_used: false,
            // Work posted before the worker started would otherwise wait for a notify.
            do_rx: true,
            do_tx: true,
            more: false,
            started: false,
        })
    }

    /// The loop; returns the backend when told to stop.
    pub(super) fn run(mut self) -> Box<dyn Backend> {
        if let Err(e) = event_loop::run(&mut self, 4) {
            error!("virtio-net: epoll_wait failed, worker exits: {e}");
        }
        self.backend
    }

    /// Updates the backend's epoll interest and raises the interrupt if needed.
    fn finish_round(&mut self) {
        self.update_interest();
        let mut notify = false;
        for (used, queue, name) in [
            (&mut self.rx_used, &mut self.rx, "rx"),
            (&mut self.tx_used, &mut self.tx, "tx"),
        ] {
            if std::mem::take(used) {
                notify |= queue.needs_notification(&self.mem).unwrap_or_else(|e| {
                    debug!("virtio-net: reading the {name} used event failed: {e}");
                    true
                });
            }
        }
        if notify {
            if let Err(e) = self.interrupt.signal(VIRTIO_MMIO_INT_VRING) {
                error!("virtio-net: raising the interrupt failed: {e}");
            }
        }
    }

    fn update_interest(&mut self) {
        if !self.alive {
            return;
        }
        let mut want = EventSet::empty();
        if self.rx_len == 0 {
            want |= EventSet::IN;
        }
        if self.tx_pending.is_some() || self.backend.has_pending_output() {
            want |= EventSet::OUT;
        }
        if want == self.interest {
            return;
        }
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.backend.as_raw_fd(),
            EpollEvent::new(want, PROCESS_BACKEND),
        ) {
            Ok(()) => self.interest = want,
            Err(e) => error!("virtio-net: changing the backend's epoll interest failed: {e}"),
        }
    }

    /// The backend went away: stop polling it, drop what waits for it, and tell
    /// the driver the link is down.
    fn backend_gone(&mut self, why: &str) {
        if !self.alive {
            return;
        }
        error!(
            "virtio-net: the {} backend is gone ({why}); the link is down",
            self.backend.name()
        );
        self.alive = false;
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Delete,
            self.backend.as_raw_fd(),
            EpollEvent::default(),
        ) {
            debug!("virtio-net: removing the backend from epoll failed: {e}");
        }
        self.interest = EventSet::empty();
        self.link_up.store(false, Ordering::SeqCst);
        if let Some((head, _)) = self.tx_pending.take() {
            self.complete_tx(head);
        }
        self.rx_len = 0;
        if let Err(e) = self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG) {
            error!("virtio-net: raising the config interrupt failed: {e}");
        }
    }

    fn complete_tx(&mut self, head: u16) {
        match self.tx.add_used(&self.mem, head, 0) {
            Ok(()) => self.tx_used = true,
            Err(e) => debug!("virtio-net: returning tx chain {head} failed: {e}"),
        }
    }

    /// Sends `tx_buf[..len]`; true if the chain is done (sent or dropped), false
    /// if the backend is busy and the frame must wait.
    fn send_frame(&mut self, len: usize) -> bool {
        if !self.alive {
            return true;
        }
        // A backend without a header gets the bare frame.
        let strip = VNET_HDR_LEN - self.backend.vnet_hdr_len().min(VNET_HDR_LEN);
        let Some(frame) = self.tx_buf.get(strip..len) else {
            return true;
        };
        match self.backend.send(frame) {
            Ok(sent) => sent,
            Err(e) => {
                match e.kind() {
                    io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::NotConnected => self.backend_gone(&e.to_string()),
                    _ => debug!("virtio-net: the backend dropped a frame: {e}"),
                }
                true
            }
        }
    }

    /// Sends what the driver queued. Returns true if work is left for later.
    fn process_tx(&mut self) -> bool {
        if let Some((head, len)) = self.tx_pending {
            if !self.send_frame(len) {
                return false;
            }
            self.tx_pending = None;
            self.complete_tx(head);
        } else if self.alive && self.backend.has_pending_output() {
            match self.backend.flush() {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => self.backend_gone(&e.to_string()),
            }
        }
        let mut budget = BUDGET;
        loop {
            if let Err(e) = self.tx.disable_notification(&self.mem) {
                debug!("virtio-net: disabling tx notifications failed: {e}");
            }
            let mut progressed = false;
            while let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) {
                progressed = true;
                let head = chain.head_index();
                let Some(len) = gather(chain, &mut self.tx_buf, &self.mem) else {
                    debug!("virtio-net: malformed tx chain {head} dropped");
                    self.complete_tx(head);
                    continue;
                };
                if !self.send_frame(len) {
                    self.tx_pending = Some((head, len));
                    return false;
                }
                self.complete_tx(head);
                budget -= 1;
                if budget == 0 {
                    return true;
                }
            }
            // Stop when the driver added nothing since, and also when nothing could
            // be popped: a bogus avail index would otherwise keep us spinning.
            match self.tx.enable_notification(&self.mem) {
                Ok(true) if progressed => continue,
                Ok(_) => return false,
                Err(e) => {
                    debug!("virtio-net: enabling tx notifications failed: {e}");
                    return false;
                }
            }
        }
    }

    /// Moves frames from the backend to the guest. Returns true if work is left.
    fn process_rx(&mut self) -> bool {
        for _ in 0..BUDGET {
            if !self.alive {
                self.rx_len = 0;
                return false;
            }
            if self.rx_len == 0 {
                let pad = self.hdr_pad;
                match self.backend.recv(&mut self.rx_buf[pad..]) {
                    Ok(Some(n)) if n == 0 || pad + n < VNET_HDR_LEN => {
                        debug!("virtio-net: {n}-byte frame from the backend dropped");
                        continue;
                    }
                    Ok(Some(n)) => {
                        // Header-less backends: no offload information, so all zero.
                        self.rx_buf[..pad].fill(0);
                        self.rx_len = pad + n;
                        // A partial checksum the driver did not agree to take is
                        // finished here.
                        if !self.guest_csum && !complete_partial_csum(&mut self.rx_buf[..self.rx_len]) {
                            debug!("virtio-net: a frame from the backend with a bad checksum offset dropped");
                            self.rx_len = 0;
                            continue;
                        }
                    }
                    Ok(None) => return false,
                    Err(e) => {
                        self.backend_gone(&e.to_string());
                        return false;
                    }
                }
            }
            match self.deliver() {
                Delivery::Done | Delivery::Dropped => self.rx_len = 0,
                Delivery::NoBuffers => return false,
            }
        }
        true
    }

    /// Writes the waiting frame into guest buffers.
    fn deliver(&mut self) -> Delivery {
        let need = self.rx_len;
        loop {
            let enough = if self.mrg_rxbuf {
                self.reserve.capacity >= need
            } else {
                !self.reserve.chains.is_empty()
            };
            if enough {
                break;
            }
            if self.reserve.chains.len() >= usize::from(self.rx.size()) {
                // Every buffer the ring can hold is ours and the frame still does not fit.
                debug!("virtio-net: {need}-byte frame dropped: the rx buffers are too small");
                return Delivery::Dropped;
            }
            match self.rx.pop_descriptor_chain(&self.mem) {
                Some(chain) => self.rx_used |= self.reserve.add(chain, &self.mem, &mut self.rx),
                None => match self.rx.enable_notification(&self.mem) {
                    Ok(true) => {
                        // Buffers were added meanwhile; pop again (and stop asking).
                        if let Err(e) = self.rx.disable_notification(&self.mem) {
                            debug!("virtio-net: disabling rx notifications failed: {e}");
                        }
                        // A bogus avail index makes enable say "more" while pop finds
                        // nothing: give up rather than spin.
                        match self.rx.pop_descriptor_chain(&self.mem) {
                            Some(chain) => {
                                self.rx_used |= self.reserve.add(chain, &self.mem, &mut self.rx)
                            }
                            None => return Delivery::NoBuffers,
                        }
                    }
                    Ok(false) => return Delivery::NoBuffers,
                    Err(e) => {
                        debug!("virtio-net: enabling rx notifications failed: {e}");
                        return Delivery::NoBuffers;
                    }
                },
            }
        }
        // How many chains the frame takes: the shortest prefix that holds it.
        let mut count = 0;
        let mut cap = 0;
        for c in &self.reserve.chains {
            count += 1;
            cap += c.capacity;
            if !self.mrg_rxbuf || cap >= need {
                break;
            }
        }
        if cap < need {
            // Only without mergeable buffers: one chain must hold the whole frame.
            debug!("virtio-net: {need}-byte frame dropped: rx chain holds only {cap}");
            return Delivery::Dropped;
        }
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        self.rx_buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut off = 0;
        for c in &self.reserve.chains[..count] {
            let mut written = 0;
            for &(addr, len) in &self.reserve.segs[c.seg_start..c.seg_end] {
                if off == need {
                    break;
                }
                let n = len.min(need - off);
                if let Err(e) = self.mem.write_slice(&self.rx_buf[off..off + n], addr) {
                    debug!("virtio-net: writing rx buffer at {:#x} failed: {e}", addr.0);
                }
                off += n;
                written += n;
            }
            // `written` is at most one chain's capacity, below 2^32 for a real chain.
            let len = u32::try_from(written).unwrap_or(u32::MAX);
            match self.rx.add_used(&self.mem, c.head, len) {
                Ok(()) => self.rx_used = true,
                Err(e) => debug!("virtio-net: returning rx chain {} failed: {e}", c.head),
            }
        }
        let used: usize = self.reserve.chains[..count]
            .iter()
            .map(|c| c.capacity)
            .sum();
        self.reserve.capacity -= used;
        self.reserve.chains.drain(..count);
        match self.reserve.chains.first() {
            None => self.reserve.segs.clear(),
            Some(first) => {
                let shift = first.seg_start;
                self.reserve.segs.drain(..shift);
                for c in &mut self.reserve.chains {
                    c.seg_start -= shift;
                    c.seg_end -= shift;
                }
            }
        }
        Delivery::Done
    }
}

/// The worker without its thread or epoll loop, so property tests and fuzz
/// targets can drive the queues synchronously: [`SyncWorker::process`] is what
/// one wake-up does.
impl event_loop::EventHandler for NetWorker {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle(&mut self, token: u64, set: EventSet) {
        match token {
            PROCESS_RX_QUEUE => {
                // A count of zero (EAGAIN) is harmless: process anyway.
                let _ = self.rx_evt.read();
                self.do_rx = true;
            }
            PROCESS_TX_QUEUE => {
                let _ = self.tx_evt.read();
                self.do_tx = true;
            }
            PROCESS_BACKEND => {
                self.do_rx |= set.contains(EventSet::IN);
                self.do_tx |= set.contains(EventSet::OUT);
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    // Let rx drain what is readable first; then it is gone.
                    if set.contains(EventSet::IN) && self.rx_len == 0 {
                        self.process_rx();
                    }
                    self.backend_gone("hang-up");
                }
            }
            other => warn!("virtio-net: unexpected epoll token {other}"),
        }
    }

    fn after_wake(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
        }
        // Work left from the last round goes on whatever woke us.
        let (do_rx, do_tx) = (self.do_rx | self.more, self.do_tx | self.more);
        (self.do_rx, self.do_tx, self.more) = (false, false, false);
        if do_tx {
            self.more |= self.process_tx();
        }
        if do_rx {
            self.more |= self.process_rx();
        }
        self.finish_round();
    }

    fn timeout(&mut self) -> Option<std::time::Duration> {
        self.more.then_some(std::time::Duration::ZERO)
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub struct SyncWorker(NetWorker);

#[cfg(any(test, feature = "test-utils"))]
impl SyncWorker {
    /// A worker on `rx` and `tx` with `backend`, the link up.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        backend: Box<dyn Backend>,
        acked_features: u64,
    ) -> io::Result<Self> {
        let evt = || EventFd::new(crate::sys::EFD_NONBLOCK);
        NetWorker::new(
            mem,
            [rx, tx],
            [evt()?, evt()?],
            evt()?,
            interrupt,
            backend,
            acked_features,
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicU64::new(0)),
        )
        .map(Self)
        .map_err(|(e, _)| io::Error::other(e.to_string()))
    }

    /// Sends what the driver queued, receives what the backend has, then raises
    /// the interrupt if needed. Returns true if work is left for another call.
    pub fn process(&mut self) -> bool {
        let more = self.0.process_tx() | self.0.process_rx();
        self.0.finish_round();
        more
    }

    /// The rx queue.
    pub fn rx_queue(&self) -> &Queue {
        &self.0.rx
    }

    /// The tx queue.
    pub fn tx_queue(&self) -> &Queue {
        &self.0.tx
    }
}

/// Copies a tx chain into `buf`; `None` if it is malformed (device-writable
/// buffers, outside guest memory, longer than `buf`, shorter than the header,
/// looping or pointing outside the descriptor table).
fn gather(
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    mem: &GuestMemoryMmap,
) -> Option<usize> {
    let mut len = 0usize;
    let mut cut_short = false;
    for desc in chain {
        if desc.is_write_only() {
            return None;
        }
        let end = len.checked_add(desc.len() as usize)?;
        mem.read_slice(buf.get_mut(len..end)?, desc.addr()).ok()?;
        len = end;
        cut_short = desc.has_next();
    }
    // The iterator stops early, silently, on a loop or an out-of-table index; the
    // last descriptor then still says "next".
    (len >= VNET_HDR_LEN && !cut_short).then_some(len)
}
