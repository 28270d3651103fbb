//! aarch64: the guest layout, `Image` loading, the device tree and PSCI.
//!
//! The pieces a boot on Apple silicon (or any arm64 host) puts together: guest
//! RAM starts at [`layout::DRAM_START`]; [`image::load_image`] copies the kernel
//! there; the initrd and the device tree ([`fdt::create_fdt`]) go near the top of
//! RAM; the boot vCPU starts at the kernel's first byte in EL1h with interrupts
//! masked, MMU off and x0 = the device tree ([`boot_regs`]). Secondary vCPUs wait
//! for the guest's PSCI CPU_ON ([`psci`]). Everything here is plain data and
//! compiles (and is tested) on every host.

pub mod fdt;
pub mod image;
pub mod layout;
pub mod psci;

/// Errors of aarch64 guest setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file is not a usable arm64 `Image`.
    #[error("the kernel is not a usable arm64 Image: {0}")]
    Kernel(String),
    /// Guest memory could not be written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest's boot blobs do not fit its memory.
    #[error("guest layout: {0}")]
    Layout(String),
    /// The device tree could not be built.
    #[error("device tree: {0}")]
    Fdt(String),
}

/// `Result` of aarch64 setup.
pub type Result<T> = std::result::Result<T, Error>;

/// PSTATE for kernel entry: EL1 with SP_EL1 (EL1h) and D, A, I, F masked.
pub const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;

/// The registers a vCPU starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRegs {
    /// Program counter.
    pub pc: u64,
    /// x0: the device tree for the boot vCPU, the context ID after CPU_ON.
    pub x0: u64,
    /// PSTATE (CPSR).
    pub pstate: u64,
}

/// The boot vCPU's registers: enter the kernel at `entry` with x0 = `fdt_addr`
/// (x1..x3 stay zero, as booting.rst requires of a fresh vCPU).
pub fn boot_regs(entry: u64, fdt_addr: u64) -> BootRegs {
    BootRegs {
        pc: entry,
        x0: fdt_addr,
        pstate: PSTATE_EL1H_DAIF_MASKED,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn boot_regs_enter_el1h_with_interrupts_masked() {
        let r = boot_regs(0x4000_0000, 0x5fe0_0000);
        assert_eq!(r.pc, 0x4000_0000);
        assert_eq!(r.x0, 0x5fe0_0000);
        assert_eq!(r.pstate & 0xf, 0b0101, "EL1h");
        assert_eq!(r.pstate & 0x3c0, 0x3c0, "DAIF masked");
    }
}
