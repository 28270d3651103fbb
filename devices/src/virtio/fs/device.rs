//! The virtio-fs device: its checked configuration, config space and lifecycle.
//!
//! `activate` starts one worker thread per ready queue (see [`super::worker`]), all
//! sharing one FUSE server. `reset` stops and joins them and drops the server with
//! every inode and handle it held, so the next activation starts a fresh FUSE
//! session that the guest INITs again.
//!
//! On Linux the shared directory is resolved and opened once, in [`Fs::new`]
//! (`filesystem::ShareRoot`); every server the device builds, the first and each
//! one after a reset, serves that open directory, never the path again.

use std::path::PathBuf;
use std::sync::Arc;

#[cfg(target_os = "linux")]
use fuse_backend_rs::api::server::Server;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

#[cfg(target_os = "linux")]
use super::filesystem::{ShareFs, ShareRoot};
#[cfg(target_os = "linux")]
use super::protect::Protection;
use super::macos::backend::portable_server;
use super::worker::QueueWorker;
use super::{
    Error, FsBackend, FsConfig, FsServer, Result, CONFIG_SPACE_LEN, MAX_REQUEST_QUEUES,
    NUM_HIPRIO_QUEUES, QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS,
};
use crate::virtio::queue_thread::{run_worker, worker_epoll};
use crate::virtio::{self, ActivateArgs, VirtioCommon, VirtioDevice, Workers};

/// A configuration that passed [`check_config`], with the root resolved.
#[derive(Clone, Debug)]
struct Checked {
    config: FsConfig,
    /// The shared directory, opened once; every server this device builds (one
    /// per activation) imports it from this fd, never from the path again (Linux).
    #[cfg(target_os = "linux")]
    root: Arc<ShareRoot>,
    /// The protected paths, resolved once when the device is created (Linux).
    #[cfg(target_os = "linux")]
    protection: Arc<Protection>,
}

/// Resolves and opens the root once (Linux): the fd is what every server serves.
#[cfg(target_os = "linux")]
fn open_root(path: &std::path::Path) -> Result<(Arc<ShareRoot>, PathBuf)> {
    let root = ShareRoot::open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR) => Error::RootNotDir(path.to_path_buf()),
        _ => Error::RootMissing(path.to_path_buf(), e),
    })?;
    let resolved = root.path().to_path_buf();
    Ok((Arc::new(root), resolved))
}

/// Checks `config`: the root exists and is a directory (symlinks resolved), the
/// tag fits the config space, the queue count is in range.
fn check_config(config: &FsConfig) -> Result<Checked> {
    #[cfg(target_os = "linux")]
    let (share_root, root) = open_root(&config.root)?;
    #[cfg(not(target_os = "linux"))]
    let root = {
        let root = std::fs::canonicalize(&config.root)
            .map_err(|e| Error::RootMissing(config.root.clone(), e))?;
        let meta = std::fs::metadata(&root).map_err(|e| Error::RootMissing(root.clone(), e))?;
        if !meta.is_dir() {
            return Err(Error::RootNotDir(root));
        }
        root
    };
    if root.to_str().is_none_or(|s| s.contains('\0')) {
        return Err(Error::RootNotUtf8(root));
    }
    if config.tag.is_empty() {
        return Err(Error::EmptyTag);
    }
    if config.tag.len() > TAG_LEN {
        return Err(Error::TagTooLong(config.tag.len()));
    }
    if config.tag.contains('\0') {
        return Err(Error::TagHasNul);
    }
    if !(1..=MAX_REQUEST_QUEUES).contains(&config.request_queues) {
        return Err(Error::RequestQueues(config.request_queues));
    }
    let mut config = config.clone();
    #[cfg(target_os = "linux")]
    let protection = Arc::new(Protection::resolve(&root, &config.protection_rules(&root)));
    config.root = root;
    Ok(Checked {
        config,
        #[cfg(target_os = "linux")]
        root: share_root,
        #[cfg(target_os = "linux")]
        protection,
    })
}

/// The file system a share serves, for `config` (checked first). Tests and
/// benches call it directly to drive the `FileSystem` API.
#[cfg(target_os = "linux")]
pub fn share_fs(config: &FsConfig) -> Result<ShareFs> {
    let checked = check_config(config)?;
    build_fs(&checked)
}

#[cfg(target_os = "linux")]
fn build_fs(checked: &Checked) -> Result<ShareFs> {
    ShareFs::new(
        &checked.config,
        checked.root.clone(),
        checked.protection.clone(),
    )
    .map_err(Error::Passthrough)
}

/// A FUSE server for `config`, as the device's workers use it.
#[cfg(target_os = "linux")]
pub fn fuse_server(config: &FsConfig) -> Result<Arc<Server<ShareFs>>> {
    Ok(Arc::new(Server::new(share_fs(config)?)))
}

/// The server of `checked`'s backend.
fn build_server(checked: &Checked) -> Result<Arc<dyn FsServer>> {
    match checked.config.backend {
        #[cfg(target_os = "linux")]
        FsBackend::Linux => Ok(Arc::new(Server::new(build_fs(checked)?))),
        FsBackend::Portable => portable_server(&checked.config).map_err(Error::Passthrough),
    }
}

/// The virtio-fs device.
pub struct Fs {
    checked: Checked,
    common: VirtioCommon,
    /// The server for the next activation, built ahead so errors show early.
    next_server: Option<Arc<dyn FsServer>>,
    workers: Option<Workers<()>>,
}

impl Fs {
    /// A new, inactive device sharing `config.root` under `config.tag`.
    pub fn new(config: FsConfig) -> Result<Fs> {
        let checked = check_config(&config)?;
        let server = build_server(&checked)?;
        let mut config_space = [0u8; CONFIG_SPACE_LEN];
        config_space[..checked.config.tag.len()].copy_from_slice(checked.config.tag.as_bytes());
        // request_queues <= MAX_REQUEST_QUEUES, so it fits a u32.
        let n = u32::try_from(checked.config.request_queues).unwrap_or(1);
        config_space[TAG_LEN..].copy_from_slice(&n.to_le_bytes());
        let queue_sizes = vec![QUEUE_SIZE; NUM_HIPRIO_QUEUES + checked.config.request_queues];
        Ok(Fs {
            checked,
            common: VirtioCommon::new(
                "virtio-fs",
                VIRTIO_ID_FS,
                queue_sizes,
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                config_space.to_vec(),
            ),
            next_server: Some(server),
            workers: None,
        })
    }

    /// The configuration, with the root resolved.
    pub fn config(&self) -> &FsConfig {
        &self.checked.config
    }

    /// The resolved shared directory.
    pub fn root(&self) -> &PathBuf {
        &self.checked.config.root
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    /// Whether worker threads are running.
    pub fn is_active(&self) -> bool {
        self.workers.is_some()
    }

    fn start(&mut self, args: ActivateArgs) -> Result<()> {
        if self.workers.is_some() {
            return Err(Error::AlreadyActive);
        }
        let ActivateArgs {
            mem,
            queues,
            queue_evts,
            interrupt,
            spawner,
        } = args;
        let expected = self.common.queue_sizes().len();
        let ready_requests = queues.iter().skip(NUM_HIPRIO_QUEUES).any(|q| q.ready());
        if queues.len() != expected || queue_evts.len() != expected || !ready_requests {
            return Err(Error::Queues {
                expected,
                got: queues.len(),
            });
        }
        let server = match self.next_server.take() {
            Some(s) => s,
            // After a reset: build the new server on a worker thread, since this
            // runs on a vCPU thread, whose seccomp filter does not open files.
            None => {
                let checked = self.checked.clone();
                spawner.spawn("aivmm-fs-init", move || build_server(&checked))
                    .map_err(Error::Spawn)?
                    .join()
                    .map_err(|_| Error::Passthrough(std::io::Error::other("setup panicked")))??
            }
        };
        let mut workers = Workers::new("virtio-fs").map_err(Error::Event)?;
        for (index, (queue, queue_evt)) in queues.into_iter().zip(queue_evts).enumerate() {
            if !queue.ready() {
                continue;
            }
            let spawned = worker_epoll(&queue_evt, workers.stop_event())
                .map_err(Error::Event)
                .and_then(|epoll| {
                    let mut worker = QueueWorker {
                        index,
                        mem: mem.clone(),
                        queue,
                        server: server.clone(),
                        interrupt: interrupt.clone(),
                    };
                    let name = format!("aivmm-fs-q{index}");
                    workers
                        .spawn(&spawner, name.clone(), move || {
                            run_worker(&name, &epoll, &queue_evt, &mut || worker.process_queue())
                        })
                        .map_err(Error::Spawn)
                });
            if let Err(e) = spawned {
                workers.stop();
                return Err(e);
            }
        }
        self.workers = Some(workers);
        Ok(())
    }

}

impl Drop for Fs {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Fs {
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
        if let Some(w) = self.workers.take() {
            w.stop();
        }
        // The old server (its inodes and open files) goes with the last worker; the
        // next activation builds a new one.
        self.next_server = None;
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::mem::size_of;
    use std::time::Duration;

    use fuse_backend_rs::abi::fuse_abi::{EntryOut, OutHeader};
    use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::bus::BusDevice;
    use crate::sys::{EventFd, EFD_NONBLOCK};
    use crate::test_utils::*;
    use crate::virtio::fs::test_utils as fuse;
    use crate::virtio::fs::CachePolicy;
    use crate::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};

    const WAIT: Duration = Duration::from_secs(5);
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

    #[test]
    fn config_is_checked() {
        let tmp = TempDir::new().unwrap();
        let file = tmp.as_path().join("f");
        std::fs::write(&file, b"").unwrap();
        let ok = FsConfig::new(tmp.as_path(), "work");
        assert!(Fs::new(ok.clone()).is_ok());
        let with = |f: &dyn Fn(&mut FsConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            Fs::new(c).err().unwrap()
        };
        assert!(matches!(
            with(&|c| c.root = tmp.as_path().join("missing")),
            Error::RootMissing(..)
        ));
        assert!(matches!(
            with(&|c| c.root = file.clone()),
            Error::RootNotDir(_)
        ));
        assert!(matches!(with(&|c| c.tag = String::new()), Error::EmptyTag));
        assert!(matches!(
            with(&|c| c.tag = "x".repeat(37)),
            Error::TagTooLong(37)
        ));
        assert!(matches!(with(&|c| c.tag = "a\0b".into()), Error::TagHasNul));
        assert!(matches!(
            with(&|c| c.request_queues = 0),
            Error::RequestQueues(0)
        ));
        assert!(matches!(
            with(&|c| c.request_queues = 17),
            Error::RequestQueues(17)
        ));
        // A link to the root is resolved once, here.
        let link = tmp.as_path().join("link");
        std::os::unix::fs::symlink(tmp.as_path(), &link).unwrap();
        let fs = Fs::new(FsConfig::new(&link, "work")).unwrap();
        assert_eq!(fs.root(), &std::fs::canonicalize(tmp.as_path()).unwrap());
        for cache in [CachePolicy::None, CachePolicy::Auto, CachePolicy::Always] {
            let mut c = ok.clone();
            c.cache = cache;
            c.read_only = true;
            assert!(Fs::new(c).is_ok());
        }
    }

    #[test]
    fn config_space_and_queues() {
        let tmp = TempDir::new().unwrap();
        let mut cfg = FsConfig::new(tmp.as_path(), "myproject");
        cfg.request_queues = 3;
        let fs = Fs::new(cfg).unwrap();
        assert_eq!(fs.device_type(), VIRTIO_ID_FS);
        assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE; 4]);
        let mut space = [0xffu8; 48];
        fs.read_config(0, &mut space);
        assert_eq!(&space[..9], b"myproject");
        assert!(space[9..TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&space[TAG_LEN..TAG_LEN + 4], &3u32.to_le_bytes());
        assert!(space[CONFIG_SPACE_LEN..].iter().all(|&b| b == 0));
        let mut n = [0u8; 4];
        fs.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 3);
        fs.read_config(u64::MAX, &mut n);
        assert_eq!(n, [0; 4]);
        assert_eq!(fs.features(), FEATURES);
    }

    fn post(
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        head: u16,
        slot: u64,
        req: &[u8],
    ) {
        let addr = DATA_ADDR + slot * 0x2_0000;
        mem.write_slice(req, GuestAddress(addr)).unwrap();
        add_chain(
            q,
            head,
            &[
                Buf::read(addr, req.len() as u32),
                Buf::write(addr + 0x1000, 0x1_0000),
            ],
        );
    }

    fn reply(mem: &GuestMemoryMmap, slot: u64) -> (OutHeader, Vec<u8>) {
        let addr = DATA_ADDR + slot * 0x2_0000 + 0x1000;
        let h: OutHeader = mem.read_obj(GuestAddress(addr)).unwrap();
        let mut body = vec![0u8; h.len as usize - size_of::<OutHeader>()];
        mem.read_slice(
            &mut body,
            GuestAddress(addr + size_of::<OutHeader>() as u64),
        )
        .unwrap();
        (h, body)
    }

    #[test]
    fn through_the_mmio_transport_with_workers() {
        let tmp = TempDir::new().unwrap();
        std::fs::write(tmp.as_path().join("hello"), b"hi").unwrap();
        let mem = guest_memory(0x80_0000);
        let irq = Arc::new(RecordingInterrupt::default());
        let fs = Fs::new(FsConfig::new(tmp.as_path(), "work")).unwrap();
        let mut t = MmioTransport::new(Box::new(fs), mem.clone(), irq.clone(), Default::default()).unwrap();
        assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_FS);
        let mut tag = [0u8; 4];
        t.read(CONFIG_SPACE_OFFSET, &mut tag);
        assert_eq!(&tag, b"work");

        for round in 0..2u64 {
            let hiprio = mock_queue_at(&mem, QUEUE_ADDR, 64);
            let requests = mock_queue_at(&mem, QUEUE_ADDR + 0x1_0000, 64);
            assert_eq!(mmio_init(&mut t, FEATURES, &[&hiprio, &requests]), 0xf);
            // INIT, then LOOKUP, on the request queue: a fresh session each round.
            post(&requests, &mem, 0, 0, &fuse::init().encode(1, (0, 0)));
            post(
                &requests,
                &mem,
                2,
                1,
                &fuse::lookup(fuse::ROOT_ID, "hello").encode(2, (0, 0)),
            );
            write32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
            assert!(
                wait_until(WAIT, || used_idx(&requests) == 2),
                "round {round}"
            );
            let (h, _) = reply(&mem, 0);
            assert_eq!((h.error, h.unique), (0, 1));
            let (h, body) = reply(&mem, 1);
            assert_eq!((h.error, h.unique), (0, 2));
            let e = *EntryOut::from_slice(&body[..size_of::<EntryOut>()]).unwrap();
            assert_eq!(e.attr.size, 2);
            assert_eq!(used_elem(&requests, 1), (2, h.len));
            // A FORGET on the high-priority queue needs no reply.
            let forget = fuse::Request {
                opcode: fuse_backend_rs::abi::fuse_abi::Opcode::Forget as u32,
                nodeid: e.nodeid,
                body: 1u64.to_le_bytes().to_vec(),
            };
            post(&hiprio, &mem, 0, 2, &forget.encode(3, (0, 0)));
            write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
            assert!(wait_until(WAIT, || used_idx(&hiprio) == 1));
            assert_eq!(used_elem(&hiprio, 0), (0, 0));
            assert!(wait_until(WAIT, || irq.count() >= 1));
            // Reset: the workers stop and the next round starts over.
            write32(&mut t, 0x70, 0);
            assert_eq!(read32(&mut t, 0x70), 0);
        }
    }

    #[test]
    fn activation_errors_and_reset() {
        let tmp = TempDir::new().unwrap();
        let mem = guest_memory(0x40_0000);
        let mut fs = Fs::new(FsConfig::new(tmp.as_path(), "work")).unwrap();
        let args = |queues: Vec<virtio_queue::Queue>| {
            let n = queues.len();
            ActivateArgs {
                mem: mem.clone(),
                queues,
                queue_evts: (0..n)
                    .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                    .collect(),
                interrupt: Arc::new(RecordingVirtioInterrupt::default()),
                spawner: Default::default(),
            }
        };
        assert!(fs.activate(args(vec![])).is_err());
        // Two queues, but the request queue is not ready.
        let hi = mock_queue_at(&mem, QUEUE_ADDR, 16);
        let not_ready = virtio_queue::Queue::new(16).unwrap();
        assert!(fs
            .activate(args(vec![hi.create_queue().unwrap(), not_ready]))
            .is_err());
        assert!(!fs.is_active());
        let rq = mock_queue_at(&mem, QUEUE_ADDR + 0x1_0000, 16);
        fs.activate(args(vec![
            hi.create_queue().unwrap(),
            rq.create_queue().unwrap(),
        ]))
        .unwrap();
        assert!(fs.is_active());
        assert!(fs
            .activate(args(vec![
                hi.create_queue().unwrap(),
                rq.create_queue().unwrap()
            ]))
            .is_err());
        // A bogus avail index does not wedge a worker: reset still joins.
        rq.avail().idx().store(1000);
        std::thread::sleep(Duration::from_millis(20));
        assert!(fs.reset());
        assert!(!fs.is_active());
        assert!(fs.reset(), "reset of an idle device");
    }
}
