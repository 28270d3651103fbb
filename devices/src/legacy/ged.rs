//! The ACPI Generic Event Device (GED): how the VMM presses the guest's power
//! button on a hardware-reduced ACPI platform.
//!
//! A hardware-reduced platform has no fixed-feature power button, no PM1 event
//! registers and no SCI. Instead the DSDT declares a GED (`ACPI0013`) with one
//! interrupt, an `_EVT` method, and a power button device (`PNP0C0C`). The flow:
//!
//! ```text
//! VMM: Ged::notify(POWER_BUTTON) ── sets the event bit, raises the GED's GSI
//! guest: evged runs _EVT ── reads the event register (read clears it)
//!        bit POWER_BUTTON set ── Notify(\_SB_.PWRB, 0x80)
//!        the ACPI button driver ── KEY_POWER on its input device
//!        user space (aivmm-agent) ── clean shutdown, then S5 through the PM block
//! ```
//!
//! The event register is one byte at the device's base: the events raised since
//! the guest last read it. Writes are ignored.

use std::sync::Arc;

use log::{debug, warn};

use crate::bus::BusDevice;
use crate::Interrupt;

/// Length of the GED's register block.
pub const GED_LEN: u64 = 1;
/// Offset of the event register.
pub const EVENT_OFFSET: u64 = 0;
/// The event bit of the power button, as the DSDT's `_EVT` tests it.
pub const EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The Generic Event Device.
pub struct Ged {
    irq: Arc<dyn Interrupt>,
    /// Events raised and not yet read by the guest.
    pending: u8,
    /// How many events were raised, for logs and tests.
    raised: u64,
}

impl Ged {
    /// A GED that raises `irq` (its GSI, as the DSDT names it) for each event.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self {
            irq,
            pending: 0,
            raised: 0,
        }
    }

    /// Raises `events` (a mask of `EVENT_*` bits): they become pending until the
    /// guest reads the event register, and the interrupt fires.
    pub fn notify(&mut self, events: u8) -> std::io::Result<()> {
        self.pending |= events;
        self.raised += 1;
        self.irq.trigger()
    }

    /// Presses the power button once.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.notify(EVENT_POWER_BUTTON)
    }

    /// Events the guest has not read yet.
    pub fn pending(&self) -> u8 {
        self.pending
    }

    /// How many times [`Ged::notify`] raised the interrupt.
    pub fn raised(&self) -> u64 {
        self.raised
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == EVENT_OFFSET {
            if let Some(first) = data.first_mut() {
                *first = self.pending;
                if self.pending != 0 {
                    debug!("ged: guest read events {:#x}", self.pending);
                }
                self.pending = 0;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        warn!("ged: write of {data:02x?} at offset {offset} ignored");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    struct Broken;

    impl Interrupt for Broken {
        fn trigger(&self) -> std::io::Result<()> {
            Err(std::io::Error::from_raw_os_error(libc::EBADF))
        }
    }

    fn ged() -> (Ged, Arc<RecordingInterrupt>) {
        let irq = Arc::new(RecordingInterrupt::default());
        (Ged::new(irq.clone()), irq)
    }

    fn read_event(dev: &mut Ged) -> u8 {
        let mut b = [0xffu8; 1];
        dev.read(EVENT_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn power_button_raises_the_irq_and_reads_once() {
        let (mut dev, irq) = ged();
        assert_eq!(read_event(&mut dev), 0, "nothing pending at first");
        assert_eq!(irq.count(), 0);

        dev.press_power_button().unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(dev.pending(), EVENT_POWER_BUTTON);
        assert_eq!(read_event(&mut dev), EVENT_POWER_BUTTON);
        // Read-to-clear: a second _EVT run sees nothing.
        assert_eq!(read_event(&mut dev), 0);
        assert_eq!(dev.pending(), 0);
    }

    #[test]
    fn presses_before_a_read_merge_but_each_interrupts() {
        let (mut dev, irq) = ged();
        dev.press_power_button().unwrap();
        dev.press_power_button().unwrap();
        dev.notify(1 << 3).unwrap();
        assert_eq!(irq.count(), 3);
        assert_eq!(dev.raised(), 3);
        assert_eq!(read_event(&mut dev), EVENT_POWER_BUTTON | 1 << 3);
        assert_eq!(read_event(&mut dev), 0);
    }

    #[test]
    fn writes_and_other_offsets_change_nothing() {
        let (mut dev, _) = ged();
        dev.press_power_button().unwrap();
        dev.write(EVENT_OFFSET, &[0]);
        dev.write(EVENT_OFFSET, &[0xff]);
        assert_eq!(dev.pending(), EVENT_POWER_BUTTON, "writes do not clear or set");
        // A read beyond the register reads zeros and leaves the event pending.
        let mut b = [0xffu8; 2];
        dev.read(1, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(dev.pending(), EVENT_POWER_BUTTON);
        // A wide read at the register returns it in the low byte.
        let mut w = [0xffu8; 4];
        dev.read(EVENT_OFFSET, &mut w);
        assert_eq!(w, [EVENT_POWER_BUTTON, 0, 0, 0]);
    }

    #[test]
    fn a_failed_interrupt_is_reported_and_the_event_kept() {
        let mut dev = Ged::new(Arc::new(Broken));
        assert!(dev.press_power_button().is_err());
        assert_eq!(read_event(&mut dev), EVENT_POWER_BUTTON);
    }
}
