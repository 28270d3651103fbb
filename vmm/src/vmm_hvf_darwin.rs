//! macOS only: [`HvfMachine`] on the real Hypervisor.framework.
//!
//! Everything else of the HVF VM lives in [`crate::vmm_hvf`], generic over the
//! framework calls and tested on Linux against a fake; this file only picks the
//! real calls ([`Framework`]).

use crate::hypervisor::hvf::{Framework, HvfHypervisor};
use crate::vmm::VmExit;
use crate::vmm_hvf::{HvfMachine, Parts, Result};

/// Builds the VM on the framework. A process may build one.
pub fn build(parts: Parts<'_>) -> Result<HvfMachine<Framework>> {
    HvfMachine::build(&HvfHypervisor::new(Framework::new()), parts)
}

/// Builds the VM and runs it until the guest powers off or resets.
pub fn run(parts: Parts<'_>) -> Result<VmExit> {
    build(parts)?.run()
}
