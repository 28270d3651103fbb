//! The virtio-blk device.
//!
//! `activate` moves the request queue, its notification `EventFd`, the interrupt
//! and a handle on the [`Disk`] into a worker thread (the devices' event loop over
//! the queue `EventFd` and a stop event), which serves the queue on each wake
//! (see `worker`). `reset` stops and joins the thread.

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
#[cfg(any(test, feature = "test-utils"))]
use {
    crate::virtio::VirtioInterrupt,
    virtio_queue::Queue,
    vm_memory::GuestMemoryMmap,
};

use super::disk::Disk;
use super::worker::RequestHandler;
#[cfg(any(test, feature = "test-utils"))]
use super::SyncHandler;
use super::{
    Error, Result, CONFIG_LEN, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, QUEUE_SIZE, SECTOR_SHIFT,
    SECTOR_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_ID_BLOCK,
};
use crate::virtio::queue_thread::spawn_queue_worker;
use crate::virtio::{self, ActivateArgs, VirtioCommon, VirtioDevice, Workers};

/// What the VMM configures for one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image (a regular file or a block device).
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// The GET_ID answer (at most 20 bytes); by default derived from the file's
    /// device and inode numbers.
    pub id: Option<String>,
}

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    common: VirtioCommon,
    worker: Option<Workers<()>>,
}

impl Block {
    /// Opens and locks the image of `config`. Fails if it is missing, a
    /// directory, empty, not a whole number of sectors, or locked by another VM.
    pub fn new(config: BlockConfig) -> Result<Self> {
        let disk = Disk::open(&config.path, config.read_only, config.id.as_deref())?;
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if disk.can_discard() {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if disk.can_write_zeroes() {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let config = config_space(&disk).to_vec();
        Ok(Self {
            disk: Arc::new(disk),
            common: VirtioCommon::new("virtio-blk", VIRTIO_ID_BLOCK, vec![QUEUE_SIZE], features, config),
            worker: None,
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; ID_LEN] {
        self.disk.id()
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
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(Error::NoQueue);
        };
        if !queue.ready() {
            return Err(Error::NoQueue);
        }
        let mut handler = RequestHandler::new(
            mem,
            queue,
            interrupt,
            self.disk.clone(),
            self.common.acked_features(),
        );
        let worker = spawn_queue_worker(&spawner, "virtio-blk", "aivmm-blk", queue_evt, move || {
            handler.process_queue()
        })?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `virtio_blk_config` bytes, little-endian, through `write_zeroes_may_unmap`.
fn config_space(disk: &Disk) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.capacity().to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // 16..20 geometry: not offered.
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    // 24..32 topology: not offered. 32 writeback, 33 unused.
    put(34, &1u16.to_le_bytes());
    let align = disk.fs_block_size() >> SECTOR_SHIFT;
    if disk.can_discard() {
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &align.to_le_bytes());
    }
    if disk.can_write_zeroes() {
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEG.to_le_bytes());
        put(56, &[u8::from(disk.can_discard())]);
    }
    c
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered:
    // the provided write_config ignores every write.

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
impl Block {
    /// The handler a worker would run on `queue`, against this device's disk and
    /// with the features acked so far; no thread is started.
    pub fn sync_handler(
        &self,
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> SyncHandler {
        SyncHandler::new(RequestHandler::new(
            mem,
            queue,
            interrupt,
            self.disk.clone(),
            self.common.acked_features(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs::File;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;
    use std::time::Duration;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::GuestAddress;

    use super::*;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use vm_memory::Bytes;
    use crate::virtio::VIRTIO_MMIO_INT_VRING;
    use crate::sys::{EventFd, EFD_NONBLOCK};
    use crate::test_utils::*;
    use crate::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};

    const WAIT: Duration = Duration::from_secs(5);
    const MEM_SIZE: usize = 0x100_0000;
    /// Per-request header and status slots, then data buffers.
    const HDR: u64 = DATA_ADDR;
    const STATUS: u64 = DATA_ADDR + 0x8000;
    const BUF: u64 = DATA_ADDR + 0x10_0000;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn image(dir: &Path, size: u64) -> std::path::PathBuf {
        let p = dir.join("disk.img");
        File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn config(path: &Path, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: path.to_path_buf(),
            read_only,
            id: None,
        }
    }

    /// A driver's view: the queue, its notifier, and request bookkeeping.
    struct Driver<'a> {
        mem: &'a GuestMemoryMmap,
        q: MockSplitQueue<'a, GuestMemoryMmap>,
        evt: EventFd,
        irq: Arc<RecordingVirtioInterrupt>,
        next_desc: u16,
        submitted: u16,
    }

    impl<'a> Driver<'a> {
        fn new(blk: &mut Block, mem: &'a GuestMemoryMmap) -> Self {
            let q = mock_queue(mem, QUEUE_SIZE);
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let irq = Arc::new(RecordingVirtioInterrupt::default());
            blk.ack_features(blk.features());
            blk.activate(ActivateArgs {
                mem: mem.clone(),
                queues: vec![q.create_queue::<Queue>().unwrap()],
                queue_evts: vec![evt.try_clone().unwrap()],
                interrupt: irq.clone(),
                spawner: Default::default(),
            })
            .unwrap();
            Self {
                mem,
                q,
                evt,
                irq,
                next_desc: 0,
                submitted: 0,
            }
        }

        /// Posts raw descriptors (their `next` fields relative to the first) and
        /// waits for the chain to come back: (used len, status byte at STATUS).
        fn raw(&mut self, descs: &[SplitDescriptor]) -> (u32, u8) {
            let first = self.next_desc;
            let raw: Vec<RawDescriptor> = descs
                .iter()
                .map(|d| {
                    RawDescriptor::from(SplitDescriptor::new(
                        d.addr().0,
                        d.len(),
                        d.flags(),
                        d.next() + first,
                    ))
                })
                .collect();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            self.q.add_desc_chains(&raw, first).unwrap();
            self.next_desc += descs.len() as u16;
            self.kick_and_wait()
        }

        fn chain(&mut self, bufs: &[Buf]) -> (u32, u8) {
            let first = self.next_desc;
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            add_chain(&self.q, first, bufs);
            self.next_desc += bufs.len() as u16;
            self.kick_and_wait()
        }

        fn kick_and_wait(&mut self) -> (u32, u8) {
            self.submitted += 1;
            self.evt.write(1).unwrap();
            let n = self.submitted;
            assert!(
                wait_until(WAIT, || used_idx(&self.q) == n),
                "request {n} not completed"
            );
            let (_, len) = used_elem(&self.q, n - 1);
            (len, self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
        }

        /// A well-formed request: header, `data`, 1-byte status.
        fn request(&mut self, ty: u32, sector: u64, data: &[Buf]) -> (u32, u8) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&ty.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            let mut bufs = vec![Buf::read(HDR, 16)];
            bufs.extend_from_slice(data);
            bufs.push(Buf::write(STATUS, 1));
            self.chain(&bufs)
        }

        fn fill(&self, addr: u64, bytes: &[u8]) {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn ranges(r: &[(u64, u32, u32)]) -> Vec<u8> {
        r.iter()
            .flat_map(|&(s, n, f)| {
                let mut b = s.to_le_bytes().to_vec();
                b.extend_from_slice(&n.to_le_bytes());
                b.extend_from_slice(&f.to_le_bytes());
                b
            })
            .collect()
    }

    fn file_bytes(p: &Path, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        File::open(p).unwrap().read_exact_at(&mut v, off).unwrap();
        v
    }

    #[test]
    fn features_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 8 << 20);
        let blk = Block::new(config(&p, false)).unwrap();
        assert_eq!(blk.device_type(), VIRTIO_ID_BLOCK);
        let f = blk.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), (8 << 20) / 512);
        let mut b = [0u8; 4];
        blk.read_config(20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 512);
        blk.read_config(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), SEG_MAX);
        // Reads past the end, or straddling it, are zero-filled.
        let mut b = [0xffu8; 8];
        blk.read_config(CONFIG_LEN as u64 - 2, &mut b);
        assert_eq!(&b[2..], &[0; 6]);
        blk.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
        if f & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
            blk.read_config(40, &mut b[..4]);
            assert_eq!(
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                MAX_DISCARD_SEG
            );
        }
        let ro = {
            drop(blk);
            Block::new(config(&p, true)).unwrap()
        };
        let f = ro.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mut blk = Block::new(config(&p, false)).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 3) as u8).collect();
        d.fill(BUF, &pattern[..512]);
        d.fill(BUF + 0x1000, &pattern[512..]);
        // Two segments, the second one 1 KiB, at sector 3.
        let (len, st) = d.request(
            VIRTIO_BLK_T_OUT,
            3,
            &[Buf::read(BUF, 512), Buf::read(BUF + 0x1000, 1024)],
        );
        assert_eq!((len, st), (1, OK));
        assert_eq!(file_bytes(&p, 3 * 512, 1536), pattern);
        assert_eq!(file_bytes(&p, 2 * 512, 512), vec![0; 512]);
        // Read it back in three pieces elsewhere.
        let (len, st) = d.request(
            VIRTIO_BLK_T_IN,
            3,
            &[
                Buf::write(BUF + 0x10000, 1024),
                Buf::write(BUF + 0x20000, 0),
                Buf::write(BUF + 0x30000, 512),
            ],
        );
        assert_eq!((len, st), (1537, OK));
        let mut back = d.read(BUF + 0x10000, 1024);
        back.extend(d.read(BUF + 0x30000, 512));
        assert_eq!(back, pattern);
        assert!(d.irq.count() >= 1);
        assert_eq!(d.irq.status(), VIRTIO_MMIO_INT_VRING);
        // The last sector is reachable.
        let (len, st) = d.request(VIRTIO_BLK_T_IN, 2047, &[Buf::write(BUF, 512)]);
        assert_eq!((len, st), (513, OK));
        // Flush.
        let (len, st) = d.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!((len, st), (1, OK));
        assert!(blk.reset());
    }

    #[test]
    fn out_of_range_and_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mut blk = Block::new(config(&p, false)).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        for (ty, sector, len) in [
            (VIRTIO_BLK_T_IN, 2048, 512),
            (VIRTIO_BLK_T_IN, 2047, 1024),
            (VIRTIO_BLK_T_OUT, 2048, 512),
            (VIRTIO_BLK_T_IN, u64::MAX, 512),
            (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
            (VIRTIO_BLK_T_IN, 0, 100),
        ] {
            let buf = if ty == VIRTIO_BLK_T_IN {
                Buf::write(BUF, len)
            } else {
                Buf::read(BUF, len)
            };
            let (ulen, st) = d.request(ty, sector, &[buf]);
            assert_eq!((ulen, st), (1, IOERR), "{ty} at {sector}, {len} bytes");
        }
        // Unknown types are UNSUPP.
        let (ulen, st) = d.request(42, 0, &[]);
        assert_eq!((ulen, st), (1, UNSUPP));
        assert!(blk.reset());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    }

    #[test]
    fn get_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 4096);
        let mut cfg = config(&p, true);
        cfg.id = Some("my-disk".into());
        let mut blk = Block::new(cfg).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        d.fill(BUF, &[0xaa; 32]);
        let (len, st) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[Buf::write(BUF, 20)]);
        assert_eq!((len, st), (21, OK));
        let got = d.read(BUF, 21);
        assert_eq!(&got[..7], b"my-disk");
        assert_eq!(&got[7..20], &[0; 13]);
        assert_eq!(got[20], 0xaa, "nothing written past the buffer");
        // A short buffer gets a prefix; split buffers get it all.
        let (len, st) = d.request(VIRTIO_BLK_T_GET_ID, 0, &[Buf::write(BUF + 0x100, 4)]);
        assert_eq!((len, st, d.read(BUF + 0x100, 4)), (5, OK, b"my-d".to_vec()));
        let (len, st) = d.request(
            VIRTIO_BLK_T_GET_ID,
            0,
            &[Buf::write(BUF + 0x200, 3), Buf::write(BUF + 0x300, 64)],
        );
        assert_eq!((len, st), (21, OK));
        assert_eq!(d.read(BUF + 0x300, 4), b"disk".to_vec());
        drop(d);
        assert!(blk.reset());
        // The default id is not empty.
        drop(blk);
        let blk = Block::new(config(&p, true)).unwrap();
        assert_ne!(blk.id()[0], 0);
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[9u8; 512], 0)
            .unwrap();
        let mut blk = Block::new(config(&p, true)).unwrap();
        assert!(blk.read_only());
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        d.fill(BUF, &[1u8; 512]);
        let (len, st) = d.request(VIRTIO_BLK_T_OUT, 0, &[Buf::read(BUF, 512)]);
        assert_eq!((len, st), (1, IOERR));
        d.fill(BUF, &ranges(&[(0, 1, 0)]));
        let (_, st) = d.request(VIRTIO_BLK_T_DISCARD, 0, &[Buf::read(BUF, 16)]);
        assert_eq!(st, IOERR);
        let (_, st) = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Buf::read(BUF, 16)]);
        assert_eq!(st, IOERR);
        assert_eq!(file_bytes(&p, 0, 512), vec![9u8; 512]);
        // Reads work.
        let (len, st) = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::write(BUF, 512)]);
        assert_eq!((len, st, d.read(BUF, 512)), (513, OK, vec![9u8; 512]));
        assert!(blk.reset());
    }

    #[test]
    fn discard_and_write_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let p = image(dir.path(), size);
        {
            let f = File::options().write(true).open(&p).unwrap();
            f.write_all_at(&vec![0x5au8; size as usize], 0).unwrap();
            f.sync_all().unwrap();
        }
        let mut blk = Block::new(config(&p, false)).unwrap();
        let features = blk.features();
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        let blocks = |p: &Path| std::fs::metadata(p).unwrap().blocks();
        let before = blocks(&p);

        if features & (1 << VIRTIO_BLK_F_DISCARD) != 0 {
            // Discard the first MiB, in two ranges split across descriptors.
            let payload = ranges(&[(0, 1024, 0), (1024, 1024, 0)]);
            d.fill(BUF, &payload);
            let (len, st) = d.request(
                VIRTIO_BLK_T_DISCARD,
                0,
                &[Buf::read(BUF, 10), Buf::read(BUF + 10, 22)],
            );
            assert_eq!((len, st), (1, OK));
            assert!(file_bytes(&p, 0, 1 << 20).iter().all(|&b| b == 0));
            assert_eq!(file_bytes(&p, 1 << 20, 512), vec![0x5a; 512]);
            assert!(
                blocks(&p) < before,
                "blocks were freed: {} -> {}",
                before,
                blocks(&p)
            );
            // The unmap flag is not allowed on discard; ranges past the end are IOERR.
            d.fill(BUF, &ranges(&[(0, 8, 1)]));
            assert_eq!(
                d.request(VIRTIO_BLK_T_DISCARD, 0, &[Buf::read(BUF, 16)]).1,
                UNSUPP
            );
            d.fill(BUF, &ranges(&[(8191, 2, 0)]));
            assert_eq!(
                d.request(VIRTIO_BLK_T_DISCARD, 0, &[Buf::read(BUF, 16)]).1,
                IOERR
            );
            d.fill(BUF, &ranges(&[(u64::MAX, 2, 0)]));
            assert_eq!(
                d.request(VIRTIO_BLK_T_DISCARD, 0, &[Buf::read(BUF, 16)]).1,
                IOERR
            );
            // A payload that is not whole ranges.
            assert_eq!(
                d.request(VIRTIO_BLK_T_DISCARD, 0, &[Buf::read(BUF, 15)]).1,
                IOERR
            );
            assert_eq!(d.request(VIRTIO_BLK_T_DISCARD, 0, &[]).1, IOERR);
        } else {
            eprintln!("this filesystem cannot punch holes; discard not tested");
        }

        if features & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0 {
            // Zero sectors 2048..2056 without unmap, and 4096..4104 with it.
            d.fill(
                BUF,
                &ranges(&[(2048, 8, 0), (4096, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)]),
            );
            let (len, st) = d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Buf::read(BUF, 32)]);
            assert_eq!((len, st), (1, OK));
            assert!(file_bytes(&p, 2048 * 512, 4096).iter().all(|&b| b == 0));
            assert!(file_bytes(&p, 4096 * 512, 4096).iter().all(|&b| b == 0));
            assert_eq!(file_bytes(&p, 2056 * 512, 512), vec![0x5a; 512]);
            assert_eq!(file_bytes(&p, 4104 * 512, 512), vec![0x5a; 512]);
            // Unknown flags.
            d.fill(BUF, &ranges(&[(0, 8, 2)]));
            assert_eq!(
                d.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Buf::read(BUF, 16)])
                    .1,
                UNSUPP
            );
            // Too many ranges.
            let many: Vec<_> = (0..=MAX_DISCARD_SEG)
                .map(|i| (u64::from(i) * 8, 8, 0))
                .collect();
            let payload = ranges(&many);
            d.fill(BUF, &payload);
            let (_, st) = d.request(
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                &[Buf::read(BUF, payload.len() as u32)],
            );
            assert_eq!(st, IOERR);
        } else {
            eprintln!("this filesystem cannot zero ranges; write-zeroes not tested");
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), size, "size kept");
        assert!(blk.reset());
    }

    #[test]
    fn hostile_chains_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mut blk = Block::new(config(&p, false)).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        d.fill(HDR, &h);
        let hdr = Buf::read(HDR, 16);
        let status = Buf::write(STATUS, 1);
        // Missing status (the last buffer is device-readable): dropped, nothing written.
        assert_eq!(d.chain(&[hdr, Buf::read(BUF, 512)]), (0, 0xff));
        // A long last buffer is the status: its final byte is set.
        d.fill(BUF, &[0xff; 512]);
        assert_eq!(d.chain(&[hdr, Buf::write(BUF, 512)]), (1, 0xff));
        assert_eq!(d.read(BUF + 511, 1), vec![OK]);
        // Read-only status: dropped.
        assert_eq!(
            d.chain(&[hdr, Buf::write(BUF, 512), Buf::read(STATUS, 1)]),
            (0, 0xff)
        );
        // Header alone.
        assert_eq!(d.chain(&[hdr]), (0, 0xff));
        // Header too short, header past memory, data past memory, data wrapping: IOERR.
        assert_eq!(d.chain(&[Buf::read(HDR, 8), status]), (1, IOERR));
        assert_eq!(
            d.chain(&[Buf::read(MEM_SIZE as u64, 16), status]),
            (1, IOERR)
        );
        assert_eq!(
            d.chain(&[hdr, Buf::write(MEM_SIZE as u64 - 256, 512), status]),
            (1, IOERR)
        );
        assert_eq!(
            d.chain(&[hdr, Buf::write(u64::MAX - 100, 512), status]),
            (1, IOERR)
        );
        // Status past memory.
        assert_eq!(
            d.chain(&[
                hdr,
                Buf::write(BUF, 512),
                Buf::write(MEM_SIZE as u64 + 8, 1)
            ]),
            (0, 0xff)
        );
        // A loop: header -> data -> header ...
        let next = VRING_DESC_F_NEXT as u16;
        let w = VRING_DESC_F_WRITE as u16;
        assert_eq!(
            d.raw(&[
                SplitDescriptor::new(HDR, 16, next, 1),
                SplitDescriptor::new(BUF, 512, next | w, 0),
            ]),
            (0, 0xff)
        );
        // A next index past the queue.
        assert_eq!(
            d.raw(&[
                SplitDescriptor::new(HDR, 16, next, 1),
                SplitDescriptor::new(STATUS, 1, next | w, 4000),
            ]),
            (0, 0xff)
        );
        // Absurd lengths adding past 4 GiB.
        assert_eq!(
            d.chain(&[
                hdr,
                Buf::write(BUF, u32::MAX),
                Buf::write(BUF, u32::MAX),
                status
            ]),
            (0, 0xff)
        );
        // The worker is still alive and serves a good request.
        let (len, st) = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::write(BUF, 512)]);
        assert_eq!((len, st), (513, OK));
        assert!(blk.reset());
    }

    #[test]
    fn indirect_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[0x3cu8; 1024], 512)
            .unwrap();
        let mut blk = Block::new(config(&p, false)).unwrap();
        assert_ne!(blk.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
        let mem = guest_memory(MEM_SIZE);
        let mut d = Driver::new(&mut blk, &mem);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&1u64.to_le_bytes());
        d.fill(HDR, &h);
        let next = VRING_DESC_F_NEXT as u16;
        let w = VRING_DESC_F_WRITE as u16;
        let table = BUF + 0x8_0000;
        for (i, desc) in [
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(BUF, 1024, next | w, 2),
            SplitDescriptor::new(STATUS, 1, w, 0),
        ]
        .into_iter()
        .enumerate()
        {
            mem.write_obj(
                RawDescriptor::from(desc),
                GuestAddress(table + 16 * i as u64),
            )
            .unwrap();
        }
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let (len, st) = d.raw(&[SplitDescriptor::new(table, 48, indirect, 0)]);
        assert_eq!((len, st), (1025, OK));
        assert_eq!(d.read(BUF, 1024), vec![0x3c; 1024]);
        // An indirect table whose last entry points past the table: dropped.
        mem.write_obj(
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, w | next, 7)),
            GuestAddress(table + 32),
        )
        .unwrap();
        assert_eq!(
            d.raw(&[SplitDescriptor::new(table, 48, indirect, 0)]),
            (0, 0xff)
        );
        assert!(blk.reset());
    }

    #[test]
    fn bogus_avail_index_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mut blk = Block::new(config(&p, false)).unwrap();
        let mem = guest_memory(MEM_SIZE);
        let d = Driver::new(&mut blk, &mem);
        d.q.avail().idx().store(1000);
        d.evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(blk.reset());
        assert_eq!(used_idx(&d.q), 0);
    }

    #[test]
    fn lock_conflicts_between_devices() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let a = Block::new(config(&p, false)).unwrap();
        let e = Block::new(config(&p, false)).err().unwrap();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        assert!(matches!(
            Block::new(config(&p, true)),
            Err(Error::Locked { .. })
        ));
        drop(a);
        let _r1 = Block::new(config(&p, true)).unwrap();
        let _r2 = Block::new(config(&p, true)).unwrap();
        assert!(matches!(
            Block::new(config(&p, false)),
            Err(Error::Locked { .. })
        ));
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (size, want) in [(0u64, "empty"), (513, "multiple of 512")] {
            let p = image(dir.path(), size);
            let e = Block::new(config(&p, false)).err().unwrap();
            assert!(e.to_string().contains(want), "{e}");
        }
        let e = Block::new(config(&dir.path().join("missing"), false))
            .err()
            .unwrap();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = Block::new(config(dir.path(), true)).err().unwrap();
        assert!(e.to_string().contains("directory"), "{e}");
    }

    #[test]
    fn through_the_mmio_transport() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mem = guest_memory(MEM_SIZE);
        let q = mock_queue(&mem, 256);
        let irq = Arc::new(RecordingInterrupt::default());
        let blk = Block::new(config(&p, false)).unwrap();
        let features = blk.features();
        let mut t = MmioTransport::new(Box::new(blk), mem.clone(), irq.clone(), Default::default()).unwrap();
        assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_BLOCK);
        let cap = u64::from(read32(&mut t, CONFIG_SPACE_OFFSET))
            | (u64::from(read32(&mut t, CONFIG_SPACE_OFFSET + 4)) << 32);
        assert_eq!(cap, 2048);
        assert_eq!(mmio_init(&mut t, features, &[&q]), 0xf);
        mem.write_slice(&[0x77u8; 512], GuestAddress(BUF)).unwrap();
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&5u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        add_chain(
            &q,
            0,
            &[
                Buf::read(HDR, 16),
                Buf::read(BUF, 512),
                Buf::write(STATUS, 1),
            ],
        );
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
        assert!(wait_until(WAIT, || irq.count() >= 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        assert_eq!(file_bytes(&p, 5 * 512, 512), vec![0x77; 512]);
        // Reset through the transport stops the worker; it comes back.
        write32(&mut t, 0x70, 0);
        let q = mock_queue(&mem, 256);
        assert_eq!(mmio_init(&mut t, features, &[&q]), 0xf);
        h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        add_chain(&q, 0, &[Buf::read(HDR, 16), Buf::write(STATUS, 1)]);
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
        assert_eq!(used_elem(&q, 0), (0, 1));
    }

    #[test]
    fn reset_then_activate_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), 1 << 20);
        let mut blk = Block::new(config(&p, false)).unwrap();
        let mem = guest_memory(MEM_SIZE);
        {
            let _d = Driver::new(&mut blk, &mem);
        }
        let q = mock_queue(&mem, 16);
        let second = blk.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(RecordingVirtioInterrupt::default()),
            spawner: Default::default(),
        });
        assert!(second.is_err(), "already active");
        assert!(blk.reset());
        assert!(blk.reset(), "reset of an idle device");
        let mut d = Driver::new(&mut blk, &mem);
        assert_eq!(d.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        let no_queue = Block::new(BlockConfig {
            path: p.clone(),
            read_only: true,
            id: None,
        });
        assert!(no_queue.is_err(), "still locked read-write");
    }
}
