//! Legacy x86 devices: serial, i8042, boot timer, ACPI power management.
