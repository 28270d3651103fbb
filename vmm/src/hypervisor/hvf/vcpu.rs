//! An HVF vCPU: the run loop that turns framework exits into [`VcpuExit`]s.
//!
//! Only exits the device model must see leave [`HvfVcpu::run`]: MMIO reads and
//! writes, power-off, reset, `Interrupted` (a stop) and failures. PSCI, WFI, WFE,
//! trapped system registers and the virtual timer are handled inside the loop.
//! After an MMIO exit, the next `run` completes the instruction first: a load's
//! value goes into its register (sign- or zero-extended per the syndrome) and the
//! PC moves past the 4-byte instruction, as KVM does in the kernel.

use std::sync::Arc;

use crate::arch::aarch64::layout::mpidr;
use crate::arch::aarch64::psci::{Effect, Power};
use crate::arch::aarch64::{BootRegs, PSTATE_EL1H_DAIF_MASKED};
use crate::hypervisor::VcpuExit;

use super::esr::{class_name, MmioAccess, Syndrome};
use super::irq::{VmShared, VtimerState};
use super::{hv, sys_reg, Error, ExitInfo, ExitReason, HvVcpu, HvfApi, Reg, Result};

/// Work left from the previous exit, done before the next entry.
#[derive(Clone, Copy, Debug)]
enum Pending {
    /// Write the loaded value, then step over the instruction.
    Load(MmioAccess),
    /// Step over the instruction.
    Advance,
}

/// What one pass of the loop produced.
#[derive(Debug)]
enum Step {
    Continue,
    Read(u64, usize),
    Write(u64, usize),
    PowerOff,
    Reset,
    Interrupted,
    Unhandled(String),
    Failed(String),
}

/// One vCPU. Create it with [`super::HvfVm::vcpu`], move it to its thread, run it.
pub struct HvfVcpu<A: HvfApi> {
    shared: Arc<VmShared<A>>,
    index: u32,
    handle: Option<HvVcpu>,
    boot: Option<BootRegs>,
    pending: Option<Pending>,
    buf: [u8; 8],
    vtimer: VtimerState,
}

impl<A: HvfApi> HvfVcpu<A> {
    pub(crate) fn new(shared: Arc<VmShared<A>>, index: u32) -> Self {
        Self {
            shared,
            index,
            handle: None,
            boot: None,
            pending: None,
            buf: [0; 8],
            vtimer: VtimerState::default(),
        }
    }

    /// This vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Sets the registers the boot vCPU starts with (applied when it is created).
    pub fn set_boot_regs(&mut self, regs: BootRegs) {
        self.boot = Some(regs);
    }

    /// Runs guest code until an exit the VMM must handle.
    pub fn run(&mut self) -> Result<VcpuExit<'_>> {
        loop {
            let step = self.step()?;
            return Ok(match step {
                Step::Continue => continue,
                Step::Read(addr, n) => VcpuExit::MmioRead(addr, &mut self.buf[..n]),
                Step::Write(addr, n) => VcpuExit::MmioWrite(addr, &self.buf[..n]),
                Step::PowerOff => VcpuExit::PowerOff,
                Step::Reset => VcpuExit::Reset,
                Step::Interrupted => VcpuExit::Interrupted,
                Step::Unhandled(what) => VcpuExit::Unhandled(what),
                Step::Failed(why) => VcpuExit::Failed(why),
            });
        }
    }

    fn api(&self) -> &A {
        &self.shared.api
    }

    fn step(&mut self) -> Result<Step> {
        let Some(h) = self.power_on()? else {
            return Ok(Step::Interrupted);
        };
        self.finish_pending(h)?;
        let gen = {
            let s = self.shared.lock();
            if s.stopping {
                return Ok(Step::Interrupted);
            }
            s.wake_gen
        };
        let exit = hv("hv_vcpu_run", self.api().vcpu_run(h))?;
        match exit.reason {
            ExitReason::Canceled => Ok(Step::Interrupted),
            ExitReason::VtimerActivated => {
                let shared = self.shared.clone();
                self.vtimer.activated(&*shared.api, h)?;
                Ok(Step::Continue)
            }
            ExitReason::Exception => {
                let shared = self.shared.clone();
                self.vtimer.sync(&*shared.api, h)?;
                self.exception(h, &exit, gen)
            }
            ExitReason::Unknown(r) => Ok(Step::Failed(format!(
                "Hypervisor.framework exit reason {r} (HV_EXIT_REASON_UNKNOWN)"
            ))),
        }
    }

    /// Waits until this vCPU is on (vCPU 0 is from the start; the others after a
    /// CPU_ON), creates it on this thread the first time and sets its entry
    /// registers after every power-on. `None` when the VM is stopping.
    fn power_on(&mut self) -> Result<Option<HvVcpu>> {
        let i = self.index as usize;
        let mut s = self.shared.lock();
        let start = loop {
            if s.stopping {
                return Ok(None);
            }
            match s.psci.power(i) {
                Some(Power::On) => break None,
                Some(Power::OnPending { .. }) => break s.psci.take_start(i),
                Some(Power::Off) => {
                    let gen = s.wake_gen;
                    s = self
                        .shared
                        .wait_while(s, None, |s| !s.stopping && s.wake_gen == gen);
                }
                None => return Err(Error::Invalid(format!("vCPU {i} is not part of the VM"))),
            }
        };
        drop(s);

        let regs = match (self.handle, start) {
            (Some(h), None) => return Ok(Some(h)),
            (_, Some((entry, context))) => BootRegs {
                pc: entry,
                x0: context,
                pstate: PSTATE_EL1H_DAIF_MASKED,
            },
            (None, None) => self
                .boot
                .ok_or_else(|| Error::Invalid(format!("vCPU {i} has no boot registers")))?,
        };
        let h = match self.handle {
            Some(h) => h,
            None => self.create()?,
        };
        self.pending = None;
        let api = self.api();
        hv(
            "hv_vcpu_set_reg(CPSR)",
            api.vcpu_set_reg(h, Reg::Cpsr, regs.pstate),
        )?;
        hv("hv_vcpu_set_reg(PC)", api.vcpu_set_reg(h, Reg::Pc, regs.pc))?;
        hv(
            "hv_vcpu_set_reg(X0)",
            api.vcpu_set_reg(h, Reg::X(0), regs.x0),
        )?;
        for n in 1..=3 {
            hv("hv_vcpu_set_reg", api.vcpu_set_reg(h, Reg::X(n), 0))?;
        }
        Ok(Some(h))
    }

    fn create(&mut self) -> Result<HvVcpu> {
        if !self
            .shared
            .gic_ready
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(Error::Invalid(
                "the GIC must be created before the first vCPU runs".into(),
            ));
        }
        let h = hv("hv_vcpu_create", self.api().vcpu_create())?;
        self.handle = Some(h);
        // The GIC routes by affinity: the same MPIDR as the device tree's cpu node.
        hv(
            "hv_vcpu_set_sys_reg(MPIDR_EL1)",
            self.api()
                .vcpu_set_sys_reg(h, sys_reg::MPIDR_EL1, mpidr(self.index)),
        )?;
        self.shared.lock().handles[self.index as usize] = Some(h);
        Ok(h)
    }

    fn finish_pending(&mut self, h: HvVcpu) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let api = self.api();
        if let Pending::Load(access) = p {
            if let Some(reg) = access.register() {
                hv(
                    "hv_vcpu_set_reg",
                    api.vcpu_set_reg(h, reg, access.load_value(&self.buf)),
                )?;
            }
        }
        let pc = hv("hv_vcpu_get_reg(PC)", api.vcpu_get_reg(h, Reg::Pc))?;
        hv(
            "hv_vcpu_set_reg(PC)",
            api.vcpu_set_reg(h, Reg::Pc, pc.wrapping_add(4)),
        )
    }

    fn exception(&mut self, h: HvVcpu, exit: &ExitInfo, gen: u64) -> Result<Step> {
        match Syndrome::decode(exit.syndrome) {
            Syndrome::DataAbort => {
                let access = MmioAccess::decode(exit.syndrome, exit.physical_address)?;
                if access.cache_maintenance {
                    self.pending = Some(Pending::Advance);
                    return Ok(Step::Continue);
                }
                if access.write {
                    let value = match access.register() {
                        Some(reg) => hv("hv_vcpu_get_reg", self.api().vcpu_get_reg(h, reg))?,
                        None => 0,
                    };
                    self.buf = access.store_bytes(value);
                    self.pending = Some(Pending::Advance);
                    Ok(Step::Write(access.addr, access.size))
                } else {
                    self.buf = [0; 8];
                    self.pending = Some(Pending::Load(access));
                    Ok(Step::Read(access.addr, access.size))
                }
            }
            // HVC's preferred return is the next instruction; SMC's is the SMC.
            Syndrome::Hvc(_) => self.psci(h, false, gen),
            Syndrome::Smc(_) => self.psci(h, true, gen),
            Syndrome::Wfi => {
                self.pending = Some(Pending::Advance);
                self.wfi(h, gen)
            }
            Syndrome::Wfe => {
                self.pending = Some(Pending::Advance);
                Ok(Step::Continue)
            }
            Syndrome::SysReg(acc) => {
                // Registers the framework leaves to the VMM read as zero and
                // ignore writes; none of them matter to a Linux guest.
                log::debug!("vCPU {}: trapped system register {:?}", self.index, acc);
                if acc.read && acc.rt < 31 {
                    hv(
                        "hv_vcpu_set_reg",
                        self.api().vcpu_set_reg(h, Reg::X(acc.rt), 0),
                    )?;
                }
                self.pending = Some(Pending::Advance);
                Ok(Step::Continue)
            }
            Syndrome::Other { ec, iss } => {
                let pc = hv("hv_vcpu_get_reg(PC)", self.api().vcpu_get_reg(h, Reg::Pc))?;
                Ok(Step::Unhandled(format!(
                    "{} (EC {ec:#x}, ISS {iss:#x}) at PC {pc:#x}, address {:#x}",
                    class_name(ec),
                    exit.physical_address
                )))
            }
        }
    }

    fn psci(&mut self, h: HvVcpu, smc: bool, gen: u64) -> Result<Step> {
        let mut x = [0u64; 4];
        for (n, v) in x.iter_mut().enumerate() {
            *v = hv(
                "hv_vcpu_get_reg",
                self.api().vcpu_get_reg(h, Reg::X(n as u8)),
            )?;
        }
        let out = self.shared.lock().psci.call(self.index as usize, x);
        hv(
            "hv_vcpu_set_reg(X0)",
            self.api().vcpu_set_reg(h, Reg::X(0), out.x0),
        )?;
        if smc {
            self.pending = Some(Pending::Advance);
        }
        Ok(match out.effect {
            Effect::None | Effect::CpuOff => Step::Continue,
            Effect::SystemOff => Step::PowerOff,
            Effect::SystemReset => Step::Reset,
            Effect::StartCpu(_) => {
                self.shared.wake_all();
                Step::Continue
            }
            Effect::Suspend => return self.wfi(h, gen),
        })
    }

    /// Idles until an interrupt may be pending: a device trigger, a CPU_ON, a
    /// stop, or the virtual timer's deadline.
    fn wfi(&mut self, h: HvVcpu, gen: u64) -> Result<Step> {
        let shared = self.shared.clone();
        let budget = self.vtimer.wfi_budget(&*shared.api, h)?;
        let cap = shared.wfi_cap();
        let budget = budget.map_or(cap, |b| b.min(cap));
        if budget.is_zero() {
            return Ok(Step::Continue);
        }
        let s = shared.lock();
        let s = shared.wait_while(s, Some(budget), |s| !s.stopping && s.wake_gen == gen);
        Ok(if s.stopping {
            Step::Interrupted
        } else {
            Step::Continue
        })
    }
}

impl<A: HvfApi> Drop for HvfVcpu<A> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.shared.lock().handles[self.index as usize] = None;
            if let Err(code) = self.shared.api.vcpu_destroy(h) {
                log::debug!("hv_vcpu_destroy: {code}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use aivmm_devices::Interrupt;

    use super::super::esr::tests::dabt;
    use super::super::esr::{EC_BRK64, EC_HVC64, EC_SMC64, EC_SYSREG, EC_WFX};
    use super::super::fake::{Call, FakeHvf, FIRST_HANDLE as H0};
    use super::super::irq::{CTL_ENABLE, CTL_ISTATUS};
    use super::super::{HvfHypervisor, HvfVm};
    use super::*;
    use crate::arch::aarch64::boot_regs;
    use crate::arch::aarch64::psci::func;

    const RAM: (u64, u64) = (0x4000_0000, 0x8000_0000);
    const ENTRY: u64 = 0x4020_0000;

    fn vm(vcpus: u32) -> (FakeHvf, HvfVm<FakeHvf>) {
        let fake = FakeHvf::new();
        let vm = HvfHypervisor::new(fake.clone())
            .create_hvf_vm(vcpus, RAM.0, RAM.1)
            .unwrap();
        vm.create_gic().unwrap();
        (fake, vm)
    }

    fn boot_vcpu(vm: &HvfVm<FakeHvf>) -> HvfVcpu<FakeHvf> {
        let mut v = vm.vcpu(0).unwrap();
        v.set_boot_regs(boot_regs(ENTRY, 0x5fe0_0000));
        v
    }

    fn ec(c: u8) -> u64 {
        u64::from(c) << 26
    }

    /// Queues an exception exit with syndrome `esr` at `ipa`.
    fn push(fake: &FakeHvf, esr: u64, ipa: u64, regs: &[(Reg, u64)]) {
        fake.push_exit(H0, ExitReason::Exception, esr, ipa, regs);
    }

    /// Queues an HVC on `vcpu` after the guest sets `regs` (x0: the function).
    fn push_hvc(fake: &FakeHvf, vcpu: HvVcpu, regs: &[(Reg, u64)]) {
        fake.push_exit(vcpu, ExitReason::Exception, ec(EC_HVC64), 0, regs);
    }

    /// Queues a 4-byte write of x0 to the first virtio window.
    fn push_write(fake: &FakeHvf) {
        push(fake, dabt(4, true, 0, false, false), 0x0a00_0000, &[]);
    }

    /// Runs `v` to an MMIO write and returns how long that took.
    fn time_to_write(v: &mut HvfVcpu<FakeHvf>) -> Duration {
        let start = Instant::now();
        assert!(matches!(v.run().unwrap(), VcpuExit::MmioWrite(..)));
        start.elapsed()
    }

    /// Asserts the next run of `v` is an MMIO read of `n` bytes at `addr` and
    /// answers it with `data`.
    fn expect_read(v: &mut HvfVcpu<FakeHvf>, addr: u64, data: &[u8]) {
        match v.run().unwrap() {
            VcpuExit::MmioRead(a, buf) => {
                assert_eq!((a, buf.len()), (addr, data.len()));
                buf.copy_from_slice(data);
            }
            other => panic!("expected a read, got {other:?}"),
        }
    }

    #[test]
    fn boot_vcpu_is_created_on_first_run_with_mpidr_and_entry_registers() {
        let (fake, vm) = vm(2);
        let mut v = boot_vcpu(&vm);
        assert!(
            fake.calls_of(|c| matches!(c, Call::VcpuCreate(_)))
                .is_empty(),
            "created lazily"
        );
        push_hvc(&fake, H0, &[(Reg::X(0), func::SYSTEM_OFF.into())]);
        assert!(matches!(v.run().unwrap(), VcpuExit::PowerOff));
        assert_eq!(fake.sys_reg(H0, sys_reg::MPIDR_EL1), 0x8000_0000);
        let sets = fake.calls_of(|c| matches!(c, Call::SetReg(..)));
        assert_eq!(
            sets[0..3],
            [
                Call::SetReg(H0, Reg::Cpsr, 0x3c5),
                Call::SetReg(H0, Reg::Pc, ENTRY),
                Call::SetReg(H0, Reg::X(0), 0x5fe0_0000),
            ]
        );
    }

    #[test]
    fn vcpus_need_the_gic_and_boot_registers() {
        let fake = FakeHvf::new();
        let vm = HvfHypervisor::new(fake.clone())
            .create_hvf_vm(1, RAM.0, RAM.1)
            .unwrap();
        let err = boot_vcpu(&vm).run().unwrap_err().to_string();
        assert!(err.contains("GIC must be created"), "{err}");
        vm.create_gic().unwrap();
        let err = vm.vcpu(0).unwrap().run().unwrap_err().to_string();
        assert!(err.contains("no boot registers"), "{err}");
    }

    #[test]
    fn mmio_write_takes_data_from_the_transfer_register_then_steps_over() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        let regs = [
            (Reg::X(7), 0x1122_3344_5566_7788),
            (Reg::X(30), 0xaabb_ccdd),
            (Reg::Pc, ENTRY + 0x100),
        ];
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(4, true, 7, false, false),
            0x0a00_0070,
            &regs,
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(2, true, 30, false, true),
            0x0a00_0072,
            &[],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(8, true, 31, false, true),
            0x0a00_0078,
            &[],
        );
        match v.run().unwrap() {
            VcpuExit::MmioWrite(a, d) => {
                assert_eq!((a, d), (0x0a00_0070, &[0x88, 0x77, 0x66, 0x55][..]))
            }
            other => panic!("{other:?}"),
        }
        match v.run().unwrap() {
            VcpuExit::MmioWrite(a, d) => assert_eq!((a, d), (0x0a00_0072, &[0xdd, 0xcc][..])),
            other => panic!("{other:?}"),
        }
        // The first write's instruction was stepped over before the second entry.
        assert!(fake
            .calls_of(|c| matches!(c, Call::SetReg(_, Reg::Pc, _)))
            .contains(&Call::SetReg(H0, Reg::Pc, ENTRY + 0x104)));
        match v.run().unwrap() {
            VcpuExit::MmioWrite(a, d) => {
                assert_eq!((a, d), (0x0a00_0078, &[0u8; 8][..]), "XZR stores zero")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mmio_read_fills_the_register_with_the_right_extension() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        fake.set_reg(H0, Reg::X(3), 0xdead_beef_dead_beef);
        // LDRSB w3; LDRSH x4; LDR w30 (upper half cleared); LDR xzr.
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(1, false, 3, true, false),
            0x0a00_0000,
            &[(Reg::Pc, ENTRY)],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(2, false, 4, true, true),
            0x0a00_0002,
            &[],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(4, false, 30, false, false),
            0x0a00_0004,
            &[],
        );
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(8, false, 31, false, true),
            0x0a00_0008,
            &[],
        );
        push_hvc(&fake, H0, &[(Reg::X(0), func::SYSTEM_OFF.into())]);
        expect_read(&mut v, 0x0a00_0000, &[0x80]);
        expect_read(&mut v, 0x0a00_0002, &[0x00, 0x80]);
        assert_eq!(fake.reg(H0, Reg::X(3)), 0xffff_ff80);
        expect_read(&mut v, 0x0a00_0004, &[1, 2, 3, 4]);
        assert_eq!(fake.reg(H0, Reg::X(4)), 0xffff_ffff_ffff_8000);
        expect_read(&mut v, 0x0a00_0008, &[9; 8]);
        assert_eq!(fake.reg(H0, Reg::X(30)), 0x0403_0201);
        assert!(matches!(v.run().unwrap(), VcpuExit::PowerOff));
        // Four loads, four steps; nothing was ever written to a register 31.
        assert_eq!(fake.reg(H0, Reg::Pc), ENTRY + 16);
        assert!(fake
            .calls_of(|c| matches!(c, Call::SetReg(_, Reg::X(31), _)))
            .is_empty());
    }

    #[test]
    fn data_abort_without_syndrome_is_an_error() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        let no_isv = dabt(4, false, 1, false, false) & !(1 << 24);
        push(&fake, no_isv, 0x0a00_0010, &[]);
        let err = v.run().unwrap_err().to_string();
        assert!(err.contains("ISV=0"), "{err}");
    }

    #[test]
    fn hvc_and_smc_reach_psci_and_only_smc_steps_the_pc() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        let version = [
            (Reg::X(0), u64::from(func::PSCI_VERSION)),
            (Reg::Pc, ENTRY + 8),
        ];
        push_hvc(&fake, H0, &version);
        fake.push_exit(
            H0,
            ExitReason::Exception,
            ec(EC_SMC64),
            0,
            &[(Reg::X(0), u64::from(func::PSCI_VERSION))],
        );
        push_hvc(&fake, H0, &[(Reg::X(0), func::SYSTEM_RESET.into())]);
        assert!(matches!(v.run().unwrap(), VcpuExit::Reset));
        let pcs = fake.calls_of(|c| matches!(c, Call::SetReg(_, Reg::Pc, _)));
        // The entry PC, then one step (after the SMC), none after the HVC.
        assert_eq!(
            pcs,
            vec![
                Call::SetReg(H0, Reg::Pc, ENTRY),
                Call::SetReg(H0, Reg::Pc, ENTRY + 12)
            ]
        );
        let x0s = fake.calls_of(|c| matches!(c, Call::SetReg(_, Reg::X(0), 0x1_0000)));
        assert_eq!(x0s.len(), 2);
    }

    #[test]
    fn cpu_on_starts_a_parked_secondary_at_its_entry() {
        let (fake, vm) = vm(2);
        let mut v0 = boot_vcpu(&vm);
        let mut v1 = vm.vcpu(1).unwrap();
        // vCPU 0 exists first (handle 100); vCPU 1 will be 101.
        push_write(&fake);
        assert!(matches!(v0.run().unwrap(), VcpuExit::MmioWrite(..)));
        let t = std::thread::spawn(move || {
            let exit = format!("{:?}", v1.run().unwrap());
            (exit, v1)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "vCPU 1 waits for CPU_ON");
        push_hvc(&fake, H0 + 1, &[(Reg::X(0), func::SYSTEM_OFF.into())]);
        let on = [
            (Reg::X(0), u64::from(func::CPU_ON_64)),
            (Reg::X(1), mpidr(1)),
            (Reg::X(2), 0x4100_0000),
            (Reg::X(3), 0xc0de),
        ];
        push_hvc(&fake, H0, &on);
        fake.push_exit(
            H0,
            ExitReason::Exception,
            dabt(4, true, 0, false, false),
            0x0a00_0004,
            &[],
        );
        assert!(matches!(
            v0.run().unwrap(),
            VcpuExit::MmioWrite(0x0a00_0004, _)
        ));
        assert_eq!(fake.reg(H0, Reg::X(0)), 0, "CPU_ON returned SUCCESS");
        let (exit, _v1) = t.join().unwrap();
        assert_eq!(exit, "PowerOff");
        assert_eq!(fake.sys_reg(H0 + 1, sys_reg::MPIDR_EL1), mpidr(1));
        let starts = fake.calls_of(|c| matches!(c, Call::SetReg(101, Reg::Pc | Reg::X(0), _)));
        assert_eq!(
            &starts[..2],
            &[
                Call::SetReg(101, Reg::Pc, 0x4100_0000),
                Call::SetReg(101, Reg::X(0), 0xc0de)
            ]
        );
    }

    #[test]
    fn wfi_sleeps_until_a_device_interrupt() {
        let (fake, vm) = vm(1);
        vm.set_wfi_cap(Duration::from_secs(30));
        let mut v = boot_vcpu(&vm);
        let irq = vm.interrupt(16);
        push(&fake, ec(EC_WFX), 0, &[]);
        push_write(&fake);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            irq.trigger().unwrap();
        });
        let took = time_to_write(&mut v);
        assert!(took >= Duration::from_millis(90), "woke after {took:?}");
        t.join().unwrap();
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::SetSpi(..))),
            vec![Call::SetSpi(48, true)]
        );
    }

    #[test]
    fn wfi_wakes_for_the_virtual_timer_deadline() {
        let (fake, vm) = vm(1);
        vm.set_wfi_cap(Duration::from_secs(30));
        let mut v = boot_vcpu(&vm);
        fake.set_counter(1_000, 1_000_000); // 1 MHz
        fake.set_sys_reg(H0, sys_reg::CNTV_CTL_EL0, CTL_ENABLE);
        fake.set_sys_reg(H0, sys_reg::CNTV_CVAL_EL0, 1_000 + 60_000); // 60 ms ahead
        push(&fake, ec(EC_WFX), 0, &[]);
        push(&fake, ec(EC_WFX) | 1, 0, &[]); // WFE: no sleep
        push_write(&fake);
        let took = time_to_write(&mut v);
        assert!(
            took >= Duration::from_millis(55) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[test]
    fn wfi_sleep_is_capped_so_idle_vcpus_see_ipis() {
        let (fake, vm) = vm(1);
        vm.set_wfi_cap(Duration::from_millis(20));
        let mut v = boot_vcpu(&vm);
        // Timer off: without the cap this WFI would sleep until woken.
        fake.push_exit(
            H0,
            ExitReason::Exception,
            ec(EC_WFX),
            0,
            &[(Reg::Pc, ENTRY)],
        );
        push_write(&fake);
        let took = time_to_write(&mut v);
        assert!(
            took >= Duration::from_millis(15) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(fake.reg(H0, Reg::Pc), ENTRY + 4, "stepped over the WFI");
    }

    #[test]
    fn vtimer_exit_pends_ppi_27_and_keeps_running() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        fake.set_sys_reg(H0, sys_reg::CNTV_CTL_EL0, CTL_ENABLE | CTL_ISTATUS);
        fake.push_exit(H0, ExitReason::VtimerActivated, 0, 0, &[]);
        // The guest's handler reprograms the timer, then touches a device.
        push_write(&fake);
        let exit = v.run().unwrap();
        assert!(matches!(exit, VcpuExit::MmioWrite(..)));
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::SetRedist(..))),
            vec![Call::SetRedist(H0, 0x1_0200, 1 << 27)]
        );
        // Still firing at that exit: the mask stays on.
        assert!(fake
            .calls_of(|c| matches!(c, Call::VtimerMask(..)))
            .is_empty());
        fake.set_sys_reg(H0, sys_reg::CNTV_CTL_EL0, CTL_ENABLE);
        push_write(&fake);
        v.run().unwrap();
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::VtimerMask(..))),
            vec![Call::VtimerMask(H0, false)]
        );
    }

    #[test]
    fn stop_kicks_running_vcpus_and_releases_parked_ones() {
        let (fake, vm) = vm(2);
        let mut v0 = boot_vcpu(&vm);
        push_write(&fake);
        v0.run().unwrap();
        let mut v1 = vm.vcpu(1).unwrap();
        let t = std::thread::spawn(move || matches!(v1.run(), Ok(VcpuExit::Interrupted)));
        std::thread::sleep(Duration::from_millis(30));
        vm.stop();
        assert!(t.join().unwrap(), "the parked vCPU returned Interrupted");
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::VcpusExit(..))),
            vec![Call::VcpusExit(vec![H0])]
        );
        assert!(matches!(v0.run().unwrap(), VcpuExit::Interrupted));
        drop(v0);
        assert!(fake
            .calls_of(|c| matches!(c, Call::VcpuDestroy(_)))
            .contains(&Call::VcpuDestroy(H0)));
    }

    #[test]
    fn canceled_unknown_and_unhandled_exits() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        fake.push_exit(H0, ExitReason::Canceled, 0, 0, &[]);
        fake.push_exit(
            H0,
            ExitReason::Exception,
            ec(EC_BRK64) | 3,
            0,
            &[(Reg::Pc, 0x4000_1234)],
        );
        fake.push_exit(H0, ExitReason::Unknown(3), 0, 0, &[]);
        assert!(matches!(v.run().unwrap(), VcpuExit::Interrupted));
        match v.run().unwrap() {
            VcpuExit::Unhandled(what) => assert!(
                what.contains("BRK") && what.contains("0x40001234"),
                "{what}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(v.run().unwrap(), VcpuExit::Failed(_)));
    }

    #[test]
    fn trapped_system_register_reads_as_zero_and_steps_over() {
        let (fake, vm) = vm(1);
        let mut v = boot_vcpu(&vm);
        fake.set_reg(H0, Reg::X(5), 77);
        let mrs_x5 = ec(EC_SYSREG) | (3 << 20) | (1 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        push(&fake, mrs_x5, 0, &[(Reg::Pc, ENTRY)]);
        push_hvc(&fake, H0, &[(Reg::X(0), func::SYSTEM_OFF.into())]);
        assert!(matches!(v.run().unwrap(), VcpuExit::PowerOff));
        assert_eq!(fake.reg(H0, Reg::X(5)), 0);
        assert_eq!(fake.reg(H0, Reg::Pc), ENTRY + 4);
    }
}
