//! The virtio-vsock device.
//!
//! [`Vsock::new`] binds the host-side listening socket, so a bad path is reported
//! before the VM starts. `activate` moves the three queues, their `EventFd`s, the
//! interrupt and a [`Muxer`] into a worker thread (see `worker`).
//!
//! `reset` stops the worker, which closes every connection and host handshake;
//! the listener stays bound for the next activation.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "test-utils"))]
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
#[cfg(any(test, feature = "test-utils"))]
use {crate::virtio::VirtioInterrupt, virtio_queue::Queue, vm_memory::GuestMemoryMmap};

use super::muxer::Muxer;
use super::unix;
use super::worker::{VsockWorker, PROCESS_EVQ, PROCESS_RXQ, PROCESS_TXQ};
#[cfg(any(test, feature = "test-utils"))]
use super::SyncWorker;
use super::{Error, Result, CONFIG_LEN, MIN_GUEST_CID, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventSet};
use crate::virtio::event_loop;
use crate::virtio::{self, ActivateArgs, VirtioCommon, VirtioDevice, Workers};

/// What the VMM configures for the socket device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// Where host programs connect to reach the guest; guest connects to port P
    /// go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, so drop removes only ours.
    socket_id: (u64, u64),
    common: VirtioCommon,
    worker: Option<Workers<()>>,
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
            common: VirtioCommon::new(
                "virtio-vsock",
                VIRTIO_ID_VSOCK,
                vec![QUEUE_SIZE; NUM_QUEUES],
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                // `guest_cid`, a little-endian u64.
                config.guest_cid.to_le_bytes()[..CONFIG_LEN].to_vec(),
            ),
            config,
            listener,
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
        self.common.acked_features()
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
        let mut workers = Workers::new("virtio-vsock").map_err(Error::Event)?;
        let kill = workers.stop_event();
        let epoll = Epoll::new().map_err(Error::Event)?;
        event_loop::add_stop(&epoll, kill).map_err(Error::Event)?;
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
        let mut w = VsockWorker::new(
            mem,
            rxq,
            txq,
            [rx_evt, tx_evt, ev_evt],
            kill.try_clone().map_err(Error::Event)?,
            interrupt,
            muxer,
        );
        workers
            .spawn(&spawner, "aivmm-vsock", move || w.run())
            .map_err(Error::Spawn)?;
        self.worker = Some(workers);
        Ok(())
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
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, args: ActivateArgs) -> virtio::Result<()> {
        self.start(args)
            .map_err(|e| virtio::Error::activation(self.common.name(), e))
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

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
        let evt = || crate::sys::EventFd::new(crate::sys::EFD_NONBLOCK);
        let muxer = Muxer::new(
            self.config.guest_cid,
            self.config.uds_path.clone(),
            self.listener.try_clone()?,
            Epoll::new()?,
        )?;
        Ok(SyncWorker::new(VsockWorker::new(
            mem,
            rxq,
            txq,
            [evt()?, evt()?, evt()?],
            evt()?,
            interrupt,
            muxer,
        )))
    }
}
