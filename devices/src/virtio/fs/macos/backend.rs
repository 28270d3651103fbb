//! Which file system serves a virtio-fs share, and the one interface the
//! device's queue workers call.
//!
//! The device ([`crate::virtio::fs::Fs`]) hands every chain to an [`FsServer`].
//! [`FsConfig::backend`](crate::virtio::fs::FsConfig) picks it ([`FsBackend`]):
//! - [`FsBackend::Linux`] (Linux hosts, their default): fuse-backend-rs's FUSE
//!   server over `ShareFs` (its `PassthroughFs`, with `O_PATH` inodes);
//! - [`FsBackend::Portable`] (the only one, so the default, on macOS):
//!   [`LinuxFuseServer`] over [`PosixFs`], the Linux FUSE ABI from portable
//!   POSIX calls. It also runs on Linux, which is how its wiring into the
//!   device is tested here.

use std::sync::Arc;
use std::time::Duration;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use super::passthrough::{Options, PosixFs};
use super::server::{self, LinuxFuseServer};
use crate::virtio::fs::{CachePolicy, FsConfig};

/// Serves one descriptor chain of FUSE requests; returns the bytes written into
/// it (0 for no reply or a chain that cannot be served).
pub trait FsServer: Send + Sync {
    /// Serves `chain`.
    fn handle_chain(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32;
}

/// The file system behind a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsBackend {
    /// fuse-backend-rs's passthrough (Linux only).
    #[cfg(target_os = "linux")]
    Linux,
    /// [`PosixFs`] in the Linux FUSE ABI (any host).
    Portable,
}

impl Default for FsBackend {
    fn default() -> Self {
        #[cfg(target_os = "linux")]
        return FsBackend::Linux;
        #[cfg(not(target_os = "linux"))]
        return FsBackend::Portable;
    }
}

#[cfg(target_os = "linux")]
impl FsServer for fuse_backend_rs::api::server::Server<crate::virtio::fs::filesystem::ShareFs> {
    fn handle_chain(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        crate::virtio::fs::worker::handle_chain(self, mem, chain)
    }
}

impl FsServer for LinuxFuseServer {
    fn handle_chain(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        server::handle_chain(self, mem, chain)
    }
}

/// How long the guest may keep entries and attributes, per cache policy (the
/// same timeouts the Linux backend uses).
pub fn ttl(cache: CachePolicy) -> Duration {
    match cache {
        CachePolicy::None => Duration::ZERO,
        CachePolicy::Auto => Duration::from_secs(1),
        CachePolicy::Always => Duration::from_secs(24 * 60 * 60),
    }
}

/// The portable server for `config`, whose root is already resolved and checked.
pub fn portable_server(config: &FsConfig) -> std::io::Result<Arc<dyn FsServer>> {
    let fs = PosixFs::new(
        &config.root,
        Options {
            read_only: config.read_only,
        },
    )?;
    Ok(Arc::new(LinuxFuseServer::new(fs, ttl(config.cache))))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::mem::size_of;
    use std::time::Duration;

    use fuse_backend_rs::abi::fuse_abi::{EntryOut, InitOut, OpenOut, OutHeader};
    use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::test_utils::*;
    use crate::virtio::fs::test_utils as fuse;
    use crate::virtio::fs::{Fs, VIRTIO_ID_FS};
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};

    const WAIT: Duration = Duration::from_secs(5);
    const FEATURES: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    /// A driver of one virtio-fs device behind the MMIO transport, with its
    /// queues and buffers in guest memory.
    struct Driver<'m> {
        mem: &'m GuestMemoryMmap,
        t: MmioTransport,
        hiprio: MockSplitQueue<'m, GuestMemoryMmap>,
        requests: MockSplitQueue<'m, GuestMemoryMmap>,
        posted: u16,
        unique: u64,
    }

    impl<'m> Driver<'m> {
        fn new(mem: &'m GuestMemoryMmap, cfg: FsConfig) -> Self {
            let irq = std::sync::Arc::new(RecordingInterrupt::default());
            let fs = Fs::new(cfg).unwrap();
            let mut t = MmioTransport::new(Box::new(fs), mem.clone(), irq, Default::default()).unwrap();
            assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_FS);
            let hiprio = mock_queue_at(mem, QUEUE_ADDR, 64);
            let requests = mock_queue_at(mem, QUEUE_ADDR + 0x1_0000, 64);
            assert_eq!(mmio_init(&mut t, FEATURES, &[&hiprio, &requests]), 0xf);
            Self {
                mem,
                t,
                hiprio,
                requests,
                posted: 0,
                unique: 0,
            }
        }

        /// Posts `req` on the request queue, notifies, waits for the reply:
        /// (errno, body).
        fn call(&mut self, req: &fuse::Request) -> (i32, Vec<u8>) {
            self.unique += 1;
            let slot = u64::from(self.posted % 32);
            let addr = DATA_ADDR + slot * 0x2_0000;
            let bytes = req.encode(self.unique, (0, 0));
            self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
            add_chain(
                &self.requests,
                self.posted,
                &[
                    Buf::read(addr, bytes.len() as u32),
                    Buf::write(addr + 0x1000, 0x1_0000),
                ],
            );
            self.posted += 1;
            write32(&mut self.t, QUEUE_NOTIFY_OFFSET, 1);
            let want = self.posted;
            assert!(wait_until(WAIT, || used_idx(&self.requests) == want));
            let (_, used_len) = used_elem(&self.requests, want - 1);
            let h: OutHeader = self.mem.read_obj(GuestAddress(addr + 0x1000)).unwrap();
            assert_eq!((h.unique, h.len), (self.unique, used_len));
            let mut body = vec![0u8; h.len as usize - size_of::<OutHeader>()];
            let at = addr + 0x1000 + size_of::<OutHeader>() as u64;
            self.mem.read_slice(&mut body, GuestAddress(at)).unwrap();
            (-h.error, body)
        }
    }

    fn obj<T: ByteValued>(body: &[u8]) -> T {
        *T::from_slice(&body[..size_of::<T>()]).unwrap()
    }

    /// One guest session: INIT, LOOKUP, OPEN + READ, CREATE + WRITE; returns the
    /// negotiated minor version and what the guest saw.
    fn session(cfg: FsConfig) -> (u32, Vec<u8>, i32) {
        let mem = guest_memory(0x80_0000);
        let mut d = Driver::new(&mem, cfg);
        let (e, body) = d.call(&fuse::init());
        assert_eq!(e, 0);
        let minor = obj::<InitOut>(&body).minor;
        let (e, body) = d.call(&fuse::lookup(fuse::ROOT_ID, "hello"));
        assert_eq!(e, 0);
        let entry: EntryOut = obj(&body);
        assert_eq!(entry.attr.size, 5);
        let (e, body) = d.call(&fuse::open(entry.nodeid, libc::O_RDONLY as u32));
        assert_eq!(e, 0);
        let fh = obj::<OpenOut>(&body).fh;
        let (e, data) = d.call(&fuse::read(entry.nodeid, fh, 1, 100));
        assert_eq!(e, 0);
        let create = fuse::create(fuse::ROOT_ID, "new", libc::O_WRONLY as u32, 0o644);
        let (create_errno, body) = d.call(&create);
        if create_errno == 0 {
            let entry: EntryOut = obj(&body);
            let fh = obj::<OpenOut>(&body[size_of::<EntryOut>()..]).fh;
            let (e, _) = d.call(&fuse::write(entry.nodeid, fh, 0, b"written"));
            assert_eq!(e, 0);
            assert_eq!(d.call(&fuse::release(entry.nodeid, fh)).0, 0);
        }
        // A FORGET on the high-priority queue needs no reply.
        let forget = fuse::Request {
            opcode: fuse_backend_rs::abi::fuse_abi::Opcode::Forget as u32,
            nodeid: entry.nodeid,
            body: 1u64.to_le_bytes().to_vec(),
        };
        let bytes = forget.encode(1000, (0, 0));
        mem.write_slice(&bytes, GuestAddress(DATA_ADDR + 0x40_0000))
            .unwrap();
        add_chain(
            &d.hiprio,
            0,
            &[Buf::read(DATA_ADDR + 0x40_0000, bytes.len() as u32)],
        );
        write32(&mut d.t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(wait_until(WAIT, || used_idx(&d.hiprio) == 1));
        assert_eq!(used_elem(&d.hiprio, 0), (0, 0));
        // Reset stops the workers.
        write32(&mut d.t, 0x70, 0);
        assert_eq!(read32(&mut d.t, 0x70), 0);
        (minor, data, create_errno)
    }

    #[test]
    fn macos_backend_portable_serves_the_virtio_fs_device() {
        let tmp = TempDir::new().unwrap();
        std::fs::write(tmp.as_path().join("hello"), b"hello").unwrap();
        let mut cfg = FsConfig::new(tmp.as_path(), "work");
        assert_eq!(
            cfg.backend,
            FsBackend::Linux,
            "Linux hosts default to fuse-backend-rs"
        );
        cfg.backend = FsBackend::Portable;
        let (minor, data, e) = session(cfg.clone());
        // The portable server answers INIT with its own protocol version: the
        // device really went through it.
        assert_eq!(minor, super::super::server::KERNEL_MINOR_VERSION);
        assert_eq!((data.as_slice(), e), (&b"ello"[..], 0));
        assert_eq!(
            std::fs::read(tmp.as_path().join("new")).unwrap(),
            b"written"
        );
        std::fs::remove_file(tmp.as_path().join("new")).unwrap();

        // The same session on the Linux backend reads the same bytes.
        cfg.backend = FsBackend::Linux;
        let (linux_minor, linux_data, e) = session(cfg.clone());
        assert_ne!(linux_minor, minor);
        assert_eq!((linux_data, e), (data, 0));

        // Read-only shares refuse the CREATE on the portable backend too.
        std::fs::remove_file(tmp.as_path().join("new")).unwrap();
        cfg.backend = FsBackend::Portable;
        cfg.read_only = true;
        let (_, _, e) = session(cfg);
        assert_eq!(e, libc::EROFS);
        assert!(!tmp.as_path().join("new").exists());
    }

    #[test]
    fn macos_backend_ttl_follows_the_cache_policy() {
        assert_eq!(ttl(CachePolicy::None), Duration::ZERO);
        assert_eq!(ttl(CachePolicy::Auto), Duration::from_secs(1));
        assert_eq!(ttl(CachePolicy::Always), Duration::from_secs(86_400));
        let tmp = TempDir::new().unwrap();
        let mut cfg = FsConfig::new(tmp.as_path().join("missing"), "work");
        cfg.backend = FsBackend::Portable;
        assert!(portable_server(&cfg).is_err(), "a missing root");
        cfg.root = tmp.as_path().to_path_buf();
        assert!(portable_server(&cfg).is_ok());
    }
}
