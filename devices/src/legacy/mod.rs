//! Legacy devices on the port I/O and MMIO buses: the 16550 serial console, the
//! i8042 (only its reset line), the ACPI power-management block, the ACPI
//! Generic Event Device (the power button), the PL061 GPIO (the power button of
//! an arm64 guest), and the boot timer the guest writes to mark the end of boot.
//!
//! Devices that end the VM (reset, power-off) call an [`ExitHandler`] given by the
//! VMM; they never stop anything themselves.

pub mod acpi_pm;
pub mod boot_timer;
pub mod ged;
pub mod i8042;
pub mod pl061;
pub mod serial;

use std::sync::Arc;

use crate::ExitReason;

pub use acpi_pm::AcpiPm;
pub use boot_timer::BootTimer;
pub use ged::Ged;
pub use i8042::I8042;
pub use pl061::Pl061;
pub use serial::Serial;

/// Called by a device when the guest asks to power off or reset.
pub type ExitHandler = Arc<dyn Fn(ExitReason) + Send + Sync>;
