//! virtio-balloon's worker: one thread serving every queue and the host's
//! requests for statistics, on the devices' event loop.
//!
//! A wake serves the queues that were notified: inflate chains list frame
//! numbers (each 2 MiB block wholly in the balloon is discarded, see `Inflated`),
//! deflate chains take pages out of the balloon, free page reports are discarded range by range (unless the guest
//! poisons free pages, see `Shared::may_discard_free_pages`), and a stats buffer
//! is read and kept until the host wants fresh figures, when it goes back on the
//! used ring for the driver to refill. Everything the guest wrote is bounded
//! ([`MAX_PFNS_PER_CHAIN`], [`MAX_REPORT_RANGES`], [`MAX_STATS`]), and discarding
//! touches only whole host pages inside guest RAM.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, error};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::Shared;
use super::{BALLOON_PAGE_SIZE, MAX_PFNS_PER_CHAIN, MAX_REPORT_RANGES, MAX_STATS};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet};
use crate::virtio::event_loop::{self, EventHandler};
use crate::virtio::queue_thread::{drain_queue, for_each_available, signal_used};
use crate::virtio::VirtioInterrupt;

/// Discards guest range `addr`, `len` on the host; returns the bytes discarded.
pub(super) type DiscardFn = fn(&GuestMemoryMmap, u64, u64) -> u64;

/// Event tokens: the queues (by role), then the host's stats request.
const PROCESS_INFLATE: u64 = 0;
const PROCESS_DEFLATE: u64 = 1;
const PROCESS_STATS: u64 = 2;
const PROCESS_REPORTING: u64 = 3;
const STATS_WANTED: u64 = 4;
/// Every queue: what the first wake serves (buffers posted before the worker ran).
const ALL_QUEUES: u8 = 0b1111;

/// The queues the driver set up, each with its notification.
pub(super) struct Queues {
    pub inflate: (Queue, EventFd),
    pub deflate: (Queue, EventFd),
    pub stats: Option<(Queue, EventFd)>,
    pub reporting: Option<(Queue, EventFd)>,
}

/// Guest pages in a 2 MiB block.
const BLOCK_PAGES: u64 = 512;

/// The pages in the balloon, a bit per 4 KiB guest page. Inflated pages are
/// discarded a 2 MiB block at a time, once every page of the block is in the
/// balloon: guest RAM is backed by transparent huge pages, and discarding 4 KiB
/// inside one splits it (the guest then runs on 4 KiB mappings there, and the
/// host zaps and refaults them page by page). A balloon filled from free memory
/// fills whole blocks; a page in a block the guest still partly uses stays.
struct Inflated {
    words: Vec<u64>,
}

impl Inflated {
    /// Room for every page below the end of guest RAM.
    fn new(mem: &GuestMemoryMmap) -> Self {
        use vm_memory::GuestMemory;
        let pages = mem.last_addr().0 / BALLOON_PAGE_SIZE + 1;
        let blocks = pages.div_ceil(BLOCK_PAGES);
        Self {
            words: vec![0; usize::try_from(blocks * BLOCK_PAGES / 64).unwrap_or(0)],
        }
    }

    /// Puts `pfn` in the balloon; returns the first page of its block if that
    /// made the block full. A page past guest RAM, or already in, changes nothing.
    fn insert(&mut self, pfn: u32) -> Option<u64> {
        let (w, bit) = (pfn as usize / 64, 1u64 << (pfn % 64));
        let word = self.words.get_mut(w)?;
        if *word & bit != 0 {
            return None;
        }
        *word |= bit;
        let first = w / 8 * 8;
        let block = self.words.get(first..first + 8)?;
        block.iter().all(|&x| x == u64::MAX).then_some(u64::from(pfn) / BLOCK_PAGES * BLOCK_PAGES)
    }

    /// Takes `pfn` out of the balloon; whether it was in.
    fn remove(&mut self, pfn: u32) -> bool {
        let (w, bit) = (pfn as usize / 64, 1u64 << (pfn % 64));
        match self.words.get_mut(w) {
            Some(word) if *word & bit != 0 => {
                *word &= !bit;
                true
            }
            _ => false,
        }
    }
}

/// The queues and what serving them needs.
pub(super) struct RequestHandler {
    mem: GuestMemoryMmap,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    reporting: Option<Queue>,
    /// Notification of each queue, by token (`None`: not set up).
    evts: [Option<EventFd>; 4],
    interrupt: Arc<dyn VirtioInterrupt>,
    shared: Arc<Shared>,
    discard: DiscardFn,
    /// The stats buffer the device holds until the host wants fresh figures.
    stats_head: Option<u16>,
    /// The pages in the balloon.
    inflated: Inflated,
    /// Frame numbers of the chain being served (reused).
    pfns: Vec<u32>,
    /// Raw bytes read from guest memory (reused).
    bytes: Vec<u8>,
}

impl RequestHandler {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        q: Queues,
        interrupt: Arc<dyn VirtioInterrupt>,
        shared: Arc<Shared>,
        discard: DiscardFn,
    ) -> Self {
        let (stats, stats_evt) = q.stats.map_or((None, None), |(q, e)| (Some(q), Some(e)));
        let (reporting, reporting_evt) = q.reporting.map_or((None, None), |(q, e)| (Some(q), Some(e)));
        let inflated = Inflated::new(&mem);
        Self {
            mem,
            inflate: q.inflate.0,
            deflate: q.deflate.0,
            stats,
            reporting,
            evts: [Some(q.inflate.1), Some(q.deflate.1), stats_evt, reporting_evt],
            interrupt,
            shared,
            discard,
            stats_head: None,
            inflated,
            pfns: Vec::with_capacity(MAX_PFNS_PER_CHAIN),
            bytes: Vec::new(),
        }
    }

    /// The worker's epoll set: each queue's notification, the host's stats
    /// request and `stop`.
    pub(super) fn epoll_with(&self, stop: &EventFd) -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        let evts = self.evts.iter().enumerate().filter_map(|(t, e)| e.as_ref().map(|e| (t as u64, e)));
        for (token, evt) in evts.chain([(STATS_WANTED, self.shared.stats_wanted())]) {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, token))?;
        }
        event_loop::add_stop(&epoll, stop)?;
        Ok(epoll)
    }

    /// Serves what `pending` (bits by token) asks for.
    fn process(&mut self, pending: u8) {
        if pending & (1 << PROCESS_INFLATE) != 0 {
            self.process_inflate();
        }
        if pending & (1 << PROCESS_DEFLATE) != 0 {
            self.process_deflate();
        }
        if pending & (1 << PROCESS_STATS) != 0 {
            self.process_stats();
        }
        if pending & (1 << PROCESS_REPORTING) != 0 {
            self.process_reporting();
        }
        if pending & (1 << STATS_WANTED) != 0 {
            self.request_stats();
        }
    }

    /// Inflate chains: the pages they list go in the balloon; each 2 MiB block
    /// that is then wholly in it is discarded.
    fn process_inflate(&mut self) {
        let (mem, pfns, bytes, shared, discard) = (&self.mem, &mut self.pfns, &mut self.bytes, &self.shared, self.discard);
        let inflated = &mut self.inflated;
        drain_queue(&mut self.inflate, mem, &*self.interrupt, "virtio-balloon: inflate", |chain| {
            read_pfns(chain, mem, pfns, bytes);
            for &pfn in pfns.iter() {
                if let Some(block) = inflated.insert(pfn) {
                    let n = discard(mem, block * BALLOON_PAGE_SIZE, BLOCK_PAGES * BALLOON_PAGE_SIZE);
                    shared.inflated.fetch_add(n, Ordering::SeqCst);
                }
            }
            0
        });
    }

    /// Deflate chains: the guest takes those pages back (a discarded one faults in
    /// as a zero page); they leave the balloon.
    fn process_deflate(&mut self) {
        let (mem, pfns, bytes, shared) = (&self.mem, &mut self.pfns, &mut self.bytes, &self.shared);
        let inflated = &mut self.inflated;
        drain_queue(&mut self.deflate, mem, &*self.interrupt, "virtio-balloon: deflate", |chain| {
            read_pfns(chain, mem, pfns, bytes);
            for &pfn in pfns.iter() {
                if inflated.remove(pfn) {
                    shared.deflated.fetch_add(BALLOON_PAGE_SIZE, Ordering::SeqCst);
                }
            }
            0
        });
    }

    /// Free page reports: each range is discarded (when the guest's poison allows).
    fn process_reporting(&mut self) {
        let Some(q) = self.reporting.as_mut() else {
            return;
        };
        let (mem, shared, discard) = (&self.mem, &self.shared, self.discard);
        let may_discard = shared.may_discard_free_pages();
        drain_queue(q, mem, &*self.interrupt, "virtio-balloon: reporting", |chain| {
            for desc in chain.take(MAX_REPORT_RANGES) {
                if may_discard {
                    let n = discard(mem, desc.addr().0, u64::from(desc.len()));
                    shared.reported.fetch_add(n, Ordering::SeqCst);
                }
            }
            0
        });
    }

    /// Stats buffers: each is read and kept; an older one still kept goes back.
    fn process_stats(&mut self) {
        let Some(q) = self.stats.as_mut() else {
            return;
        };
        let (mem, bytes, shared, kept) = (&self.mem, &mut self.bytes, &self.shared, &mut self.stats_head);
        let mut returned = false;
        for_each_available(q, mem, "virtio-balloon: stats", |q, chain| {
            let head = chain.head_index();
            shared.post_stats(read_stats(chain, mem, bytes));
            if let Some(old) = kept.replace(head) {
                match q.add_used(mem, old, 0) {
                    Ok(()) => returned = true,
                    Err(e) => debug!("virtio-balloon: returning stats chain {old} failed: {e}"),
                }
            }
        });
        if returned {
            signal_used(q, mem, &*self.interrupt, "virtio-balloon: stats");
        }
    }

    /// The host wants fresh statistics: the kept buffer goes back for the driver
    /// to refill and post again.
    fn request_stats(&mut self) {
        let (Some(q), Some(head)) = (self.stats.as_mut(), self.stats_head) else {
            return;
        };
        match q.add_used(&self.mem, head, 0) {
            Ok(()) => {
                self.stats_head = None;
                signal_used(q, &self.mem, &*self.interrupt, "virtio-balloon: stats");
            }
            Err(e) => debug!("virtio-balloon: returning stats chain {head} failed: {e}"),
        }
    }
}

/// Reads the chain's device-readable buffers into `bytes`, at most `max` bytes.
fn read_readable(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, bytes: &mut Vec<u8>, max: usize) {
    bytes.clear();
    let readable = chain.filter(|d: &Descriptor| !d.is_write_only());
    for desc in readable {
        let want = (desc.len() as usize).min(max - bytes.len());
        if want == 0 {
            break;
        }
        let at = bytes.len();
        bytes.resize(at + want, 0);
        if let Err(e) = mem.read_slice(&mut bytes[at..], desc.addr()) {
            debug!("virtio-balloon: buffer at {:#x} not readable: {e}", desc.addr().0);
            bytes.truncate(at);
            break;
        }
    }
}

/// The frame numbers an inflate or deflate chain lists (little-endian u32s).
fn read_pfns(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, pfns: &mut Vec<u32>, bytes: &mut Vec<u8>) {
    read_readable(chain, mem, bytes, MAX_PFNS_PER_CHAIN * 4);
    pfns.clear();
    pfns.extend(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

/// The (tag, value) pairs of a stats buffer: 10 bytes each, packed.
fn read_stats(chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, bytes: &mut Vec<u8>) -> Vec<(u16, u64)> {
    read_readable(chain, mem, bytes, MAX_STATS * 10);
    bytes
        .chunks_exact(10)
        .map(|c| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&c[2..10]);
            (u16::from_le_bytes([c[0], c[1]]), u64::from_le_bytes(v))
        })
        .collect()
}

/// The worker as the event loop drives it.
struct Worker {
    epoll: Epoll,
    handler: RequestHandler,
    pending: u8,
}

impl EventHandler for Worker {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle(&mut self, token: u64, _events: EventSet) {
        let evt = match token {
            STATS_WANTED => Some(self.handler.shared.stats_wanted()),
            t => self.handler.evts.get(t as usize).and_then(Option::as_ref),
        };
        if let Some(evt) = evt {
            // A count of zero (EAGAIN) is harmless: serve anyway.
            let _ = evt.read();
            self.pending |= 1 << token;
        }
    }

    fn after_wake(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        if pending != 0 {
            self.handler.process(pending);
        }
    }
}

/// The worker thread: serves the queues until the stop event fires.
pub(super) fn run(handler: RequestHandler, epoll: Epoll) {
    let mut w = Worker {
        epoll,
        handler,
        pending: ALL_QUEUES,
    };
    if let Err(e) = event_loop::run(&mut w, 8) {
        error!("virtio-balloon: epoll_wait failed, worker exits: {e}");
    }
}

/// The host's page size.
fn host_page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|n| n.is_power_of_two()).unwrap_or(4096)
    })
}

/// Discards the host memory behind guest range `addr`..`addr + len`: the whole
/// host pages of it that lie in guest RAM, which then read as zero. Returns the
/// bytes discarded. Whatever the guest says, nothing outside its RAM is touched.
///
/// On Linux this is `madvise(MADV_DONTNEED)` on the private anonymous mapping of
/// guest RAM (KVM drops its mappings of those pages through its MMU notifier).
/// Elsewhere it discards nothing yet (macOS' `MADV_FREE_REUSABLE` does not make
/// pages read as zero, which a guest that zeroes free pages relies on).
pub fn discard(mem: &GuestMemoryMmap, addr: u64, len: u64) -> u64 {
    use vm_memory::{GuestMemory, GuestMemoryRegion, MemoryRegionAddress};
    if !cfg!(target_os = "linux") {
        return 0;
    }
    let page = host_page_size();
    let (Some(start), Some(end)) = (addr.checked_add(page - 1), addr.checked_add(len)) else {
        return 0;
    };
    let (start, end) = (start & !(page - 1), end & !(page - 1));
    let mut at = start;
    let mut done = 0;
    while at < end {
        let Some(region) = mem.find_region(GuestAddress(at)) else {
            // A hole: go on at the next region above, if any.
            match mem.iter().map(|r| r.start_addr().0).filter(|&s| s > at).min() {
                Some(next) => {
                    at = next.checked_add(page - 1).map_or(u64::MAX, |n| n & !(page - 1));
                    continue;
                }
                None => break,
            }
        };
        let base = region.start_addr().0;
        let stop = end.min(base.saturating_add(region.len())) & !(page - 1);
        if stop <= at {
            break;
        }
        let Ok(host) = region.get_host_address(MemoryRegionAddress(at - base)) else {
            break;
        };
        let n = stop - at;
        if (host as u64) % page == 0 {
            // SAFETY: `host..host + n` lies inside this region's live mapping of
            // guest RAM (checked against the region's bounds above) and is
            // page-aligned; discarding it only makes guest pages read as zero,
            // which the guest asked for. No Rust reference points into guest RAM.
            #[cfg(target_os = "linux")]
            let r = unsafe { libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED) };
            #[cfg(not(target_os = "linux"))]
            let r = -1;
            if r == 0 {
                done += n;
            } else {
                debug!("virtio-balloon: discarding {n} bytes at {at:#x} failed: {}", std::io::Error::last_os_error());
            }
        }
        at = stop;
    }
    done
}

/// The worker's request path without its thread, so tests can drive the queues
/// synchronously: [`SyncHandler::process_all`] is what one wake with every queue
/// notified does.
#[cfg(any(test, feature = "test-utils"))]
pub struct SyncHandler(RequestHandler);

#[cfg(any(test, feature = "test-utils"))]
impl SyncHandler {
    /// A handler on the four queues (all features on), discarding nothing.
    pub fn new(mem: GuestMemoryMmap, queues: [Queue; 4], interrupt: Arc<dyn VirtioInterrupt>) -> std::io::Result<Self> {
        let (dev, _handle) = super::Balloon::with_discard(mem_size(&mem), |_, _, len| len)?;
        let shared = dev.shared();
        let [i, d, s, r] = queues;
        let evt = || EventFd::new(crate::sys::EFD_NONBLOCK);
        let q = Queues {
            inflate: (i, evt()?),
            deflate: (d, evt()?),
            stats: Some((s, evt()?)),
            reporting: Some((r, evt()?)),
        };
        Ok(Self(RequestHandler::new(mem, q, interrupt, shared, |_, _, len| len)))
    }

    /// Serves every queue, then answers a stats request.
    pub fn process_all(&mut self) {
        self.0.process(ALL_QUEUES | (1 << STATS_WANTED));
    }

    /// The queues, in order: inflate, deflate, stats, reporting.
    pub fn queues(&self) -> [&Queue; 4] {
        let h = &self.0;
        [&h.inflate, &h.deflate, h.stats.as_ref().unwrap_or(&h.inflate), h.reporting.as_ref().unwrap_or(&h.inflate)]
    }
}

#[cfg(any(test, feature = "test-utils"))]
fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemory, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{hostile_memory, HOSTILE_RAM};

    fn filled() -> GuestMemoryMmap {
        let mem = hostile_memory();
        for (base, len) in HOSTILE_RAM {
            mem.write_slice(&vec![0xee; len], GuestAddress(base)).unwrap();
        }
        mem
    }

    /// The pages of guest RAM (4 KiB each) that read as zero.
    fn zero_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
        let mut out = Vec::new();
        for (base, len) in HOSTILE_RAM {
            for p in (base..base + len as u64).step_by(4096) {
                let mut b = [0u8; 4096];
                mem.read_slice(&mut b, GuestAddress(p)).unwrap();
                if b.iter().all(|&x| x == 0) {
                    out.push(p);
                } else {
                    assert!(b.iter().all(|&x| x == 0xee), "page {p:#x} half discarded");
                }
            }
        }
        out
    }

    #[test]
    fn discard_touches_only_whole_pages_inside_guest_ram() {
        assert_eq!(host_page_size(), 4096, "these cases assume 4 KiB host pages");
        // Across the end of the first region, the hole and into the second.
        let mem = filled();
        assert_eq!(discard(&mem, 0xf000, 0x4000), 0x3000);
        assert_eq!(zero_pages(&mem), vec![0xf000, 0x11000, 0x12000]);
        // Unaligned: only the whole page inside.
        let mem = filled();
        assert_eq!(discard(&mem, 0x1800, 0x2000), 0x1000);
        assert_eq!(zero_pages(&mem), vec![0x2000]);
        // Past the end of RAM, overflowing, empty, or below a page.
        let mem = filled();
        assert_eq!(discard(&mem, 0x2_0000, 0x10_0000), 0x1000);
        for (addr, len) in [(u64::MAX - 10, 100), (u64::MAX - 0x1000, 0x2000), (0x3000, 0), (0x3001, 0x1000), (0x10_0000, 0x1000)] {
            assert_eq!(discard(&mem, addr, len), 0, "{addr:#x}+{len:#x}");
        }
        assert_eq!(zero_pages(&mem), vec![0x2_0000]);
    }
}
