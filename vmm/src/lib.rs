//! aivmm: a single-process VMM for running an AI coding agent in a real VM.
//!
//! The CLI ([`cli`]) gives a [`config::VmConfig`]; [`vmm::Vmm`] builds the VM on a
//! [`hypervisor::Hypervisor`] and runs it. Devices live in the `aivmm-devices`
//! crate and know nothing of the hypervisor.

pub mod arch;
pub mod builder;
pub mod claude_auth;
pub mod cli;
pub mod config;
// The control socket of a running VM (`aivmm balloon`).
pub mod control;
// The virtio devices of a configuration, shared by both backends.
pub mod devices_setup;
// Host stdin into the serial console (`aivmm run --kernel`).
pub mod console;
pub mod hypervisor;
pub mod image;
pub mod landlock;
pub mod launch;
pub mod logging;
// The VM behind one interface (KVM or Hypervisor.framework), for the session layer.
pub mod machine;
pub mod manage;
// The workdir configs the user approved (`aivmm trust`).
pub mod pins;
// From the merged settings to the VmConfig (`aivmm run`'s two modes).
pub mod plan;
pub mod seccomp;
pub mod session;
pub mod settings;
// Signal handlers without vmm-sys-util's Linux-only `signal` module.
pub mod signals;
// Per-workdir state files: the user's alone (0700 dirs, 0600 files, no symlinks).
pub mod state_fs;
// `aivmm trust`: approving a workdir's aivmm.toml.
pub mod trust;
// The x86 VM on KVM.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vmm;
// The arm64 VM on Hypervisor.framework: portable, tested on Linux against a fake.
pub mod vmm_hvf;
#[cfg(target_os = "macos")]
pub mod vmm_hvf_darwin;
// `aivmm run` on HVF: backend selection and the CLI's config as the HVF builder's parts.
pub mod vmm_hvf_run;
pub mod workdir;
