//! An address bus: non-overlapping ranges, each owned by one device.
//!
//! The VMM keeps one bus for port I/O and one for MMIO. A vCPU exit is looked up
//! here and turned into a read or write at an offset from the range's base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The range {0:#x}+{1:#x} overlaps a device already on the bus, or is empty.
    #[error("range {0:#x}+{1:#x} overlaps a device already on the bus, or is empty")]
    Overlap(u64, u64),
}

/// `Result` of bus operations.
pub type Result<T> = std::result::Result<T, Error>;

/// A device that answers reads and writes on a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base. Bytes the
    /// device does not define must be filled in (zero is the usual answer).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// Ranges of addresses mapped to devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `base..base+len`.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<()> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::Overlap(base, len))?;
        if let Some((b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(Error::Overlap(base, len));
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// The device owning `addr`, with the offset of `addr` in its range.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        (off < e.len).then(|| (e.dev.clone(), off))
    }

    /// Reads at `addr`. Returns false, with `data` all ones, when no device owns
    /// it: an unclaimed read floats high, as on a PC. Zeros would pass Linux's
    /// probe for a type-2 PCI host bridge at ports 0xcf8/0xcfa, which then scans
    /// the bus through ~1,000 port exits before giving up.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, off)) => {
                lock(&dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes at `addr`. Returns false when no device owns it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, off)) => {
                lock(&dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panic in one access must
/// not wedge every later access.
pub fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn insert_resolve_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(7))), 0x110, 0x10)
            .unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10f, 2).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0xf8, 0x9)
            .is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x0, 0).is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), u64::MAX, 2)
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x111, &[9]));
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0xff, &mut b));
    }
}
