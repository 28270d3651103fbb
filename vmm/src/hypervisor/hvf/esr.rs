//! Decoding the exception syndrome (ESR_EL2) of an `HV_EXIT_REASON_EXCEPTION`.
//!
//! The exception class (EC, bits 31:26) says what trapped; the ISS (bits 24:0)
//! holds the details. For a data abort on an unmapped IPA with a valid syndrome
//! (ISV = 1) the ISS gives the access size, the transfer register, whether the
//! load sign-extends and whether the register is 64-bit, which is all the VMM
//! needs to emulate the access as an MMIO read or write, the same shape KVM hands
//! back. A data abort without a syndrome (ISV = 0: load/store pair, writeback,
//! SIMD registers) cannot be emulated without decoding the instruction and is an
//! error, as it is under KVM.

use super::{Error, Reg, Result};

/// EC: unknown reason.
pub const EC_UNKNOWN: u8 = 0x00;
/// EC: WFI or WFE trapped.
pub const EC_WFX: u8 = 0x01;
/// EC: HVC from AArch64.
pub const EC_HVC64: u8 = 0x16;
/// EC: SMC from AArch64.
pub const EC_SMC64: u8 = 0x17;
/// EC: MSR/MRS/system instruction trapped.
pub const EC_SYSREG: u8 = 0x18;
/// EC: instruction abort from a lower EL.
pub const EC_IABT_LOWER: u8 = 0x20;
/// EC: data abort from a lower EL.
pub const EC_DABT_LOWER: u8 = 0x24;
/// EC: BRK from AArch64.
pub const EC_BRK64: u8 = 0x3c;

const ISS_MASK: u64 = 0x1ff_ffff;
const DABT_ISV: u64 = 1 << 24;
const DABT_SSE: u64 = 1 << 21;
const DABT_SF: u64 = 1 << 15;
const DABT_CM: u64 = 1 << 8;
const DABT_S1PTW: u64 = 1 << 7;
const DABT_WNR: u64 = 1 << 6;

/// The exception class of a syndrome.
pub fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// What a syndrome describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syndrome {
    /// A data abort (decode it with [`MmioAccess::decode`]).
    DataAbort,
    /// WFI: idle until an interrupt.
    Wfi,
    /// WFE (or WFET): a hint; resume.
    Wfe,
    /// HVC with its immediate; the PC already points past it.
    Hvc(u16),
    /// SMC with its immediate; the PC points at it.
    Smc(u16),
    /// A trapped system register access.
    SysReg(SysRegAccess),
    /// Anything else: the class and the ISS.
    Other {
        /// Exception class.
        ec: u8,
        /// Instruction-specific syndrome.
        iss: u32,
    },
}

impl Syndrome {
    /// Classifies `esr`.
    pub fn decode(esr: u64) -> Self {
        let iss = esr & ISS_MASK;
        match exception_class(esr) {
            EC_DABT_LOWER => Syndrome::DataAbort,
            // TI, bits 1:0: 0 WFI, 1 WFE, 2 WFIT, 3 WFET.
            EC_WFX if iss & 1 == 0 => Syndrome::Wfi,
            EC_WFX => Syndrome::Wfe,
            EC_HVC64 => Syndrome::Hvc(iss as u16),
            EC_SMC64 => Syndrome::Smc(iss as u16),
            EC_SYSREG => Syndrome::SysReg(SysRegAccess::decode(iss)),
            ec => Syndrome::Other {
                ec,
                iss: iss as u32,
            },
        }
    }
}

/// A human name for an exception class, for error messages.
pub fn class_name(ec: u8) -> &'static str {
    match ec {
        EC_UNKNOWN => "unknown reason (undefined instruction?)",
        EC_WFX => "WFI/WFE",
        EC_HVC64 => "HVC",
        EC_SMC64 => "SMC",
        EC_SYSREG => "system register access",
        EC_IABT_LOWER => "instruction abort (guest jumped outside RAM?)",
        EC_DABT_LOWER => "data abort",
        EC_BRK64 => "BRK (breakpoint)",
        _ => "exception",
    }
}

/// A trapped MSR/MRS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysRegAccess {
    /// op0, op1, CRn, CRm, op2: the register's encoding.
    pub encoding: (u8, u8, u8, u8, u8),
    /// The general register (31 = XZR).
    pub rt: u8,
    /// MRS (a read) rather than MSR.
    pub read: bool,
}

impl SysRegAccess {
    fn decode(iss: u64) -> Self {
        let field = |shift: u32, bits: u32| ((iss >> shift) & ((1 << bits) - 1)) as u8;
        Self {
            encoding: (
                field(20, 2),
                field(14, 3),
                field(10, 4),
                field(1, 4),
                field(17, 3),
            ),
            rt: field(5, 5),
            read: iss & 1 == 1,
        }
    }
}

/// A decoded MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// Guest physical address.
    pub addr: u64,
    /// 1, 2, 4 or 8 bytes.
    pub size: usize,
    /// A store (else a load).
    pub write: bool,
    /// The transfer register; 31 is XZR/WZR.
    pub reg: u8,
    /// The load sign-extends (LDRSB/LDRSH/LDRSW).
    pub sign_extend: bool,
    /// The register is 64-bit (Xn), else 32-bit (Wn).
    pub sixty_four: bool,
    /// A cache maintenance operation on the address, not a load or store.
    pub cache_maintenance: bool,
}

impl MmioAccess {
    /// Decodes a lower-EL data abort at `ipa`.
    pub fn decode(esr: u64, ipa: u64) -> Result<Self> {
        let ec = exception_class(esr);
        if ec != EC_DABT_LOWER {
            return Err(Error::Syndrome(format!(
                "{esr:#x} is not a data abort (EC {ec:#x})"
            )));
        }
        if esr & DABT_S1PTW != 0 {
            return Err(Error::Syndrome(format!(
                "the guest's stage-1 page-table walk touched {ipa:#x}, which is not RAM"
            )));
        }
        let cache_maintenance = esr & DABT_CM != 0;
        if esr & DABT_ISV == 0 && !cache_maintenance {
            return Err(Error::Syndrome(format!(
                "data abort at {ipa:#x} without an instruction syndrome (ISV=0, ESR {esr:#x}): \
                 the guest used a load/store pair, writeback or SIMD access on MMIO, which cannot be emulated"
            )));
        }
        Ok(Self {
            addr: ipa,
            size: 1 << ((esr >> 22) & 3),
            write: esr & DABT_WNR != 0 && !cache_maintenance,
            reg: ((esr >> 16) & 0x1f) as u8,
            sign_extend: esr & DABT_SSE != 0,
            sixty_four: esr & DABT_SF != 0,
            cache_maintenance,
        })
    }

    /// The register to read for a store or write after a load; `None` for XZR.
    pub fn register(&self) -> Option<Reg> {
        (self.reg < 31).then_some(Reg::X(self.reg))
    }

    /// The bytes a store writes, from the transfer register's value (XZR: 0).
    pub fn store_bytes(&self, reg_value: u64) -> [u8; 8] {
        let value = if self.reg == 31 { 0 } else { reg_value };
        let mut out = [0u8; 8];
        out[..self.size].copy_from_slice(&value.to_le_bytes()[..self.size]);
        out
    }

    /// The value a load leaves in the transfer register, from the bytes read:
    /// sign- or zero-extended to the register's width, and a 32-bit register's
    /// upper half cleared.
    pub fn load_value(&self, data: &[u8]) -> u64 {
        let mut b = [0u8; 8];
        let n = self.size.min(data.len());
        b[..n].copy_from_slice(&data[..n]);
        let raw = u64::from_le_bytes(b);
        let bits = (self.size * 8) as u32;
        let value = if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        if self.sixty_four {
            value
        } else {
            value & 0xffff_ffff
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Builds a lower-EL data abort syndrome with ISV set and IL = 1.
    pub(crate) fn dabt(size: usize, write: bool, reg: u8, sse: bool, sf: bool) -> u64 {
        let sas = size.trailing_zeros() as u64;
        (u64::from(EC_DABT_LOWER) << 26)
            | (1 << 25)
            | DABT_ISV
            | (sas << 22)
            | if sse { DABT_SSE } else { 0 }
            | (u64::from(reg) << 16)
            | if sf { DABT_SF } else { 0 }
            | if write { DABT_WNR } else { 0 }
    }

    #[test]
    fn every_size_and_register_decodes_both_ways() {
        for size in [1usize, 2, 4, 8] {
            for reg in 0..=31u8 {
                for write in [false, true] {
                    let sf = size == 8 || reg % 2 == 0;
                    let a =
                        MmioAccess::decode(dabt(size, write, reg, false, sf), 0x0a00_0050).unwrap();
                    assert_eq!(
                        (a.addr, a.size, a.write, a.reg, a.sixty_four),
                        (0x0a00_0050, size, write, reg, sf)
                    );
                    assert!(!a.sign_extend && !a.cache_maintenance);
                    assert_eq!(a.register(), (reg < 31).then_some(Reg::X(reg)));
                }
            }
        }
    }

    #[test]
    fn stores_take_the_low_bytes_of_the_register() {
        let v = 0x1122_3344_5566_7788u64;
        for (size, want) in [
            (1, vec![0x88]),
            (2, vec![0x88, 0x77]),
            (4, vec![0x88, 0x77, 0x66, 0x55]),
            (8, v.to_le_bytes().to_vec()),
        ] {
            let a = MmioAccess::decode(dabt(size, true, 3, false, true), 0).unwrap();
            assert_eq!(&a.store_bytes(v)[..size], want.as_slice());
        }
    }

    #[test]
    fn store_from_xzr_writes_zero() {
        let a = MmioAccess::decode(dabt(4, true, 31, false, false), 0).unwrap();
        assert_eq!(a.register(), None);
        assert_eq!(a.store_bytes(0xffff_ffff), [0; 8]);
    }

    #[test]
    fn loads_zero_extend_and_sign_extend_by_width() {
        let cases: &[(usize, bool, bool, &[u8], u64)] = &[
            // LDRB W / LDRH W / LDR W / LDR X: zero-extended.
            (1, false, false, &[0x80], 0x80),
            (2, false, false, &[0x00, 0x80], 0x8000),
            (4, false, false, &[0, 0, 0, 0x80], 0x8000_0000),
            (
                8,
                false,
                true,
                &[1, 2, 3, 4, 5, 6, 7, 0x88],
                0x8807_0605_0403_0201,
            ),
            // LDRSB/LDRSH into W: sign-extended to 32 bits, upper half cleared.
            (1, true, false, &[0x80], 0xffff_ff80),
            (2, true, false, &[0xfe, 0xff], 0xffff_fffe),
            // ... into X: sign-extended to 64 bits.
            (1, true, true, &[0x80], 0xffff_ffff_ffff_ff80),
            (2, true, true, &[0x00, 0x80], 0xffff_ffff_ffff_8000),
            (4, true, true, &[0, 0, 0, 0x80], 0xffff_ffff_8000_0000),
            // Positive values stay as they are.
            (1, true, true, &[0x7f], 0x7f),
            (4, true, true, &[0xff, 0xff, 0xff, 0x7f], 0x7fff_ffff),
        ];
        for &(size, sse, sf, data, want) in cases {
            let a = MmioAccess::decode(dabt(size, false, 0, sse, sf), 0).unwrap();
            assert_eq!(a.load_value(data), want, "size {size} sse {sse} sf {sf}");
        }
    }

    #[test]
    fn missing_syndrome_and_page_walks_are_errors() {
        let no_isv = dabt(4, false, 1, false, false) & !DABT_ISV;
        let err = MmioAccess::decode(no_isv, 0x0a00_0000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ISV=0") && err.contains("0xa000000"), "{err}");
        let walk = dabt(4, false, 1, false, false) | DABT_S1PTW;
        assert!(MmioAccess::decode(walk, 0x10)
            .unwrap_err()
            .to_string()
            .contains("page-table walk"));
        let hvc = u64::from(EC_HVC64) << 26;
        assert!(MmioAccess::decode(hvc, 0)
            .unwrap_err()
            .to_string()
            .contains("not a data abort"));
    }

    #[test]
    fn cache_maintenance_is_neither_load_nor_store() {
        let dc = (dabt(4, true, 2, false, true) & !DABT_ISV) | DABT_CM;
        let a = MmioAccess::decode(dc, 0x0a00_0000).unwrap();
        assert!(a.cache_maintenance && !a.write);
    }

    #[test]
    fn classifies_wfx_hvc_smc_and_sysreg() {
        let ec = |c: u8| u64::from(c) << 26;
        assert_eq!(Syndrome::decode(ec(EC_WFX)), Syndrome::Wfi);
        assert_eq!(Syndrome::decode(ec(EC_WFX) | 1), Syndrome::Wfe);
        assert_eq!(
            Syndrome::decode(ec(EC_HVC64) | 0x1234),
            Syndrome::Hvc(0x1234)
        );
        assert_eq!(Syndrome::decode(ec(EC_SMC64)), Syndrome::Smc(0));
        assert_eq!(Syndrome::decode(ec(EC_DABT_LOWER)), Syndrome::DataAbort);
        // MRS x5, CNTPCT_EL0: op0 3, op1 3, CRn 14, CRm 0, op2 1.
        let iss = (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(
            Syndrome::decode(ec(EC_SYSREG) | iss),
            Syndrome::SysReg(SysRegAccess {
                encoding: (3, 3, 14, 0, 1),
                rt: 5,
                read: true
            })
        );
        assert_eq!(
            Syndrome::decode(ec(EC_BRK64) | 7),
            Syndrome::Other {
                ec: EC_BRK64,
                iss: 7
            }
        );
        assert_eq!(class_name(EC_BRK64), "BRK (breakpoint)");
    }
}
