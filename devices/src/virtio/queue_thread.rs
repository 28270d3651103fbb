//! The worker of a single queue (rng, blk; virtio-fs runs one per queue).
//!
//! [`spawn_queue_worker`] starts a thread that waits on the queue's notification
//! `EventFd` and its stop event, and calls the device's `process` closure once at
//! start (buffers posted before activation) and on every notification; stopping
//! its [`Workers`] joins it, so the device can be reset and activated again. The
//! loop itself, [`run_worker`] over an epoll set from [`worker_epoll`], also
//! serves devices with a worker per queue (virtio-fs). [`drain_queue`] is what a
//! wake does to a request queue (rng, blk, fs, and the balloon's queues):
//! every available chain served and returned, then one interrupt.

use std::io;
use std::os::fd::AsRawFd;

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::event_loop;
use super::{Spawner, VirtioInterrupt, Workers, VIRTIO_MMIO_INT_VRING};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet};

/// Epoll token of the queue's notification `EventFd`.
const PROCESS_QUEUE: u64 = 0;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the kill `EventFd` or the epoll set failed.
    #[error("setting up the worker's events: {0}")]
    Event(#[source] io::Error),
    /// The thread could not be started.
    #[error("starting the worker thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Starts thread `thread` of device `device` serving `queue_evt` with `process`
/// (see [`run_worker`]).
pub fn spawn_queue_worker(
    spawner: &Spawner,
    device: &'static str,
    thread: &'static str,
    queue_evt: EventFd,
    mut process: impl FnMut() + Send + 'static,
) -> Result<Workers<()>, Error> {
    let mut workers = Workers::new(device).map_err(Error::Event)?;
    let epoll = worker_epoll(&queue_evt, workers.stop_event()).map_err(Error::Event)?;
    workers
        .spawn(spawner, thread, move || run_worker(thread, &epoll, &queue_evt, &mut process))
        .map_err(Error::Spawn)?;
    Ok(workers)
}

/// The epoll set of a worker: `queue_evt` (a notification) and `kill` (stop).
pub fn worker_epoll(queue_evt: &EventFd, kill: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        queue_evt.as_raw_fd(),
        EpollEvent::new(EventSet::IN, PROCESS_QUEUE),
    )?;
    event_loop::add_stop(&epoll, kill)?;
    Ok(epoll)
}

/// One queue's worker, as the event loop drives it.
struct QueueHandler<'a> {
    epoll: &'a Epoll,
    queue_evt: &'a EventFd,
    process: &'a mut dyn FnMut(),
    notified: bool,
}

impl event_loop::EventHandler for QueueHandler<'_> {
    fn epoll(&self) -> &Epoll {
        self.epoll
    }

    fn handle(&mut self, _token: u64, _events: EventSet) {
        // A notification count of zero (EAGAIN) is harmless: process anyway.
        let _ = self.queue_evt.read();
        self.notified = true;
    }

    fn after_wake(&mut self) {
        if std::mem::take(&mut self.notified) {
            (self.process)();
        }
    }
}

/// A worker thread's loop over an epoll set from [`worker_epoll`]: `process` once at
/// start (buffers posted before the worker started), then after every notification,
/// until the kill `EventFd` is readable (see [`event_loop::run`]: the kill wins over
/// a notification in the same wake).
pub fn run_worker(name: &str, epoll: &Epoll, queue_evt: &EventFd, process: &mut dyn FnMut()) {
    let mut handler = QueueHandler {
        epoll,
        queue_evt,
        process,
        notified: true,
    };
    if let Err(e) = event_loop::run(&mut handler, 2) {
        error!("{name}: epoll_wait failed, worker exits: {e}");
    }
}

/// Serves every available chain of `queue` with `serve` (which returns the bytes
/// it wrote into the chain), returning each on the used ring (see
/// [`for_each_available`]); then raises the interrupt if the driver wants it.
/// `what` names the queue in logs ("virtio-blk").
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    what: &str,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let mut used_any = false;
    for_each_available(queue, mem, what, |queue, chain| {
        let head = chain.head_index();
        let len = serve(chain);
        match queue.add_used(mem, head, len) {
            Ok(()) => used_any = true,
            Err(e) => debug!("{what}: returning chain {head} failed: {e}"),
        }
    });
    if used_any {
        signal_used(queue, mem, interrupt, what);
    }
}

/// Hands `each` every available chain of `queue` (with the queue, for a device
/// that returns chains itself, or keeps one), until the driver has added nothing
/// since notifications were re-enabled. It stops as well when nothing could be
/// popped: a bogus avail index from a hostile driver would otherwise keep the
/// worker spinning.
pub fn for_each_available(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    what: &str,
    mut each: impl FnMut(&mut Queue, DescriptorChain<&GuestMemoryMmap>),
) {
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            warn!("{what}: disabling notifications failed: {e}");
        }
        let mut progressed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            progressed = true;
            each(queue, chain);
        }
        match queue.enable_notification(mem) {
            Ok(true) if progressed => continue,
            Ok(_) => break,
            Err(e) => {
                warn!("{what}: enabling notifications failed: {e}");
                break;
            }
        }
    }
}

/// Raises the used-buffer interrupt if the driver wants it (EVENT_IDX aware);
/// when the used event cannot be read, it raises it anyway.
pub fn signal_used(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &dyn VirtioInterrupt, what: &str) {
    let notify = queue.needs_notification(mem).unwrap_or_else(|e| {
        warn!("{what}: reading the used event failed: {e}");
        true
    });
    if notify {
        if let Err(e) = interrupt.signal(VIRTIO_MMIO_INT_VRING) {
            error!("{what}: raising the interrupt failed: {e}");
        }
    }
}
