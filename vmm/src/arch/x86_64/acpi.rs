//! ACPI tables for x86_64 guests, and the matching `virtio_mmio.device=` command line.
//!
//! Distro kernels (Debian's cloud kernel has no MP-table parsing and no virtio-mmio
//! command-line devices) find the vCPUs, the IOAPIC and the virtio-mmio devices only
//! through ACPI. [`create_acpi_tables`] builds a hardware-reduced ACPI platform with the
//! `acpi_tables` crate and writes it into the BIOS area the kernel scans for the RSDP:
//!
//! ```text
//! ACPI_START: RSDP (revision 2) ──► XSDT ──► FADT (HW_REDUCED_ACPI) ──X_DSDT──► DSDT
//!                                      └───► MADT (local APICs, IOAPIC)
//! ```
//!
//! - The FADT points the sleep control/status and reset registers at the one-byte
//!   registers of the power-management block at [`layout::ACPI_PM_PORT`], so Linux's
//!   `poweroff` and `reboot` reach the VMM. Its boot flags say there is no VGA, no
//!   i8042 and no CMOS RTC, which spares the kernel seconds of probing.
//! - The MADT lists one enabled local APIC per vCPU (APIC id = vCPU index) and KVM's
//!   IOAPIC, whose pins are GSIs 0–23 one to one, so no interrupt source override is
//!   needed.
//! - The DSDT holds `\_S5_`, COM1 (`PNP0501`), one `LNRO0005` device per virtio-mmio
//!   window, with its memory range and edge-triggered, active-high interrupt, and the
//!   power button: a Generic Event Device (`ACPI0013`, GSI [`layout::GED_IRQ`]) whose
//!   `_EVT` reads the event register at [`layout::GED_PORT`] and, when the power
//!   button bit is set, notifies the `PNP0C0C` button device `\_SB_.PWRB` (0x80,
//!   "pressed"); Linux's ACPI button driver turns that into `KEY_POWER`.
//!
//! All tables are built in host buffers first and placed one after another; nothing is
//! written to the guest unless everything fits below [`layout::ACPI_END`].
//!
//! [`cmdline_devices`] gives the same devices as `virtio_mmio.device=` parameters for
//! kernels built with `VIRTIO_MMIO_CMDLINE_DEVICES` and without ACPI.

use acpi_tables::aml::{
    self, And, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;

/// Errors of ACPI table creation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM has no vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    /// More virtio-mmio devices than the DSDT names VR00..VRFF can hold.
    #[error("{0} virtio-mmio devices are more than the 256 the DSDT can name")]
    TooManyDevices(usize),
    /// A virtio-mmio window is empty or does not lie below 4 GiB.
    #[error("virtio-mmio window {addr:#x}+{len:#x} is empty or not below 4 GiB")]
    DeviceWindow {
        /// Base of the window.
        addr: u64,
        /// Length of the window.
        len: u64,
    },
    /// A virtio-mmio IRQ is beyond the IOAPIC's last pin.
    #[error("virtio-mmio IRQ {0} is beyond the IOAPIC's last pin {max}", max = layout::IRQ_MAX)]
    Irq(u32),
    /// The tables do not fit between `ACPI_START` and `ACPI_END`.
    #[error("the ACPI tables need {needed:#x} bytes but the ACPI area holds {room:#x}")]
    TooLarge {
        /// Bytes the tables need, alignment included.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("writing the {table} at {addr:#x} into guest memory failed: {source}")]
    Write {
        /// Which table.
        table: &'static str,
        /// Where it was going.
        addr: u64,
        /// Why it failed.
        source: GuestMemoryError,
    },
}

/// `Result` of ACPI table creation.
pub type Result<T> = std::result::Result<T, Error>;

/// A virtio-mmio device as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of the register window (below 4 GiB).
    pub addr: u64,
    /// Length of the register window.
    pub len: u64,
    /// The device's GSI (an IOAPIC pin, at most [`layout::IRQ_MAX`]).
    pub irq: u32,
}

/// OEM id in every table header.
const OEM_ID: [u8; 6] = *b"AIVMM ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Tables after the RSDP start on this boundary.
const TABLE_ALIGN: u64 = 16;
/// Width of the FADT's power-management registers, in bits.
const PM_REG_BITS: u8 = 8;

/// IA-PC boot architecture flag (FADT offset 109): no VGA.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// Set would mean "do not enable MSI": leave it clear.
const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// No CMOS RTC: Linux then registers no `rtc_cmos` device.
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// What aivmm's FADT claims. `LEGACY_DEVICES` and `8042` stay clear: there is no
/// legacy ISA bus to enumerate and no keyboard controller beyond a reset port,
/// so Linux skips the i8042 probe.
const IAPC_BOOT_ARCH: u16 = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
const _: () = assert!(IAPC_BOOT_ARCH & IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED == 0);

/// AML that is already serialized, so that it can sit among other `&dyn Aml` children.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn serialize(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// Checks a virtio-mmio device and returns its window as 32-bit base and length.
fn check_device(dev: &MmioDevice) -> Result<(u32, u32)> {
    let window = || Error::DeviceWindow {
        addr: dev.addr,
        len: dev.len,
    };
    let end = dev.addr.checked_add(dev.len).ok_or_else(window)?;
    if dev.len == 0 || end > 1 << 32 {
        return Err(window());
    }
    if dev.irq > layout::IRQ_MAX {
        return Err(Error::Irq(dev.irq));
    }
    let base = u32::try_from(dev.addr).map_err(|_| window())?;
    let len = u32::try_from(dev.len).map_err(|_| window())?;
    Ok((base, len))
}

/// One `LNRO0005` device: the virtio-mmio binding Linux's `virtio_mmio` driver matches.
fn virtio_device_aml(index: usize, dev: &MmioDevice) -> Result<RawAml> {
    let (base, len) = check_device(dev)?;
    let uid = u32::try_from(index).map_err(|_| Error::TooManyDevices(index + 1))?;
    let name = format!("VR{index:02X}");
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &uid);
    let cca = Name::new("_CCA".into(), &aml::ONE);
    let mem = Memory32Fixed::new(true, base, len);
    // Edge-triggered, active-high, exclusive: what an irqfd-driven IOAPIC pin delivers.
    let irq = Interrupt::new(true, true, false, false, dev.irq);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&mem, &irq]));
    let device = Device::new(Path::new(&name), vec![&hid, &uid, &cca, &crs]);
    Ok(RawAml(serialize(&device)))
}

/// COM1 (`PNP0501`), so `8250_pnp` binds the port the VMM emulates.
fn com1_aml() -> RawAml {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    // The ports fit in 16 bits by definition of x86 port I/O.
    let port = layout::SERIAL_PORT as u16;
    let io = IO::new(port, port, 0, 8);
    let irq = Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&io, &irq]));
    let device = Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    RawAml(serialize(&device))
}

/// The power button's bit in the GED event register; `devices::legacy::ged` sets it.
const GED_EVENT_POWER_BUTTON: u8 = aivmm_devices::legacy::ged::EVENT_POWER_BUTTON;
/// `Notify` value of a button device: the button was pressed.
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The power button (`PWRB`, `PNP0C0C`) and the Generic Event Device (`GED0`,
/// `ACPI0013`) that notifies it. Linux's `evged` runs `_EVT` on the GED's interrupt.
fn power_button_aml() -> Vec<RawAml> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let pwrb = Device::new("PWRB".into(), vec![&hid, &uid]);

    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let irq = Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq]));
    // The port fits in 16 bits by definition of x86 port I/O.
    let port = layout::GED_PORT as u16;
    let len = layout::GED_LEN as u8;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &len);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    // Local0 = GDAT (reading clears it); Local1 = Local0 & POWER_BUTTON;
    // If (Local1 == POWER_BUTTON) { Notify (\_SB_.PWRB, 0x80) }
    let gdat = Path::new("GDAT");
    let read = Store::new(&Local(0), &gdat);
    let bit = GED_EVENT_POWER_BUTTON;
    let mask = And::new(&Local(1), &Local(0), &bit);
    let is_set = Equal::new(&Local(1), &bit);
    let button = Path::new("\\_SB_.PWRB");
    let pressed = NOTIFY_BUTTON_PRESSED;
    let notify = Notify::new(&button, &pressed);
    let if_set = If::new(&is_set, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &mask, &if_set]);
    let ged = Device::new("GED0".into(), vec![&hid, &uid, &crs, &region, &field, &evt]);
    vec![RawAml(serialize(&pwrb)), RawAml(serialize(&ged))]
}

/// The DSDT: `\_S5_`, then COM1, the power button with its GED and the virtio-mmio
/// devices under `\_SB_`.
fn create_dsdt(virtio: &[MmioDevice]) -> Result<Vec<u8>> {
    if virtio.len() > 0x100 {
        return Err(Error::TooManyDevices(virtio.len()));
    }
    let mut body = Vec::new();

    // SLP_TYPa, SLP_TYPb, reserved, reserved. HW-reduced platforms use SLP_TYPa only.
    let zero: u8 = 0;
    let s5 = Package::new(vec![&layout::ACPI_S5_SLP_TYP, &zero, &zero, &zero]);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut devices = vec![com1_aml()];
    devices.extend(power_button_aml());
    for (index, dev) in virtio.iter().enumerate() {
        devices.push(virtio_device_aml(index, dev)?);
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut body);

    // Revision 2: 64-bit AML integers.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"AIVMDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// A one-byte register in the power-management I/O block.
fn pm_register(offset: u64) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        PM_REG_BITS,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_PM_PORT + offset,
    )
}

/// The FADT (revision 6.5): hardware-reduced, with the DSDT at `dsdt_addr`.
fn create_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"AIVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button: the power button is the GED's.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.reset_reg = pm_register(layout::ACPI_RESET_OFFSET);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = pm_register(layout::ACPI_SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = pm_register(layout::ACPI_SLEEP_STATUS_OFFSET);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"AIVMM\0\0\0").into();
    serialize(&fadt.finalize())
}

/// The MADT: one enabled local APIC per vCPU and the IOAPIC.
///
/// The flags stay 0 (no `PCAT_COMPAT`): KVM does create an 8259 pair, but a
/// hardware-reduced Linux uses no legacy PIC and routes every GSI through the IOAPIC.
fn create_madt(num_cpus: u8) -> Vec<u8> {
    // The addresses are fixed 32-bit MMIO bases.
    let mut madt = MADT::new(
        OEM_ID,
        *b"AIVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_ADDR as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR as u32, 0));
    let mut bytes = serialize(&madt);
    // The crate writes revision 1; ACPI 6.5's MADT is revision 5 (the first that
    // defines the Online Capable flag, which Linux then reads as "not present" when
    // clear, hence Enabled above).
    set_revision(&mut bytes, MADT_REVISION);
    bytes
}

/// MADT revision of ACPI 6.2 and later.
const MADT_REVISION: u8 = 5;

/// Rewrites a table header's revision and fixes its checksum.
fn set_revision(table: &mut [u8], revision: u8) {
    table[8] = revision;
    table[9] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

fn create_xsdt(tables: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, *b"AIVMXSDT", OEM_REVISION);
    for &table in tables {
        xsdt.add_entry(table);
    }
    serialize(&xsdt)
}

/// Places blobs of `sizes` bytes one after another from `start`, each after the first
/// aligned to [`TABLE_ALIGN`], and checks that they end by `end`.
fn place(start: u64, end: u64, sizes: &[usize]) -> Result<Vec<u64>> {
    let room = end.saturating_sub(start);
    let mut addrs = Vec::with_capacity(sizes.len());
    let mut next = start;
    for &size in sizes {
        let addr = next.next_multiple_of(TABLE_ALIGN);
        addrs.push(addr);
        next = addr.saturating_add(size as u64);
    }
    if next > end {
        return Err(Error::TooLarge {
            needed: next - start,
            room,
        });
    }
    Ok(addrs)
}

fn write(mem: &GuestMemoryMmap, table: &'static str, addr: u64, bytes: &[u8]) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::Write {
            table,
            addr,
            source,
        })
}

/// Builds the RSDP, XSDT, FADT, MADT and DSDT for `num_cpus` vCPUs and the `virtio`
/// devices, writes them between [`layout::ACPI_START`] and [`layout::ACPI_END`], and
/// returns the RSDP's address (always `ACPI_START`).
///
/// The caller should also put that address in `boot_params.acpi_rsdp_addr`; the kernel
/// otherwise finds the RSDP by scanning the BIOS area.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    virtio: &[MmioDevice],
) -> Result<GuestAddress> {
    if num_cpus == 0 {
        return Err(Error::NoCpus);
    }
    let dsdt = create_dsdt(virtio)?;
    let madt = create_madt(num_cpus);
    // The FADT's and XSDT's sizes do not depend on the addresses they hold.
    let fadt_len = create_fadt(0).len();
    let xsdt_len = create_xsdt(&[0, 0]).len();

    let addrs = place(
        layout::ACPI_START,
        layout::ACPI_END,
        &[Rsdp::len(), dsdt.len(), fadt_len, madt.len(), xsdt_len],
    )?;
    let &[rsdp_addr, dsdt_addr, fadt_addr, madt_addr, xsdt_addr] = addrs.as_slice() else {
        unreachable!("place() returns one address per size");
    };

    let fadt = create_fadt(dsdt_addr);
    let xsdt = create_xsdt(&[fadt_addr, madt_addr]);
    let rsdp = serialize(&Rsdp::new(OEM_ID, xsdt_addr));

    write(mem, "DSDT", dsdt_addr, &dsdt)?;
    write(mem, "FADT", fadt_addr, &fadt)?;
    write(mem, "MADT", madt_addr, &madt)?;
    write(mem, "XSDT", xsdt_addr, &xsdt)?;
    write(mem, "RSDP", rsdp_addr, &rsdp)?;
    Ok(GuestAddress(rsdp_addr))
}

/// The `virtio_mmio.device=<size>@<addr>:<irq>` parameters for `virtio`, space separated,
/// for kernels that take their virtio-mmio devices from the command line.
pub fn cmdline_devices(virtio: &[MmioDevice]) -> String {
    virtio
        .iter()
        .map(|d| {
            format!(
                "virtio_mmio.device={}@{:#x}:{}",
                crate::config::format_size(d.len),
                d.addr,
                d.irq
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 * MIB)])
            .expect("256 MiB of guest memory")
    }

    fn virtio_devices(n: u32) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                addr: layout::VIRTIO_MMIO_START + u64::from(i) * layout::VIRTIO_MMIO_SIZE,
                len: layout::VIRTIO_MMIO_SIZE,
                irq: layout::VIRTIO_IRQ_START + i,
            })
            .collect()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest memory");
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads the table at `addr`, checking its signature, length bounds and checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        assert!(addr >= layout::ACPI_START, "{signature:?} at {addr:#x}");
        let header = read(mem, addr, 36);
        assert_eq!(&header[0..4], signature);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(
            addr + len as u64 <= layout::ACPI_END,
            "{signature:?} overflows"
        );
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Walks RSDP → XSDT → FADT/MADT → DSDT the way the guest's ACPICA does.
    fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
        let rsdp = read(mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");

        let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = read_table(mem, u64_at(&xsdt, 36), b"FACP");
        let madt = read_table(mem, u64_at(&xsdt, 44), b"APIC");
        assert_eq!(u32_at(&fadt, 40), 0, "32-bit DSDT pointer unused");
        let dsdt = read_table(mem, u64_at(&fadt, 140), b"DSDT");
        Tables { fadt, madt, dsdt }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_walk_from_rsdp() {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, 2, &virtio_devices(3)).expect("tables");
        assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
        walk(&mem, rsdp);
    }

    #[test]
    fn fadt_is_hw_reduced_with_pm_registers() {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, 1, &virtio_devices(1)).expect("tables");
        let Tables { fadt, .. } = walk(&mem, rsdp);

        assert_eq!(fadt.len(), 276, "FADT length of ACPI 6.5");
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(fadt[131], 5, "FADT minor revision");

        let iapc = u16_at(&fadt, 109);
        assert_ne!(iapc & (1 << 2), 0, "VGA not present");
        assert_eq!(iapc & (1 << 3), 0, "MSI must not be disabled");
        assert_ne!(iapc & (1 << 5), 0, "CMOS RTC not present");
        assert_eq!(iapc & (1 << 1), 0, "no 8042");

        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");

        // Generic Address Structure: space, bit width, bit offset, access size, address.
        let gas = |off: usize| {
            (
                fadt[off],
                fadt[off + 1],
                fadt[off + 2],
                fadt[off + 3],
                u64_at(&fadt, off + 4),
            )
        };
        let port = layout::ACPI_PM_PORT;
        assert_eq!(
            gas(116),
            (1, 8, 0, 1, port + layout::ACPI_RESET_OFFSET),
            "RESET_REG"
        );
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE, "RESET_VALUE");
        assert_eq!(
            gas(244),
            (1, 8, 0, 1, port + layout::ACPI_SLEEP_CONTROL_OFFSET),
            "SLEEP_CONTROL_REG"
        );
        assert_eq!(
            gas(256),
            (1, 8, 0, 1, port + layout::ACPI_SLEEP_STATUS_OFFSET),
            "SLEEP_STATUS_REG"
        );
        // No FACS, and no fixed hardware blocks on a HW-reduced platform.
        assert_eq!(u64_at(&fadt, 132), 0, "X_FIRMWARE_CTRL");
        assert!(
            fadt[148..244].iter().all(|&b| b == 0),
            "X_PM*/X_GPE* blocks"
        );
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        for cpus in [1u8, 4, 255] {
            let mem = guest_memory();
            let rsdp = create_acpi_tables(&mem, cpus, &virtio_devices(2)).expect("tables");
            let Tables { madt, .. } = walk(&mem, rsdp);
            assert_eq!(madt[8], 5, "MADT revision");
            assert_eq!(u64::from(u32_at(&madt, 36)), layout::APIC_ADDR);
            assert_eq!(u32_at(&madt, 40), 0, "MADT flags");

            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut off = 44;
            while off < madt.len() {
                let (kind, len) = (madt[off], usize::from(madt[off + 1]));
                assert!(len >= 2 && off + len <= madt.len(), "MADT entry at {off}");
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        lapics.push((madt[off + 2], madt[off + 3], u32_at(&madt, off + 4)));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((
                            madt[off + 2],
                            u32_at(&madt, off + 4),
                            u32_at(&madt, off + 8),
                        ));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            let expected: Vec<_> = (0..cpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, expected, "(uid, APIC id, enabled) per vCPU");
            assert_eq!(ioapics, vec![(0, layout::IOAPIC_ADDR as u32, 0)]);
        }
    }

    #[test]
    fn dsdt_names_devices_and_s5() {
        let mem = guest_memory();
        let devices = virtio_devices(3);
        let rsdp = create_acpi_tables(&mem, 1, &devices).expect("tables");
        let Tables { dsdt, .. } = walk(&mem, rsdp);
        for needle in [
            &b"LNRO0005"[..],
            b"_S5_",
            b"_SB_",
            b"COM1",
            b"VR00",
            b"VR01",
            b"VR02",
            b"ACPI0013",
            b"GED0",
            b"PWRB",
            b"_EVT",
            b"GDAT",
        ] {
            assert!(
                contains(&dsdt, needle),
                "{}",
                String::from_utf8_lossy(needle)
            );
        }
        // PNP0501 as a compressed EISA id, as _HID holds it.
        let eisa = serialize(&EISAName::new("PNP0501"));
        assert!(contains(&dsdt, &eisa));
        // Memory32Fixed(ReadWrite, addr, len) and Interrupt(consumer, edge, high, exclusive).
        for dev in &devices {
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&(dev.addr as u32).to_le_bytes());
            mem32.extend_from_slice(&(dev.len as u32).to_le_bytes());
            assert!(contains(&dsdt, &mem32), "Memory32Fixed for {dev:?}");
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&dev.irq.to_le_bytes());
            assert!(contains(&dsdt, &irq), "Interrupt for {dev:?}");
        }
        // \_S5_: Package(4) { 5, 0, 0, 0 }.
        let s5 = [
            b'_',
            b'S',
            b'5',
            b'_',
            0x12,
            0x07,
            0x04,
            0x0a,
            layout::ACPI_S5_SLP_TYP,
            0,
            0,
            0,
        ];
        assert!(contains(&dsdt, &s5));
    }

    #[test]
    fn no_devices_still_builds() {
        let mem = guest_memory();
        let rsdp = create_acpi_tables(&mem, 1, &[]).expect("tables");
        let Tables { dsdt, .. } = walk(&mem, rsdp);
        assert!(!contains(&dsdt, b"LNRO0005"));
        assert!(contains(&dsdt, b"COM1"));
    }

    #[test]
    fn bad_input_is_rejected() {
        let mem = guest_memory();
        assert!(matches!(
            create_acpi_tables(&mem, 0, &[]),
            Err(Error::NoCpus)
        ));

        let high = MmioDevice {
            addr: 1 << 32,
            len: 0x1000,
            irq: 5,
        };
        assert!(matches!(
            create_acpi_tables(&mem, 1, &[high]),
            Err(Error::DeviceWindow { .. })
        ));
        let straddle = MmioDevice {
            addr: 0xffff_f000,
            len: 0x2000,
            irq: 5,
        };
        assert!(matches!(
            create_acpi_tables(&mem, 1, &[straddle]),
            Err(Error::DeviceWindow { .. })
        ));
        let empty = MmioDevice {
            addr: 0xd000_0000,
            len: 0,
            irq: 5,
        };
        assert!(matches!(
            create_acpi_tables(&mem, 1, &[empty]),
            Err(Error::DeviceWindow { .. })
        ));
        let top = MmioDevice {
            addr: 0xffff_f000,
            len: 0x1000,
            irq: 5,
        };
        assert!(create_acpi_tables(&mem, 1, &[top]).is_ok());

        let irq = MmioDevice {
            irq: layout::IRQ_MAX + 1,
            ..virtio_devices(1)[0]
        };
        assert!(matches!(
            create_acpi_tables(&mem, 1, &[irq]),
            Err(Error::Irq(24))
        ));

        let many = vec![virtio_devices(1)[0]; 257];
        assert!(matches!(
            create_acpi_tables(&mem, 1, &many),
            Err(Error::TooManyDevices(257))
        ));

        // Guest memory that does not reach the ACPI area.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        assert!(matches!(
            create_acpi_tables(&small, 1, &[]),
            Err(Error::Write { .. })
        ));
    }

    #[test]
    fn placement_aligns_and_checks_room() {
        assert_eq!(
            place(0x1000, 0x1100, &[36, 40, 16]).expect("fits"),
            vec![0x1000, 0x1030, 0x1060]
        );
        assert_eq!(
            place(0x1000, 0x1070, &[36, 40, 16])
                .expect("fits exactly")
                .len(),
            3
        );
        assert!(matches!(
            place(0x1000, 0x106f, &[36, 40, 16]),
            Err(Error::TooLarge {
                needed: 0x70,
                room: 0x6f
            })
        ));
    }

    #[test]
    fn largest_configuration_fits() {
        let mem = guest_memory();
        // Every IRQ aivmm can hand out, 255 vCPUs.
        let n = layout::VIRTIO_IRQ_MAX - layout::VIRTIO_IRQ_START + 1;
        let rsdp = create_acpi_tables(&mem, 255, &virtio_devices(n)).expect("tables");
        walk(&mem, rsdp);
    }

    #[test]
    fn cmdline_lists_devices() {
        assert_eq!(cmdline_devices(&[]), "");
        assert_eq!(
            cmdline_devices(&virtio_devices(2)),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        let odd = [
            MmioDevice {
                addr: 0xc000_0000,
                len: 0x200,
                irq: 7,
            },
            MmioDevice {
                addr: 0xc010_0000,
                len: 0x10_0000,
                irq: 23,
            },
            MmioDevice {
                addr: 0xc020_0000,
                len: 0x1800,
                irq: 8,
            },
        ];
        assert_eq!(
            cmdline_devices(&odd),
            "virtio_mmio.device=512@0xc0000000:7 virtio_mmio.device=1M@0xc0100000:23 \
             virtio_mmio.device=6K@0xc0200000:8"
        );
    }

    /// Disassembles the DSDT with ACPICA's `iasl`, the compiler the kernel's
    /// interpreter shares its parser with.
    #[test]
    fn dsdt_disassembles_with_iasl() {
        let required = std::env::var("AIVMM_REQUIRE_IASL").is_ok_and(|v| v == "1");
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            assert!(!required, "iasl not found and AIVMM_REQUIRE_IASL=1");
            eprintln!("note: iasl not installed (Debian: acpica-tools); skipping DSDT disassembly");
            return;
        }

        let mem = guest_memory();
        let devices = virtio_devices(2);
        let rsdp = create_acpi_tables(&mem, 2, &devices).expect("tables");
        let Tables { dsdt, .. } = walk(&mem, rsdp);

        let dir = tempfile::tempdir().expect("temp dir");
        // iasl exits 0 even when it has to repair the table, so read its log too.
        let iasl = |args: &[&str]| {
            let out = std::process::Command::new("iasl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run iasl");
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl {args:?} failed:\n{log}");
            let complaint = log
                .lines()
                .filter(|l| !l.starts_with("Compilation successful."))
                .any(|l| l.contains("Error") || l.contains("Warning"));
            assert!(!complaint, "iasl {args:?} complained:\n{log}");
            log
        };
        std::fs::write(dir.path().join("dsdt.aml"), &dsdt).expect("write dsdt.aml");
        iasl(&["-d", "dsdt.aml"]);
        let dsl = std::fs::read_to_string(dir.path().join("dsdt.dsl")).expect("read dsdt.dsl");
        // Round trip: the disassembly compiles back cleanly.
        let log = iasl(&["-p", "recompiled", "dsdt.dsl"]);
        assert!(log.contains("0 Errors, 0 Warnings"), "{log}");

        for needle in [
            "Name (_S5, Package",
            "Device (COM1)",
            "EisaId (\"PNP0501\")",
            "IO (Decode16,",
            "Device (VR00)",
            "Device (VR01)",
            "Name (_HID, \"LNRO0005\")",
            "Name (_CCA, One)",
            "Device (PWRB)",
            "EisaId (\"PNP0C0C\")",
            "Device (GED0)",
            "Name (_HID, \"ACPI0013\" /* Generic Event Device */)",
            "OperationRegion (GDST, SystemIO, 0x0610, One)",
            "0x00000017,",
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT",
            "Local1 = (Local0 & One)",
            "If ((Local1 == One))",
            "Notify (\\_SB.PWRB, 0x80)",
        ] {
            assert!(dsl.contains(needle), "{needle:?} missing in:\n{dsl}");
        }
        for dev in &devices {
            let mem32 = format!(
                "Memory32Fixed (ReadWrite,\n                        {:#010X},",
                dev.addr
            );
            let irq = format!(
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )\n                    {{\n                        {:#010X},",
                dev.irq
            );
            let squash = |s: &str| s.split_whitespace().collect::<String>();
            let flat = squash(&dsl);
            assert!(
                flat.contains(&squash(&mem32)),
                "{mem32:?} missing in:\n{dsl}"
            );
            assert!(flat.contains(&squash(&irq)), "{irq:?} missing in:\n{dsl}");
        }
    }
}
