//! The virtio-balloon device and the handle the host drives it with.
//!
//! The device and its [`BalloonHandle`] share one state: the target the host set
//! (`num_pages`), the size the driver reports (`actual`), the guest's poison
//! value, the latest statistics and the counters of what was given back. The
//! handle sets the target and raises the configuration interrupt (once a driver
//! runs), and asks the worker for fresh statistics. `activate` starts the worker
//! on the queues the driver set up (see the module doc for their order).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};

use super::worker::{self, Queues, RequestHandler};
use super::{
    Error, Result, BALLOON_PAGE_SIZE, CONFIG_LEN, QUEUE_SIZE, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_ID_BALLOON,
};
use crate::sys::{EventFd, EFD_NONBLOCK};
use crate::virtio::common::read_config_bytes;
use crate::virtio::{
    self, ActivateArgs, VirtioCommon, VirtioDevice, VirtioInterrupt, Workers, VIRTIO_MMIO_INT_CONFIG,
};

/// The statistics tags of the virtio spec (and Linux's later ones), by number.
const STAT_NAMES: &[&str] = &[
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kills",
    "alloc_stalls",
    "async_scans",
    "direct_scans",
    "async_reclaims",
    "direct_reclaims",
];

/// The guest's statistics as its driver last posted them: (tag, value) pairs,
/// memory in bytes, the rest counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Tagged values, in the order the driver wrote them.
    pub values: Vec<(u16, u64)>,
    /// How long ago the driver posted them (`None`: never).
    pub age: Option<Duration>,
}

impl GuestStats {
    /// The value of tag `tag`, if the driver sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }

    /// The spec's name of a tag (`tag_N` for one it does not name).
    pub fn name(tag: u16) -> String {
        STAT_NAMES
            .get(usize::from(tag))
            .map_or_else(|| format!("tag_{tag}"), |n| (*n).to_string())
    }
}

/// What the host sees of the balloon, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    /// Whether a driver runs the device.
    pub driver: bool,
    /// The guest's memory.
    pub memory: u64,
    /// The balloon size the host asked for.
    pub target: u64,
    /// The balloon size the driver reports.
    pub actual: u64,
    /// Bytes the guest gave up by inflating, discarded on the host (total; whole
    /// 2 MiB blocks only, see the worker).
    pub inflated: u64,
    /// Bytes of balloon pages the guest took back by deflating (total).
    pub deflated: u64,
    /// Free memory the guest reported, discarded on the host (total).
    pub reported: u64,
}

/// The latest statistics and when they came.
#[derive(Default)]
struct StatsSlot {
    values: Vec<(u16, u64)>,
    at: Option<Instant>,
    seq: u64,
}

/// What the device, its worker and the handles share.
pub(super) struct Shared {
    memory: u64,
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    poison: AtomicU32,
    /// Whether the driver accepted PAGE_POISON (then `poison` is what a free
    /// page must hold).
    poison_acked: AtomicBool,
    /// The running device's interrupt, for configuration changes.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    stats: Mutex<StatsSlot>,
    stats_posted: Condvar,
    /// Written by a handle that wants fresh statistics; the worker waits on it.
    stats_wanted: EventFd,
    pub(super) inflated: AtomicU64,
    pub(super) deflated: AtomicU64,
    pub(super) reported: AtomicU64,
}

impl Shared {
    /// Records statistics the driver posted.
    pub(super) fn post_stats(&self, values: Vec<(u16, u64)>) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        s.values = values;
        s.at = Some(Instant::now());
        s.seq = s.seq.wrapping_add(1);
        self.stats_posted.notify_all();
    }

    /// Whether reported free pages may be discarded: they read as zero afterwards,
    /// so not when the guest poisons free pages with another value (it checks
    /// the poison when it allocates them again).
    pub(super) fn may_discard_free_pages(&self) -> bool {
        !self.poison_acked.load(Ordering::SeqCst) || self.poison.load(Ordering::SeqCst) == 0
    }

    /// The event the worker waits on for stats requests.
    pub(super) fn stats_wanted(&self) -> &EventFd {
        &self.stats_wanted
    }
}

/// The host's side of a balloon: set its size, read its status and the guest's
/// statistics. Clones share the device.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BalloonHandle").field(&self.status()).finish()
    }
}

impl BalloonHandle {
    /// Asks the guest to give up `bytes` of its memory (rounded down to 4 KiB
    /// pages; 0 deflates it fully). Returns the size set.
    pub fn set_size(&self, bytes: u64) -> Result<u64> {
        if bytes > self.0.memory {
            return Err(Error::TooLarge {
                asked: bytes,
                memory: self.0.memory,
            });
        }
        let pages = u32::try_from(bytes / BALLOON_PAGE_SIZE).map_err(|_| Error::TooLarge {
            asked: bytes,
            memory: self.0.memory,
        })?;
        self.0.target_pages.store(pages, Ordering::SeqCst);
        let irq = self.0.interrupt.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // Without a driver there is nobody to tell: it reads the target when it starts.
        if let Some(irq) = irq {
            if let Err(e) = irq.signal(VIRTIO_MMIO_INT_CONFIG) {
                warn!("virtio-balloon: raising the configuration interrupt failed: {e}");
            }
        }
        Ok(u64::from(pages) * BALLOON_PAGE_SIZE)
    }

    /// The balloon's state, in bytes.
    pub fn status(&self) -> BalloonStatus {
        let s = &self.0;
        BalloonStatus {
            driver: s.interrupt.lock().map(|i| i.is_some()).unwrap_or(false),
            memory: s.memory,
            target: u64::from(s.target_pages.load(Ordering::SeqCst)) * BALLOON_PAGE_SIZE,
            actual: u64::from(s.actual_pages.load(Ordering::SeqCst)) * BALLOON_PAGE_SIZE,
            inflated: s.inflated.load(Ordering::SeqCst),
            deflated: s.deflated.load(Ordering::SeqCst),
            reported: s.reported.load(Ordering::SeqCst),
        }
    }

    /// The statistics the driver last posted, without asking for fresh ones.
    pub fn last_stats(&self) -> GuestStats {
        let slot = self.0.stats.lock().unwrap_or_else(|p| p.into_inner());
        GuestStats {
            values: slot.values.clone(),
            age: slot.at.map(|t| t.elapsed()),
        }
    }

    /// Asks the driver for fresh statistics and waits up to `timeout` for them;
    /// returns the latest there are (older ones, with their age, if the guest did
    /// not answer in time; none if it never posted any).
    pub fn guest_stats(&self, timeout: Duration) -> GuestStats {
        let s = &self.0;
        let seq = s.stats.lock().map(|x| x.seq).unwrap_or(0);
        if let Err(e) = s.stats_wanted.write(1) {
            warn!("virtio-balloon: asking the worker for statistics failed: {e}");
        }
        let deadline = Instant::now() + timeout;
        let mut slot = s.stats.lock().unwrap_or_else(|p| p.into_inner());
        while slot.seq == seq {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            slot = match s.stats_posted.wait_timeout(slot, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(slot);
        self.last_stats()
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    common: VirtioCommon,
    shared: Arc<Shared>,
    worker: Option<Workers<()>>,
    /// Where discarding goes (the host's `madvise`; a recorder in tests).
    discard: worker::DiscardFn,
}

impl Balloon {
    /// A balloon for a guest of `memory` bytes, empty, with its handle.
    pub fn new(memory: u64) -> std::io::Result<(Self, BalloonHandle)> {
        Self::with_discard(memory, super::discard)
    }

    /// The same, discarding through `discard`.
    pub(super) fn with_discard(memory: u64, discard: worker::DiscardFn) -> std::io::Result<(Self, BalloonHandle)> {
        let shared = Arc::new(Shared {
            memory,
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            poison: AtomicU32::new(0),
            poison_acked: AtomicBool::new(false),
            interrupt: Mutex::new(None),
            stats: Mutex::new(StatsSlot::default()),
            stats_posted: Condvar::new(),
            stats_wanted: EventFd::new(EFD_NONBLOCK)?,
            inflated: AtomicU64::new(0),
            deflated: AtomicU64::new(0),
            reported: AtomicU64::new(0),
        });
        let features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BALLOON_F_STATS_VQ)
            | (1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
            | (1 << VIRTIO_BALLOON_F_PAGE_POISON)
            | (1 << VIRTIO_BALLOON_F_REPORTING);
        let dev = Self {
            // inflate, deflate, stats, reporting: the most a driver sets up.
            common: VirtioCommon::new("virtio-balloon", VIRTIO_ID_BALLOON, vec![QUEUE_SIZE; 4], features, Vec::new()),
            shared: shared.clone(),
            worker: None,
            discard,
        };
        Ok((dev, BalloonHandle(shared)))
    }

    /// The state the device shares with its worker and handles.
    #[cfg(any(test, feature = "test-utils"))]
    pub(super) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let s = &self.shared;
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&s.target_pages.load(Ordering::SeqCst).to_le_bytes());
        c[4..8].copy_from_slice(&s.actual_pages.load(Ordering::SeqCst).to_le_bytes());
        // free_page_hint_cmd_id (8..12) stays 0: free page hinting is not offered.
        c[12..16].copy_from_slice(&s.poison.load(Ordering::SeqCst).to_le_bytes());
        c
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
        let acked = self.common.acked_features();
        let mut slots = queues.into_iter().zip(queue_evts).map(Some).collect::<Vec<_>>();
        // Queues take indices in order, skipping those whose feature is off.
        let mut next = 0;
        let mut take = |name: &'static str| -> Result<(Queue, EventFd)> {
            let slot = slots.get_mut(next).and_then(Option::take);
            next += 1;
            match slot {
                Some((q, e)) if q.ready() => Ok((q, e)),
                _ => Err(Error::NoQueue(name)),
            }
        };
        let inflate = take("inflate")?;
        let deflate = take("deflate")?;
        let stats = if acked & (1 << VIRTIO_BALLOON_F_STATS_VQ) != 0 {
            Some(take("stats")?)
        } else {
            None
        };
        let reporting = if acked & (1 << VIRTIO_BALLOON_F_REPORTING) != 0 {
            Some(take("reporting")?)
        } else {
            None
        };
        self.shared
            .poison_acked
            .store(acked & (1 << VIRTIO_BALLOON_F_PAGE_POISON) != 0, Ordering::SeqCst);
        let mut workers = Workers::new("virtio-balloon").map_err(Error::Worker)?;
        let queues = Queues {
            inflate,
            deflate,
            stats,
            reporting,
        };
        let handler = RequestHandler::new(mem, queues, interrupt.clone(), self.shared.clone(), self.discard);
        let epoll = handler
            .epoll_with(workers.stop_event())
            .map_err(Error::Worker)?;
        workers
            .spawn(&spawner, "aivmm-balloon", move || worker::run(handler, epoll))
            .map_err(Error::Worker)?;
        self.worker = Some(workers);
        *self.shared.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(interrupt);
        // A target set before the driver came is already in the config it read.
        Ok(())
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Balloon {
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
        *self.shared.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    /// The driver writes `actual` (bytes 4..8) and `poison_val` (12..16); the
    /// rest is the device's.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut c = self.config();
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()).map(|e| (o, e)))
            .filter(|&(_, e)| e <= CONFIG_LEN)
        else {
            debug!("virtio-balloon: config write at {offset:#x} outside the space ignored");
            return;
        };
        let (start, end) = end;
        if !(4..8).contains(&start) && !(12..16).contains(&start) || (start < 8 && end > 8) {
            debug!("virtio-balloon: config write at {offset:#x} to a device field ignored");
            return;
        }
        c[start..end].copy_from_slice(data);
        let word = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
        self.shared.actual_pages.store(word(4), Ordering::SeqCst);
        self.shared.poison.store(word(12), Ordering::SeqCst);
    }

    fn reset(&mut self) -> bool {
        self.stop();
        self.common.reset_features();
        self.shared.actual_pages.store(0, Ordering::SeqCst);
        self.shared.poison.store(0, Ordering::SeqCst);
        self.shared.poison_acked.store(false, Ordering::SeqCst);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::test_utils::*;
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};

    const WAIT: Duration = Duration::from_secs(5);
    const MEM: usize = 16 << 20;
    /// MMIO offsets: interrupt status, config generation, config space.
    const INTERRUPT_STATUS: u64 = 0x60;
    const CONFIG_GENERATION: u64 = 0xfc;
    const CONFIG: u64 = 0x100;

    fn features(extra: &[u32]) -> u64 {
        extra.iter().fold(1 << VIRTIO_F_VERSION_1, |f, b| f | (1 << b))
    }

    struct Fixture {
        t: MmioTransport,
        irq: Arc<RecordingInterrupt>,
        handle: BalloonHandle,
    }

    /// A balloon behind the MMIO transport, its driver started with `features`
    /// and one queue per entry of `queues`.
    fn start(mem: &GuestMemoryMmap, features: u64, queues: &[&MockSplitQueue<'_, GuestMemoryMmap>]) -> Fixture {
        let (dev, handle) = Balloon::new(MEM as u64).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone(), Default::default()).unwrap();
        assert_eq!(mmio_init(&mut t, features, queues), 0xf);
        Fixture {
            t,
            irq,
            handle,
        }
    }

    fn queues(mem: &GuestMemoryMmap) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
        (0..4).map(|i| mock_queue_at(mem, QUEUE_ADDR + i * 0x1_0000, 16)).collect()
    }

    fn notify(f: &mut Fixture, q: u32) {
        write32(&mut f.t, QUEUE_NOTIFY_OFFSET, q);
    }

    fn pfn_list(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    fn page_is(mem: &GuestMemoryMmap, addr: u64, byte: u8) -> bool {
        let mut p = vec![0u8; 4096];
        mem.read_slice(&mut p, GuestAddress(addr)).unwrap();
        p.iter().all(|&b| b == byte)
    }

    #[test]
    fn inflating_discards_whole_blocks_of_listed_pages_and_nothing_else() {
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        let mut f = start(&mem, features(&[]), &[&qs[0], &qs[1]]);
        mem.write_slice(&vec![0xab; 0x30_0000], GuestAddress(0x40_0000)).unwrap();
        // The 2 MiB block of pages 0x400..0x600 in two chains (out of order, one
        // listed twice), two pages of the next block, and frames past guest memory.
        let mut first: Vec<u32> = (0x500..0x600).rev().collect();
        first.push(0x600);
        let len = pfn_list(&mem, DATA_ADDR, &first);
        add_chain(&qs[0], 0, &[Buf::read(DATA_ADDR, len)]);
        let second: Vec<u32> = (0x400..0x500).chain([0x450, 0x601, 0xfff_ffff, u32::MAX]).collect();
        let len = pfn_list(&mem, DATA_ADDR + 0x1000, &second);
        add_chain(&qs[0], 1, &[Buf::read(DATA_ADDR + 0x1000, len)]);
        notify(&mut f, 0);
        assert!(wait_until(WAIT, || used_idx(&qs[0]) == 2));
        assert_eq!(used_elem(&qs[0], 0), (0, 0));
        for (page, byte) in [(0x3ff, 0), (0x400, 0), (0x4ff, 0), (0x5ff, 0), (0x600, 0xab), (0x601, 0xab), (0x6ff, 0xab)] {
            assert!(page_is(&mem, page << 12, byte), "page {page:#x}");
        }
        assert!(f.irq.count() >= 1);
        assert_eq!(f.handle.status().inflated, 2 << 20);
        // Deflating takes pages out of the balloon; a page not in it is not counted.
        let len = pfn_list(&mem, DATA_ADDR, &[0x400, 0x401, 0x401, 0x700]);
        add_chain(&qs[1], 0, &[Buf::read(DATA_ADDR, len)]);
        notify(&mut f, 1);
        assert!(wait_until(WAIT, || used_idx(&qs[1]) == 1));
        assert_eq!(f.handle.status().deflated, 2 * 4096);
        // The block is no longer whole: putting one page back discards nothing more.
        mem.write_slice(&[0xcd; 4096], GuestAddress(0x401 << 12)).unwrap();
        let len = pfn_list(&mem, DATA_ADDR, &[0x401]);
        add_chain(&qs[0], 2, &[Buf::read(DATA_ADDR, len)]);
        notify(&mut f, 0);
        assert!(wait_until(WAIT, || used_idx(&qs[0]) == 3));
        assert!(page_is(&mem, 0x401 << 12, 0xcd));
        assert_eq!(f.handle.status().inflated, 2 << 20);
    }

    #[test]
    fn free_page_reports_are_discarded_unless_the_guest_poisons_free_pages() {
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        // Without STATS_VQ the reporting queue is the third.
        let mut f = start(&mem, features(&[VIRTIO_BALLOON_F_REPORTING]), &[&qs[0], &qs[1], &qs[2]]);
        mem.write_slice(&vec![0xcd; 0x40_0000], GuestAddress(0x40_0000)).unwrap();
        // 2 MiB, then a range that runs past the end of guest memory.
        add_chain(&qs[2], 0, &[Buf::write(0x40_0000, 0x20_0000), Buf::write(MEM as u64 - 0x1000, 0x10_0000)]);
        notify(&mut f, 2);
        assert!(wait_until(WAIT, || used_idx(&qs[2]) == 1));
        assert!(page_is(&mem, 0x40_0000, 0) && page_is(&mem, 0x5f_f000, 0));
        assert!(page_is(&mem, 0x60_0000, 0xcd));
        assert_eq!(f.handle.status().reported, 0x20_0000 + 0x1000);

        // A guest that fills free pages with a poison value keeps them.
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        let feats = features(&[VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_PAGE_POISON]);
        let mut f = start(&mem, feats, &[&qs[0], &qs[1], &qs[2]]);
        write32(&mut f.t, CONFIG + 12, 0xaaaa_aaaa);
        mem.write_slice(&vec![0xaa; 0x20_0000], GuestAddress(0x40_0000)).unwrap();
        add_chain(&qs[2], 0, &[Buf::write(0x40_0000, 0x20_0000)]);
        notify(&mut f, 2);
        assert!(wait_until(WAIT, || used_idx(&qs[2]) == 1));
        assert!(page_is(&mem, 0x40_0000, 0xaa));
        assert_eq!(f.handle.status().reported, 0);
    }

    #[test]
    fn the_host_sets_the_size_and_the_driver_reports_actual() {
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        let mut f = start(&mem, features(&[]), &[&qs[0], &qs[1]]);
        let before = (f.irq.count(), read32(&mut f.t, CONFIG_GENERATION));
        assert_eq!(f.handle.set_size((1 << 20) + 100).unwrap(), 1 << 20);
        assert_eq!(read32(&mut f.t, CONFIG), 256);
        assert_eq!(f.irq.count(), before.0 + 1);
        assert_eq!(read32(&mut f.t, INTERRUPT_STATUS) & crate::virtio::VIRTIO_MMIO_INT_CONFIG, 2);
        assert_ne!(read32(&mut f.t, CONFIG_GENERATION), before.1);
        // The driver writes actual; num_pages and the hint id are the device's.
        write32(&mut f.t, CONFIG + 4, 200);
        write32(&mut f.t, CONFIG, 7);
        write32(&mut f.t, CONFIG + 8, 7);
        assert_eq!((read32(&mut f.t, CONFIG), read32(&mut f.t, CONFIG + 4), read32(&mut f.t, CONFIG + 8)), (256, 200, 0));
        let s = f.handle.status();
        assert!(s.driver);
        assert_eq!((s.target, s.actual, s.memory), (1 << 20, 200 * 4096, MEM as u64));
        // More than the guest has is refused, and changes nothing.
        assert!(matches!(f.handle.set_size(MEM as u64 + 4096), Err(Error::TooLarge { .. })));
        assert_eq!(f.handle.status().target, 1 << 20);
        assert!(f.handle.set_size(MEM as u64).is_ok());
        // After a reset there is no driver to tell; the target stays for the next one.
        write32(&mut f.t, 0x70, 0);
        let n = f.irq.count();
        f.handle.set_size(4096).unwrap();
        assert_eq!(f.irq.count(), n);
        assert!(!f.handle.status().driver);
        assert_eq!(read32(&mut f.t, CONFIG), 1);
    }

    /// Writes a stats buffer of `values` at `at`; returns its length.
    fn stats_buf(mem: &GuestMemoryMmap, at: u64, values: &[(u16, u64)]) -> u32 {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        bytes.len() as u32
    }

    #[test]
    fn stats_are_kept_until_the_host_asks_for_fresh_ones() {
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        let feats = features(&[VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_REPORTING]);
        let mut f = start(&mem, feats, &[&qs[0], &qs[1], &qs[2], &qs[3]]);
        // The driver posts its first figures when it starts.
        let len = stats_buf(&mem, DATA_ADDR, &[(4, 100 << 20), (5, 512 << 20)]);
        add_chain(&qs[2], 0, &[Buf::read(DATA_ADDR, len)]);
        notify(&mut f, 2);
        let handle = f.handle.clone();
        assert!(wait_until(WAIT, || handle.last_stats().age.is_some()));
        // Asked for fresh figures, the device hands the buffer back; the "driver"
        // here refills it and posts it again, as Linux's does.
        let asker = std::thread::spawn(move || handle.guest_stats(WAIT));
        assert!(wait_until(WAIT, || used_idx(&qs[2]) == 1));
        let len = stats_buf(&mem, DATA_ADDR, &[(4, 90 << 20), (5, 512 << 20), (7, 3 << 20), (99, 1)]);
        add_chain(&qs[2], 0, &[Buf::read(DATA_ADDR, len)]);
        notify(&mut f, 2);
        let got = asker.join().unwrap();
        assert_eq!(got.values, vec![(4, 90 << 20), (5, 512 << 20), (7, 3 << 20), (99, 1)]);
        assert!(got.age.unwrap() < WAIT);
        assert_eq!((GuestStats::name(4), GuestStats::name(99)), ("free_memory".into(), "tag_99".into()));
        assert_eq!(got.get(7), Some(3 << 20));
        // A guest that does not answer leaves the last figures, with their age.
        let stale = f.handle.guest_stats(Duration::from_millis(50));
        assert_eq!(stale.values, got.values);
        // The reporting queue is the fourth with STATS_VQ on.
        add_chain(&qs[3], 0, &[Buf::write(0x40_0000, 0x1000)]);
        notify(&mut f, 3);
        assert!(wait_until(WAIT, || used_idx(&qs[3]) == 1));
    }

    #[test]
    fn a_queue_the_driver_did_not_set_up_fails_activation() {
        let mem = guest_memory(MEM);
        let qs = queues(&mem);
        let (dev, _handle) = Balloon::new(MEM as u64).unwrap();
        let irq = Arc::new(RecordingInterrupt::default());
        let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq, Default::default()).unwrap();
        // REPORTING accepted, but only two queues made ready.
        let status = mmio_init(&mut t, features(&[VIRTIO_BALLOON_F_REPORTING]), &[&qs[0], &qs[1]]);
        assert_ne!(status & 0x40, 0, "DEVICE_NEEDS_RESET, status {status:#x}");
    }
}
