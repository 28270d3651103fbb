//! The VM as the session layer sees it, whatever the hypervisor.
//!
//! `aivmm run --workdir` ([`crate::launch`]) needs only a few things of its VM:
//! build it from a [`VmConfig`], run it on a thread until the guest powers off,
//! press its power button when aivmm is told to stop, and feed its console.
//! [`Machine`] is that interface and [`MachineBuilder`] makes one. Two builders
//! exist: [`Kvm`] (the x86 [`Vmm`] on Linux, its power button the ACPI Generic
//! Event Device) and [`HvfHypervisor`] (the arm64 [`HvfMachine`] on
//! Hypervisor.framework, its power button a PL061 GPIO line wired to
//! `gpio-keys`). Either way the guest sees an input device named "Power Button"
//! sending `KEY_POWER`, which the guest agent acts on.
//!
//! The HVF builder is generic over the framework calls, so the whole workdir path
//! above the FFI runs on Linux against the fake framework.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use aivmm_devices::legacy::{Ged, Serial};

use crate::config::{NetMode, VmConfig};
use crate::hypervisor::hvf::{HvfApi, HvfHypervisor};
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use crate::hypervisor::Hypervisor;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
use crate::vmm::Vmm;
use crate::vmm_hvf::HvfMachine;

/// Errors of building or running a VM, by backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The KVM VM failed.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[error(transparent)]
    Kvm(#[from] crate::vmm::Error),
    /// The Hypervisor.framework VM could not be built from the configuration.
    #[error(transparent)]
    HvfConfig(#[from] crate::vmm_hvf_run::Error),
    /// The Hypervisor.framework VM failed.
    #[error(transparent)]
    Hvf(#[from] crate::vmm_hvf::Error),
}

/// `Result` of [`Machine`] operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; aivmm does not restart it.
    Reset,
}

/// A button the host presses to ask the guest to shut down.
pub trait PowerButton: Send + Sync {
    /// Presses the button once.
    fn press(&self) -> std::io::Result<()>;
}

/// A poisoned device lock, as an I/O error.
fn poisoned() -> std::io::Error {
    std::io::Error::other("the power button's lock is poisoned")
}

impl PowerButton for Mutex<Ged> {
    fn press(&self) -> std::io::Result<()> {
        self.lock().map_err(|_| poisoned())?.press_power_button()
    }
}

/// A built VM, ready to run on a thread of its own.
pub trait Machine: Send {
    /// The serial console, for feeding it host input.
    fn serial(&self) -> Arc<Mutex<Serial>>;
    /// The guest's power button.
    fn power_button(&self) -> Arc<dyn PowerButton>;
    /// Runs the guest until it powers off or resets, or the VM fails.
    fn run(self: Box<Self>) -> Result<VmExit>;
    /// The memory balloon, if the VM has one.
    fn balloon(&self) -> Option<aivmm_devices::virtio::balloon::BalloonHandle> {
        None
    }
}

/// Makes the [`Machine`] of a configuration.
pub trait MachineBuilder {
    /// Builds the VM of `config`; `console` gets its serial output and `started`
    /// is when the process began (for the boot timer).
    fn build(
        &self,
        config: &VmConfig,
        started: Instant,
        console: Box<dyn Write + Send>,
    ) -> Result<Box<dyn Machine>>;
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl Machine for Vmm {
    fn serial(&self) -> Arc<Mutex<Serial>> {
        Vmm::serial(self)
    }
    fn power_button(&self) -> Arc<dyn PowerButton> {
        Vmm::power_button(self)
    }
    fn run(self: Box<Self>) -> Result<VmExit> {
        Ok(Vmm::run(*self)?)
    }
    fn balloon(&self) -> Option<aivmm_devices::virtio::balloon::BalloonHandle> {
        Vmm::balloon(self)
    }
}

/// The KVM backend: an x86 [`Vmm`] on a hypervisor.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub struct Kvm<'a>(pub &'a dyn Hypervisor);

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
impl MachineBuilder for Kvm<'_> {
    fn build(
        &self,
        config: &VmConfig,
        started: Instant,
        console: Box<dyn Write + Send>,
    ) -> Result<Box<dyn Machine>> {
        Ok(Box::new(Vmm::build(self.0, config, started, console)?))
    }
}

impl<A: HvfApi> Machine for HvfMachine<A> {
    fn serial(&self) -> Arc<Mutex<Serial>> {
        HvfMachine::serial(self)
    }
    fn power_button(&self) -> Arc<dyn PowerButton> {
        HvfMachine::power_button(self)
    }
    fn run(self: Box<Self>) -> Result<VmExit> {
        Ok(HvfMachine::run(*self)?)
    }
}

impl<A: HvfApi> MachineBuilder for HvfHypervisor<A> {
    fn build(
        &self,
        config: &VmConfig,
        started: Instant,
        console: Box<dyn Write + Send>,
    ) -> Result<Box<dyn Machine>> {
        Ok(Box::new(crate::vmm_hvf_run::build(
            self, config, console, started,
        )?))
    }
}

/// The network of a run whose command line names none, on host `os`
/// (`std::env::consts::OS`): aivmm's own user-mode network on the hosts it
/// runs on (Linux and macOS), none elsewhere.
pub fn default_net_for(os: &str) -> NetMode {
    match os {
        "linux" | "macos" => NetMode::User,
        _ => NetMode::None,
    }
}

/// [`default_net_for`] as a `--net` argument (for `aivmm builder`, whose VM is
/// a child `aivmm run --net …`).
pub fn default_net_arg(os: &str) -> &'static str {
    match default_net_for(os) {
        NetMode::User => "user",
        _ => "none",
    }
}

/// Why an option that needs user-mode networking (`--ssh`) is refused, on host `os`.
pub fn user_net_needed(os: &str) -> &'static str {
    match default_net_for(os) {
        NetMode::User => "needs user-mode networking (--net user, the default)",
        _ => "needs user-mode networking (--net user), which this host does not have",
    }
}

/// [`default_net_for`] this host.
pub fn default_net() -> NetMode {
    default_net_for(std::env::consts::OS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn hvf_default_net_is_none_on_macos_and_user_on_linux() {
        assert_eq!(default_net_for("linux"), NetMode::User);
        assert_eq!(default_net_for("macos"), NetMode::User);
        assert_eq!(default_net(), NetMode::User, "this test host is Linux");
        assert_eq!(default_net_for("freebsd"), NetMode::None);
        assert_eq!(default_net_arg("macos"), "user");
        assert_eq!(default_net_arg("linux"), "user");
        assert_eq!(default_net_arg("freebsd"), "none");
        assert!(user_net_needed("linux").contains("the default"));
        assert!(user_net_needed("macos").contains("the default"));
        let other = user_net_needed("freebsd");
        assert!(
            other.contains("--net user") && !other.contains("default"),
            "{other}"
        );
    }

    /// `aivmm builder` on a Mac boots its VM with aivmm's own network by default,
    /// and that VM's `aivmm run` arguments are accepted by the HVF path; passt's
    /// are not.
    #[test]
    fn hvf_builder_default_net_on_macos_is_accepted_by_hvf() {
        use clap::Parser;
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let config = |net: &str| {
            let argv = [
                "aivmm",
                "run",
                "--kernel",
                kernel.path().to_str().unwrap(),
                "--net",
                net,
            ];
            let crate::cli::Command::Run(args) =
                crate::cli::Cli::try_parse_from(argv).unwrap().command
            else {
                panic!("not run")
            };
            VmConfig::try_from(&args).unwrap()
        };
        let mac = config(default_net_arg("macos"));
        assert_eq!(mac.net, NetMode::User);
        assert!(crate::vmm_hvf_run::hvf_config(&mac).is_ok());
        let passt = config("passt");
        assert_eq!(passt.net, NetMode::Passt);
        assert!(crate::vmm_hvf_run::hvf_config(&passt).is_err());
    }
}
