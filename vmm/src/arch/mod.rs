//! Architecture-specific guest setup.

// aarch64 is plain data (layout, Image, FDT, PSCI), so it builds and is tested on
// every host; the HVF backend uses it.
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
