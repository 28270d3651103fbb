//! PSCI 1.0 (Arm DEN 0022) as the guest sees it over HVC: the power state of every
//! vCPU and what each call asks the VMM to do.
//!
//! [`Psci`] is a plain state machine with no threads in it. The hypervisor backend
//! feeds it the caller's x0..x3 and gets back the value for x0 and an [`Effect`]:
//! power off or reset the VM, park the caller (CPU_OFF), wake a parked vCPU at an
//! entry point (CPU_ON), or idle like WFI (CPU_SUSPEND). vCPU 0 starts on; the
//! others start off and wait for CPU_ON, which is how Linux brings up secondaries
//! when `enable-method = "psci"`.

use super::layout::{mpidr, mpidr_affinity};

/// Function IDs (SMC32 `0x84...`, SMC64 `0xc4...`).
pub mod func {
    /// PSCI_VERSION.
    pub const PSCI_VERSION: u32 = 0x8400_0000;
    /// CPU_SUSPEND (SMC32).
    pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
    /// CPU_SUSPEND (SMC64).
    pub const CPU_SUSPEND_64: u32 = 0xc400_0001;
    /// CPU_OFF.
    pub const CPU_OFF: u32 = 0x8400_0002;
    /// CPU_ON (SMC32).
    pub const CPU_ON_32: u32 = 0x8400_0003;
    /// CPU_ON (SMC64).
    pub const CPU_ON_64: u32 = 0xc400_0003;
    /// AFFINITY_INFO (SMC32).
    pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
    /// AFFINITY_INFO (SMC64).
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    /// MIGRATE_INFO_TYPE.
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    /// SYSTEM_OFF.
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    /// SYSTEM_RESET.
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    /// PSCI_FEATURES.
    pub const PSCI_FEATURES: u32 = 0x8400_000a;
    /// SYSTEM_RESET2 (SMC32).
    pub const SYSTEM_RESET2_32: u32 = 0x8400_0012;
    /// SYSTEM_RESET2 (SMC64).
    pub const SYSTEM_RESET2_64: u32 = 0xc400_0012;
    /// SMCCC_VERSION (Arm DEN 0028).
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
    /// SMCCC_ARCH_FEATURES.
    pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
}

/// PSCI return codes.
pub mod ret {
    /// SUCCESS.
    pub const SUCCESS: i64 = 0;
    /// NOT_SUPPORTED (also SMCCC's "unknown function").
    pub const NOT_SUPPORTED: i64 = -1;
    /// INVALID_PARAMETERS.
    pub const INVALID_PARAMETERS: i64 = -2;
    /// ALREADY_ON.
    pub const ALREADY_ON: i64 = -4;
    /// ON_PENDING.
    pub const ON_PENDING: i64 = -5;
    /// INVALID_ADDRESS.
    pub const INVALID_ADDRESS: i64 = -9;
}

/// PSCI 1.0 as `major << 16 | minor`.
pub const PSCI_VERSION_1_0: u64 = 0x1_0000;
/// SMCCC 1.1.
pub const SMCCC_VERSION_1_1: u64 = 0x1_0001;
/// MIGRATE_INFO_TYPE: no Trusted OS, nothing to migrate.
const MIGRATE_NOT_REQUIRED: u64 = 2;

/// A vCPU's power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    /// Running guest code.
    On,
    /// Off: its thread is parked.
    Off,
    /// CPU_ON was called; it starts at `entry` with x0 = `context` when its thread
    /// picks the request up.
    OnPending {
        /// Entry point (physical address, MMU off).
        entry: u64,
        /// Value for x0.
        context: u64,
    },
}

/// What the VMM must do after a call, besides writing x0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: resume the caller.
    None,
    /// Power the VM off.
    SystemOff,
    /// Reset the VM.
    SystemReset,
    /// Park the caller until a CPU_ON names it.
    CpuOff,
    /// Wake vCPU `index`, which has a pending start.
    StartCpu(usize),
    /// Idle the caller as WFI would (CPU_SUSPEND to a standby state).
    Suspend,
}

/// The result of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The value for x0.
    pub x0: u64,
    /// What else to do.
    pub effect: Effect,
}

impl Outcome {
    fn ret(code: i64) -> Self {
        Self {
            x0: code as u64,
            effect: Effect::None,
        }
    }
}

/// The PSCI state of a VM.
#[derive(Debug)]
pub struct Psci {
    power: Vec<Power>,
    ram: (u64, u64),
}

impl Psci {
    /// `vcpus` vCPUs, vCPU 0 on; CPU_ON entry points must lie in RAM `[start, end)`.
    pub fn new(vcpus: usize, ram_start: u64, ram_end: u64) -> Self {
        let mut power = vec![Power::Off; vcpus];
        if let Some(first) = power.first_mut() {
            *first = Power::On;
        }
        Self {
            power,
            ram: (ram_start, ram_end),
        }
    }

    /// vCPU `index`'s power state.
    pub fn power(&self, index: usize) -> Option<Power> {
        self.power.get(index).copied()
    }

    /// Takes vCPU `index`'s pending start, turning it on: `(entry, context)`.
    pub fn take_start(&mut self, index: usize) -> Option<(u64, u64)> {
        match self.power.get(index) {
            Some(&Power::OnPending { entry, context }) => {
                self.power[index] = Power::On;
                Some((entry, context))
            }
            _ => None,
        }
    }

    fn index_of(&self, target: u64) -> Option<usize> {
        let aff = mpidr_affinity(target);
        (0..self.power.len()).find(|&i| mpidr_affinity(mpidr(i as u32)) == aff)
    }

    /// Handles a call from vCPU `caller` with registers x0..x3.
    pub fn call(&mut self, caller: usize, x: [u64; 4]) -> Outcome {
        // Function IDs are 32 bits; the SMC32 calls take 32-bit arguments.
        let fid = x[0] as u32;
        let smc64 = fid & 0x4000_0000 != 0;
        let arg = |i: usize| if smc64 { x[i] } else { x[i] & 0xffff_ffff };
        use func::*;
        match fid {
            PSCI_VERSION => Outcome {
                x0: PSCI_VERSION_1_0,
                effect: Effect::None,
            },
            SMCCC_VERSION => Outcome {
                x0: SMCCC_VERSION_1_1,
                effect: Effect::None,
            },
            MIGRATE_INFO_TYPE => Outcome {
                x0: MIGRATE_NOT_REQUIRED,
                effect: Effect::None,
            },
            PSCI_FEATURES => Outcome::ret(match arg(1) as u32 {
                PSCI_VERSION | CPU_SUSPEND_32 | CPU_SUSPEND_64 | CPU_OFF | CPU_ON_32
                | CPU_ON_64 | AFFINITY_INFO_32 | AFFINITY_INFO_64 | MIGRATE_INFO_TYPE
                | SYSTEM_OFF | SYSTEM_RESET | SYSTEM_RESET2_32 | SYSTEM_RESET2_64
                | PSCI_FEATURES => ret::SUCCESS,
                // SMCCC_VERSION is discovered through PSCI_FEATURES too.
                SMCCC_VERSION => ret::SUCCESS,
                _ => ret::NOT_SUPPORTED,
            }),
            // No firmware workarounds (SPECTRE v2/v4 mitigations) are offered.
            SMCCC_ARCH_FEATURES => Outcome::ret(ret::NOT_SUPPORTED),
            CPU_SUSPEND_32 | CPU_SUSPEND_64 => Outcome {
                x0: ret::SUCCESS as u64,
                effect: Effect::Suspend,
            },
            CPU_OFF => {
                if let Some(p) = self.power.get_mut(caller) {
                    *p = Power::Off;
                }
                Outcome {
                    x0: ret::SUCCESS as u64,
                    effect: Effect::CpuOff,
                }
            }
            CPU_ON_32 | CPU_ON_64 => self.cpu_on(arg(1), arg(2), arg(3)),
            AFFINITY_INFO_32 | AFFINITY_INFO_64 => {
                if arg(2) != 0 {
                    // Only level 0 (a single vCPU) is described.
                    return Outcome::ret(ret::INVALID_PARAMETERS);
                }
                match self.index_of(arg(1)).map(|i| self.power[i]) {
                    Some(Power::On) => Outcome::ret(0),
                    Some(Power::Off) => Outcome::ret(1),
                    Some(Power::OnPending { .. }) => Outcome::ret(2),
                    None => Outcome::ret(ret::INVALID_PARAMETERS),
                }
            }
            SYSTEM_OFF => Outcome {
                x0: ret::SUCCESS as u64,
                effect: Effect::SystemOff,
            },
            SYSTEM_RESET | SYSTEM_RESET2_32 | SYSTEM_RESET2_64 => Outcome {
                x0: ret::SUCCESS as u64,
                effect: Effect::SystemReset,
            },
            _ => Outcome::ret(ret::NOT_SUPPORTED),
        }
    }

    fn cpu_on(&mut self, target: u64, entry: u64, context: u64) -> Outcome {
        let Some(index) = self.index_of(target) else {
            return Outcome::ret(ret::INVALID_PARAMETERS);
        };
        if entry < self.ram.0 || entry >= self.ram.1 {
            return Outcome::ret(ret::INVALID_ADDRESS);
        }
        match self.power[index] {
            Power::On => Outcome::ret(ret::ALREADY_ON),
            Power::OnPending { .. } => Outcome::ret(ret::ON_PENDING),
            Power::Off => {
                self.power[index] = Power::OnPending { entry, context };
                Outcome {
                    x0: ret::SUCCESS as u64,
                    effect: Effect::StartCpu(index),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::func::*;
    use super::*;

    const RAM: (u64, u64) = (0x4000_0000, 0x8000_0000);

    fn psci(n: usize) -> Psci {
        Psci::new(n, RAM.0, RAM.1)
    }

    fn x0(code: i64) -> u64 {
        code as u64
    }

    #[test]
    fn version_features_and_migrate_info() {
        let mut p = psci(1);
        assert_eq!(p.call(0, [PSCI_VERSION.into(), 0, 0, 0]).x0, 0x1_0000);
        assert_eq!(p.call(0, [SMCCC_VERSION.into(), 0, 0, 0]).x0, 0x1_0001);
        assert_eq!(
            p.call(0, [PSCI_FEATURES.into(), CPU_ON_64.into(), 0, 0]).x0,
            0
        );
        assert_eq!(
            p.call(0, [PSCI_FEATURES.into(), SYSTEM_RESET.into(), 0, 0])
                .x0,
            0
        );
        assert_eq!(
            p.call(0, [PSCI_FEATURES.into(), 0x8400_0005, 0, 0]).x0,
            x0(ret::NOT_SUPPORTED)
        );
        assert_eq!(
            p.call(0, [SMCCC_ARCH_FEATURES.into(), 0x8000_8000, 0, 0])
                .x0,
            x0(-1)
        );
        assert_eq!(p.call(0, [MIGRATE_INFO_TYPE.into(), 0, 0, 0]).x0, 2);
        // Unknown functions (MIGRATE, a vendor call) are NOT_SUPPORTED, with no effect.
        for fid in [0x8400_0005u64, 0xc200_0000, 0x1234] {
            assert_eq!(
                p.call(0, [fid, 0, 0, 0]),
                Outcome {
                    x0: x0(-1),
                    effect: Effect::None
                }
            );
        }
    }

    #[test]
    fn system_off_and_reset() {
        let mut p = psci(1);
        assert_eq!(
            p.call(0, [SYSTEM_OFF.into(), 0, 0, 0]).effect,
            Effect::SystemOff
        );
        assert_eq!(
            p.call(0, [SYSTEM_RESET.into(), 0, 0, 0]).effect,
            Effect::SystemReset
        );
        assert_eq!(
            p.call(0, [SYSTEM_RESET2_64.into(), 0, 0, 0]).effect,
            Effect::SystemReset
        );
    }

    #[test]
    fn cpu_on_walks_off_pending_on() {
        let mut p = psci(3);
        assert_eq!(p.power(1), Some(Power::Off));
        let target = mpidr(2);
        let out = p.call(0, [CPU_ON_64.into(), target, 0x4008_0000, 0xfeed]);
        assert_eq!(
            out,
            Outcome {
                x0: 0,
                effect: Effect::StartCpu(2)
            }
        );
        assert_eq!(
            p.power(2),
            Some(Power::OnPending {
                entry: 0x4008_0000,
                context: 0xfeed
            })
        );
        // A second CPU_ON before it starts: ON_PENDING; AFFINITY_INFO says 2.
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), target, 0x4008_0000, 0]).x0,
            x0(ret::ON_PENDING)
        );
        assert_eq!(p.call(0, [AFFINITY_INFO_64.into(), target, 0, 0]).x0, 2);
        assert_eq!(p.take_start(2), Some((0x4008_0000, 0xfeed)));
        assert_eq!(p.take_start(2), None);
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), target, 0x4008_0000, 0]).x0,
            x0(ret::ALREADY_ON)
        );
        assert_eq!(p.call(1, [AFFINITY_INFO_64.into(), target, 0, 0]).x0, 0);
    }

    #[test]
    fn cpu_off_then_on_again() {
        let mut p = psci(2);
        p.call(0, [CPU_ON_64.into(), mpidr(1), 0x4000_0000, 0]);
        p.take_start(1);
        assert_eq!(p.call(1, [CPU_OFF.into(), 0, 0, 0]).effect, Effect::CpuOff);
        assert_eq!(p.call(0, [AFFINITY_INFO_32.into(), mpidr(1), 0, 0]).x0, 1);
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), mpidr(1), 0x4000_1000, 7])
                .effect,
            Effect::StartCpu(1)
        );
    }

    #[test]
    fn cpu_on_checks_its_arguments() {
        let mut p = psci(2);
        // No such vCPU.
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), mpidr(5), 0x4000_0000, 0]).x0,
            x0(ret::INVALID_PARAMETERS)
        );
        // Entry outside RAM.
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), mpidr(1), 0x1000, 0]).x0,
            x0(ret::INVALID_ADDRESS)
        );
        assert_eq!(
            p.call(0, [CPU_ON_64.into(), mpidr(1), RAM.1, 0]).x0,
            x0(ret::INVALID_ADDRESS)
        );
        assert_eq!(p.power(1), Some(Power::Off));
        // The boot vCPU is already on.
        assert_eq!(
            p.call(1, [CPU_ON_64.into(), mpidr(0), 0x4000_0000, 0]).x0,
            x0(ret::ALREADY_ON)
        );
        // AFFINITY_INFO above level 0 is not described.
        assert_eq!(
            p.call(0, [AFFINITY_INFO_64.into(), mpidr(1), 1, 0]).x0,
            x0(ret::INVALID_PARAMETERS)
        );
    }

    #[test]
    fn smc32_calls_use_only_the_low_32_bits() {
        let mut p = psci(2);
        // High garbage in the SMC32 arguments is ignored: the entry is 0x4000_2000.
        let out = p.call(
            0,
            [
                0xffff_ffff_0000_0000 | u64::from(CPU_ON_32),
                0xdead_0000_0000_0100,
                0x1_4000_2000,
                0x2_0000_0005,
            ],
        );
        assert_eq!(out.effect, Effect::StartCpu(1));
        assert_eq!(p.take_start(1), Some((0x4000_2000, 5)));
    }

    #[test]
    fn cpu_suspend_idles_the_caller() {
        let mut p = psci(1);
        assert_eq!(
            p.call(0, [CPU_SUSPEND_64.into(), 0, 0, 0]),
            Outcome {
                x0: 0,
                effect: Effect::Suspend
            }
        );
    }
}
