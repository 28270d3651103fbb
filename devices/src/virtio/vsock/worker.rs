//! virtio-vsock's worker: the devices' event loop over the queue `EventFd`s, the
//! stop event, the listener and every unix stream. On each wake it:
//! 1. hands socket events to the muxer and times out what is overdue;
//! 2. drains the tx queue, each chain one packet for the muxer;
//! 3. fills rx buffers with whatever the muxer has for the guest.

use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{self, RxBuffers};
use super::{EVQ_INDEX, HDR_SIZE, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX};
use crate::sys::{Epoll, EventFd, EventSet};
use crate::virtio::event_loop;
use crate::virtio::queue_thread::signal_used;
use crate::virtio::VirtioInterrupt;

/// Epoll token of the rx queue's notification `EventFd`.
pub(super) const PROCESS_RXQ: u64 = 0;
/// Epoll token of the tx queue's notification `EventFd`.
pub(super) const PROCESS_TXQ: u64 = 1;
/// Epoll token of the event queue's notification `EventFd`.
pub(super) const PROCESS_EVQ: u64 = 2;

/// The worker's state: the queues and the muxer.
pub(super) struct VsockWorker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    /// rx, tx and event queue notifications.
    evts: [EventFd; 3],
    /// The stop event, held open while it is in the epoll set (kqueue forgets a
    /// closed descriptor's events).
    _kill: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    muxer: Muxer,
    /// Scratch: one tx chain's descriptors and payload, one rx chain's buffers.
    descs: Vec<Descriptor>,
    payload: Vec<u8>,
    rxbufs: RxBuffers,
}

impl VsockWorker {
    /// A worker on the rx and tx queues, with the notification `EventFd`s of all
    /// three queues, the stop event and the muxer (whose epoll set holds them).
    pub(super) fn new(
        mem: GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
        evts: [EventFd; 3],
        stop: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
        muxer: Muxer,
    ) -> Self {
        Self {
            mem,
            rxq,
            txq,
            evts,
            _kill: stop,
            interrupt,
            muxer,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            payload: Vec::new(),
            rxbufs: RxBuffers::default(),
        }
    }

    /// The loop, until the stop event.
    pub(super) fn run(&mut self) {
        if let Err(e) = event_loop::run(self, 64) {
            error!("virtio-vsock: epoll_wait failed, worker exits: {e}");
        }
    }

    /// Drains tx, then fills rx; again while tx waited for rx room and rx moved.
    fn process_queues(&mut self) {
        loop {
            let stalled = self.process_tx();
            let moved = self.process_rx();
            if !(stalled && moved) {
                break;
            }
        }
    }

    /// Hands every tx chain to the muxer. Returns true if it stopped because the
    /// muxer's RST queue is full.
    fn process_tx(&mut self) -> bool {
        let mut used_any = false;
        let mut stalled;
        loop {
            if let Err(e) = self.txq.disable_notification(&self.mem) {
                warn!("virtio-vsock: disabling tx notifications failed: {e}");
            }
            let mut progressed = false;
            while !self.muxer.tx_stalled() {
                let Some(chain) = self.txq.pop_descriptor_chain(&self.mem) else {
                    break;
                };
                progressed = true;
                let head = chain.head_index();
                let now = Instant::now();
                match packet::read_tx(chain, &self.mem, &mut self.descs, &mut self.payload) {
                    Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &self.payload, now),
                    Err(m) => self.muxer.handle_malformed(&m),
                }
                match self.txq.add_used(&self.mem, head, 0) {
                    Ok(()) => used_any = true,
                    Err(e) => debug!("virtio-vsock: returning tx chain {head} failed: {e}"),
                }
            }
            stalled = self.muxer.tx_stalled();
            // Stop when the driver added nothing since, and also when nothing could
            // be popped: a bogus avail index would otherwise keep us spinning.
            match self.txq.enable_notification(&self.mem) {
                Ok(true) if progressed && !stalled => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!("virtio-vsock: enabling tx notifications failed: {e}");
                    break;
                }
            }
        }
        if used_any {
            signal_used(&mut self.txq, &self.mem, &*self.interrupt, "virtio-vsock: tx");
        }
        stalled
    }

    /// Fills rx buffers while the muxer has packets. Returns whether any was used.
    fn process_rx(&mut self) -> bool {
        let mut used_any = false;
        let mut rechecked = false;
        while self.muxer.has_rx() {
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                // Out of buffers: ask to be notified when the driver adds some, and
                // look once more in case it just did.
                if rechecked {
                    break;
                }
                rechecked = true;
                match self.rxq.enable_notification(&self.mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn!("virtio-vsock: enabling rx notifications failed: {e}");
                        break;
                    }
                }
            };
            let head = chain.head_index();
            self.rxbufs.collect(chain, &self.mem);
            let len = if self.rxbufs.capacity() < HDR_SIZE {
                debug!("virtio-vsock: rx chain {head} too small for a header");
                0
            } else {
                match self.muxer.next_rx(self.rxbufs.max_payload()) {
                    Some((hdr, n)) => {
                        let payload = self.muxer.rx_payload(n);
                        self.rxbufs.write(&self.mem, &hdr, payload).unwrap_or(0)
                    }
                    None => {
                        // Nothing fits this buffer now; keep it for later.
                        self.rxq.go_to_previous_position();
                        break;
                    }
                }
            };
            match self.rxq.add_used(&self.mem, head, len) {
                Ok(()) => used_any = true,
                Err(e) => debug!("virtio-vsock: returning rx chain {head} failed: {e}"),
            }
        }
        if used_any {
            signal_used(&mut self.rxq, &self.mem, &*self.interrupt, "virtio-vsock: rx");
        }
        used_any
    }
}

impl event_loop::EventHandler for VsockWorker {
    fn epoll(&self) -> &Epoll {
        self.muxer.epoll()
    }

    fn handle(&mut self, token: u64, events: EventSet) {
        match token {
            // A count of zero (EAGAIN) is harmless: the queues are checked anyway.
            PROCESS_RXQ => drop(self.evts[RXQ_INDEX].read()),
            PROCESS_TXQ => drop(self.evts[TXQ_INDEX].read()),
            // The event queue only carries device events, which are not sent.
            PROCESS_EVQ => drop(self.evts[EVQ_INDEX].read()),
            token => self.muxer.handle_event(token, events, Instant::now()),
        }
    }

    /// After every wake (and at start, for buffers posted before the worker
    /// started): connections past their deadlines, then the queues.
    fn after_wake(&mut self) {
        self.muxer.expire(Instant::now());
        self.process_queues();
    }

    fn timeout(&mut self) -> Option<std::time::Duration> {
        self.muxer
            .next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// The worker without its thread or epoll loop, so property tests and fuzz
/// targets can drive the queues synchronously: [`SyncWorker::process_queues`]
/// is what the worker does after each wake-up.
#[cfg(any(test, feature = "test-utils"))]
pub struct SyncWorker(VsockWorker);


#[cfg(any(test, feature = "test-utils"))]
impl SyncWorker {
    /// Wraps a worker that no thread runs.
    pub(super) fn new(worker: VsockWorker) -> Self {
        Self(worker)
    }

    /// Drains tx, then fills rx, as the worker does after each wake-up.
    pub fn process_queues(&mut self) {
        self.0.process_queues();
    }

    /// The rx queue.
    pub fn rx_queue(&self) -> &Queue {
        &self.0.rxq
    }

    /// The tx queue.
    pub fn tx_queue(&self) -> &Queue {
        &self.0.txq
    }
}

