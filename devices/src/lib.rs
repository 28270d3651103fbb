//! aivmm's devices. Nothing here knows which hypervisor runs the guest.
//!
//! A device sees three things: guest memory (`vm_memory::GuestMemoryMmap`), `EventFd`s
//! for notifications, and the [`Interrupt`] trait for raising its interrupt line. The
//! VMM places devices on a [`bus::Bus`] (one for port I/O, one for MMIO); a vCPU exit
//! becomes a [`bus::BusDevice::read`] or [`bus::BusDevice::write`] on the device that
//! owns the address.

pub mod bus;
pub mod host_file;
pub mod legacy;
pub mod sys;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod virtio;

use std::io;

/// How a device raises its interrupt line. On KVM this is an irqfd; on other
/// backends it is whatever injects a GSI.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt (an edge; the guest acknowledges through the device).
    fn trigger(&self) -> io::Result<()>;
}

/// An [`Interrupt`] that writes an `EventFd` (what a KVM irqfd listens on).
#[derive(Debug)]
pub struct EventFdInterrupt(pub sys::EventFd);

impl Interrupt for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Why the VMM should stop, as asked by a device (power-off, reset) or by an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot); aivmm ends the VM.
    Reset,
}
