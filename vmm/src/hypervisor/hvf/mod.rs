//! The Hypervisor.framework backend (macOS on Apple silicon), written against a
//! trait so that everything above the framework calls builds and is tested on
//! every host.
//!
//! The layers, bottom up:
//! - [`HvfApi`]: the framework calls aivmm makes, one method each, with Rust
//!   types. `darwin.rs` implements it with the real framework (`ffi.rs` holds the
//!   `extern "C"` declarations); both are `cfg(target_os = "macos")` and small.
//!   Tests implement it with a fake that scripts exits and records calls.
//! - [`HvfVm`]: one per process (the framework allows one VM). It maps memory
//!   with `hv_vm_map`, creates the framework's GICv3 (`hv_gic_create`, macOS 15)
//!   and hands out [`HvfVcpu`]s and [`GicInterrupt`]s.
//! - [`HvfVcpu`]: a framework vCPU belongs to the thread that created it, so it is
//!   created on its first [`HvfVcpu::run`], on the vCPU's own thread. `run`
//!   decodes each exit's syndrome ([`esr`]): data aborts become the same
//!   `MmioRead`/`MmioWrite` exits KVM gives (the load's register is written, sign-
//!   or zero-extended, before the next entry); HVC and SMC go to PSCI
//!   ([`crate::arch::aarch64::psci`]); WFI sleeps until an interrupt, a kick or
//!   the virtual timer's deadline, at most [`irq::DEFAULT_WFI_CAP`];
//!   VTIMER_ACTIVATED makes the timer PPI pending in the GIC ([`irq`]).
//! - The crate's `Vm` and `Vcpu` traits are implemented on arm64 hosts only (on
//!   x86_64 `Vcpu` also demands the x86 register interface);
//!   `macos/check-hvf-on-linux.sh` type-checks them, and the macOS files, here.
//! - The macOS stand-ins for `EventFd` and epoll (a pipe notifier and an epoll
//!   emulation over kqueue) live in the devices crate, `aivmm_devices::sys`,
//!   since the devices are what use them.
//!
//! Interrupts: a device's [`aivmm_devices::Interrupt`] is a [`GicInterrupt`],
//! which raises an edge on its SPI with `hv_gic_set_spi` and wakes vCPUs idling
//! in WFI. There is no irqfd and no ioeventfd: the virtio-mmio transport signals
//! queue notifications itself.

pub mod esr;
pub mod irq;
pub mod vcpu;

#[cfg(target_os = "macos")]
mod darwin;
#[cfg(test)]
pub(crate) mod fake;
#[cfg(target_os = "macos")]
mod ffi;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[cfg(target_os = "macos")]
pub use darwin::Framework;
pub use irq::GicInterrupt;
pub use vcpu::HvfVcpu;

use crate::arch::aarch64::fdt::GicLayout;
use crate::arch::aarch64::layout::{
    GIC_DIST_BASE, GIC_DIST_SIZE, GIC_REDIST_BASE, GIC_REDIST_END, MAX_VCPUS, SPI_BASE,
    VIRTIO_MMIO_MAX, VIRTIO_SPI_START,
};
use irq::VmShared;

/// Errors of the HVF backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A framework call failed.
    #[error("{op} failed: {code}")]
    Hv {
        /// The call.
        op: &'static str,
        /// What it returned.
        code: HvReturn,
    },
    /// An exception syndrome aivmm cannot emulate.
    #[error("{0}")]
    Syndrome(String),
    /// The framework's GIC does not fit aivmm's guest layout.
    #[error("the Hypervisor.framework GIC does not fit the guest layout: {0}")]
    GicLayout(String),
    /// A request the backend refuses.
    #[error("{0}")]
    Invalid(String),
}

/// `Result` of the HVF backend.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for super::Error {
    fn from(e: Error) -> Self {
        let op = match &e {
            Error::Hv { op, .. } => op,
            _ => "Hypervisor.framework",
        };
        super::Error::call(op, std::io::Error::other(e.to_string()))
    }
}

/// An `hv_return_t`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HvReturn(pub u32);

impl HvReturn {
    /// HV_ERROR.
    pub const ERROR: Self = Self(0xfae9_4001);
    /// HV_BUSY.
    pub const BUSY: Self = Self(0xfae9_4002);
    /// HV_BAD_ARGUMENT.
    pub const BAD_ARGUMENT: Self = Self(0xfae9_4003);
    /// HV_ILLEGAL_GUEST_STATE.
    pub const ILLEGAL_GUEST_STATE: Self = Self(0xfae9_4004);
    /// HV_NO_RESOURCES.
    pub const NO_RESOURCES: Self = Self(0xfae9_4005);
    /// HV_NO_DEVICE.
    pub const NO_DEVICE: Self = Self(0xfae9_4006);
    /// HV_DENIED.
    pub const DENIED: Self = Self(0xfae9_4007);
    /// HV_UNSUPPORTED.
    pub const UNSUPPORTED: Self = Self(0xfae9_400f);
}

impl fmt::Display for HvReturn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Self::ERROR => "HV_ERROR",
            Self::BUSY => "HV_BUSY",
            Self::BAD_ARGUMENT => "HV_BAD_ARGUMENT",
            Self::ILLEGAL_GUEST_STATE => "HV_ILLEGAL_GUEST_STATE",
            Self::NO_RESOURCES => "HV_NO_RESOURCES",
            Self::NO_DEVICE => "HV_NO_DEVICE",
            Self::DENIED => {
                return f.write_str(
                    "HV_DENIED (is the binary signed with the com.apple.security.hypervisor entitlement? see docs/macos.md)",
                )
            }
            Self::UNSUPPORTED => "HV_UNSUPPORTED",
            _ => return write!(f, "hv_return_t {:#x}", self.0),
        };
        f.write_str(name)
    }
}

impl fmt::Debug for HvReturn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `Result` of one framework call.
pub type HvResult<T> = std::result::Result<T, HvReturn>;

/// Attaches the call's name to a framework error.
pub(crate) fn hv<T>(op: &'static str, r: HvResult<T>) -> Result<T> {
    r.map_err(|code| Error::Hv { op, code })
}

/// An `hv_vcpu_t`.
pub type HvVcpu = u64;

/// `hv_exit_reason_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// HV_EXIT_REASON_CANCELED: `hv_vcpus_exit` asked for it.
    Canceled,
    /// HV_EXIT_REASON_EXCEPTION: a synchronous exception; see the syndrome.
    Exception,
    /// HV_EXIT_REASON_VTIMER_ACTIVATED: the virtual timer fired (and is now masked).
    VtimerActivated,
    /// HV_EXIT_REASON_UNKNOWN or a value aivmm does not know.
    Unknown(u32),
}

impl ExitReason {
    /// From the raw `hv_exit_reason_t`.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Self::Canceled,
            1 => Self::Exception,
            2 => Self::VtimerActivated,
            other => Self::Unknown(other),
        }
    }
}

/// `hv_vcpu_exit_t`, copied out after `hv_vcpu_run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// Why.
    pub reason: ExitReason,
    /// ESR_EL2 of an exception.
    pub syndrome: u64,
    /// FAR (guest virtual address) of an abort.
    pub virtual_address: u64,
    /// The faulting IPA (guest physical address) of an abort.
    pub physical_address: u64,
}

/// `hv_reg_t`: the general registers, PC, FPCR, FPSR and CPSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reg {
    /// X0..X30.
    X(u8),
    /// Program counter.
    Pc,
    /// Floating-point control.
    Fpcr,
    /// Floating-point status.
    Fpsr,
    /// PSTATE.
    Cpsr,
}

impl Reg {
    /// The `hv_reg_t` value: HV_REG_X0 = 0 .. HV_REG_X30 = 30, PC = 31, FPCR,
    /// FPSR, CPSR = 32, 33, 34.
    pub fn raw(self) -> u32 {
        match self {
            Reg::X(n) => u32::from(n.min(30)),
            Reg::Pc => 31,
            Reg::Fpcr => 32,
            Reg::Fpsr => 33,
            Reg::Cpsr => 34,
        }
    }
}

/// `hv_sys_reg_t` values (from `<Hypervisor/hv_vcpu_types.h>`; the encoding
/// op0:op1:CRn:CRm:op2).
pub mod sys_reg {
    /// MPIDR_EL1.
    pub const MPIDR_EL1: u16 = 0xc005;
    /// SCTLR_EL1.
    pub const SCTLR_EL1: u16 = 0xc080;
    /// CNTV_CTL_EL0.
    pub const CNTV_CTL_EL0: u16 = 0xdf19;
    /// CNTV_CVAL_EL0.
    pub const CNTV_CVAL_EL0: u16 = 0xdf1a;
}

/// `hv_memory_flags_t` bits.
pub mod mem_flags {
    /// HV_MEMORY_READ.
    pub const READ: u64 = 1 << 0;
    /// HV_MEMORY_WRITE.
    pub const WRITE: u64 = 1 << 1;
    /// HV_MEMORY_EXEC.
    pub const EXEC: u64 = 1 << 2;
}

/// The redistributor register GICR_ISPENDR0 (the SGI frame's set-pending
/// register for INTIDs 0..31); the framework's enum values are the offsets.
pub const GICR_ISPENDR0: u32 = 0x1_0200;

/// Page size of stage-2 mappings on Apple silicon.
pub const HOST_PAGE_SIZE: u64 = 0x4000;

/// What the framework says about its GIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicParams {
    /// `hv_gic_get_distributor_size`.
    pub dist_size: u64,
    /// `hv_gic_get_distributor_base_alignment`.
    pub dist_align: u64,
    /// `hv_gic_get_redistributor_region_size`: all redistributors.
    pub redist_region_size: u64,
    /// `hv_gic_get_redistributor_size`: one vCPU's.
    pub redist_size: u64,
    /// `hv_gic_get_redistributor_base_alignment`.
    pub redist_align: u64,
    /// `hv_gic_get_spi_interrupt_range`: first SPI INTID and count.
    pub spi_range: (u32, u32),
}

/// The Hypervisor.framework calls aivmm makes. vCPU methods must be called on
/// the thread that created the vCPU, except [`HvfApi::vcpus_exit`].
pub trait HvfApi: Send + Sync + 'static {
    /// `hv_vm_create(NULL)`.
    fn vm_create(&self) -> HvResult<()>;
    /// `hv_vm_destroy()`.
    fn vm_destroy(&self) -> HvResult<()>;
    /// `hv_vm_map(host, ipa, size, flags)`.
    ///
    /// # Safety
    /// `host..host+size` must stay mapped, readable and writable while mapped.
    unsafe fn vm_map(&self, host: *mut u8, ipa: u64, size: usize, flags: u64) -> HvResult<()>;
    /// The GIC's sizes, alignments and SPI range.
    fn gic_params(&self) -> HvResult<GicParams>;
    /// `hv_gic_config_create` + bases + `hv_gic_create` (before any vCPU exists).
    fn gic_create(&self, dist_base: u64, redist_base: u64) -> HvResult<()>;
    /// `hv_gic_set_spi(intid, level)`.
    fn gic_set_spi(&self, intid: u32, level: bool) -> HvResult<()>;
    /// `hv_gic_set_redistributor_reg(vcpu, reg, value)`.
    fn gic_set_redistributor_reg(&self, vcpu: HvVcpu, reg: u32, value: u64) -> HvResult<()>;
    /// `hv_vcpu_create` on the calling thread.
    fn vcpu_create(&self) -> HvResult<HvVcpu>;
    /// `hv_vcpu_destroy`.
    fn vcpu_destroy(&self, vcpu: HvVcpu) -> HvResult<()>;
    /// `hv_vcpu_run`, then the exit information.
    fn vcpu_run(&self, vcpu: HvVcpu) -> HvResult<ExitInfo>;
    /// `hv_vcpu_get_reg`.
    fn vcpu_get_reg(&self, vcpu: HvVcpu, reg: Reg) -> HvResult<u64>;
    /// `hv_vcpu_set_reg`.
    fn vcpu_set_reg(&self, vcpu: HvVcpu, reg: Reg, value: u64) -> HvResult<()>;
    /// `hv_vcpu_get_sys_reg`.
    fn vcpu_get_sys_reg(&self, vcpu: HvVcpu, reg: u16) -> HvResult<u64>;
    /// `hv_vcpu_set_sys_reg`.
    fn vcpu_set_sys_reg(&self, vcpu: HvVcpu, reg: u16, value: u64) -> HvResult<()>;
    /// `hv_vcpu_set_vtimer_mask`.
    fn vcpu_set_vtimer_mask(&self, vcpu: HvVcpu, masked: bool) -> HvResult<()>;
    /// `hv_vcpu_get_vtimer_offset`.
    fn vcpu_get_vtimer_offset(&self, vcpu: HvVcpu) -> HvResult<u64>;
    /// `hv_vcpus_exit`: makes running vCPUs return CANCELED (any thread).
    fn vcpus_exit(&self, vcpus: &[HvVcpu]) -> HvResult<()>;
    /// The host counter the virtual counter derives from (`mach_absolute_time`):
    /// CNTVCT = counter - vtimer offset.
    fn counter(&self) -> u64;
    /// Ticks per second of [`HvfApi::counter`].
    fn counter_frequency(&self) -> u64;
}

/// Checks the framework's GIC against aivmm's layout for `vcpus` vCPUs.
pub fn gic_layout(params: &GicParams, vcpus: u32) -> Result<GicLayout> {
    let bad = |m: String| Err(Error::GicLayout(m));
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::Invalid(format!(
            "{vcpus} vCPUs requested; aivmm supports 1 to {MAX_VCPUS}"
        )));
    }
    if params.dist_size > GIC_DIST_SIZE || params.dist_size == 0 {
        return bad(format!(
            "distributor size {:#x}, room for {GIC_DIST_SIZE:#x}",
            params.dist_size
        ));
    }
    if params.dist_align == 0 || GIC_DIST_BASE % params.dist_align != 0 {
        return bad(format!("distributor alignment {:#x}", params.dist_align));
    }
    if params.redist_align == 0 || GIC_REDIST_BASE % params.redist_align != 0 {
        return bad(format!(
            "redistributor alignment {:#x}",
            params.redist_align
        ));
    }
    if GIC_REDIST_BASE + params.redist_region_size > GIC_REDIST_END {
        return bad(format!(
            "redistributor region {:#x} bytes, room for {:#x}",
            params.redist_region_size,
            GIC_REDIST_END - GIC_REDIST_BASE
        ));
    }
    let per_cpu = params.redist_size.max(1);
    if u64::from(vcpus) * per_cpu > params.redist_region_size {
        return bad(format!(
            "{vcpus} redistributors of {per_cpu:#x} bytes exceed the region"
        ));
    }
    let (first, count) = params.spi_range;
    if first > SPI_BASE || first + count < SPI_BASE + VIRTIO_SPI_START + VIRTIO_MMIO_MAX {
        return bad(format!(
            "SPI INTIDs {first}..{} do not cover aivmm's",
            first + count
        ));
    }
    Ok(GicLayout {
        dist_base: GIC_DIST_BASE,
        dist_size: params.dist_size,
        redist_base: GIC_REDIST_BASE,
        redist_size: u64::from(vcpus) * per_cpu,
    })
}

/// The Hypervisor.framework "hypervisor": makes the process's one VM.
pub struct HvfHypervisor<A: HvfApi> {
    api: Arc<A>,
    made: AtomicBool,
}

impl<A: HvfApi> HvfHypervisor<A> {
    /// Wraps the framework calls.
    pub fn new(api: A) -> Self {
        Self {
            api: Arc::new(api),
            made: AtomicBool::new(false),
        }
    }

    /// Creates the VM for `vcpus` vCPUs with RAM at `[ram_start, ram_end)` (for
    /// PSCI's CPU_ON checks).
    pub fn create_hvf_vm(&self, vcpus: u32, ram_start: u64, ram_end: u64) -> Result<HvfVm<A>> {
        if self.made.swap(true, Ordering::SeqCst) {
            return Err(Error::Invalid(
                "Hypervisor.framework allows one VM per process".into(),
            ));
        }
        if let Err(code) = self.api.vm_create() {
            self.made.store(false, Ordering::SeqCst);
            return Err(Error::Hv {
                op: "hv_vm_create",
                code,
            });
        }
        Ok(HvfVm {
            shared: Arc::new(VmShared::new(
                self.api.clone(),
                vcpus as usize,
                ram_start,
                ram_end,
            )),
            vcpus,
            gic: std::sync::OnceLock::new(),
        })
    }
}

/// The process's VM.
pub struct HvfVm<A: HvfApi> {
    shared: Arc<VmShared<A>>,
    vcpus: u32,
    gic: std::sync::OnceLock<GicLayout>,
}

impl<A: HvfApi> HvfVm<A> {
    /// Maps guest RAM. Addresses and size must be 16 KiB aligned.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped, readable and writable for
    /// the life of the VM.
    pub unsafe fn map(&self, guest_addr: u64, size: u64, host_addr: u64) -> Result<()> {
        for (what, v) in [
            ("guest address", guest_addr),
            ("size", size),
            ("host address", host_addr),
        ] {
            if v % HOST_PAGE_SIZE != 0 {
                return Err(Error::Invalid(format!(
                    "memory {what} {v:#x} is not 16 KiB aligned, as Hypervisor.framework requires"
                )));
            }
        }
        let size = usize::try_from(size).map_err(|_| Error::Invalid(format!("size {size:#x}")))?;
        let flags = mem_flags::READ | mem_flags::WRITE | mem_flags::EXEC;
        // SAFETY: the caller keeps the host range mapped for the VM's life.
        hv("hv_vm_map", unsafe {
            self.shared
                .api
                .vm_map(host_addr as *mut u8, guest_addr, size, flags)
        })
    }

    /// Creates the framework's GICv3; call once, before any vCPU runs.
    pub fn create_gic(&self) -> Result<GicLayout> {
        if let Some(g) = self.gic.get() {
            return Ok(*g);
        }
        let params = hv("hv_gic_get_*", self.shared.api.gic_params())?;
        let layout = gic_layout(&params, self.vcpus)?;
        hv(
            "hv_gic_create",
            self.shared
                .api
                .gic_create(layout.dist_base, layout.redist_base),
        )?;
        self.shared.gic_ready.store(true, Ordering::SeqCst);
        Ok(*self.gic.get_or_init(|| layout))
    }

    /// vCPU `index` (created on the framework when it first runs, on its thread).
    pub fn vcpu(&self, index: u32) -> Result<HvfVcpu<A>> {
        if index >= self.vcpus {
            return Err(Error::Invalid(format!("vCPU {index} of {}", self.vcpus)));
        }
        Ok(HvfVcpu::new(self.shared.clone(), index))
    }

    /// The interrupt for SPI number `spi` (INTID `32 + spi`), for a device.
    pub fn interrupt(&self, spi: u32) -> Arc<GicInterrupt<A>> {
        Arc::new(GicInterrupt::new(self.shared.clone(), SPI_BASE + spi))
    }

    /// Sets the longest one WFI sleeps (default [`irq::DEFAULT_WFI_CAP`]).
    pub fn set_wfi_cap(&self, cap: std::time::Duration) {
        *self
            .shared
            .wfi_cap
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = cap;
    }

    /// Makes every vCPU leave the guest and return `Interrupted` from now on.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

impl<A: HvfApi> Drop for HvfVm<A> {
    fn drop(&mut self) {
        if let Err(code) = self.shared.api.vm_destroy() {
            log::debug!("hv_vm_destroy: {code}");
        }
    }
}

// The crate's hypervisor traits, on arm64 hosts only: on x86_64 the `Vcpu` trait
// also asks for the x86 register interface, which this backend does not have.
#[cfg(target_arch = "aarch64")]
mod traits {
    use super::*;
    #[cfg(target_os = "linux")]
    use crate::hypervisor::IoEventAddress;
    use crate::hypervisor::{Hypervisor, Vcpu, VcpuExit, Vm, VmShape};
    #[cfg(target_os = "linux")]
    use vmm_sys_util::eventfd::EventFd;

    impl<A: HvfApi> Hypervisor for HvfHypervisor<A> {
        fn create_vm(&self) -> super::super::Result<Box<dyn Vm>> {
            Err(Error::Invalid(
                "Hypervisor.framework needs the vCPU count up front; use create_vm_for".into(),
            )
            .into())
        }

        fn create_vm_for(&self, shape: &VmShape) -> super::super::Result<Box<dyn Vm>> {
            let vm = self.create_hvf_vm(shape.vcpus, shape.ram.0, shape.ram.1)?;
            Ok(Box::new(vm))
        }
    }

    impl<A: HvfApi> Vm for HvfVm<A> {
        unsafe fn map_memory(
            &self,
            _slot: u32,
            guest_addr: u64,
            size: u64,
            host_addr: u64,
        ) -> super::super::Result<()> {
            // SAFETY: the trait's caller gives the same guarantee `map` needs.
            Ok(unsafe { self.map(guest_addr, size, host_addr) }?)
        }
        fn create_irq_controller(&self) -> super::super::Result<()> {
            self.create_gic().map(|_| ()).map_err(Into::into)
        }
        fn interrupt(&self, line: u32) -> super::super::Result<Arc<dyn aivmm_devices::Interrupt>> {
            Ok(HvfVm::interrupt(self, line))
        }
        #[cfg(target_os = "linux")]
        fn register_irqfd(&self, _evt: &EventFd, _gsi: u32) -> super::super::Result<()> {
            Err(Error::Invalid("HVF has no irqfd; use HvfVm::interrupt".into()).into())
        }
        #[cfg(target_os = "linux")]
        fn register_ioevent(
            &self,
            _evt: &EventFd,
            _addr: IoEventAddress,
            _m: Option<u32>,
        ) -> super::super::Result<()> {
            Err(
                Error::Invalid("HVF has no ioeventfd; the transport signals notifications".into())
                    .into(),
            )
        }
        fn create_vcpu(&self, id: u32) -> super::super::Result<Box<dyn Vcpu>> {
            Ok(Box::new(self.vcpu(id)?))
        }
    }

    impl<A: HvfApi> Vcpu for HvfVcpu<A> {
        fn run(&mut self) -> super::super::Result<VcpuExit<'_>> {
            self.run().map_err(Into::into)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::fake::FakeHvf;
    use super::*;

    use super::fake::gic_params as params;

    #[test]
    fn hv_return_codes_have_names_and_denied_has_advice() {
        assert_eq!(HvReturn::BAD_ARGUMENT.to_string(), "HV_BAD_ARGUMENT");
        assert!(HvReturn::DENIED
            .to_string()
            .contains("com.apple.security.hypervisor"));
        assert_eq!(HvReturn(0x1234).to_string(), "hv_return_t 0x1234");
        let e = hv::<()>("hv_vm_create", Err(HvReturn::BUSY)).unwrap_err();
        assert_eq!(e.to_string(), "hv_vm_create failed: HV_BUSY");
        let top: crate::hypervisor::Error = e.into();
        assert!(top.to_string().starts_with("hv_vm_create failed"), "{top}");
    }

    #[test]
    fn exit_reasons_and_registers_match_the_headers() {
        assert_eq!(ExitReason::from_raw(0), ExitReason::Canceled);
        assert_eq!(ExitReason::from_raw(1), ExitReason::Exception);
        assert_eq!(ExitReason::from_raw(2), ExitReason::VtimerActivated);
        assert_eq!(ExitReason::from_raw(3), ExitReason::Unknown(3));
        assert_eq!(Reg::X(0).raw(), 0);
        assert_eq!(Reg::X(30).raw(), 30);
        assert_eq!(Reg::Pc.raw(), 31);
        assert_eq!(Reg::Cpsr.raw(), 34);
    }

    #[test]
    fn gic_layout_fits_or_says_why() {
        let g = gic_layout(&params(), 4).unwrap();
        assert_eq!(
            (g.dist_base, g.redist_base, g.redist_size),
            (GIC_DIST_BASE, GIC_REDIST_BASE, 4 * 0x2_0000)
        );
        let mut p = params();
        p.redist_region_size = 0x100_0000;
        assert!(gic_layout(&p, 4)
            .unwrap_err()
            .to_string()
            .contains("redistributor region"));
        let mut p = params();
        p.dist_align = 0x1000_0000;
        assert!(gic_layout(&p, 4)
            .unwrap_err()
            .to_string()
            .contains("distributor alignment"));
        let mut p = params();
        p.spi_range = (32, 8);
        assert!(gic_layout(&p, 4).unwrap_err().to_string().contains("SPI"));
        assert!(gic_layout(&params(), 0).is_err());
        assert!(gic_layout(&params(), 4 * 0x2_0000).is_err());
    }

    #[test]
    fn one_vm_per_process_and_aligned_maps() {
        let fake = FakeHvf::new();
        let hyp = HvfHypervisor::new(fake.clone());
        let vm = hyp.create_hvf_vm(2, 0x4000_0000, 0x8000_0000).unwrap();
        assert!(hyp
            .create_hvf_vm(1, 0, 1)
            .err()
            .unwrap()
            .to_string()
            .contains("one VM"));
        // SAFETY: the fake records the call and never touches the address.
        let err = unsafe { vm.map(0x4000_0000, 0x1000, 0x10_0000) }.unwrap_err();
        assert!(err.to_string().contains("16 KiB"), "{err}");
        // SAFETY: as above.
        unsafe { vm.map(0x4000_0000, 0x10_0000, 0x7000_0000) }.unwrap();
        assert_eq!(fake.maps(), vec![(0x7000_0000, 0x4000_0000, 0x10_0000, 7)]);
        let g = vm.create_gic().unwrap();
        assert_eq!(fake.gic(), Some((g.dist_base, g.redist_base)));
        // A second call returns the same layout without a second hv_gic_create.
        assert_eq!(vm.create_gic().unwrap(), g);
        assert!(vm.vcpu(2).is_err());
        drop(vm);
        assert!(fake.destroyed());
    }

    /// The repository's macOS signing setup: the entitlement, cargo's runner for
    /// both macOS targets, and the runner itself, driven here with a stand-in
    /// `codesign` on PATH.
    #[test]
    fn macos_runner_signs_with_the_entitlement_then_runs() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let plist = std::fs::read_to_string(root.join("macos/aivmm.entitlements")).unwrap();
        let squashed: String = plist.split_whitespace().collect();
        assert!(
            squashed.contains("<key>com.apple.security.hypervisor</key><true/>"),
            "{plist}"
        );
        let config: toml::Table = std::fs::read_to_string(root.join(".cargo/config.toml"))
            .unwrap()
            .parse()
            .unwrap();
        for triple in ["aarch64-apple-darwin", "x86_64-apple-darwin"] {
            assert_eq!(
                config["target"][triple]["runner"].as_str(),
                Some("macos/codesign-run.sh"),
                "{triple}"
            );
        }
        let runner = root.join("macos/codesign-run.sh");
        assert!(
            std::fs::metadata(&runner).unwrap().permissions().mode() & 0o111 != 0,
            "runner is executable"
        );

        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("codesign.log");
        let fake = dir.path().join("codesign");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n[ -z \"$FAIL\" ]\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.path().join("test-binary");
        std::fs::write(&bin, "#!/bin/sh\necho ran \"$@\"\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = std::process::Command::new(&runner)
            .arg(&bin)
            .args(["--exact", "x"])
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ran --exact x\n");
        let signed = std::fs::read_to_string(&log).unwrap();
        let want = format!(
            "--force --sign - --entitlements {} {}",
            root.join("macos/aivmm.entitlements").display(),
            bin.display()
        );
        assert_eq!(signed.trim(), want);
        // A failed signature stops the run with one clear line.
        let out = std::process::Command::new(&runner)
            .arg(&bin)
            .env("PATH", &path)
            .env("FAIL", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(out.stdout.is_empty());
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("aivmm: error: codesign of"),
            "{out:?}"
        );
    }

    #[test]
    fn failed_vm_create_reports_the_code_and_can_be_retried() {
        let fake = FakeHvf::new();
        fake.fail_next("vm_create", HvReturn::DENIED);
        let hyp = HvfHypervisor::new(fake.clone());
        let err = hyp.create_hvf_vm(1, 0, 1).err().unwrap().to_string();
        assert!(err.contains("hv_vm_create failed: HV_DENIED"), "{err}");
        assert!(hyp.create_hvf_vm(1, 0, 1).is_ok());
    }
}
