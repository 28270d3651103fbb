//! An arm64 VM on Hypervisor.framework, put together from the pieces in
//! [`crate::arch::aarch64`] and [`crate::hypervisor::hvf`]: the macOS
//! counterpart of [`crate::vmm::Vmm`].
//!
//! The flow of [`HvfMachine::build`]:
//! 1. [`Plan::new`] checks the shape (vCPUs, RAM, device count) and places the
//!    devices: the 16550 UART, the boot timer and one virtio-mmio window and SPI
//!    per device (the fixed map of [`crate::arch::aarch64::layout`]).
//! 2. [`guest_ram`] maps RAM at a 16 KiB-aligned host address (the framework's
//!    page size), and [`HvfVm::map`] gives it to the guest.
//! 3. The framework's GICv3 is created; its layout goes into the device tree.
//! 4. [`load`] copies the kernel `Image`, the initrd and the device tree
//!    ([`device_tree`]) into RAM.
//! 5. The devices go on one MMIO bus. Each gets an interrupt from
//!    [`HvfVm::interrupt`] (`hv_gic_set_spi`); the virtio-mmio transport signals
//!    queue notifications itself, since there is no ioeventfd.
//!
//! [`HvfMachine::run`] then runs each vCPU on its own thread (a framework vCPU
//! belongs to its thread), sends MMIO exits to the bus, and stops every vCPU at
//! the first power-off, reset or failure.
//!
//! All of this is generic over [`HvfApi`], so it builds and is tested on Linux
//! against the fake framework; `vmm_hvf_darwin.rs` (macOS only) plugs in the real
//! one. The virtio devices' notifiers and pollers come from
//! [`aivmm_devices::sys`] (a pipe and kqueue on macOS).

use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use aivmm_devices::bus::Bus;
use aivmm_devices::legacy::{pl061, BootTimer, Pl061, Serial};
use aivmm_devices::virtio::mmio::MmioTransport;
use aivmm_devices::virtio::VirtioDevice;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::aarch64::fdt::{self, FdtConfig, GicLayout, MmioDevice};
use crate::arch::aarch64::layout::{
    BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, DRAM_START, GPIO_ADDR, GPIO_SIZE, GPIO_SPI, MAX_VCPUS, SERIAL_ADDR, SERIAL_SIZE, SERIAL_SPI,
    VIRTIO_MMIO_MAX, VIRTIO_MMIO_SIZE,
};
use crate::arch::aarch64::{boot_regs, image, layout};
use crate::hypervisor::hvf::{self, HvfApi, HvfHypervisor, HvfVcpu, HvfVm, HOST_PAGE_SIZE};
use crate::hypervisor::VcpuExit;
use crate::machine::VmExit;

/// Errors of the HVF VM builder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM's shape does not fit the arm64 layout or the framework.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest RAM could not be allocated.
    #[error("cannot allocate {size} bytes of guest RAM: {reason}")]
    Memory {
        /// Bytes asked for.
        size: u64,
        /// Why not.
        reason: String,
    },
    /// Setting up the guest (kernel, initrd, device tree) failed.
    #[error(transparent)]
    Arch(#[from] crate::arch::aarch64::Error),
    /// A framework call failed.
    #[error(transparent)]
    Hvf(#[from] hvf::Error),
    /// A device could not be set up.
    #[error("device {name}: {reason}")]
    Device {
        /// The device.
        name: String,
        /// Why.
        reason: String,
    },
    /// A vCPU failed or met an exit aivmm cannot handle.
    #[error("vCPU {index}: {reason}")]
    Vcpu {
        /// The vCPU.
        index: u32,
        /// What happened.
        reason: String,
    },
}

/// `Result` of the HVF VM builder.
pub type Result<T> = std::result::Result<T, Error>;

/// The default IPA size of a framework VM (36 bits): guest physical addresses
/// stay below 64 GiB unless the VM is configured for more.
pub const IPA_LIMIT: u64 = 1 << 36;
/// The least RAM a guest gets: room for a small kernel, initrd and device tree.
pub const MIN_RAM: u64 = 32 << 20;

/// What the caller asks for: plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HvfConfig {
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes of guest RAM (a multiple of 16 KiB).
    pub memory: u64,
    /// The kernel command line.
    pub cmdline: String,
}

/// Where everything goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// vCPUs.
    pub vcpus: u32,
    /// Bytes of RAM from [`DRAM_START`].
    pub ram_size: u64,
    /// The console UART.
    pub serial: MmioDevice,
    /// The PL061 GPIO controller (the power button).
    pub gpio: MmioDevice,
    /// The virtio-mmio devices, in order.
    pub virtio: Vec<MmioDevice>,
}

impl Plan {
    /// Checks `cfg` and places the UART and `virtio_devices` virtio-mmio devices.
    pub fn new(cfg: &HvfConfig, virtio_devices: usize) -> Result<Self> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs asked for; 1 to {MAX_VCPUS} fit the GIC layout",
                cfg.vcpus
            )));
        }
        if cfg.memory < MIN_RAM || cfg.memory % HOST_PAGE_SIZE != 0 {
            return Err(Error::Config(format!(
                "{} bytes of RAM asked for; at least {MIN_RAM}, in 16 KiB pages",
                cfg.memory
            )));
        }
        if DRAM_START.saturating_add(cfg.memory) > IPA_LIMIT {
            return Err(Error::Config(format!(
                "{} bytes of RAM do not fit the 36-bit guest address space (at most {} bytes)",
                cfg.memory,
                IPA_LIMIT - DRAM_START
            )));
        }
        let count = u32::try_from(virtio_devices)
            .ok()
            .filter(|&n| n <= VIRTIO_MMIO_MAX)
            .ok_or_else(|| {
                Error::Config(format!(
                    "{virtio_devices} virtio devices; the layout has room for {VIRTIO_MMIO_MAX}"
                ))
            })?;
        let virtio = (0..count)
            .map(|i| {
                // Both exist for every index below VIRTIO_MMIO_MAX.
                let addr = layout::virtio_mmio_addr(i).unwrap_or_default();
                let spi = layout::virtio_spi(i).unwrap_or_default();
                MmioDevice {
                    addr,
                    size: VIRTIO_MMIO_SIZE,
                    spi,
                }
            })
            .collect();
        Ok(Self {
            vcpus: cfg.vcpus,
            ram_size: cfg.memory,
            serial: MmioDevice {
                addr: SERIAL_ADDR,
                size: SERIAL_SIZE,
                spi: SERIAL_SPI,
            },
            gpio: MmioDevice {
                addr: GPIO_ADDR,
                size: GPIO_SIZE,
                spi: GPIO_SPI,
            },
            virtio,
        })
    }

    /// Guest RAM as `[start, end)`.
    pub fn ram(&self) -> (u64, u64) {
        (DRAM_START, DRAM_START + self.ram_size)
    }
}

/// The device tree for `plan`.
pub fn device_tree(
    plan: &Plan,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    gic: GicLayout,
) -> Result<Vec<u8>> {
    Ok(fdt::create_fdt(&FdtConfig {
        vcpus: plan.vcpus,
        ram_size: plan.ram_size,
        cmdline,
        initrd,
        gic,
        serial: Some(plan.serial),
        gpio: Some((plan.gpio, pl061::POWER_LINE)),
        virtio: &plan.virtio,
    })?)
}

/// Guest RAM at [`DRAM_START`], backed by an anonymous mapping whose host
/// address is 16 KiB aligned, as `hv_vm_map` requires (on a Mac every mapping
/// is; on a 4 KiB-page host the slack around an aligned start is unmapped).
///
/// The mapping lives as long as the process: the framework allows one VM per
/// process, and device threads may hold the memory until the process exits.
pub fn guest_ram(size: u64) -> Result<GuestMemoryMmap> {
    let fail = |reason: String| Error::Memory { size, reason };
    let len = usize::try_from(size).map_err(|_| fail("too large for this host".into()))?;
    let align = HOST_PAGE_SIZE as usize;
    let total = len
        .checked_add(align)
        .ok_or_else(|| fail("too large for this host".into()))?;
    // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    let start = (base as usize).next_multiple_of(align);
    let head = start - base as usize;
    let tail = total - head - len;
    // SAFETY: both ranges lie inside the mapping just made and outside
    // `[start, start + len)`, which is kept.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: `[start, start + len)` is a live read-write mapping that nothing
    // else uses and that is never unmapped (see above).
    let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(start as *mut u8) }
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(DRAM_START))
        .ok_or_else(|| fail("the region overflows the guest address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| fail(e.to_string()))
}

/// Where the boot blobs went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boot {
    /// The kernel's entry point (the boot vCPU's PC).
    pub entry: u64,
    /// The device tree (the boot vCPU's x0).
    pub fdt_addr: u64,
    /// The initrd's address and size.
    pub initrd: Option<(u64, u64)>,
}

/// Copies the kernel, the initrd and the device tree into `mem`.
pub fn load(
    mem: &GuestMemoryMmap,
    plan: &Plan,
    cmdline: &str,
    kernel: &mut dyn Read,
    initrd: Option<&[u8]>,
    gic: GicLayout,
) -> Result<Boot> {
    let kernel = image::load_image(mem, plan.ram_size, kernel)?;
    let fdt_addr = image::fdt_address(plan.ram_size)?;
    let initrd = match initrd {
        Some(bytes) => {
            let size = bytes.len() as u64;
            let addr = image::initrd_address(&kernel, fdt_addr, size)?;
            mem.write_slice(bytes, GuestAddress(addr)).map_err(|e| {
                crate::arch::aarch64::Error::Memory(format!("writing the initrd: {e}"))
            })?;
            Some((addr, size))
        }
        None => None,
    };
    let blob = device_tree(plan, cmdline, initrd, gic)?;
    mem.write_slice(&blob, GuestAddress(fdt_addr))
        .map_err(|e| {
            crate::arch::aarch64::Error::Memory(format!("writing the device tree: {e}"))
        })?;
    Ok(Boot {
        entry: kernel.entry,
        fdt_addr,
        initrd,
    })
}

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// A built VM, ready to run.
pub struct HvfMachine<A: HvfApi> {
    vm: Arc<HvfVm<A>>,
    vcpus: Vec<HvfVcpu<A>>,
    bus: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    gpio: Arc<Mutex<Pl061>>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The layout.
    pub plan: Plan,
    /// Where the boot blobs are.
    pub boot: Boot,
    /// The framework GIC's layout.
    pub gic: GicLayout,
}

/// Everything [`HvfMachine::build`] needs besides the framework.
pub struct Parts<'a> {
    /// The shape and command line.
    pub config: &'a HvfConfig,
    /// The kernel `Image`.
    pub kernel: &'a mut dyn Read,
    /// The initrd.
    pub initrd: Option<&'a [u8]>,
    /// Where the guest's console output goes.
    pub console: Box<dyn Write + Send>,
    /// The virtio devices, with names for messages.
    pub virtio: Vec<(String, Box<dyn VirtioDevice>)>,
    /// When the process started (for the boot timer).
    pub started: Instant,
}

impl<A: HvfApi> HvfMachine<A> {
    /// Builds the VM on `hyp`.
    pub fn build(hyp: &HvfHypervisor<A>, parts: Parts<'_>) -> Result<Self> {
        let plan = Plan::new(parts.config, parts.virtio.len())?;
        let mem = guest_ram(plan.ram_size)?;
        let (ram_start, ram_end) = plan.ram();
        let vm = hyp.create_hvf_vm(plan.vcpus, ram_start, ram_end)?;
        for region in mem.iter() {
            // SAFETY: guest RAM is never unmapped (see `guest_ram`).
            unsafe { vm.map(region.start_addr().0, region.len(), region.as_ptr() as u64) }?;
        }
        let gic = vm.create_gic()?;
        let boot = load(
            &mem,
            &plan,
            &parts.config.cmdline,
            parts.kernel,
            parts.initrd,
            gic,
        )?;

        let mut bus = Bus::new();
        let serial = Arc::new(Mutex::new(Serial::new(
            vm.interrupt(plan.serial.spi),
            parts.console,
        )));
        bus.insert(serial.clone(), plan.serial.addr, plan.serial.size)
            .map_err(|e| device_err("serial", e))?;
        let gpio = Arc::new(Mutex::new(Pl061::new(vm.interrupt(plan.gpio.spi))));
        bus.insert(gpio.clone(), plan.gpio.addr, plan.gpio.size)
            .map_err(|e| device_err("gpio", e))?;
        bus.insert(
            Arc::new(Mutex::new(BootTimer::new(parts.started))),
            BOOT_TIMER_ADDR,
            BOOT_TIMER_SIZE,
        )
        .map_err(|e| device_err("boot-timer", e))?;
        for ((name, dev), place) in parts.virtio.into_iter().zip(&plan.virtio) {
            // Workers start from the vCPU thread that activates them: no device
            // filter to route them to here.
            let transport = MmioTransport::new(dev, mem.clone(), vm.interrupt(place.spi), Default::default())
                .map_err(|e| device_err(&name, e))?;
            bus.insert(Arc::new(Mutex::new(transport)), place.addr, place.size)
                .map_err(|e| device_err(&name, e))?;
        }

        let mut vcpus = Vec::new();
        for i in 0..plan.vcpus {
            let mut v = vm.vcpu(i)?;
            if i == 0 {
                v.set_boot_regs(boot_regs(boot.entry, boot.fdt_addr));
            }
            vcpus.push(v);
        }
        Ok(Self {
            vm: Arc::new(vm),
            vcpus,
            bus: Arc::new(bus),
            serial,
            gpio,
            mem,
            plan,
            boot,
            gic,
        })
    }

    /// The console UART, for feeding it host input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// The power button: the PL061's [`pl061::POWER_LINE`], which the device
    /// tree hands to `gpio-keys`.
    pub fn power_button(&self) -> Arc<GpioPowerButton> {
        Arc::new(GpioPowerButton {
            gpio: self.gpio.clone(),
            line: pl061::POWER_LINE,
            hold: POWER_BUTTON_HOLD,
        })
    }

    /// Runs every vCPU on its own thread until the guest powers off or resets,
    /// or a vCPU fails; then stops the others and waits for them.
    pub fn run(self) -> Result<VmExit> {
        let (tx, rx) = mpsc::channel::<Result<VmExit>>();
        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            let (bus, vm, tx) = (self.bus.clone(), self.vm.clone(), tx.clone());
            let index = vcpu.index();
            let t = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let Some(r) = run_vcpu(vcpu, &bus) {
                        vm.stop();
                        let _ = tx.send(r);
                    }
                })
                .map_err(|e| Error::Vcpu {
                    index,
                    reason: format!("cannot start its thread: {e}"),
                })?;
            threads.push(t);
        }
        drop(tx);
        // Every thread either reports or ends on a stop that a report caused.
        let first = rx.recv().unwrap_or_else(|_| {
            Err(Error::Vcpu {
                index: 0,
                reason: "every vCPU stopped without a reason".into(),
            })
        });
        self.vm.stop();
        for t in threads {
            let _ = t.join();
        }
        first
    }
}

/// How long a press holds the power button's line high: well past the 5 ms
/// `gpio-keys` waits (its debounce) before it reads the line.
pub const POWER_BUTTON_HOLD: std::time::Duration = std::time::Duration::from_millis(100);

/// The power button of an arm64 guest: a GPIO input line that a press raises
/// for [`POWER_BUTTON_HOLD`] and then lowers, so that every press is a
/// `KEY_POWER` press and release for the guest.
pub struct GpioPowerButton {
    gpio: Arc<Mutex<Pl061>>,
    line: u32,
    hold: std::time::Duration,
}

impl GpioPowerButton {
    fn set(&self, high: bool) -> std::io::Result<()> {
        self.gpio
            .lock()
            .map_err(|_| std::io::Error::other("the GPIO controller's lock is poisoned"))?
            .set_input(self.line, high)
    }
}

impl crate::machine::PowerButton for GpioPowerButton {
    /// Blocks the caller for the hold time (the lock is free meanwhile).
    fn press(&self) -> std::io::Result<()> {
        self.set(true)?;
        thread::sleep(self.hold);
        self.set(false)
    }
}

/// One vCPU's loop. `None` when it was stopped from outside.
fn run_vcpu<A: HvfApi>(mut vcpu: HvfVcpu<A>, bus: &Bus) -> Option<Result<VmExit>> {
    let index = vcpu.index();
    let fail = |reason: String| Some(Err(Error::Vcpu { index, reason }));
    loop {
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !bus.read(addr, data) {
                    log::debug!(
                        "vCPU {index}: read of {} bytes at {addr:#x}: no device",
                        data.len()
                    );
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !bus.write(addr, data) {
                    log::debug!(
                        "vCPU {index}: write of {} bytes at {addr:#x}: no device",
                        data.len()
                    );
                }
            }
            Ok(VcpuExit::PowerOff) => return Some(Ok(VmExit::PowerOff)),
            Ok(VcpuExit::Reset) => return Some(Ok(VmExit::Reset)),
            Ok(VcpuExit::Interrupted) => return None,
            Ok(VcpuExit::Failed(why)) => return fail(why),
            Ok(other) => return fail(format!("unhandled exit {other:?}")),
            Err(e) => return fail(e.to_string()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;
    use crate::arch::aarch64::fdt::tests::decompile;
    use crate::arch::aarch64::psci::func;
    use crate::hypervisor::hvf::esr::tests::dabt;
    use crate::hypervisor::hvf::esr::EC_HVC64;
    use crate::hypervisor::hvf::fake::{Call, FakeHvf, FIRST_HANDLE as H0};
    use crate::hypervisor::hvf::{ExitReason, Reg};

    fn cfg(vcpus: u32, memory: u64) -> HvfConfig {
        HvfConfig {
            vcpus,
            memory,
            cmdline: "console=ttyS0 quiet".into(),
        }
    }

    /// A minimal arm64 `Image`: the header and a little code.
    pub(crate) fn image() -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes());
        h[8..16].copy_from_slice(&0x8_0000u64.to_le_bytes()); // text_offset
        h[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // image_size
        h[24..32].copy_from_slice(&2u64.to_le_bytes()); // 4 KiB pages, little-endian
        h[56..60].copy_from_slice(&0x644d_5241u32.to_le_bytes()); // "ARM\x64"
        h
    }

    /// A console that keeps what the guest wrote.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub(crate) Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Scripts vCPU 0 of `fake`: write "A" to the UART, load a word from
    /// `read_addr` into x5, then PSCI SYSTEM_OFF.
    pub(crate) fn script_print_read_poweroff(fake: &FakeHvf, read_addr: u64) {
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(1, true, 3, false, false),
            SERIAL_ADDR,
            &[(Reg::X(3), u64::from(b'A'))],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(4, false, 5, false, false),
            read_addr,
            &[],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            u64::from(EC_HVC64) << 26,
            0,
            &[(Reg::X(0), u64::from(func::SYSTEM_OFF))],
        );
    }

    #[test]
    fn hvf_plan_places_devices_and_refuses_bad_shapes() {
        let p = Plan::new(&cfg(2, 256 << 20), 3).unwrap();
        assert_eq!(p.ram(), (DRAM_START, DRAM_START + (256 << 20)));
        assert_eq!(p.virtio.len(), 3);
        assert_eq!(
            p.virtio[2].addr,
            layout::VIRTIO_MMIO_START + 2 * VIRTIO_MMIO_SIZE
        );
        assert_eq!(p.virtio[2].spi, layout::VIRTIO_SPI_START + 2);
        assert_eq!(p.serial.spi, SERIAL_SPI);
        for (c, n, want) in [
            (cfg(0, 256 << 20), 0, "vCPUs"),
            (cfg(MAX_VCPUS + 1, 256 << 20), 0, "vCPUs"),
            (cfg(1, (256 << 20) + 4096), 0, "16 KiB"),
            (cfg(1, 1 << 20), 0, "at least"),
            (cfg(1, 64 << 30), 0, "36-bit"),
            (cfg(1, 256 << 20), 33, "room for 32"),
        ] {
            let e = Plan::new(&c, n).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        // The largest RAM that fits the IPA space is accepted.
        Plan::new(&cfg(1, IPA_LIMIT - DRAM_START), 0).unwrap();
    }

    #[test]
    fn hvf_guest_ram_is_16k_aligned_on_any_host() {
        for size in [MIN_RAM, 48 << 20] {
            let mem = guest_ram(size).unwrap();
            let r = mem.iter().next().unwrap();
            assert_eq!(r.start_addr().0, DRAM_START);
            assert_eq!(r.len(), size);
            assert_eq!(r.as_ptr() as u64 % HOST_PAGE_SIZE, 0);
            mem.write_obj(0xabu8, GuestAddress(DRAM_START + size - 1))
                .unwrap();
        }
    }

    #[test]
    fn hvf_device_tree_lists_the_configured_devices() {
        let plan = Plan::new(&cfg(2, 256 << 20), 2).unwrap();
        let gic = GicLayout {
            dist_base: layout::GIC_DIST_BASE,
            dist_size: layout::GIC_DIST_SIZE,
            redist_base: layout::GIC_REDIST_BASE,
            redist_size: layout::gic_redist_size(2),
        };
        let blob = device_tree(&plan, "console=ttyS0", Some((0x5000_0000, 0x1000)), gic).unwrap();
        let Some(dts) = decompile(&blob) else { return };
        assert!(dts.contains("virtio_mmio@a000000"), "{dts}");
        assert!(dts.contains("virtio_mmio@a001000"), "{dts}");
        assert!(!dts.contains("virtio_mmio@a002000"), "{dts}");
        assert!(dts.contains("bootargs = \"console=ttyS0\""), "{dts}");
        assert!(dts.contains("cpu@100"), "{dts}");
        assert!(dts.contains("ns16550a"), "{dts}");
        // The power button: the PL061's line wired to gpio-keys, by phandle.
        assert!(dts.contains("pl061@9020000"), "{dts}");
        let squashed: String = dts.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            squashed.contains(&format!(
                "label = \"Power Button\"; power {{ label = \"GPIO Key Power\"; linux,code = <0x74>; gpios = <0x03 {:#04x} 0x00>;",
                pl061::POWER_LINE
            )),
            "{dts}"
        );
    }

    #[test]
    fn hvf_machine_boots_writes_the_console_and_powers_off() {
        let fake = FakeHvf::new();
        let hyp = HvfHypervisor::new(fake.clone());
        let console = Captured::default();
        let initrd = vec![0x5a; 8192];
        let mut kernel = &image()[..];
        let machine = HvfMachine::build(
            &hyp,
            Parts {
                config: &cfg(2, 64 << 20),
                kernel: &mut kernel,
                initrd: Some(&initrd),
                console: Box::new(console.clone()),
                virtio: vec![(
                    "rng".into(),
                    Box::new(aivmm_devices::virtio::rng::Rng::new()),
                )],
                started: Instant::now(),
            },
        )
        .unwrap();
        // RAM is mapped once, 16 KiB aligned, read/write/execute.
        let maps = fake.maps();
        assert_eq!(maps.len(), 1);
        assert_eq!((maps[0].1, maps[0].2), (DRAM_START, 64 << 20));
        assert_eq!(maps[0].0 % HOST_PAGE_SIZE, 0);
        assert_eq!(
            fake.gic(),
            Some((machine.gic.dist_base, machine.gic.redist_base))
        );
        // The boot blobs are in RAM where the boot registers point.
        let b = machine.boot;
        assert_eq!(b.entry, DRAM_START + 0x8_0000);
        let (ia, is) = b.initrd.unwrap();
        assert_eq!(is, 8192);
        assert_eq!(machine.mem.read_obj::<u8>(GuestAddress(ia)).unwrap(), 0x5a);
        let magic: u32 = machine.mem.read_obj(GuestAddress(b.fdt_addr)).unwrap();
        assert_eq!(u32::from_be(magic), 0xd00d_feed, "a device tree at x0");

        // The guest: print "A", read the virtio magic, power off.
        script_print_read_poweroff(&fake, layout::VIRTIO_MMIO_START);
        let exit = machine.run().unwrap();
        assert!(matches!(exit, VmExit::PowerOff), "{exit:?}");
        assert_eq!(console.0.lock().unwrap().as_slice(), b"A");
        assert_eq!(
            fake.reg(H0, Reg::X(5)),
            0x7472_6976,
            "\"virt\" from the transport"
        );
        let pc = fake.calls_of(|c| matches!(c, Call::SetReg(H0, Reg::Pc, _)));
        assert_eq!(pc.first(), Some(&Call::SetReg(H0, Reg::Pc, b.entry)));
        let x0 = fake.calls_of(|c| matches!(c, Call::SetReg(H0, Reg::X(0), _)));
        assert_eq!(x0.first(), Some(&Call::SetReg(H0, Reg::X(0), b.fdt_addr)));
        // The second vCPU never got CPU_ON, so it was never created.
        assert_eq!(fake.calls_of(|c| matches!(c, Call::VcpuCreate(_))).len(), 1);
    }

    #[test]
    fn hvf_machine_reports_a_failing_vcpu() {
        let fake = FakeHvf::new();
        let hyp = HvfHypervisor::new(fake.clone());
        let mut kernel = &image()[..];
        let machine = HvfMachine::build(
            &hyp,
            Parts {
                config: &cfg(1, 64 << 20),
                kernel: &mut kernel,
                initrd: None,
                console: Box::new(std::io::sink()),
                virtio: Vec::new(),
                started: Instant::now(),
            },
        )
        .unwrap();
        // A data abort without a valid syndrome cannot be emulated.
        fake.push_exit(H0, ExitReason::Exception, 0x24 << 26, 0x0a00_0000, &[]);
        let e = machine.run().unwrap_err().to_string();
        assert!(e.starts_with("vCPU 0:"), "{e}");
    }
}
