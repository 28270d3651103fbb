//! The guest's flattened device tree, built with `vm-fdt`.
//!
//! It describes exactly what the VMM emulates: RAM at [`DRAM_START`], one CPU node
//! per vCPU (brought up through PSCI over HVC), the GICv3 (Hypervisor.framework's
//! own on macOS), the architected timer's four PPIs, the 16550 console, the
//! power button (a PL061 GPIO line under `gpio-keys`, labelled "Power Button"
//! like the ACPI button's input device on x86, with the fixed APB clock a
//! PrimeCell needs), every virtio-mmio window with its SPI, and `/chosen` with
//! the command line and the initrd's bounds. Everything the kernel needs is here;
//! there is no ACPI on arm64.

use vm_fdt::{FdtWriter, FdtWriterResult};

use super::layout::{
    mpidr, mpidr_affinity, DRAM_START, SPI_BASE, TIMER_HYP_PPI, TIMER_PHYS_PPI,
    TIMER_SECURE_PHYS_PPI, TIMER_VIRT_PPI,
};
use super::{Error, Result};

/// The GIC's phandle, the root's `interrupt-parent`.
const GIC_PHANDLE: u32 = 1;
/// The APB clock's phandle (PrimeCell devices name their bus clock).
const CLOCK_PHANDLE: u32 = 2;
/// The GPIO controller's phandle.
const GPIO_PHANDLE: u32 = 3;
/// The APB clock's rate; nothing in the PL061 depends on it.
const APB_CLOCK_HZ: u32 = 24_000_000;
/// `KEY_POWER` in Linux's input event codes.
const KEY_POWER: u32 = 116;
/// GPIO specifier flag: active high.
const GPIO_ACTIVE_HIGH: u32 = 0;
/// The power button's input device name, the one the guest agent looks for.
pub const POWER_BUTTON_LABEL: &str = "Power Button";
/// Interrupt specifier: shared peripheral interrupt.
const GIC_SPI: u32 = 0;
/// Interrupt specifier: private peripheral interrupt.
const GIC_PPI: u32 = 1;
/// Trigger type: rising edge (virtio-mmio and the UART raise edges).
const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// Trigger type: active-high level (the architected timer).
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// The 16550's input clock, as the 8250 driver expects for 115200 baud.
const UART_CLOCK_HZ: u32 = 1_843_200;

/// An MMIO device as the device tree lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base address.
    pub addr: u64,
    /// Window size.
    pub size: u64,
    /// SPI number (INTID minus 32).
    pub spi: u32,
}

/// Where the GIC's frames are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicLayout {
    /// Distributor base.
    pub dist_base: u64,
    /// Distributor size.
    pub dist_size: u64,
    /// First redistributor.
    pub redist_base: u64,
    /// Size of all redistributors together.
    pub redist_size: u64,
}

/// Everything the device tree describes.
#[derive(Clone, Debug)]
pub struct FdtConfig<'a> {
    /// vCPUs (at least one).
    pub vcpus: u32,
    /// Bytes of RAM from [`DRAM_START`].
    pub ram_size: u64,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initrd's address and size, if there is one.
    pub initrd: Option<(u64, u64)>,
    /// The GIC.
    pub gic: GicLayout,
    /// The console UART, if any.
    pub serial: Option<MmioDevice>,
    /// The PL061 GPIO controller with the power button on `power_line`, if any.
    pub gpio: Option<(MmioDevice, u32)>,
    /// The virtio-mmio devices, in order.
    pub virtio: &'a [MmioDevice],
}

/// Builds the device tree blob.
pub fn create_fdt(cfg: &FdtConfig<'_>) -> Result<Vec<u8>> {
    if cfg.vcpus == 0 {
        return Err(Error::Fdt("no vCPUs".into()));
    }
    if cfg.cmdline.as_bytes().contains(&0) {
        return Err(Error::Fdt(
            "the kernel command line contains a NUL byte".into(),
        ));
    }
    for dev in cfg.serial.iter().chain(cfg.gpio.as_ref().map(|g| &g.0)).chain(cfg.virtio) {
        if dev.spi + SPI_BASE >= 1020 {
            return Err(Error::Fdt(format!(
                "SPI {} is beyond the GIC's 988 SPIs",
                dev.spi
            )));
        }
    }
    build(cfg).map_err(|e| Error::Fdt(e.to_string()))
}

fn build(cfg: &FdtConfig<'_>) -> FdtWriterResult<Vec<u8>> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "aivmm")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for i in 0..cfg.vcpus {
        let aff = mpidr_affinity(mpidr(i));
        let cpu = fdt.begin_node(&format!("cpu@{aff:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        // Affinities stay below 2^24 (at most 65536 vCPUs), so one cell holds them.
        fdt.property_u32("reg", aff as u32)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let memory = fdt.begin_node(&format!("memory@{DRAM_START:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[DRAM_START, cfg.ram_size])?;
    fdt.end_node(memory)?;

    let g = &cfg.gic;
    let intc = fdt.begin_node(&format!("intc@{:x}", g.dist_base))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_array_u64(
        "reg",
        &[g.dist_base, g.dist_size, g.redist_base, g.redist_size],
    )?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(intc)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let mut irqs = Vec::new();
    for ppi in [
        TIMER_SECURE_PHYS_PPI,
        TIMER_PHYS_PPI,
        TIMER_VIRT_PPI,
        TIMER_HYP_PPI,
    ] {
        irqs.extend_from_slice(&[GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]);
    }
    fdt.property_array_u32("interrupts", &irqs)?;
    fdt.end_node(timer)?;

    if let Some(s) = cfg.serial {
        let uart = fdt.begin_node(&format!("uart@{:x}", s.addr))?;
        fdt.property_string("compatible", "ns16550a")?;
        fdt.property_array_u64("reg", &[s.addr, s.size])?;
        fdt.property_u32("clock-frequency", UART_CLOCK_HZ)?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, s.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.end_node(uart)?;
    }

    if let Some((g, line)) = cfg.gpio {
        let clock = fdt.begin_node("apb-pclk")?;
        fdt.property_string("compatible", "fixed-clock")?;
        fdt.property_u32("#clock-cells", 0)?;
        fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
        fdt.property_string("clock-output-names", "clk24mhz")?;
        fdt.property_phandle(CLOCK_PHANDLE)?;
        fdt.end_node(clock)?;

        let gpio = fdt.begin_node(&format!("pl061@{:x}", g.addr))?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,pl061".into(), "arm,primecell".into()],
        )?;
        fdt.property_array_u64("reg", &[g.addr, g.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, g.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("gpio-controller")?;
        fdt.property_u32("#gpio-cells", 2)?;
        fdt.property_u32("clocks", CLOCK_PHANDLE)?;
        fdt.property_string("clock-names", "apb_pclk")?;
        fdt.property_phandle(GPIO_PHANDLE)?;
        fdt.end_node(gpio)?;

        let keys = fdt.begin_node("gpio-keys")?;
        fdt.property_string("compatible", "gpio-keys")?;
        fdt.property_string("label", POWER_BUTTON_LABEL)?;
        let power = fdt.begin_node("power")?;
        fdt.property_string("label", "GPIO Key Power")?;
        fdt.property_u32("linux,code", KEY_POWER)?;
        fdt.property_array_u32("gpios", &[GPIO_PHANDLE, line, GPIO_ACTIVE_HIGH])?;
        fdt.end_node(power)?;
        fdt.end_node(keys)?;
    }

    for dev in cfg.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.addr))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.addr, dev.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, dev.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    if let Some(s) = cfg.serial {
        fdt.property_string("stdout-path", &format!("/uart@{:x}", s.addr))?;
    }
    if let Some((addr, size)) = cfg.initrd {
        fdt.property_u64("linux,initrd-start", addr)?;
        fdt.property_u64("linux,initrd-end", addr + size)?;
    }
    fdt.end_node(chosen)?;

    fdt.end_node(root)?;
    fdt.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::layout::*;
    use super::*;
    use std::process::Command;

    fn config<'a>(virtio: &'a [MmioDevice], initrd: Option<(u64, u64)>) -> FdtConfig<'a> {
        FdtConfig {
            vcpus: 2,
            ram_size: 512 << 20,
            cmdline: "console=ttyS0 quiet",
            initrd,
            gic: GicLayout {
                dist_base: GIC_DIST_BASE,
                dist_size: GIC_DIST_SIZE,
                redist_base: GIC_REDIST_BASE,
                redist_size: gic_redist_size(2),
            },
            serial: Some(MmioDevice {
                addr: SERIAL_ADDR,
                size: SERIAL_SIZE,
                spi: SERIAL_SPI,
            }),
            gpio: Some((
                MmioDevice {
                    addr: GPIO_ADDR,
                    size: GPIO_SIZE,
                    spi: GPIO_SPI,
                },
                3,
            )),
            virtio,
        }
    }

    /// Decompiles `blob` with dtc. `None` (with the reason printed) when dtc is
    /// missing outside CI; in CI a missing dtc fails the test.
    pub(crate) fn decompile(blob: &[u8]) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.dtb");
        std::fs::write(&path, blob).unwrap();
        let out = match Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts"])
            .arg(&path)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                let required = std::env::var("CI").as_deref() == Ok("true")
                    || std::env::var_os("AIVMM_REQUIRE_DTC").is_some();
                assert!(
                    !required,
                    "dtc is required in CI but cannot run ({e}); install Debian's device-tree-compiler"
                );
                eprintln!(
                    "skipping the dtc check: dtc cannot run ({e}); install device-tree-compiler"
                );
                return None;
            }
        };
        assert!(
            out.status.success(),
            "dtc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(String::from_utf8(out.stdout).unwrap())
    }

    #[test]
    fn dtc_reads_back_every_node() {
        let virtio = [
            MmioDevice {
                addr: VIRTIO_MMIO_START,
                size: VIRTIO_MMIO_SIZE,
                spi: VIRTIO_SPI_START,
            },
            MmioDevice {
                addr: VIRTIO_MMIO_START + 0x1000,
                size: VIRTIO_MMIO_SIZE,
                spi: VIRTIO_SPI_START + 1,
            },
        ];
        let blob = create_fdt(&config(&virtio, Some((0x5000_0000, 0x10_0000)))).unwrap();
        assert_eq!(&blob[0..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let Some(dts) = decompile(&blob) else { return };
        let squashed: String = dts.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "compatible = \"linux,dummy-virt\";",
            "#address-cells = <0x02>;",
            "interrupt-parent = <0x01>;",
            "cpu@0 { device_type = \"cpu\"; compatible = \"arm,arm-v8\"; enable-method = \"psci\"; reg = <0x00>; };",
            "cpu@100 { device_type = \"cpu\"; compatible = \"arm,arm-v8\"; enable-method = \"psci\"; reg = <0x100>; };",
            "compatible = \"arm,psci-1.0\\0arm,psci-0.2\"; method = \"hvc\";",
            "memory@40000000 { device_type = \"memory\"; reg = <0x00 0x40000000 0x00 0x20000000>; };",
            "intc@8000000 { compatible = \"arm,gic-v3\"; interrupt-controller; #interrupt-cells = <0x03>; reg = <0x00 0x8000000 0x00 0x10000 0x00 0x8100000 0x00 0x40000>;",
            "phandle = <0x01>;",
            "compatible = \"arm,armv8-timer\"; always-on; interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
            "uart@9000000 { compatible = \"ns16550a\"; reg = <0x00 0x9000000 0x00 0x1000>; clock-frequency = <0x1c2000>; interrupts = <0x00 0x01 0x01>; };",
            "virtio_mmio@a000000 { compatible = \"virtio,mmio\"; reg = <0x00 0xa000000 0x00 0x1000>; interrupts = <0x00 0x10 0x01>; dma-coherent; };",
            "virtio_mmio@a001000 { compatible = \"virtio,mmio\"; reg = <0x00 0xa001000 0x00 0x1000>; interrupts = <0x00 0x11 0x01>; dma-coherent; };",
            "bootargs = \"console=ttyS0 quiet\";",
            "stdout-path = \"/uart@9000000\";",
            "apb-pclk { compatible = \"fixed-clock\"; #clock-cells = <0x00>; clock-frequency = <0x16e3600>; clock-output-names = \"clk24mhz\"; phandle = <0x02>; };",
            "pl061@9020000 { compatible = \"arm,pl061\\0arm,primecell\"; reg = <0x00 0x9020000 0x00 0x1000>; interrupts = <0x00 0x02 0x01>; gpio-controller; #gpio-cells = <0x02>; clocks = <0x02>; clock-names = \"apb_pclk\"; phandle = <0x03>; };",
            "gpio-keys { compatible = \"gpio-keys\"; label = \"Power Button\"; power { label = \"GPIO Key Power\"; linux,code = <0x74>; gpios = <0x03 0x03 0x00>; }; };",
            "linux,initrd-start = <0x00 0x50000000>;",
            "linux,initrd-end = <0x00 0x50100000>;",
        ] {
            assert!(squashed.contains(want), "missing `{want}` in:\n{dts}");
        }
    }

    #[test]
    fn no_initrd_means_no_initrd_properties() {
        let blob = create_fdt(&config(&[], None)).unwrap();
        let Some(dts) = decompile(&blob) else { return };
        assert!(!dts.contains("linux,initrd"), "{dts}");
        assert!(!dts.contains("virtio_mmio"), "{dts}");
        assert!(dts.contains("bootargs"), "{dts}");
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut c = config(&[], None);
        c.vcpus = 0;
        assert!(create_fdt(&c).unwrap_err().to_string().contains("no vCPUs"));
        let mut c = config(&[], None);
        c.cmdline = "a\0b";
        assert!(create_fdt(&c).unwrap_err().to_string().contains("NUL"));
        let far = [MmioDevice {
            addr: VIRTIO_MMIO_START,
            size: 0x1000,
            spi: 1000,
        }];
        assert!(create_fdt(&config(&far, None))
            .unwrap_err()
            .to_string()
            .contains("SPI 1000"));
    }

    #[test]
    fn blob_fits_the_boot_protocol_limit_with_many_cpus() {
        let mut c = config(&[], None);
        c.vcpus = MAX_VCPUS;
        let blob = create_fdt(&c).unwrap();
        assert!((blob.len() as u64) < FDT_MAX_SIZE);
    }
}
