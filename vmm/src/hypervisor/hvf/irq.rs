//! Interrupt routing and vCPU wake-ups for the HVF backend.
//!
//! Device interrupts: a [`GicInterrupt`] raises an edge on its SPI in the
//! framework's GIC (`hv_gic_set_spi(intid, true)`; for an edge-triggered INTID a
//! `false` level is ignored, so one call per edge). A vCPU running guest code
//! takes it at once; a vCPU idling in WFI is in aivmm's own wait, so every
//! trigger also wakes the idlers, who re-enter the guest and take it there.
//!
//! The virtual timer: when it fires while a vCPU runs, the framework exits with
//! VTIMER_ACTIVATED and masks it. aivmm makes the timer's PPI (INTID 27) pending
//! in that vCPU's redistributor and leaves the timer masked until the guest has
//! dealt with it (its CNTV_CTL no longer shows an unmasked, enabled, firing
//! timer), then unmasks it, checked on every exit ([`VtimerState`]).
//!
//! [`VmShared`] is the state the vCPUs share: PSCI power states, the stop flag
//! and a wake-up generation, under one mutex with one condition variable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::arch::aarch64::layout::VTIMER_INTID;
use crate::arch::aarch64::psci::Psci;

use super::{hv, sys_reg, HvVcpu, HvfApi, Result, GICR_ISPENDR0};

/// CNTV_CTL_EL0.ENABLE.
pub const CTL_ENABLE: u64 = 1 << 0;
/// CNTV_CTL_EL0.IMASK.
pub const CTL_IMASK: u64 = 1 << 1;
/// CNTV_CTL_EL0.ISTATUS.
pub const CTL_ISTATUS: u64 = 1 << 2;

/// Whether a timer with control value `ctl` asserts its interrupt.
pub fn timer_asserted(ctl: u64) -> bool {
    ctl & (CTL_ENABLE | CTL_IMASK | CTL_ISTATUS) == CTL_ENABLE | CTL_ISTATUS
}

/// How long a WFI may sleep before the virtual timer fires: `None` to sleep
/// until woken (timer off or masked), zero if it is already due.
pub fn vtimer_sleep(ctl: u64, cval: u64, now: u64, freq: u64) -> Option<Duration> {
    if ctl & CTL_ENABLE == 0 || ctl & CTL_IMASK != 0 {
        return None;
    }
    if ctl & CTL_ISTATUS != 0 || cval <= now || freq == 0 {
        return Some(Duration::ZERO);
    }
    let ticks = u128::from(cval - now);
    let nanos = ticks * 1_000_000_000 / u128::from(freq);
    Some(Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

/// What the vCPUs share, under [`VmShared::lock`].
#[derive(Debug)]
pub struct Shared {
    /// PSCI power states.
    pub psci: Psci,
    /// Bumped by every wake-up (a device interrupt, a CPU_ON, a stop).
    pub wake_gen: u64,
    /// The VM is stopping: vCPUs return `Interrupted` and never enter the guest.
    pub stopping: bool,
    /// Framework handles of the vCPUs that exist, for `hv_vcpus_exit`.
    pub handles: Vec<Option<HvVcpu>>,
}

/// The longest a WFI sleeps by default. Interrupts the framework's GIC delivers
/// on its own (SGIs between vCPUs: IPIs) never pass through aivmm, so an idle
/// vCPU cannot be woken for them; it re-enters the guest this often instead,
/// which bounds IPI latency to an idle vCPU.
pub const DEFAULT_WFI_CAP: Duration = Duration::from_millis(1);

/// The VM state the vCPU threads and devices share.
pub struct VmShared<A: HvfApi> {
    pub(crate) api: Arc<A>,
    state: Mutex<Shared>,
    cond: Condvar,
    pub(crate) gic_ready: AtomicBool,
    /// Upper bound of one WFI sleep.
    pub(crate) wfi_cap: Mutex<Duration>,
}

impl<A: HvfApi> VmShared<A> {
    pub(crate) fn new(api: Arc<A>, vcpus: usize, ram_start: u64, ram_end: u64) -> Self {
        Self {
            api,
            state: Mutex::new(Shared {
                psci: Psci::new(vcpus, ram_start, ram_end),
                wake_gen: 0,
                stopping: false,
                handles: vec![None; vcpus],
            }),
            cond: Condvar::new(),
            gic_ready: AtomicBool::new(false),
            wfi_cap: Mutex::new(DEFAULT_WFI_CAP),
        }
    }

    /// Locks the shared state (a poisoned lock is still usable: the state is
    /// plain data, consistent after every statement).
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The longest one WFI may sleep.
    pub fn wfi_cap(&self) -> Duration {
        *self.wfi_cap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every waiting vCPU.
    pub fn wake_all(&self) {
        let mut s = self.lock();
        s.wake_gen = s.wake_gen.wrapping_add(1);
        drop(s);
        self.cond.notify_all();
    }

    /// Waits, for at most `timeout`, until `done` holds.
    pub(crate) fn wait_while<'a>(
        &'a self,
        guard: MutexGuard<'a, Shared>,
        timeout: Option<Duration>,
        mut keep_waiting: impl FnMut(&mut Shared) -> bool,
    ) -> MutexGuard<'a, Shared> {
        match timeout {
            None => self
                .cond
                .wait_while(guard, |s| keep_waiting(s))
                .unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                self.cond
                    .wait_timeout_while(guard, t, |s| keep_waiting(s))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        }
    }

    /// Stops the VM: wakes idle vCPUs and makes running ones leave the guest.
    pub fn stop(&self) {
        let mut s = self.lock();
        s.stopping = true;
        s.wake_gen = s.wake_gen.wrapping_add(1);
        let running: Vec<HvVcpu> = s.handles.iter().flatten().copied().collect();
        drop(s);
        self.cond.notify_all();
        if !running.is_empty() {
            if let Err(code) = self.api.vcpus_exit(&running) {
                log::warn!("hv_vcpus_exit: {code}");
            }
        }
    }
}

/// A device's interrupt line: an SPI of the framework's GIC.
pub struct GicInterrupt<A: HvfApi> {
    shared: Arc<VmShared<A>>,
    intid: u32,
}

impl<A: HvfApi> GicInterrupt<A> {
    pub(crate) fn new(shared: Arc<VmShared<A>>, intid: u32) -> Self {
        Self { shared, intid }
    }

    /// The INTID this line raises.
    pub fn intid(&self) -> u32 {
        self.intid
    }
}

impl<A: HvfApi> aivmm_devices::Interrupt for GicInterrupt<A> {
    fn trigger(&self) -> std::io::Result<()> {
        if !self.shared.gic_ready.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the GIC has not been created"));
        }
        self.shared
            .api
            .gic_set_spi(self.intid, true)
            .map_err(|code| {
                std::io::Error::other(format!("hv_gic_set_spi({}): {code}", self.intid))
            })?;
        self.shared.wake_all();
        Ok(())
    }
}

/// One vCPU's view of its virtual timer.
#[derive(Debug, Default)]
pub struct VtimerState {
    /// The framework masked the timer after VTIMER_ACTIVATED.
    pub masked: bool,
}

impl VtimerState {
    /// Handles VTIMER_ACTIVATED: the PPI becomes pending in `vcpu`'s
    /// redistributor; the framework has masked the timer.
    pub fn activated<A: HvfApi>(&mut self, api: &A, vcpu: HvVcpu) -> Result<()> {
        self.masked = true;
        hv(
            "hv_gic_set_redistributor_reg(GICR_ISPENDR0)",
            api.gic_set_redistributor_reg(vcpu, GICR_ISPENDR0, 1 << VTIMER_INTID),
        )
    }

    /// Unmasks the timer once the guest has handled it (called on every exit).
    pub fn sync<A: HvfApi>(&mut self, api: &A, vcpu: HvVcpu) -> Result<()> {
        if !self.masked {
            return Ok(());
        }
        let ctl = hv(
            "hv_vcpu_get_sys_reg(CNTV_CTL_EL0)",
            api.vcpu_get_sys_reg(vcpu, sys_reg::CNTV_CTL_EL0),
        )?;
        if !timer_asserted(ctl) {
            hv(
                "hv_vcpu_set_vtimer_mask",
                api.vcpu_set_vtimer_mask(vcpu, false),
            )?;
            self.masked = false;
        }
        Ok(())
    }

    /// How long a WFI on `vcpu` may sleep (see [`vtimer_sleep`]). While the
    /// framework keeps the timer masked it cannot exit for it, so a firing timer
    /// is made pending again and the WFI does not sleep.
    pub fn wfi_budget<A: HvfApi>(&mut self, api: &A, vcpu: HvVcpu) -> Result<Option<Duration>> {
        self.sync(api, vcpu)?;
        let ctl = hv(
            "hv_vcpu_get_sys_reg(CNTV_CTL_EL0)",
            api.vcpu_get_sys_reg(vcpu, sys_reg::CNTV_CTL_EL0),
        )?;
        if self.masked && timer_asserted(ctl) {
            self.activated(api, vcpu)?;
            return Ok(Some(Duration::ZERO));
        }
        let cval = hv(
            "hv_vcpu_get_sys_reg(CNTV_CVAL_EL0)",
            api.vcpu_get_sys_reg(vcpu, sys_reg::CNTV_CVAL_EL0),
        )?;
        let offset = hv(
            "hv_vcpu_get_vtimer_offset",
            api.vcpu_get_vtimer_offset(vcpu),
        )?;
        let now = api.counter().wrapping_sub(offset);
        Ok(vtimer_sleep(ctl, cval, now, api.counter_frequency()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::fake::{Call, FakeHvf};
    use super::*;
    use aivmm_devices::Interrupt;

    #[test]
    fn timer_assertion_needs_enable_status_and_no_mask() {
        assert!(timer_asserted(CTL_ENABLE | CTL_ISTATUS));
        assert!(!timer_asserted(CTL_ENABLE | CTL_ISTATUS | CTL_IMASK));
        assert!(!timer_asserted(CTL_ISTATUS));
        assert!(!timer_asserted(CTL_ENABLE));
    }

    #[test]
    fn wfi_sleep_follows_the_timer_deadline() {
        let f = 24_000_000;
        assert_eq!(vtimer_sleep(0, 100, 0, f), None, "timer off");
        assert_eq!(
            vtimer_sleep(CTL_ENABLE | CTL_IMASK, 100, 0, f),
            None,
            "masked"
        );
        assert_eq!(
            vtimer_sleep(CTL_ENABLE, 24_000, 0, f),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            vtimer_sleep(CTL_ENABLE, 10, 20, f),
            Some(Duration::ZERO),
            "past due"
        );
        assert_eq!(
            vtimer_sleep(CTL_ENABLE | CTL_ISTATUS, 1 << 40, 0, f),
            Some(Duration::ZERO)
        );
        // A far deadline does not overflow.
        assert!(vtimer_sleep(CTL_ENABLE, u64::MAX, 0, 1).is_some());
    }

    #[test]
    fn device_interrupt_raises_an_edge_on_its_spi_and_wakes_idlers() {
        let fake = FakeHvf::new();
        let shared = Arc::new(VmShared::new(Arc::new(fake.clone()), 1, 0, 1));
        let irq = GicInterrupt::new(shared.clone(), 32 + 17);
        // Before hv_gic_create there is nowhere to send it.
        assert!(irq.trigger().unwrap_err().to_string().contains("GIC"));
        shared.gic_ready.store(true, Ordering::SeqCst);
        let before = shared.lock().wake_gen;
        irq.trigger().unwrap();
        irq.trigger().unwrap();
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::SetSpi(..))),
            vec![Call::SetSpi(49, true), Call::SetSpi(49, true)]
        );
        assert_eq!(shared.lock().wake_gen, before + 2);
        fake.fail_next("gic_set_spi", super::super::HvReturn::BAD_ARGUMENT);
        assert!(irq
            .trigger()
            .unwrap_err()
            .to_string()
            .contains("hv_gic_set_spi(49): HV_BAD_ARGUMENT"));
        assert_eq!(irq.intid(), 49);
    }

    #[test]
    fn vtimer_fires_into_ppi_27_and_unmasks_once_handled() {
        let fake = FakeHvf::new();
        let mut vt = VtimerState::default();
        vt.activated(&fake, 7).unwrap();
        assert!(vt.masked);
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::SetRedist(..))),
            vec![Call::SetRedist(7, 0x1_0200, 1 << 27)]
        );
        // Still firing: stays masked.
        fake.set_sys_reg(7, sys_reg::CNTV_CTL_EL0, CTL_ENABLE | CTL_ISTATUS);
        vt.sync(&fake, 7).unwrap();
        assert!(vt.masked);
        assert!(fake
            .calls_of(|c| matches!(c, Call::VtimerMask(..)))
            .is_empty());
        // The guest reprogrammed it: unmasked.
        fake.set_sys_reg(7, sys_reg::CNTV_CTL_EL0, CTL_ENABLE);
        vt.sync(&fake, 7).unwrap();
        assert!(!vt.masked);
        assert_eq!(
            fake.calls_of(|c| matches!(c, Call::VtimerMask(..))),
            vec![Call::VtimerMask(7, false)]
        );
    }

    #[test]
    fn wfi_budget_uses_the_virtual_counter() {
        let fake = FakeHvf::new();
        let mut vt = VtimerState::default();
        fake.set_counter(1_000_000, 24_000_000);
        fake.set_vtimer_offset(3, 400_000);
        // Virtual now = 600_000; the deadline 2.4 ms later.
        fake.set_sys_reg(3, sys_reg::CNTV_CTL_EL0, CTL_ENABLE);
        fake.set_sys_reg(3, sys_reg::CNTV_CVAL_EL0, 600_000 + 57_600);
        assert_eq!(
            vt.wfi_budget(&fake, 3).unwrap(),
            Some(Duration::from_micros(2400))
        );
        // Masked by the framework and still firing: re-pend, do not sleep.
        vt.masked = true;
        fake.set_sys_reg(3, sys_reg::CNTV_CTL_EL0, CTL_ENABLE | CTL_ISTATUS);
        assert_eq!(vt.wfi_budget(&fake, 3).unwrap(), Some(Duration::ZERO));
        assert_eq!(fake.calls_of(|c| matches!(c, Call::SetRedist(..))).len(), 1);
    }
}
