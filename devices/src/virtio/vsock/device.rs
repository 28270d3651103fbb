//! The virtio-vsock device and its worker thread.
//!
//! [`Vsock::new`] binds the host-side listening socket, so a bad path is reported
//! before the VM starts. `activate` moves the three queues, their `EventFd`s, the
//! interrupt and a [`Muxer`] into a worker thread that epolls the queue `EventFd`s,
//! a kill `EventFd`, the listener and every unix stream. On each wake it:
//! 1. hands socket events to the muxer and times out what is overdue;
//! 2. drains the tx queue, each chain one packet for the muxer;
//! 3. fills rx buffers with whatever the muxer has for the guest.
//!
//! `reset` stops the worker, which closes every connection and host handshake;
//! the listener stays bound for the next activation.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::muxer::Muxer;
use super::packet::{self, RxBuffers};
use super::unix;
use super::{
    Error, Result, CONFIG_LEN, EVQ_INDEX, HDR_SIZE, MIN_GUEST_CID, NUM_QUEUES, QUEUE_SIZE,
    RXQ_INDEX, TXQ_INDEX, VIRTIO_ID_VSOCK,
};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet, EFD_NONBLOCK};
use crate::virtio::event_loop;
use crate::virtio::{self, ActivateArgs, VirtioDevice, VirtioInterrupt, VIRTIO_MMIO_INT_VRING};

/// Epoll token of the rx queue's notification `EventFd`.
const PROCESS_RXQ: u64 = 0;
/// Epoll token of the tx queue's notification `EventFd`.
const PROCESS_TXQ: u64 = 1;
/// Epoll token of the event queue's notification `EventFd`.
const PROCESS_EVQ: u64 = 2;

/// What the VMM configures for the socket device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// Where host programs connect to reach the guest; guest connects to port P
    /// go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// A running worker: the thread and the `EventFd` that stops it.
struct Worker {
    kill: EventFd,
    handle: crate::virtio::queue_thread::WorkerHandle<()>,
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, so drop removes only ours.
    socket_id: (u64, u64),
    acked_features: u64,
    worker: Option<Worker>,
}

/// Makes room for the listening socket: a stale socket file (nobody accepts on it)
/// is removed; a live one, or anything that is not a socket, is refused.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(Error::Bind {
                path: path.to_path_buf(),
                source: e,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    match unix::connect_nonblocking(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| Error::RemoveStale {
                path: path.to_path_buf(),
                source,
            }),
        // Someone is there but busy (a full backlog): not ours to remove.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Err(Error::SocketInUse(path.to_path_buf()))
        }
        Err(e) => Err(Error::Bind {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

impl Vsock {
    /// Checks `config` and listens on its `uds_path`.
    pub fn new(config: VsockConfig) -> Result<Self> {
        if config.guest_cid < MIN_GUEST_CID || config.guest_cid >= u64::from(u32::MAX) {
            return Err(Error::ReservedCid(config.guest_cid));
        }
        let path = &config.uds_path;
        // Room for the longest `_<port>` suffix of a guest connect.
        let max = std::mem::size_of::<libc::sockaddr_un>() - 2 - 1 - ("_4294967295".len());
        if path.as_os_str().len() > max {
            return Err(Error::PathTooLong(path.clone()));
        }
        clear_stale_socket(path)?;
        let bind_err = |source| Error::Bind {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        Ok(Self {
            socket_id: (meta.dev(), meta.ino()),
            config,
            listener,
            acked_features: 0,
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    /// The host-side listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.config.uds_path
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn start(&mut self, args: ActivateArgs) -> Result<()> {
        if self.worker.is_some() {
            return Err(Error::AlreadyActive);
        }
        let ActivateArgs {
            mem,
            queues,
            queue_evts,
            interrupt,
            spawner,
        } = args;
        if queues.len() < NUM_QUEUES || queue_evts.len() < NUM_QUEUES {
            return Err(Error::NoQueue);
        }
        let mut queues = queues.into_iter();
        let mut evts = queue_evts.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(Error::NoQueue);
        };
        let (Some(rx_evt), Some(tx_evt), Some(ev_evt)) = (evts.next(), evts.next(), evts.next())
        else {
            return Err(Error::NoQueue);
        };
        if !rxq.ready() || !txq.ready() {
            return Err(Error::NoQueue);
        }
        let kill = EventFd::new(EFD_NONBLOCK).map_err(Error::Event)?;
        let epoll = Epoll::new().map_err(Error::Event)?;
        event_loop::add_stop(&epoll, &kill).map_err(Error::Event)?;
        for (fd, token) in [
            (&rx_evt, PROCESS_RXQ),
            (&tx_evt, PROCESS_TXQ),
            (&ev_evt, PROCESS_EVQ),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Event)?;
        }
        let listener = self.listener.try_clone().map_err(Error::Event)?;
        let muxer = Muxer::new(
            self.config.guest_cid,
            self.config.uds_path.clone(),
            listener,
            epoll,
        )
        .map_err(Error::Event)?;
        let mut w = VsockWorker {
            mem,
            rxq,
            txq,
            evts: [rx_evt, tx_evt, ev_evt],
            _kill: kill.try_clone().map_err(Error::Event)?,
            interrupt,
            muxer,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            payload: Vec::new(),
            rxbufs: RxBuffers::default(),
        };
        let handle = spawner.spawn("aivmm-vsock", move || w.run())
            .map_err(Error::Spawn)?;
        self.worker = Some(Worker { kill, handle });
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.kill.write(1) {
                error!("virtio-vsock: signalling the worker to stop failed: {e}");
            }
            if w.handle.join().is_err() {
                error!("virtio-vsock: the worker thread panicked");
            }
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop();
        let path = &self.config.uds_path;
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if (m.dev(), m.ino()) == self.socket_id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < CONFIG_LEN)
                .map_or(0, |o| config[o]);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("virtio-vsock: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, args: ActivateArgs) -> virtio::Result<()> {
        self.start(args)
            .map_err(|e| virtio::Error::Activate(e.to_string()))
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.acked_features = 0;
        true
    }
}

/// The worker's state: the queues and the muxer.
struct VsockWorker {
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
    fn run(&mut self) {
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
            signal_used(&mut self.txq, &self.mem, &*self.interrupt, "tx");
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
            signal_used(&mut self.rxq, &self.mem, &*self.interrupt, "rx");
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
impl Vsock {
    /// A worker with a fresh muxer on this device's listener; no thread is started.
    pub fn sync_worker(
        &self,
        mem: GuestMemoryMmap,
        rxq: Queue,
        txq: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> io::Result<SyncWorker> {
        let evt = || EventFd::new(EFD_NONBLOCK);
        let muxer = Muxer::new(
            self.config.guest_cid,
            self.config.uds_path.clone(),
            self.listener.try_clone()?,
            Epoll::new()?,
        )?;
        Ok(SyncWorker(VsockWorker {
            mem,
            rxq,
            txq,
            evts: [evt()?, evt()?, evt()?],
            _kill: evt()?,
            interrupt,
            muxer,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            payload: Vec::new(),
            rxbufs: RxBuffers::default(),
        }))
    }
}

#[cfg(any(test, feature = "test-utils"))]
impl SyncWorker {
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

/// Raises the used-buffer interrupt if the driver wants it (EVENT_IDX aware).
fn signal_used(q: &mut Queue, mem: &GuestMemoryMmap, irq: &dyn VirtioInterrupt, name: &str) {
    let notify = q.needs_notification(mem).unwrap_or_else(|e| {
        warn!("virtio-vsock: reading the {name} used event failed: {e}");
        true
    });
    if notify {
        if let Err(e) = irq.signal(VIRTIO_MMIO_INT_VRING) {
            error!("virtio-vsock: raising the interrupt failed: {e}");
        }
    }
}
