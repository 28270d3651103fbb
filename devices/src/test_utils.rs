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
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
pub use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

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
    let e: VirtqUsedElem = q.used().ring().ref_at(usize::from(i)).unwrap().load();
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
