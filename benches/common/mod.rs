//! What the benches share: guest memory, a driver's side of a split virtqueue
//! written into it, and an interrupt that does nothing.
//!
//! The driver here is deliberately small and independent of the devices'
//! `test_utils`: it writes descriptors once, then each round only publishes heads
//! on the available ring (modulo the queue size, wrapping the 16-bit index as a
//! real driver does), so a bench can run millions of rounds on one queue and
//! measure the device side, not the setup.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use aivmm_devices::virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `VRING_DESC_F_NEXT`: the chain goes on at `next`.
pub const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const F_WRITE: u16 = 2;

/// Where benches put their rings.
pub const QUEUE_ADDR: u64 = 0x1000;
/// Where benches put their buffers, well after the rings of a 1024-entry queue.
pub const DATA_ADDR: u64 = 0x10_0000;

/// `size` bytes of guest RAM at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// An interrupt nobody listens to: the benches count used entries instead.
#[derive(Debug, Default)]
pub struct NullInterrupt;

impl VirtioInterrupt for NullInterrupt {
    fn signal(&self, _status: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`NullInterrupt`] as the devices take it.
pub fn null_interrupt() -> Arc<dyn VirtioInterrupt> {
    Arc::new(NullInterrupt)
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
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

/// The driver's side of a split queue of `size` entries at `base`: descriptor
/// table, then the available ring, then the used ring (4-byte aligned), as the
/// virtio 1.x split layout puts them.
pub struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries (a power of two) with its rings at `base`; the
    /// rings start zeroed.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(size.is_power_of_two());
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        let zeros = vec![0u8; (end - base) as usize];
        mem.write_slice(&zeros, GuestAddress(base)).unwrap();
        Self {
            mem,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
        }
    }

    /// The device's view of this queue: ready, with the driver's addresses.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        assert!(q.is_valid(self.mem), "bench queue layout is invalid");
        q
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(i < self.size);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }

    /// Writes `bufs` as one chain in descriptors `first..first + bufs.len()`
    /// (not yet published).
    pub fn set_chain(&self, first: u16, bufs: &[Buf]) {
        for (k, b) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let last = k + 1 == bufs.len();
            let mut flags = if b.write { F_WRITE } else { 0 };
            if !last {
                flags |= F_NEXT;
            }
            self.set_desc(i, b.addr, b.len, flags, if last { 0 } else { i + 1 });
        }
    }

    /// Puts `head` on the available ring and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// How many heads the driver has published (wrapping).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// The used entry at position `i` (taken modulo the size): (head, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}

/// A small, fast, deterministic generator for offsets (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rand(u64);

impl Rand {
    /// A generator from a nonzero seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
