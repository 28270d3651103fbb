//! x86_64: the guest layout, kernel loading and boot parameters, boot-time vCPU
//! state (GDT, page tables, registers, CPUID) and ACPI tables.

pub mod acpi;
pub mod boot;
pub mod layout;
pub mod regs;
pub mod vmlinux;
