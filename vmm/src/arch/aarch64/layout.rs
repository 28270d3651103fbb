//! The aarch64 guest physical layout and interrupt numbers.
//!
//! Below [`DRAM_START`] (1 GiB) sit the devices: the GICv3 distributor and
//! redistributors, the console UART, the boot-timer window and the virtio-mmio
//! windows. RAM starts at 1 GiB; the kernel `Image` loads at its start (plus the
//! header's `text_offset`), and the device tree and initrd go near the top of the
//! first 32 GiB, where the arm64 boot protocol wants them.

/// The GICv3 distributor.
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Size of the distributor window (one 64 KiB frame).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The first redistributor; one follows every [`GIC_REDIST_SIZE_PER_CPU`].
pub const GIC_REDIST_BASE: u64 = 0x0810_0000;
/// A GICv3 redistributor: an RD and an SGI frame of 64 KiB each.
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// End (exclusive) of the room kept for redistributors.
pub const GIC_REDIST_END: u64 = 0x0900_0000;
/// The most vCPUs whose redistributors fit below [`GIC_REDIST_END`].
pub const MAX_VCPUS: u32 = ((GIC_REDIST_END - GIC_REDIST_BASE) / GIC_REDIST_SIZE_PER_CPU) as u32;

/// The console: a 16550-compatible UART (`ns16550a`), byte registers.
pub const SERIAL_ADDR: u64 = 0x0900_0000;
/// Size of the UART window.
pub const SERIAL_SIZE: u64 = 0x1000;
/// The boot-timer device: a guest write here is logged with the time since exec.
pub const BOOT_TIMER_ADDR: u64 = 0x0901_0000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The PL061 GPIO controller whose line 3 is the power button (`gpio-keys`).
pub const GPIO_ADDR: u64 = 0x0902_0000;
/// Size of the GPIO window.
pub const GPIO_SIZE: u64 = 0x1000;
/// The first virtio-mmio window; the others follow every [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = 0x0a00_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio windows the layout has room for (SPIs are the limit).
pub const VIRTIO_MMIO_MAX: u32 = 32;

/// Guest RAM starts here (2 MiB aligned, as the kernel's load base must be).
pub const DRAM_START: u64 = 0x4000_0000;
/// The kernel and initrd must sit in one 1 GiB-aligned window of at most 32 GiB
/// (Documentation/arch/arm64/booting.rst); aivmm keeps the boot blobs below this.
pub const BOOT_WINDOW_END: u64 = DRAM_START + (32 << 30);
/// The device tree may not exceed 2 MiB and gets a 2 MiB block of its own.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// Alignment of the kernel's load base.
pub const KERNEL_ALIGN: u64 = 0x20_0000;

/// INTID of the first shared peripheral interrupt (SPI).
pub const SPI_BASE: u32 = 32;
/// INTID of the first private peripheral interrupt (PPI).
pub const PPI_BASE: u32 = 16;
/// The UART's SPI number (INTID `SPI_BASE + SERIAL_SPI`).
pub const SERIAL_SPI: u32 = 1;
/// The GPIO controller's SPI number.
pub const GPIO_SPI: u32 = 2;
/// The first virtio-mmio device's SPI number; each device takes the next one.
pub const VIRTIO_SPI_START: u32 = 16;
/// The architected timers' PPI numbers (INTID = `PPI_BASE + n`).
pub const TIMER_SECURE_PHYS_PPI: u32 = 13;
/// Non-secure EL1 physical timer.
pub const TIMER_PHYS_PPI: u32 = 14;
/// EL1 virtual timer: the one Hypervisor.framework reports with VTIMER_ACTIVATED.
pub const TIMER_VIRT_PPI: u32 = 11;
/// EL2 (hypervisor) physical timer.
pub const TIMER_HYP_PPI: u32 = 10;
/// INTID of the virtual timer interrupt (27).
pub const VTIMER_INTID: u32 = PPI_BASE + TIMER_VIRT_PPI;

/// Size of the redistributor region for `vcpus` vCPUs.
pub fn gic_redist_size(vcpus: u32) -> u64 {
    u64::from(vcpus) * GIC_REDIST_SIZE_PER_CPU
}

/// The MMIO window of virtio device `index`, if the layout has one.
pub fn virtio_mmio_addr(index: u32) -> Option<u64> {
    (index < VIRTIO_MMIO_MAX).then(|| VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE)
}

/// The SPI number of virtio device `index`.
pub fn virtio_spi(index: u32) -> Option<u32> {
    (index < VIRTIO_MMIO_MAX).then(|| VIRTIO_SPI_START + index)
}

/// The MPIDR_EL1 value of vCPU `index`: the index in Aff1, Aff0 = 0, and bit 31
/// (RES1). Hypervisor.framework's GIC finds a vCPU's redistributor by affinity,
/// so the same value goes in the vCPU's register and in the device tree.
pub fn mpidr(index: u32) -> u64 {
    (1 << 31) | (u64::from(index & 0xff) << 8) | (u64::from((index >> 8) & 0xff) << 16)
}

/// The affinity fields (Aff2..Aff0) of an MPIDR value: what the device tree's
/// `cpu@N/reg` and PSCI's `target_cpu` carry.
pub fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn device_windows_do_not_overlap_and_sit_below_ram() {
        let mut windows = [
            (GIC_DIST_BASE, GIC_DIST_SIZE),
            (GIC_REDIST_BASE, gic_redist_size(MAX_VCPUS)),
            (SERIAL_ADDR, SERIAL_SIZE),
            (BOOT_TIMER_ADDR, BOOT_TIMER_SIZE),
            (
                VIRTIO_MMIO_START,
                u64::from(VIRTIO_MMIO_MAX) * VIRTIO_MMIO_SIZE,
            ),
        ];
        windows.sort();
        for pair in windows.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        let last = windows[windows.len() - 1];
        assert!(last.0 + last.1 <= DRAM_START);
        assert!(GIC_REDIST_BASE + gic_redist_size(MAX_VCPUS) <= GIC_REDIST_END);
        assert_eq!(DRAM_START % KERNEL_ALIGN, 0);
    }

    #[test]
    fn mpidr_puts_the_index_in_aff1() {
        assert_eq!(mpidr(0), 0x8000_0000);
        assert_eq!(mpidr(3), 0x8000_0300);
        assert_eq!(mpidr_affinity(mpidr(3)), 0x300);
        assert_eq!(mpidr_affinity(mpidr(300)), 0x1_2c00);
    }

    #[test]
    fn virtio_windows_and_spis_stop_at_the_limit() {
        assert_eq!(virtio_mmio_addr(0), Some(VIRTIO_MMIO_START));
        assert_eq!(virtio_mmio_addr(2), Some(VIRTIO_MMIO_START + 0x2000));
        assert_eq!(virtio_mmio_addr(VIRTIO_MMIO_MAX), None);
        assert_eq!(virtio_spi(1), Some(VIRTIO_SPI_START + 1));
        assert_eq!(virtio_spi(VIRTIO_MMIO_MAX), None);
        assert_ne!(SERIAL_SPI, VIRTIO_SPI_START);
    }
}
