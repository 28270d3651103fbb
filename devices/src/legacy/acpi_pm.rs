//! The ACPI hardware-reduced power-management block: how an ACPI guest powers
//! off and reboots.
//!
//! The FADT points the guest at three one-byte registers: sleep control, sleep
//! status and reset. Writing SLP_TYP = S5 with SLP_EN to sleep control powers off;
//! writing the reset value to the reset register reboots. Both end the VM through
//! the [`ExitHandler`]. The VMM places the block at `ACPI_PM_PORT`.

use log::debug;

use super::ExitHandler;
use crate::bus::BusDevice;
use crate::ExitReason;

/// Length of the block.
pub const ACPI_PM_LEN: u64 = 3;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// The value written to the reset register to reboot.
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP of S5 (soft-off), as in the DSDT's `_S5_` package.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_EN: bit 5 of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYP sits in bits 2..=4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The power-management block.
pub struct AcpiPm {
    exit: ExitHandler,
}

impl AcpiPm {
    /// A block that reports power-off and reset to `exit`.
    pub fn new(exit: ExitHandler) -> Self {
        Self { exit }
    }

    fn write_reg(&self, reg: u64, v: u8) {
        match reg {
            SLEEP_CONTROL_OFFSET => {
                let slp_typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if v & SLP_EN != 0 && slp_typ == S5_SLP_TYP {
                    (self.exit)(ExitReason::PowerOff);
                } else {
                    debug!("acpi-pm: sleep control {v:#x} ignored");
                }
            }
            RESET_OFFSET if v == RESET_VALUE => (self.exit)(ExitReason::Reset),
            _ => debug!("acpi-pm: write {v:#x} to register {reg} ignored"),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep, no wake events. The others read as 0 too.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The registers are one byte each; a wider access covers the next ones.
        for (reg, &v) in (offset..).zip(data) {
            self.write_reg(reg, v);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    fn pm() -> (AcpiPm, Arc<Mutex<Vec<ExitReason>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            AcpiPm::new(Arc::new(move |r| s.lock().unwrap().push(r))),
            seen,
        )
    }

    #[test]
    fn s5_powers_off() {
        let (mut dev, seen) = pm();
        // SLP_TYP = 5 without SLP_EN, and SLP_EN with another type: nothing.
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << 2]);
        dev.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (3 << 2)]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (S5_SLP_TYP << 2)]);
        assert_eq!(seen.lock().unwrap().as_slice(), &[ExitReason::PowerOff]);
    }

    #[test]
    fn reset_register_resets() {
        let (mut dev, seen) = pm();
        dev.write(RESET_OFFSET, &[2]);
        dev.write(SLEEP_STATUS_OFFSET, &[0xff]);
        dev.write(3, &[RESET_VALUE]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(seen.lock().unwrap().as_slice(), &[ExitReason::Reset]);
        let mut b = [0xffu8; 1];
        dev.read(SLEEP_STATUS_OFFSET, &mut b);
        assert_eq!(b, [0]);
    }
}
