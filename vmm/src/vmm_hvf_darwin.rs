//! macOS only: [`HvfMachine`] on the real Hypervisor.framework.
//!
//! Everything else of the HVF VM lives in [`crate::vmm_hvf`] and
//! [`crate::vmm_hvf_run`], generic over the framework calls and tested on Linux
//! against a fake; this file only picks the real calls ([`Framework`]).

use std::time::Instant;

use crate::cli::RunArgs;
use crate::hypervisor::hvf::{Framework, HvfHypervisor};
use crate::machine::VmExit;
use crate::vmm_hvf::{HvfMachine, Parts, Result};

/// Builds the VM on the framework. A process may build one.
pub fn build(parts: Parts<'_>) -> Result<HvfMachine<Framework>> {
    HvfMachine::build(&HvfHypervisor::new(Framework::new()), parts)
}

/// Builds the VM and runs it until the guest powers off or resets.
pub fn run(parts: Parts<'_>) -> Result<VmExit> {
    build(parts)?.run()
}

/// `aivmm run` on the framework: a workdir session, or the command line's VM
/// with its console on this terminal. Returns the exit status.
pub fn run_cli(args: &RunArgs, started: Instant) -> crate::vmm_hvf_run::Result<i32> {
    use std::io::Write;

    use crate::vmm_hvf_run::Outcome;

    let hyp = HvfHypervisor::new(Framework::new());
    // The session layer handles the terminal itself.
    let raw = args
        .workdir
        .is_none()
        .then(crate::console::RawTerminal::enter);
    let tty = raw.as_ref().map(|r| r.is_raw());
    let outcome = crate::vmm_hvf_run::run_cli(&hyp, args, Box::new(std::io::stdout()), tty, started);
    let _ = std::io::stdout().flush();
    drop(raw);
    match outcome? {
        // Exit at once: vCPU and device threads end with the process.
        Outcome::Command(code) => std::process::exit(code),
        Outcome::Vm(VmExit::PowerOff) => tracing::info!("guest powered off"),
        Outcome::Vm(VmExit::Reset) => tracing::info!("guest reset; stopping"),
    }
    Ok(0)
}
