//! x86_64: the guest layout, boot parameters, page tables, GDT, CPUID and ACPI tables.

pub mod acpi;
pub mod layout;
