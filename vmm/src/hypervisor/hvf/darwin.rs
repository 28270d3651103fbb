//! [`HvfApi`] on the real Hypervisor.framework (macOS 15+ on Apple silicon).
//!
//! Each method is one framework call with its result converted. The exit record
//! `hv_vcpu_create` hands back is per vCPU and per thread, so it is kept in a
//! thread-local next to the vCPU's handle and read after every `hv_vcpu_run`.

use std::cell::Cell;
use std::ptr;

use super::ffi::{self, hv_return_t, hv_vcpu_exit_t, GicFns};
use super::{ExitInfo, ExitReason, GicParams, HvResult, HvReturn, HvVcpu, HvfApi, Reg};

thread_local! {
    /// The vCPU created on this thread and its exit record.
    static VCPU_EXIT: Cell<Option<(HvVcpu, *const hv_vcpu_exit_t)>> = const { Cell::new(None) };
}

fn ok(r: hv_return_t) -> HvResult<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(HvReturn(r as u32))
    }
}

/// The framework.
pub struct Framework {
    gic: Option<GicFns>,
    freq: u64,
}

impl Framework {
    /// Looks up the GIC functions and the counter frequency.
    pub fn new() -> Self {
        let mut tb = ffi::mach_timebase_info_data_t::default();
        // SAFETY: writes one struct through a live pointer.
        let r = unsafe { ffi::mach_timebase_info(&mut tb) };
        // ticks * numer / denom = ns, so ticks per second = 1e9 * denom / numer
        // (24 MHz on Apple silicon).
        let freq = if r == 0 && tb.numer != 0 {
            1_000_000_000u64 * u64::from(tb.denom) / u64::from(tb.numer)
        } else {
            24_000_000
        };
        Self {
            gic: GicFns::load(),
            freq,
        }
    }

    fn gic(&self) -> HvResult<&GicFns> {
        // HV_UNSUPPORTED: hv_gic_* appeared in macOS 15.
        self.gic.as_ref().ok_or(HvReturn::UNSUPPORTED)
    }
}

impl Default for Framework {
    fn default() -> Self {
        Self::new()
    }
}

impl HvfApi for Framework {
    fn vm_create(&self) -> HvResult<()> {
        // SAFETY: a NULL configuration asks for the defaults.
        ok(unsafe { ffi::hv_vm_create(ptr::null_mut()) })
    }

    fn vm_destroy(&self) -> HvResult<()> {
        // SAFETY: no arguments; fails harmlessly without a VM.
        ok(unsafe { ffi::hv_vm_destroy() })
    }

    unsafe fn vm_map(&self, host: *mut u8, ipa: u64, size: usize, flags: u64) -> HvResult<()> {
        // SAFETY: the caller guarantees the host range for the mapping's life.
        ok(unsafe { ffi::hv_vm_map(host.cast(), ipa, size, flags) })
    }

    fn gic_params(&self) -> HvResult<GicParams> {
        let g = self.gic()?;
        let get = |f: unsafe extern "C" fn(*mut usize) -> hv_return_t| -> HvResult<u64> {
            let mut v = 0usize;
            // SAFETY: the function writes one size_t through a live pointer.
            ok(unsafe { f(&mut v) })?;
            Ok(v as u64)
        };
        let (mut base, mut count) = (0u32, 0u32);
        // SAFETY: writes two uint32_t through live pointers.
        ok(unsafe { (g.get_spi_interrupt_range)(&mut base, &mut count) })?;
        Ok(GicParams {
            dist_size: get(g.get_distributor_size)?,
            dist_align: get(g.get_distributor_base_alignment)?,
            redist_region_size: get(g.get_redistributor_region_size)?,
            redist_size: get(g.get_redistributor_size)?,
            redist_align: get(g.get_redistributor_base_alignment)?,
            spi_range: (base, count),
        })
    }

    fn gic_create(&self, dist_base: u64, redist_base: u64) -> HvResult<()> {
        let g = self.gic()?;
        // SAFETY: returns a new configuration object (or NULL), released below.
        let cfg = unsafe { (g.config_create)() };
        if cfg.is_null() {
            return Err(HvReturn::NO_RESOURCES);
        }
        // SAFETY: `cfg` is a live configuration object for all three calls.
        let r = unsafe {
            ok((g.config_set_distributor_base)(cfg, dist_base))
                .and_then(|()| ok((g.config_set_redistributor_base)(cfg, redist_base)))
                .and_then(|()| ok((g.create)(cfg)))
        };
        // SAFETY: the object came from hv_gic_config_create and is not used again.
        unsafe { ffi::os_release(cfg) };
        r
    }

    fn gic_set_spi(&self, intid: u32, level: bool) -> HvResult<()> {
        let g = self.gic()?;
        // SAFETY: plain integer arguments; any thread may call it.
        ok(unsafe { (g.set_spi)(intid, level) })
    }

    fn gic_set_redistributor_reg(&self, vcpu: HvVcpu, reg: u32, value: u64) -> HvResult<()> {
        let g = self.gic()?;
        // SAFETY: plain integer arguments; called on the vCPU's own thread.
        ok(unsafe { (g.set_redistributor_reg)(vcpu, reg, value) })
    }

    fn vcpu_create(&self) -> HvResult<HvVcpu> {
        let mut vcpu: ffi::hv_vcpu_t = 0;
        let mut exit: *mut hv_vcpu_exit_t = ptr::null_mut();
        // SAFETY: both out-pointers are live locals; NULL config means defaults.
        ok(unsafe { ffi::hv_vcpu_create(&mut vcpu, &mut exit, ptr::null_mut()) })?;
        if exit.is_null() {
            return Err(HvReturn::ERROR);
        }
        VCPU_EXIT.with(|c| c.set(Some((vcpu, exit.cast_const()))));
        Ok(vcpu)
    }

    fn vcpu_destroy(&self, vcpu: HvVcpu) -> HvResult<()> {
        VCPU_EXIT.with(|c| {
            if c.get().is_some_and(|(v, _)| v == vcpu) {
                c.set(None);
            }
        });
        // SAFETY: called on the owning thread; the handle is not used again.
        ok(unsafe { ffi::hv_vcpu_destroy(vcpu) })
    }

    fn vcpu_run(&self, vcpu: HvVcpu) -> HvResult<ExitInfo> {
        let exit = VCPU_EXIT
            .with(|c| c.get())
            .filter(|&(v, _)| v == vcpu)
            .map(|(_, e)| e);
        // Not created on this thread: the framework would refuse it too.
        let exit = exit.ok_or(HvReturn::BAD_ARGUMENT)?;
        // SAFETY: runs the vCPU owned by this thread.
        ok(unsafe { ffi::hv_vcpu_run(vcpu) })?;
        // SAFETY: the framework keeps the record alive until hv_vcpu_destroy and
        // has filled it in before hv_vcpu_run returned.
        let e = unsafe { ptr::read(exit) };
        Ok(ExitInfo {
            reason: ExitReason::from_raw(e.reason),
            syndrome: e.exception.syndrome,
            virtual_address: e.exception.virtual_address,
            physical_address: e.exception.physical_address,
        })
    }

    fn vcpu_get_reg(&self, vcpu: HvVcpu, reg: Reg) -> HvResult<u64> {
        let mut v = 0u64;
        // SAFETY: writes one uint64_t through a live pointer.
        ok(unsafe { ffi::hv_vcpu_get_reg(vcpu, reg.raw(), &mut v) })?;
        Ok(v)
    }

    fn vcpu_set_reg(&self, vcpu: HvVcpu, reg: Reg, value: u64) -> HvResult<()> {
        // SAFETY: plain integer arguments.
        ok(unsafe { ffi::hv_vcpu_set_reg(vcpu, reg.raw(), value) })
    }

    fn vcpu_get_sys_reg(&self, vcpu: HvVcpu, reg: u16) -> HvResult<u64> {
        let mut v = 0u64;
        // SAFETY: writes one uint64_t through a live pointer.
        ok(unsafe { ffi::hv_vcpu_get_sys_reg(vcpu, reg, &mut v) })?;
        Ok(v)
    }

    fn vcpu_set_sys_reg(&self, vcpu: HvVcpu, reg: u16, value: u64) -> HvResult<()> {
        // SAFETY: plain integer arguments.
        ok(unsafe { ffi::hv_vcpu_set_sys_reg(vcpu, reg, value) })
    }

    fn vcpu_set_vtimer_mask(&self, vcpu: HvVcpu, masked: bool) -> HvResult<()> {
        // SAFETY: plain arguments.
        ok(unsafe { ffi::hv_vcpu_set_vtimer_mask(vcpu, masked) })
    }

    fn vcpu_get_vtimer_offset(&self, vcpu: HvVcpu) -> HvResult<u64> {
        let mut v = 0u64;
        // SAFETY: writes one uint64_t through a live pointer.
        ok(unsafe { ffi::hv_vcpu_get_vtimer_offset(vcpu, &mut v) })?;
        Ok(v)
    }

    fn vcpus_exit(&self, vcpus: &[HvVcpu]) -> HvResult<()> {
        let mut list = vcpus.to_vec();
        let n = u32::try_from(list.len()).map_err(|_| HvReturn::BAD_ARGUMENT)?;
        // SAFETY: `list` holds `n` handles and outlives the call.
        ok(unsafe { ffi::hv_vcpus_exit(list.as_mut_ptr(), n) })
    }

    fn counter(&self) -> u64 {
        // SAFETY: no arguments.
        unsafe { ffi::mach_absolute_time() }
    }

    fn counter_frequency(&self) -> u64 {
        self.freq
    }
}
