//! An Arm PrimeCell PL061 GPIO controller: the arm64 guest's power button.
//!
//! An arm64 guest booted from a device tree has no ACPI Generic Event Device.
//! There the power button is a GPIO input line: the device tree wires line
//! [`POWER_LINE`] of this controller to a `gpio-keys` node labelled "Power
//! Button" that sends `KEY_POWER`, the same input event the ACPI button driver
//! sends on x86. The flow of one press:
//!
//! ```text
//! VMM: Pl061::set_input(line, true) ── the line rises; an edge the guest armed
//!      (GPIOIS/GPIOIBE/GPIOIEV) sets its raw status bit; a bit unmasked in
//!      GPIOIE raises the controller's interrupt
//! guest: pl061 driver ── reads GPIOMIS, clears the bit through GPIOIC
//!        gpio-keys ── after its debounce, reads GPIODATA: KEY_POWER 1
//! VMM: set_input(line, false) a little later ── KEY_POWER 0 (the release)
//! ```
//!
//! Only inputs are modelled: lines the guest makes outputs keep the value it
//! writes, and nothing outside sees them. Level-sensitive interrupts (GPIOIS)
//! are kept raised while the level holds.

use std::sync::Arc;

use log::warn;

use crate::bus::BusDevice;
use crate::Interrupt;

/// Length of the register block.
pub const PL061_LEN: u64 = 0x1000;
/// The line the power button is on.
pub const POWER_LINE: u32 = 3;
/// Lines of a PL061.
pub const LINES: u32 = 8;

const GPIODATA_END: u64 = 0x400;
const GPIODIR: u64 = 0x400;
const GPIOIS: u64 = 0x404;
const GPIOIBE: u64 = 0x408;
const GPIOIEV: u64 = 0x40c;
const GPIOIE: u64 = 0x410;
const GPIORIS: u64 = 0x414;
const GPIOMIS: u64 = 0x418;
const GPIOIC: u64 = 0x41c;
const GPIOAFSEL: u64 = 0x420;
const ID_START: u64 = 0xfe0;
/// PeriphID0..3 then PCellID0..3, one byte per word: the PL061, and a PrimeCell.
const IDS: [u8; 8] = [0x61, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// The PL061.
pub struct Pl061 {
    irq: Arc<dyn Interrupt>,
    /// Levels of the input lines, as the host sets them.
    input: u8,
    /// Values the guest wrote to its output lines.
    output: u8,
    dir: u8,
    is: u8,
    ibe: u8,
    iev: u8,
    ie: u8,
    ris: u8,
    afsel: u8,
}

impl Pl061 {
    /// A PL061 whose interrupt line is `irq`; every input low.
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        Self {
            irq,
            input: 0,
            output: 0,
            dir: 0,
            is: 0,
            ibe: 0,
            iev: 0,
            ie: 0,
            ris: 0,
            afsel: 0,
        }
    }

    /// Sets input `line` to `high`; an armed edge or level raises the interrupt.
    pub fn set_input(&mut self, line: u32, high: bool) -> std::io::Result<()> {
        if line >= LINES {
            return Err(std::io::Error::other(format!("pl061: no line {line}")));
        }
        let bit = 1u8 << line;
        let was = self.input & bit != 0;
        if high {
            self.input |= bit;
        } else {
            self.input &= !bit;
        }
        if self.dir & bit != 0 {
            // An output: the guest drives it.
            return Ok(());
        }
        let level = self.is & bit != 0;
        let fired = if level {
            high == (self.iev & bit != 0)
        } else if was == high {
            false
        } else {
            self.ibe & bit != 0 || high == (self.iev & bit != 0)
        };
        if fired {
            self.ris |= bit;
        }
        self.raise_if_pending()
    }

    /// The level the guest reads on every line.
    pub fn data(&self) -> u8 {
        (self.input & !self.dir) | (self.output & self.dir)
    }

    /// Status bits raised and unmasked.
    pub fn masked_status(&self) -> u8 {
        self.ris & self.ie
    }

    fn raise_if_pending(&self) -> std::io::Result<()> {
        if self.masked_status() != 0 {
            self.irq.trigger()
        } else {
            Ok(())
        }
    }

    /// Level-sensitive lines whose level still holds stay raised.
    fn relatch_levels(&mut self) {
        let active = !(self.input ^ self.iev);
        self.ris |= self.is & !self.dir & active;
    }

    fn register(&self, offset: u64) -> u8 {
        match offset {
            GPIODIR => self.dir,
            GPIOIS => self.is,
            GPIOIBE => self.ibe,
            GPIOIEV => self.iev,
            GPIOIE => self.ie,
            GPIORIS => self.ris,
            GPIOMIS => self.masked_status(),
            GPIOAFSEL => self.afsel,
            o if (ID_START..PL061_LEN).contains(&o) => {
                IDS.get(((o - ID_START) / 4) as usize).copied().unwrap_or(0)
            }
            _ => 0,
        }
    }
}

impl BusDevice for Pl061 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // GPIODATA is address-masked: bits 9:2 of the offset select the lines read.
        let value = if offset < GPIODATA_END {
            self.data() & ((offset >> 2) as u8)
        } else if offset % 4 == 0 {
            self.register(offset)
        } else {
            0
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if offset < GPIODATA_END {
            let mask = (offset >> 2) as u8 & self.dir;
            self.output = (self.output & !mask) | (value & mask);
            return;
        }
        match offset {
            GPIODIR => self.dir = value,
            GPIOIS => self.is = value,
            GPIOIBE => self.ibe = value,
            GPIOIEV => self.iev = value,
            GPIOIE => self.ie = value,
            GPIOIC => {
                self.ris &= !value;
                self.relatch_levels();
            }
            GPIOAFSEL => self.afsel = value,
            _ => {
                warn!("pl061: write of {value:#x} at offset {offset:#x} ignored");
                return;
            }
        }
        if matches!(offset, GPIOIS | GPIOIEV | GPIOIE | GPIOIC) {
            if let Err(e) = self.raise_if_pending() {
                warn!("pl061: cannot raise its interrupt: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    fn gpio() -> (Pl061, Arc<RecordingInterrupt>) {
        let irq = Arc::new(RecordingInterrupt::default());
        (Pl061::new(irq.clone()), irq)
    }

    fn rd(dev: &mut Pl061, offset: u64) -> u8 {
        let mut b = [0xffu8; 4];
        dev.read(offset, &mut b);
        assert_eq!(&b[1..], &[0, 0, 0], "one byte per register");
        b[0]
    }

    fn wr(dev: &mut Pl061, offset: u64, v: u8) {
        dev.write(offset, &[v, 0, 0, 0]);
    }

    const BIT: u8 = 1 << POWER_LINE;

    #[test]
    fn pl061_identifies_as_a_primecell_pl061() {
        let (mut g, _) = gpio();
        let ids: Vec<u8> = (0..8).map(|i| rd(&mut g, ID_START + 4 * i)).collect();
        assert_eq!(ids, IDS);
    }

    /// What Linux's gpio-keys asks of the PL061 driver: both edges, unmasked.
    #[test]
    fn pl061_both_edges_raise_the_interrupt_until_cleared() {
        let (mut g, irq) = gpio();
        // Nothing armed: a press is seen in GPIODATA only.
        g.set_input(POWER_LINE, true).unwrap();
        assert_eq!(irq.count(), 0);
        assert_eq!(rd(&mut g, (BIT as u64) << 2), BIT);
        assert_eq!(rd(&mut g, 0x3fc), BIT);
        assert_eq!(rd(&mut g, 0x3fc & !((BIT as u64) << 2)), 0, "masked out");
        // With GPIOIEV 0 the falling edge is the armed one: latched, masked.
        g.set_input(POWER_LINE, false).unwrap();
        assert_eq!((rd(&mut g, GPIORIS), rd(&mut g, GPIOMIS)), (BIT, 0));
        assert_eq!(irq.count(), 0);
        wr(&mut g, GPIOIC, BIT);
        wr(&mut g, GPIOIBE, BIT);
        wr(&mut g, GPIOIE, BIT);
        g.set_input(POWER_LINE, true).unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(rd(&mut g, GPIOMIS), BIT);
        wr(&mut g, GPIOIC, BIT);
        assert_eq!((rd(&mut g, GPIOMIS), rd(&mut g, GPIORIS)), (0, 0));
        // The same level again is no edge.
        g.set_input(POWER_LINE, true).unwrap();
        assert_eq!(irq.count(), 1);
        g.set_input(POWER_LINE, false).unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(rd(&mut g, GPIOMIS), BIT);
    }

    #[test]
    fn pl061_single_edges_masks_and_levels() {
        let (mut g, irq) = gpio();
        // Rising edge only.
        wr(&mut g, GPIOIEV, BIT);
        g.set_input(POWER_LINE, true).unwrap();
        assert_eq!(rd(&mut g, GPIORIS), BIT, "raw status while masked");
        assert_eq!(irq.count(), 0);
        // Unmasking a pending bit raises the interrupt.
        wr(&mut g, GPIOIE, BIT);
        assert_eq!(irq.count(), 1);
        wr(&mut g, GPIOIC, BIT);
        g.set_input(POWER_LINE, false).unwrap();
        assert_eq!(rd(&mut g, GPIORIS), 0, "a falling edge is not armed");
        // Level high: stays raised while high, even after a clear.
        wr(&mut g, GPIOIS, BIT);
        g.set_input(POWER_LINE, true).unwrap();
        wr(&mut g, GPIOIC, BIT);
        assert_eq!(rd(&mut g, GPIOMIS), BIT);
        g.set_input(POWER_LINE, false).unwrap();
        wr(&mut g, GPIOIC, BIT);
        assert_eq!(rd(&mut g, GPIOMIS), 0);
        assert!(g.set_input(LINES, true).is_err());
    }

    #[test]
    fn pl061_outputs_keep_what_the_guest_wrote() {
        let (mut g, irq) = gpio();
        wr(&mut g, GPIODIR, 0x01);
        wr(&mut g, GPIOIE, 0xff);
        wr(&mut g, GPIOIBE, 0xff);
        wr(&mut g, 0x3fc, 0xff);
        assert_eq!(rd(&mut g, 0x3fc), 0x01);
        g.set_input(0, true).unwrap();
        assert_eq!(irq.count(), 0, "an output is not an input");
        assert_eq!(rd(&mut g, GPIODIR), 0x01);
    }
}
