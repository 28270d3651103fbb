//! The x86_64 guest physical layout and the fixed port and IRQ numbers.
//!
//! Low memory holds the boot structures; the kernel loads at 1 MiB. RAM runs up to
//! the 32-bit MMIO hole at [`MMIO_HOLE_START`] and continues at 4 GiB.

/// GDT for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) for the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the identity map built for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories (2 MiB pages) identity-mapping the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the kernel command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of the low RAM below the EBDA.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables go: the BIOS area the kernel scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x100000;
/// Where protected-mode kernels are loaded.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO hole: no RAM from here to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// RAM above the hole starts at 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// The boot-timer device: the guest writes here and the VMM logs the time since exec.
pub const BOOT_TIMER_ADDR: u64 = MMIO_HOLE_START;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// The first virtio-mmio device; the others follow every [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The first GSI given to virtio-mmio devices; each device takes the next one.
pub const VIRTIO_IRQ_START: u32 = 5;
/// The last GSI a virtio-mmio device may take (the one after is the GED's).
pub const VIRTIO_IRQ_MAX: u32 = GED_IRQ - 1;
/// The last GSI aivmm hands out (the KVM IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;

/// The IOAPIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;

/// COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 controller's data port (its command port is +4).
pub const I8042_PORT: u64 = 0x60;
/// The ACPI power-management block: sleep control (offset 0), sleep status
/// (offset 1) and reset (offset 2) registers, each one byte, as the FADT says.
pub const ACPI_PM_PORT: u64 = 0x600;
/// Length of the ACPI power-management block.
pub const ACPI_PM_LEN: u64 = 3;
/// Offset of the sleep control register in the block.
pub const ACPI_SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register in the block.
pub const ACPI_SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register in the block.
pub const ACPI_RESET_OFFSET: u64 = 2;
/// The value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP for S5 (soft-off), in the DSDT's `_S5_` package and the sleep control register.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// The ACPI Generic Event Device's event register (one byte): the power button.
pub const GED_PORT: u64 = 0x610;
/// Length of the GED's register block.
pub const GED_LEN: u64 = 1;
/// The GED's GSI: the last IOAPIC pin. Not below 16: KVM also routes GSIs 0-15 to
/// its 8259 PIC, and until Linux masks the boot vCPU's LINT0 (ExtINT at reset) a
/// press there would arrive as a PIC vector (3 on the unprogrammed PIC: a
/// breakpoint) and reset a guest still in early boot. From 16 up, only the
/// IOAPIC sees it, and a masked pin drops it; aivmm presses again every second.
pub const GED_IRQ: u32 = IRQ_MAX;
const _: () = assert!(GED_IRQ >= 16 && GED_IRQ <= IRQ_MAX && VIRTIO_IRQ_MAX < GED_IRQ);
