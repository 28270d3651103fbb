//! The hypervisor boundary: the only place aivmm talks to KVM (or, later,
//! Hypervisor.framework).
//!
//! [`Hypervisor`] makes a [`Vm`]; a `Vm` maps guest memory, wires interrupts and
//! notifications, and makes [`Vcpu`]s; a `Vcpu` runs until it exits with a
//! [`VcpuExit`]. The register types are aivmm's own, so a backend converts at the
//! edge and nothing above this module names a backend's types.
//!
//! Device interrupts go through [`Vm::interrupt`], which hands a device an
//! [`Interrupt`] for its line: on KVM an `EventFd` registered as an irqfd (the
//! provided method), on Hypervisor.framework a direct `hv_gic_set_spi`. The
//! `EventFd` methods (`register_irqfd`, `register_ioevent`) exist on Linux only,
//! so the trait also builds on macOS. [`Hypervisor::create_vm_for`] passes the
//! VM's [`VmShape`] to backends that must know it up front (HVF's PSCI checks
//! CPU_ON targets and entry points against it).

// HVF: everything above the framework calls compiles (and is tested) on every
// host; only its FFI files are macOS-only.
pub mod hvf;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

use std::io;
use std::sync::Arc;

use aivmm_devices::Interrupt;
#[cfg(target_os = "linux")]
use vmm_sys_util::eventfd::EventFd;

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hypervisor device could not be opened.
    #[error("cannot open {path}: {source}{hint}")]
    Open {
        /// The device path.
        path: String,
        /// Why.
        source: io::Error,
        /// Advice for the user.
        hint: &'static str,
    },
    /// The hypervisor's API version is not one aivmm supports.
    #[error("unsupported hypervisor API version {0}")]
    ApiVersion(i32),
    /// A hypervisor call failed.
    #[error("{op} failed: {source}")]
    Call {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// `Result` of hypervisor operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn call(op: &'static str, source: impl Into<io::Error>) -> Self {
        Error::Call {
            op,
            source: source.into(),
        }
    }
}

/// An address that a notification `EventFd` can be tied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A port I/O address.
    Pio(u64),
    /// An MMIO address.
    Mmio(u64),
}

/// What a VM is made for: the backends that size things at creation read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmShape {
    /// vCPUs the VM will have.
    pub vcpus: u32,
    /// Guest RAM, `[start, end)`.
    pub ram: (u64, u64),
}

/// A hypervisor: the factory of VMs.
pub trait Hypervisor: Send + Sync {
    /// Creates a VM with no memory and no vCPUs.
    fn create_vm(&self) -> Result<Box<dyn Vm>>;
    /// Creates a VM for `shape`. KVM needs no shape, so by default this is
    /// [`Hypervisor::create_vm`].
    fn create_vm_for(&self, shape: &VmShape) -> Result<Box<dyn Vm>> {
        let _ = shape;
        self.create_vm()
    }
    /// CPUID entries the hypervisor can expose to a guest.
    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> Result<Vec<x86_64::CpuIdEntry>>;
}

/// A VM: guest memory, interrupt wiring and vCPUs.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped, readable and writable for the
    /// life of the VM.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Creates the platform's interrupt controllers (on x86: PIC, IOAPIC, LAPICs, PIT).
    fn create_irq_controller(&self) -> Result<()>;
    /// The interrupt a device raises on `line` (an x86 GSI; on arm64 an SPI
    /// number, INTID `32 + line`). On Linux this is an irqfd by default.
    #[cfg(target_os = "linux")]
    fn interrupt(&self, line: u32) -> Result<Arc<dyn Interrupt>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::call("eventfd", e))?;
        self.register_irqfd(&evt, line)?;
        Ok(Arc::new(aivmm_devices::EventFdInterrupt(evt)))
    }
    /// The interrupt a device raises on `line` (an SPI number on arm64).
    #[cfg(not(target_os = "linux"))]
    fn interrupt(&self, line: u32) -> Result<Arc<dyn Interrupt>>;
    /// Makes every write to `evt` raise `gsi`.
    #[cfg(target_os = "linux")]
    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()>;
    /// Makes guest writes at `addr` (with value `datamatch`, if given) signal `evt`
    /// without a vCPU exit.
    #[cfg(target_os = "linux")]
    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
}

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// The guest wrote `data` to I/O `port`.
    IoOut(u16, &'a [u8]),
    /// The guest reads I/O `port`; fill `data` before the next run.
    IoIn(u16, &'a mut [u8]),
    /// The guest reads MMIO `addr`; fill `data` before the next run.
    MmioRead(u64, &'a mut [u8]),
    /// The guest wrote `data` to MMIO `addr`.
    MmioWrite(u64, &'a [u8]),
    /// The guest halted with no interrupt controller to wake it.
    Hlt,
    /// The guest triple-faulted or otherwise reset itself.
    Shutdown,
    /// The guest asked the platform to power off.
    PowerOff,
    /// The guest asked the platform to reset.
    Reset,
    /// The run was interrupted by a signal; run again or stop.
    Interrupted,
    /// The hypervisor could not run or emulate the guest.
    Failed(String),
    /// An exit aivmm does not handle.
    Unhandled(String),
}

/// A virtual CPU. Each runs on its own thread.
pub trait Vcpu: Send {
    /// Runs guest code until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// The x86 register interface.
    #[cfg(target_arch = "x86_64")]
    fn x86(&self) -> &dyn x86_64::X86Vcpu;
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use super::*;

    /// A VM that records the irqfds it is given.
    #[derive(Default)]
    struct RecordingVm(Mutex<Vec<(EventFd, u32)>>);

    impl Vm for RecordingVm {
        unsafe fn map_memory(&self, _: u32, _: u64, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        fn create_irq_controller(&self) -> Result<()> {
            Ok(())
        }
        fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
            let dup = evt.try_clone().map_err(|e| Error::call("dup", e))?;
            self.0.lock().unwrap().push((dup, gsi));
            Ok(())
        }
        fn register_ioevent(&self, _: &EventFd, _: IoEventAddress, _: Option<u32>) -> Result<()> {
            Ok(())
        }
        fn create_vcpu(&self, _: u32) -> Result<Box<dyn Vcpu>> {
            Err(Error::call("create_vcpu", io::Error::other("none here")))
        }
    }

    #[test]
    fn default_interrupt_is_an_irqfd_on_the_line() {
        let vm = RecordingVm::default();
        let irq = vm.interrupt(7).unwrap();
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        let regs = vm.0.lock().unwrap();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].1, 7);
        assert_eq!(
            regs[0].0.read().unwrap(),
            2,
            "each trigger is one eventfd write"
        );
    }
}
