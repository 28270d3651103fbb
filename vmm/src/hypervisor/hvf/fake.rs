//! A fake Hypervisor.framework for tests: it records every call, keeps register
//! files in maps and plays back scripted exits per vCPU.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ExitInfo, ExitReason, GicParams, HvResult, HvReturn, HvVcpu, HvfApi, Reg};

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Map(u64, u64, usize, u64),
    GicCreate(u64, u64),
    SetSpi(u32, bool),
    SetRedist(HvVcpu, u32, u64),
    VcpuCreate(HvVcpu),
    VcpuDestroy(HvVcpu),
    Run(HvVcpu),
    SetReg(HvVcpu, Reg, u64),
    SetSysReg(HvVcpu, u16, u64),
    VtimerMask(HvVcpu, bool),
    VcpusExit(Vec<HvVcpu>),
}

/// A scripted exit: registers the "guest" sets, then the exit itself.
#[derive(Clone, Debug)]
struct Scripted {
    regs: Vec<(Reg, u64)>,
    exit: ExitInfo,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    fail: HashMap<&'static str, HvReturn>,
    regs: HashMap<(HvVcpu, Reg), u64>,
    sys_regs: HashMap<(HvVcpu, u16), u64>,
    offsets: HashMap<HvVcpu, u64>,
    scripts: HashMap<HvVcpu, VecDeque<Scripted>>,
    next_vcpu: HvVcpu,
    counter: (u64, u64),
    destroyed: bool,
    gic: Option<(u64, u64)>,
}

/// GIC parameters like the framework's: 64 KiB frames, 128 KiB redistributors.
pub fn gic_params() -> GicParams {
    GicParams {
        dist_size: 0x1_0000,
        dist_align: 0x1_0000,
        redist_region_size: 0x40_0000,
        redist_size: 0x2_0000,
        redist_align: 0x1_0000,
        spi_range: (32, 988),
    }
}

/// The fake; clones share state.
#[derive(Clone)]
pub struct FakeHvf(Arc<Mutex<State>>);

/// The first handle `vcpu_create` returns (then 101, 102, ...).
pub const FIRST_HANDLE: HvVcpu = 100;

impl FakeHvf {
    pub fn new() -> Self {
        let s = State {
            next_vcpu: FIRST_HANDLE,
            counter: (0, 24_000_000),
            ..State::default()
        };
        Self(Arc::new(Mutex::new(s)))
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, op: &'static str) -> HvResult<()> {
        match self.st().fail.remove(op) {
            Some(code) => Err(code),
            None => Ok(()),
        }
    }

    fn record(&self, c: Call) {
        self.st().calls.push(c);
    }

    /// Makes the next call of method `op` fail with `code`.
    pub fn fail_next(&self, op: &'static str, code: HvReturn) {
        self.st().fail.insert(op, code);
    }

    /// The calls `pick` selects, in order.
    pub fn calls_of(&self, pick: impl Fn(&Call) -> bool) -> Vec<Call> {
        self.st()
            .calls
            .iter()
            .filter(|c| pick(c))
            .cloned()
            .collect()
    }

    /// The recorded `hv_vm_map` calls: (host, ipa, size, flags).
    pub fn maps(&self) -> Vec<(u64, u64, usize, u64)> {
        self.calls_of(|c| matches!(c, Call::Map(..)))
            .into_iter()
            .filter_map(|c| match c {
                Call::Map(h, i, s, f) => Some((h, i, s, f)),
                _ => None,
            })
            .collect()
    }

    pub fn gic(&self) -> Option<(u64, u64)> {
        self.st().gic
    }

    pub fn destroyed(&self) -> bool {
        self.st().destroyed
    }

    pub fn set_sys_reg(&self, vcpu: HvVcpu, reg: u16, value: u64) {
        self.st().sys_regs.insert((vcpu, reg), value);
    }

    pub fn sys_reg(&self, vcpu: HvVcpu, reg: u16) -> u64 {
        self.st().sys_regs.get(&(vcpu, reg)).copied().unwrap_or(0)
    }

    pub fn set_reg(&self, vcpu: HvVcpu, reg: Reg, value: u64) {
        self.st().regs.insert((vcpu, reg), value);
    }

    pub fn reg(&self, vcpu: HvVcpu, reg: Reg) -> u64 {
        self.st().regs.get(&(vcpu, reg)).copied().unwrap_or(0)
    }

    pub fn set_counter(&self, now: u64, freq: u64) {
        self.st().counter = (now, freq);
    }

    pub fn set_vtimer_offset(&self, vcpu: HvVcpu, offset: u64) {
        self.st().offsets.insert(vcpu, offset);
    }

    /// Queues an exit for `vcpu`, after the guest sets `regs`.
    pub fn push_exit(
        &self,
        vcpu: HvVcpu,
        reason: ExitReason,
        syndrome: u64,
        ipa: u64,
        regs: &[(Reg, u64)],
    ) {
        let exit = ExitInfo {
            reason,
            syndrome,
            virtual_address: 0,
            physical_address: ipa,
        };
        self.st()
            .scripts
            .entry(vcpu)
            .or_default()
            .push_back(Scripted {
                regs: regs.to_vec(),
                exit,
            });
    }
}

impl HvfApi for FakeHvf {
    fn vm_create(&self) -> HvResult<()> {
        self.check("vm_create")
    }
    fn vm_destroy(&self) -> HvResult<()> {
        self.st().destroyed = true;
        Ok(())
    }
    unsafe fn vm_map(&self, host: *mut u8, ipa: u64, size: usize, flags: u64) -> HvResult<()> {
        self.check("vm_map")?;
        self.record(Call::Map(host as u64, ipa, size, flags));
        Ok(())
    }
    fn gic_params(&self) -> HvResult<GicParams> {
        self.check("gic_params")?;
        Ok(gic_params())
    }
    fn gic_create(&self, dist_base: u64, redist_base: u64) -> HvResult<()> {
        self.check("gic_create")?;
        self.st().gic = Some((dist_base, redist_base));
        self.record(Call::GicCreate(dist_base, redist_base));
        Ok(())
    }
    fn gic_set_spi(&self, intid: u32, level: bool) -> HvResult<()> {
        self.check("gic_set_spi")?;
        self.record(Call::SetSpi(intid, level));
        Ok(())
    }
    fn gic_set_redistributor_reg(&self, vcpu: HvVcpu, reg: u32, value: u64) -> HvResult<()> {
        self.check("gic_set_redistributor_reg")?;
        self.record(Call::SetRedist(vcpu, reg, value));
        Ok(())
    }
    fn vcpu_create(&self) -> HvResult<HvVcpu> {
        self.check("vcpu_create")?;
        let mut s = self.st();
        let h = s.next_vcpu;
        s.next_vcpu += 1;
        s.calls.push(Call::VcpuCreate(h));
        Ok(h)
    }
    fn vcpu_destroy(&self, vcpu: HvVcpu) -> HvResult<()> {
        self.record(Call::VcpuDestroy(vcpu));
        Ok(())
    }
    fn vcpu_run(&self, vcpu: HvVcpu) -> HvResult<ExitInfo> {
        self.check("vcpu_run")?;
        let mut s = self.st();
        s.calls.push(Call::Run(vcpu));
        let Some(next) = s.scripts.get_mut(&vcpu).and_then(|q| q.pop_front()) else {
            // Nothing scripted: behave as if kicked.
            return Ok(ExitInfo {
                reason: ExitReason::Canceled,
                syndrome: 0,
                virtual_address: 0,
                physical_address: 0,
            });
        };
        for (r, v) in next.regs {
            s.regs.insert((vcpu, r), v);
        }
        Ok(next.exit)
    }
    fn vcpu_get_reg(&self, vcpu: HvVcpu, reg: Reg) -> HvResult<u64> {
        self.check("vcpu_get_reg")?;
        Ok(self.reg(vcpu, reg))
    }
    fn vcpu_set_reg(&self, vcpu: HvVcpu, reg: Reg, value: u64) -> HvResult<()> {
        self.check("vcpu_set_reg")?;
        let mut s = self.st();
        s.calls.push(Call::SetReg(vcpu, reg, value));
        s.regs.insert((vcpu, reg), value);
        Ok(())
    }
    fn vcpu_get_sys_reg(&self, vcpu: HvVcpu, reg: u16) -> HvResult<u64> {
        self.check("vcpu_get_sys_reg")?;
        Ok(self.sys_reg(vcpu, reg))
    }
    fn vcpu_set_sys_reg(&self, vcpu: HvVcpu, reg: u16, value: u64) -> HvResult<()> {
        self.check("vcpu_set_sys_reg")?;
        let mut s = self.st();
        s.calls.push(Call::SetSysReg(vcpu, reg, value));
        s.sys_regs.insert((vcpu, reg), value);
        Ok(())
    }
    fn vcpu_set_vtimer_mask(&self, vcpu: HvVcpu, masked: bool) -> HvResult<()> {
        self.check("vcpu_set_vtimer_mask")?;
        self.record(Call::VtimerMask(vcpu, masked));
        Ok(())
    }
    fn vcpu_get_vtimer_offset(&self, vcpu: HvVcpu) -> HvResult<u64> {
        Ok(self.st().offsets.get(&vcpu).copied().unwrap_or(0))
    }
    fn vcpus_exit(&self, vcpus: &[HvVcpu]) -> HvResult<()> {
        self.record(Call::VcpusExit(vcpus.to_vec()));
        Ok(())
    }
    fn counter(&self) -> u64 {
        self.st().counter.0
    }
    fn counter_frequency(&self) -> u64 {
        self.st().counter.1
    }
}
