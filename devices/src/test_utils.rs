//! Helpers shared by device tests and benches: guest memory, split queues written
//! into it the way a driver would, recording interrupts, and a driver-side walk of
//! the virtio-mmio init sequence.
//!
//! Built for `cfg(test)` and with the `test-utils` feature. Helpers panic on setup
//! errors: they only ever see values a test chose.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, MockError, UsedRing};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::bus::BusDevice;
use crate::virtio::VirtioInterrupt;
use crate::Interrupt;

/// Where [`mock_queue`] puts the rings.
pub const QUEUE_ADDR: u64 = 0x1000;
/// A good place for test buffers, well after the rings.
pub const DATA_ADDR: u64 = 0x10_0000;

/// `size` bytes of guest RAM at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A split queue of `len` entries with its rings at [`QUEUE_ADDR`] (the queue `n`
/// of a device goes at `QUEUE_ADDR + n * 0x10000` via [`mock_queue_at`]).
pub fn mock_queue(mem: &GuestMemoryMmap, len: u16) -> MockSplitQueue<'_, GuestMemoryMmap> {
    mock_queue_at(mem, QUEUE_ADDR, len)
}

/// A split queue of `len` entries with its rings at `addr`.
pub fn mock_queue_at(
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u16,
) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::create(mem, GuestAddress(addr), len)
}

/// Where the three parts of a split ring of `size` entries go when the
/// descriptor table starts at `addr`: (descriptor table, avail ring, used ring,
/// end). The avail ring follows the table; the used ring follows the avail ring,
/// 4-byte aligned. Each ring ends with its event field (`used_event`,
/// `avail_event`), as EVENT_IDX needs.
pub fn ring_layout(addr: u64, size: u16) -> (u64, u64, u64, u64) {
    let size = u64::from(size);
    let avail = addr + 16 * size;
    let used = (avail + 4 + 2 * size + 2 + 3) & !3;
    (addr, avail, used, used + 4 + 8 * size + 2)
}

/// A split queue as the driver sees it, written into guest memory.
///
/// It keeps the API of virtio-queue's `MockSplitQueue` that our tests use, but
/// lays the rings out as [`ring_layout`] says: virtio-queue 0.17's mock puts the
/// used ring `len` bytes (not `2 * len + 6`) after the avail ring's start, inside
/// the avail ring, so avail entries from `len / 2` on overwrite used entries. The
/// avail index it writes also wraps modulo the queue size here.
pub struct MockSplitQueue<'a, M: GuestMemory = GuestMemoryMmap> {
    len: u16,
    desc_table_addr: GuestAddress,
    desc_table: DescriptorTable<'a, M>,
    avail_addr: GuestAddress,
    avail: AvailRing<'a, M>,
    used_addr: GuestAddress,
    used: UsedRing<'a, M>,
}

impl<'a, M: GuestMemory> MockSplitQueue<'a, M> {
    /// A queue of `len` entries with its descriptor table at `start`; the rings'
    /// flags, indexes and event fields are zeroed.
    pub fn create(mem: &'a M, start: GuestAddress, len: u16) -> Self {
        let (desc, avail, used, _) = ring_layout(start.0, len);
        Self {
            len,
            desc_table_addr: GuestAddress(desc),
            desc_table: DescriptorTable::new(mem, GuestAddress(desc), len),
            avail_addr: GuestAddress(avail),
            avail: AvailRing::new(mem, GuestAddress(avail), len),
            used_addr: GuestAddress(used),
            used: UsedRing::new(mem, GuestAddress(used), len),
        }
    }

    /// The number of entries.
    pub fn len(&self) -> u16 {
        self.len
    }

    /// Whether the queue has no entries (never, for a queue a device accepts).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor table.
    pub fn desc_table(&self) -> &DescriptorTable<'a, M> {
        &self.desc_table
    }

    /// The available ring.
    pub fn avail(&self) -> &AvailRing<'a, M> {
        &self.avail
    }

    /// The used ring.
    pub fn used(&self) -> &UsedRing<'a, M> {
        &self.used
    }

    /// Where the descriptor table starts.
    pub fn desc_table_addr(&self) -> GuestAddress {
        self.desc_table_addr
    }

    /// Where the avail ring starts.
    pub fn avail_addr(&self) -> GuestAddress {
        self.avail_addr
    }

    /// Where the used ring starts.
    pub fn used_addr(&self) -> GuestAddress {
        self.used_addr
    }

    /// The device side of this queue: ready, at these addresses.
    pub fn create_queue<Q: QueueT>(&self) -> Result<Q, virtio_queue::Error> {
        let mut q = Q::new(self.len)?;
        q.set_size(self.len);
        let halves = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = halves(self.desc_table_addr);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(self.avail_addr);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(self.used_addr);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        Ok(q)
    }

    /// Writes `descs` at descriptor index `offset` on, and makes available the
    /// head of every chain in them: the first descriptor, and each one after a
    /// descriptor without VRING_DESC_F_NEXT.
    pub fn add_desc_chains(&self, descs: &[RawDescriptor], offset: u16) -> Result<(), MockError> {
        let mut idx = self.avail.idx().load();
        let mut chain_start = true;
        for (i, desc) in descs.iter().enumerate() {
            let at = offset.wrapping_add(i as u16);
            self.desc_table.store(at, *desc)?;
            if chain_start {
                let pos = usize::from(idx % self.len);
                self.avail.ring().ref_at(pos)?.store(at);
                idx = idx.wrapping_add(1);
            }
            chain_start = SplitDescriptor::from(*desc).flags() & VRING_DESC_F_NEXT as u16 == 0;
        }
        self.avail.idx().store(idx);
        Ok(())
    }
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub write: bool,
}

impl Buf {
    /// A buffer the device reads.
    pub fn read(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub fn write(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// Writes a chain of `bufs` at descriptor index `first` and makes it available.
pub fn add_chain(q: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, bufs: &[Buf]) {
    let descs: Vec<RawDescriptor> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let last = i + 1 == bufs.len();
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(b.addr, b.len, flags, next))
        })
        .collect();
    q.add_desc_chains(&descs, first).unwrap();
}

/// The used ring's index.
pub fn used_idx(q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    q.used().idx().load()
}

/// Used ring entry `i`: (descriptor head, bytes written).
pub fn used_elem(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let pos = usize::from(i % q.len());
    let e: VirtqUsedElem = q.used().ring().ref_at(pos).unwrap().load();
    (e.id(), e.len())
}

/// An [`Interrupt`] that counts triggers.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    count: AtomicUsize,
}

impl RecordingInterrupt {
    /// How many times the interrupt was raised.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Interrupt for RecordingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A [`VirtioInterrupt`] that records status bits and counts signals, for
/// driving a device without a transport.
#[derive(Debug, Default)]
pub struct RecordingVirtioInterrupt {
    status: AtomicU32,
    count: AtomicUsize,
}

impl RecordingVirtioInterrupt {
    /// The status bits signalled so far.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// How many times the interrupt was raised.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingVirtioInterrupt {
    fn signal(&self, status: u32) -> std::io::Result<()> {
        self.status.fetch_or(status, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns its last value.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A 32-bit register read, as a driver does.
pub fn read32(dev: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// A 32-bit register write, as a driver does.
pub fn write32(dev: &mut dyn BusDevice, offset: u64, v: u32) {
    dev.write(offset, &v.to_le_bytes());
}

/// Walks the virtio-mmio init sequence on `dev`: reset, ACKNOWLEDGE, DRIVER,
/// `features`, FEATURES_OK, the queues (queue `i` from `queues[i]`), DRIVER_OK.
/// Returns the status register read back at the end.
pub fn mmio_init(
    dev: &mut dyn BusDevice,
    features: u64,
    queues: &[&MockSplitQueue<'_, GuestMemoryMmap>],
) -> u32 {
    const STATUS: u64 = 0x70;
    write32(dev, STATUS, 0);
    write32(dev, STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    let mut s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    write32(dev, STATUS, s);
    write32(dev, 0x24, 0);
    write32(dev, 0x20, features as u32);
    write32(dev, 0x24, 1);
    write32(dev, 0x20, (features >> 32) as u32);
    s |= VIRTIO_CONFIG_S_FEATURES_OK;
    write32(dev, STATUS, s);
    for (i, q) in queues.iter().enumerate() {
        write32(dev, 0x30, i as u32);
        let max = read32(dev, 0x34);
        // The descriptor table (16 bytes an entry) ends where the avail ring starts.
        let len = ((q.avail_addr().0 - q.desc_table_addr().0) / 16) as u32;
        assert!(len <= max, "queue {i}: {len} > max {max}");
        write32(dev, 0x38, len);
        for (lo, addr) in [
            (0x80, q.desc_table_addr().0),
            (0x90, q.avail_addr().0),
            (0xa0, q.used_addr().0),
        ] {
            write32(dev, lo, addr as u32);
            write32(dev, lo + 4, (addr >> 32) as u32);
        }
        write32(dev, 0x44, 1);
    }
    s |= VIRTIO_CONFIG_S_DRIVER_OK;
    write32(dev, STATUS, s);
    read32(dev, STATUS)
}

// ---------------------------------------------------------------------------
// Hostile guests: queues whose every field is chosen by an input byte string.
//
// Property tests (a `proptest` byte vector) and fuzz targets (libFuzzer's input)
// use the same decoder, so a failing input of one can be replayed by the other.
// Bytes past the end of the input read as zero, so every input is a valid case.
// ---------------------------------------------------------------------------

/// Guest RAM of a hostile case: two regions with a one-page hole between them,
/// so buffers can straddle a hole as well as the end of memory.
pub const HOSTILE_RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x1_1000, 0x1_0000)];
/// The end of the last region.
pub const HOSTILE_RAM_END: u64 = 0x2_1000;
/// Queue `n` of a hostile case has its descriptor table at
/// `HOSTILE_QUEUE_BASE + n * HOSTILE_QUEUE_STRIDE` (room for 256 entries).
pub const HOSTILE_QUEUE_BASE: u64 = 0x1000;
/// See [`HOSTILE_QUEUE_BASE`].
pub const HOSTILE_QUEUE_STRIDE: u64 = 0x2000;
/// Where buffer addresses usually point: the rest of RAM, hole included.
pub const HOSTILE_DATA: (u64, u64) = (0x8000, HOSTILE_RAM_END);
/// Where indirect descriptor tables go (inside the data area on purpose).
pub const HOSTILE_INDIRECT: u64 = 0x1_c000;
/// Where the follow-up good request puts its buffers.
pub const GOOD_ADDR: u64 = 0x1_8000;
/// The largest queue a hostile case uses.
pub const HOSTILE_MAX_QUEUE: u16 = 256;
/// The most chains one hostile queue makes available, to keep cases cheap.
pub const HOSTILE_MAX_CHAINS: u16 = 24;

/// The guest memory of a hostile case (fresh and zeroed).
pub fn hostile_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = HOSTILE_RAM
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// Reads an input byte string as a stream of choices; past the end, every
/// choice is zero.
#[derive(Clone, Debug)]
pub struct ByteSource<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> ByteSource<'a> {
    /// A source over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    /// The next two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// The next four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }

    /// The next eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A value below `n` (`n` > 0).
    pub fn below(&mut self, n: u32) -> u32 {
        if n <= 256 {
            u32::from(self.u8()) % n
        } else {
            self.u32() % n
        }
    }

    /// True with probability about 1/`n`.
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8() % n == 0
    }

    /// Whether input is left.
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Which way a queue's buffers normally point; each descriptor's direction is
/// still flipped now and then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// All device-writable (rng, rx queues).
    Writable,
    /// All device-readable (tx queues).
    Readable,
    /// Readable first, then data in either direction, writable last (blk, fs).
    Request,
}

/// What a device's queue looks like to the decoder.
#[derive(Clone, Copy, Debug)]
pub struct QueueSpec<'t> {
    /// The smallest queue size to use (the follow-up request must fit).
    pub min_size: u16,
    /// Which way the buffers point.
    pub shape: Shape,
    /// Plausible contents for device-readable buffers (request headers), of
    /// which the decoder picks one and flips a few bytes.
    pub payloads: &'t [Vec<u8>],
}

/// One hostile queue written into guest memory.
#[derive(Clone, Debug)]
pub struct HostileQueue {
    /// Queue size.
    pub size: u16,
    /// Descriptor table, avail ring, used ring.
    pub desc: u64,
    /// The avail ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
    /// Where the device's `next_avail` and `next_used` start.
    pub start: u16,
    /// Whether the device uses VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

fn write_desc(mem: &GuestMemoryMmap, table: u64, i: u16, d: SplitDescriptor) {
    let _ = vm_memory::Bytes::write_obj(
        mem,
        RawDescriptor::from(d),
        GuestAddress(table + 16 * u64::from(i)),
    );
}

fn write_u16(mem: &GuestMemoryMmap, addr: u64, v: u16) {
    let _ = vm_memory::Bytes::write_obj(mem, v.to_le(), GuestAddress(addr));
}

fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    u16::from_le(vm_memory::Bytes::read_obj(mem, GuestAddress(addr)).unwrap_or(0))
}

impl HostileQueue {
    /// Decodes queue `index` from `src` and writes it into `mem`: a descriptor
    /// table of chains with chosen addresses, lengths, flags and `next` links,
    /// some indirect tables, request bytes in readable buffers, and an avail
    /// ring and index that may or may not make sense.
    pub fn write(
        mem: &GuestMemoryMmap,
        src: &mut ByteSource<'_>,
        index: usize,
        spec: &QueueSpec<'_>,
    ) -> Self {
        const SIZES: [u16; 12] = [1, 2, 4, 4, 8, 8, 16, 16, 32, 64, 128, 256];
        let mut size = SIZES[src.below(SIZES.len() as u32) as usize];
        while size < spec.min_size {
            size *= 2;
        }
        let size = size.min(HOSTILE_MAX_QUEUE);
        let base = HOSTILE_QUEUE_BASE + index as u64 * HOSTILE_QUEUE_STRIDE;
        let (desc, avail, used, _) = ring_layout(base, size);
        let start = if src.one_in(4) { src.u16() } else { 0 };
        let event_idx = src.one_in(2);
        let mut q = Self {
            size,
            desc,
            avail,
            used,
            start,
            event_idx,
        };
        let mut indirect_at = HOSTILE_INDIRECT + index as u64 * 0x800;
        // Chains at consecutive table slots, then heads (mostly chain starts).
        let n_chains = src.below(u32::from(size.min(HOSTILE_MAX_CHAINS)) + 1) as u16;
        let mut heads = Vec::with_capacity(usize::from(n_chains));
        let mut slot: u16 = 0;
        for _ in 0..n_chains {
            let len = 1 + src.below(4) as u16;
            heads.push(slot % size);
            for pos in 0..len {
                let i = slot % size;
                slot = slot.wrapping_add(1);
                let last = pos + 1 == len;
                let mut d = q.decode_desc(mem, src, spec, pos, last, slot % size);
                if d.flags() & VRING_DESC_F_INDIRECT as u16 != 0 && src.one_in(2) {
                    // A real indirect table, itself a small hostile chain.
                    let n = 1 + src.below(6) as u16;
                    for k in 0..n {
                        let e = q.decode_desc(mem, src, spec, k, k + 1 == n, k + 1);
                        write_desc(mem, indirect_at, k, e);
                    }
                    let tlen = if src.one_in(8) {
                        src.u32()
                    } else {
                        16 * u32::from(n)
                    };
                    d = SplitDescriptor::new(indirect_at, tlen, d.flags(), d.next());
                    indirect_at += 16 * u64::from(n);
                }
                write_desc(mem, desc, i, d);
            }
        }
        let avail_flags = u16::from(src.one_in(4));
        write_u16(mem, avail, avail_flags);
        let n_avail = if src.one_in(8) {
            src.below(u32::from(size) + 1) as u16
        } else {
            n_chains
        };
        for k in 0..n_avail {
            let head = match src.below(16) {
                0 => src.u16(),
                1 => src.below(u32::from(size)) as u16,
                _ => heads.get(usize::from(k)).copied().unwrap_or(0),
            };
            let pos = start.wrapping_add(k) % size;
            write_u16(mem, avail + 4 + 2 * u64::from(pos), head);
        }
        let idx = match src.below(16) {
            0 => src.u16(),
            1 => start.wrapping_add(size).wrapping_add(1),
            _ => start.wrapping_add(n_avail),
        };
        write_u16(mem, avail + 2, idx);
        // used_event, at the end of the avail ring.
        write_u16(mem, avail + 4 + 2 * u64::from(size), src.u16());
        // The used ring's index starts where the device's next_used does.
        write_u16(mem, used + 2, start);
        q
    }

    fn decode_desc(
        &mut self,
        mem: &GuestMemoryMmap,
        src: &mut ByteSource<'_>,
        spec: &QueueSpec<'_>,
        pos: u16,
        last: bool,
        next_slot: u16,
    ) -> SplitDescriptor {
        let (lo, hi) = HOSTILE_DATA;
        let addr = match src.below(16) {
            0..=8 => lo + (u64::from(src.u16()) * 2) % (hi - lo),
            9 => self.desc + u64::from(src.u16()) % (HOSTILE_QUEUE_STRIDE * 2),
            10 => HOSTILE_RAM_END - u64::from(src.below(64)),
            11 => HOSTILE_RAM_END + u64::from(src.u16()),
            12 => u64::MAX - u64::from(src.u8()),
            13 => HOSTILE_RAM[0].1 as u64 - u64::from(src.below(64)),
            14 => src.u64(),
            _ => u64::from(src.u8()),
        };
        let len = match src.below(16) {
            0 => 0,
            1 => 1,
            2..=4 => 16 << src.below(3),
            5..=10 => u32::from(src.u16()) % 4096,
            11 => u32::from(src.u16()),
            12 => u32::MAX - u32::from(src.u8()),
            13 => 0x1_0000 + u32::from(src.u16()),
            _ => src.u32(),
        };
        let writable = match spec.shape {
            Shape::Writable => true,
            Shape::Readable => false,
            Shape::Request => {
                if pos == 0 {
                    false
                } else if last {
                    true
                } else {
                    src.one_in(2)
                }
            }
        } ^ src.one_in(8);
        let mut flags = 0u16;
        if writable {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if !last ^ src.one_in(16) {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        if src.one_in(16) {
            flags |= VRING_DESC_F_INDIRECT as u16;
        }
        if src.one_in(32) {
            flags |= src.u16() & !7;
        }
        let next = match src.below(16) {
            0 => src.u16(),
            1 => src.below(u32::from(self.size)) as u16,
            _ => next_slot,
        };
        if !writable && !spec.payloads.is_empty() && !src.one_in(4) {
            let mut p = spec.payloads[src.below(spec.payloads.len() as u32) as usize].clone();
            for _ in 0..src.below(4) {
                if p.is_empty() {
                    break;
                }
                let i = src.below(p.len() as u32) as usize;
                p[i] = src.u8();
            }
            p.truncate(len as usize);
            let _ = vm_memory::Bytes::write_slice(mem, &p, GuestAddress(addr));
        }
        SplitDescriptor::new(addr, len, flags, next)
    }

    /// The device side of this queue: ready, with `next_avail` and `next_used`
    /// at [`HostileQueue::start`].
    pub fn queue(&self) -> virtio_queue::Queue {
        let mut q = virtio_queue::Queue::new(HOSTILE_MAX_QUEUE).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_event_idx(self.event_idx);
        q.set_next_avail(self.start);
        q.set_next_used(self.start);
        q.set_ready(true);
        q
    }

    /// Posts well-formed chains, each at fresh table slots from 0, at avail
    /// position `next_avail` on (where the device will look next), and returns
    /// their heads. The chains must fit the table.
    pub fn post(&self, mem: &GuestMemoryMmap, next_avail: u16, chains: &[&[Buf]]) -> Vec<u16> {
        let mut slot = 0u16;
        let mut heads = Vec::with_capacity(chains.len());
        for (k, bufs) in chains.iter().enumerate() {
            assert!(usize::from(slot) + bufs.len() <= usize::from(self.size));
            heads.push(slot);
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let mut flags = if b.write {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                write_desc(
                    mem,
                    self.desc,
                    slot,
                    SplitDescriptor::new(b.addr, b.len, flags, slot + 1),
                );
                slot += 1;
            }
            let pos = next_avail.wrapping_add(k as u16) % self.size;
            write_u16(mem, self.avail + 4 + 2 * u64::from(pos), heads[k]);
        }
        write_u16(
            mem,
            self.avail + 2,
            next_avail.wrapping_add(chains.len() as u16),
        );
        heads
    }

    /// The used ring's index as the device left it.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        read_u16(mem, self.used + 2)
    }

    /// The used ring entry at ring position `idx % size`: (head, length).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, idx: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(idx % self.size);
        let id: u32 = vm_memory::Bytes::read_obj(mem, GuestAddress(at)).unwrap_or(u32::MAX);
        let len: u32 = vm_memory::Bytes::read_obj(mem, GuestAddress(at + 4)).unwrap_or(u32::MAX);
        (id, len)
    }

    /// The byte ranges of the rings: descriptor table, avail ring, used ring.
    fn ring_ranges(&self) -> [(u64, u64); 3] {
        let s = u64::from(self.size);
        [
            (self.desc, self.desc + 16 * s),
            (self.avail, self.avail + 6 + 2 * s),
            (self.used, self.used + 6 + 8 * s),
        ]
    }
}

/// A snapshot of guest memory and of where the device may write: the used rings
/// and the device-writable buffers of every descriptor in the tables (indirect
/// ones included). [`WriteCheck::check`] then finds writes anywhere else.
///
/// A writable buffer that overlaps a descriptor table or an avail ring lets the
/// device's own writes redefine later chains; such cases are not checked.
pub struct WriteCheck {
    before: Vec<Vec<u8>>,
    allowed: Vec<(u64, u64)>,
    enabled: bool,
    rings_untouched: bool,
}

fn read_desc(mem: &GuestMemoryMmap, addr: u64) -> Option<SplitDescriptor> {
    let raw: RawDescriptor = vm_memory::Bytes::read_obj(mem, GuestAddress(addr)).ok()?;
    Some(SplitDescriptor::from(raw))
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl WriteCheck {
    /// Takes the snapshot; call it after the case is written, before the device runs.
    pub fn new(mem: &GuestMemoryMmap, queues: &[&HostileQueue]) -> Self {
        let mut allowed = Vec::new();
        let mut tables = Vec::new();
        for q in queues {
            let [d, a, u] = q.ring_ranges();
            tables.push(d);
            tables.push(a);
            allowed.push(u);
            for i in 0..u64::from(q.size) {
                let Some(desc) = read_desc(mem, q.desc + 16 * i) else {
                    continue;
                };
                let mut descs = vec![desc];
                if desc.flags() & VRING_DESC_F_INDIRECT as u16 != 0 {
                    let base = desc.addr().0;
                    let n = u64::from(desc.len() / 16).min(u64::from(u16::MAX));
                    tables.push((base, base.saturating_add(16 * n)));
                    for k in 0..n {
                        match base.checked_add(16 * k).and_then(|a| read_desc(mem, a)) {
                            Some(e) => descs.push(e),
                            None => break,
                        }
                    }
                }
                for e in descs {
                    if e.flags() & VRING_DESC_F_WRITE as u16 != 0 && e.len() > 0 {
                        let a = e.addr().0;
                        allowed.push((a, a.saturating_add(u64::from(e.len()))));
                    }
                }
            }
        }
        let enabled = !allowed
            .iter()
            .any(|&w| tables.iter().any(|&t| overlaps(w, t)));
        let used_rings: Vec<(u64, u64)> = queues.iter().map(|q| q.ring_ranges()[2]).collect();
        let rings_untouched = enabled
            && !allowed
                .iter()
                .filter(|w| !used_rings.contains(w))
                .any(|&w| used_rings.iter().any(|&u| overlaps(w, u)));
        let before = if enabled { snapshot(mem) } else { Vec::new() };
        Self {
            before,
            allowed,
            enabled,
            rings_untouched,
        }
    }

    /// Whether no device-writable buffer overlaps a ring. A device that holds
    /// chains (net, vsock rx) writes into them later, so a guest that aims
    /// buffers at its own rings corrupts them later too: a follow-up request
    /// can only be checked when this holds.
    pub fn rings_untouched(&self) -> bool {
        self.rings_untouched
    }

    /// Whether the case is checked at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The first changed byte outside the allowed ranges, if any.
    pub fn check(&self, mem: &GuestMemoryMmap) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let after = snapshot(mem);
        for (r, (b, a)) in HOSTILE_RAM.iter().zip(self.before.iter().zip(&after)) {
            if b == a {
                continue;
            }
            // Whole chunks compare fast; only changed chunks that are not inside
            // one allowed range are looked at bytewise.
            const CHUNK: usize = 256;
            let inside = |s: u64, e: u64| self.allowed.iter().any(|&(a, z)| a <= s && e <= z);
            let mut off = 0;
            while off < b.len() {
                let end = (off + CHUNK).min(b.len());
                let (cs, ce) = (r.0 + off as u64, r.0 + end as u64);
                if b[off..end] != a[off..end] && !inside(cs, ce) {
                    for i in off..end {
                        let addr = r.0 + i as u64;
                        if b[i] != a[i] && !inside(addr, addr + 1) {
                            return Err(format!(
                                "guest byte {addr:#x} changed ({:#x} -> {:#x}) outside every \
                                 device-writable buffer and used ring",
                                b[i], a[i]
                            ));
                        }
                    }
                }
                off = end;
            }
        }
        Ok(())
    }
}

/// The contents of each region of a hostile memory.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    HOSTILE_RAM
        .iter()
        .map(|&(a, l)| {
            let mut v = vec![0u8; l];
            vm_memory::Bytes::read_slice(mem, &mut v, GuestAddress(a)).unwrap();
            v
        })
        .collect()
}

/// Aborts the test process, with the input that was running, if one case takes
/// longer than `limit`: a hang shows up as a failure with its input rather than
/// as a CI timeout.
pub struct Watchdog {
    state: std::sync::Arc<std::sync::Mutex<WatchState>>,
}

/// When the running case started, its input, and whether the watchdog is done.
type WatchState = (Option<Instant>, Vec<u8>, bool);

impl Watchdog {
    /// Starts the watchdog thread for test `name`.
    pub fn new(name: &'static str, limit: Duration) -> Self {
        let state =
            std::sync::Arc::new(std::sync::Mutex::new((None::<Instant>, Vec::new(), false)));
        let s = state.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let g = s.lock().unwrap_or_else(|e| e.into_inner());
            if g.2 {
                return;
            }
            if let Some(t) = g.0 {
                if t.elapsed() > limit {
                    eprintln!(
                        "{name}: one case has run for more than {limit:?}; it hangs. Input: {:?}",
                        g.1
                    );
                    std::process::abort();
                }
            }
        });
        Self { state }
    }

    /// Marks the start of a case with `input`.
    pub fn start(&self, input: &[u8]) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = Some(Instant::now());
        g.1.clear();
        g.1.extend_from_slice(input);
    }

    /// Marks the end of a case.
    pub fn done(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
    }
}

/// How long one call into a device may take on a hostile case (debug build, a
/// loaded CI machine); real work per case is well under a millisecond.
pub const CALL_BOUND: Duration = Duration::from_secs(5);

/// Runs `f` and fails if it took longer than [`CALL_BOUND`].
pub fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    let t = Instant::now();
    let r = f();
    let el = t.elapsed();
    if el > CALL_BOUND {
        return Err(format!("{what} took {el:?}"));
    }
    Ok(r)
}

/// How many cases a property test runs: `default`, or `PROPTEST_CASES` if that
/// is higher.
pub fn hostile_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: u32| n.max(default))
}

#[cfg(test)]
mod tests {
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// Every entry of a full ring is a chain the device pops in order, and the
    /// used entries it writes do not disturb the avail ring (virtio-queue's own
    /// mock overlaps the two).
    #[test]
    fn full_queue_of_chains() {
        for len in [2u16, 16, 256] {
            let mem: GuestMemoryMmap = guest_memory(0x40_0000);
            let q = mock_queue(&mem, len);
            for i in 0..len {
                add_chain(&q, i, &[Buf::write(DATA_ADDR + u64::from(i) * 0x100, 32)]);
            }
            assert_eq!(q.avail().idx().load(), len);
            let mut dev = q.create_queue::<Queue>().unwrap();
            for i in 0..len {
                let chain = dev.pop_descriptor_chain(&mem).unwrap();
                assert_eq!(chain.head_index(), i, "queue of {len}");
                let d = chain.clone().next().unwrap();
                assert_eq!(d.addr().0, DATA_ADDR + u64::from(i) * 0x100);
                dev.add_used(&mem, i, 32 + u32::from(i)).unwrap();
            }
            assert!(dev.pop_descriptor_chain(&mem).is_none());
            assert_eq!(used_idx(&q), len);
            for i in 0..len {
                assert_eq!(used_elem(&q, i), (u32::from(i), 32 + u32::from(i)));
                let head: u16 = q.avail().ring().ref_at(usize::from(i)).unwrap().load();
                assert_eq!(head, i, "avail entry {i} of {len} intact");
            }
            // A second round wraps the avail and used indexes around the ring.
            for i in 0..len {
                add_chain(&q, i, &[Buf::write(DATA_ADDR, 8)]);
            }
            for i in 0..len {
                let chain = dev.pop_descriptor_chain(&mem).unwrap();
                assert_eq!(chain.head_index(), i);
                dev.add_used(&mem, i, 8).unwrap();
            }
            assert_eq!(used_idx(&q), 2 * len);
            assert_eq!(used_elem(&q, 2 * len - 1), (u32::from(len - 1), 8));
        }
    }
}
