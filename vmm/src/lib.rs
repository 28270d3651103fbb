//! aivmm: a single-process VMM for running an AI coding agent in a real VM.
//!
//! The CLI ([`cli`]) gives a [`config::VmConfig`]; [`vmm::Vmm`] builds the VM on a
//! [`hypervisor::Hypervisor`] and runs it. Devices live in the `aivmm-devices`
//! crate and know nothing of the hypervisor.

pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod hypervisor;
pub mod image;
pub mod launch;
pub mod logging;
pub mod manage;
pub mod seccomp;
pub mod session;
pub mod settings;
pub mod vmm;
// The arm64 VM on Hypervisor.framework: portable, tested on Linux against a fake.
pub mod vmm_hvf;
#[cfg(target_os = "macos")]
pub mod vmm_hvf_darwin;
pub mod workdir;
