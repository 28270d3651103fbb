//! The boot timer: an MMIO window the guest writes to mark a point of its boot.
//!
//! A write at offset 0 logs the time since the VMM process started (an `Instant`
//! the VMM takes as early as it can) to stderr and records it, so the boot-time
//! harness can read the same line for every VMM it compares.

use std::time::{Duration, Instant};

use log::debug;

use crate::bus::BusDevice;

/// Size of the MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The most markers kept; later ones are still logged.
const MAX_MARKERS: usize = 1024;

/// The boot-timer device.
pub struct BootTimer {
    start: Instant,
    markers: Vec<(u64, Duration)>,
}

impl BootTimer {
    /// A timer measuring from `start`, taken as close to exec as possible.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            markers: Vec::new(),
        }
    }

    /// The markers the guest wrote: value and time since `start`.
    pub fn markers(&self) -> &[(u64, Duration)] {
        &self.markers
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let elapsed = self.start.elapsed();
        if offset != 0 || data.is_empty() || data.len() > 8 {
            debug!(
                "boot-timer: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let mut le = [0u8; 8];
        le[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(le);
        eprintln!(
            "aivmm: boot-timer: guest marker {value} at {:.3} ms since exec",
            elapsed.as_secs_f64() * 1000.0
        );
        if self.markers.len() < MAX_MARKERS {
            self.markers.push((value, elapsed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_markers() {
        let start = Instant::now();
        let mut t = BootTimer::new(start);
        t.write(0, &42u32.to_le_bytes());
        t.write(0, &[7]);
        t.write(8, &[1]);
        t.write(0, &[0; 16]);
        let m = t.markers();
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[1].0), (42, 7));
        assert!(m[0].1 <= m[1].1 && m[1].1 <= start.elapsed());
        let mut b = [0xffu8; 4];
        t.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
