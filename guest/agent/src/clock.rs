//! The guest's wall clock, kept from lagging the host's.
//!
//! Files in /work carry the host's times (virtio-fs: the host's kernel stamps
//! them), so a guest clock behind the host's makes every file the guest just wrote
//! look as if it came from the future: make warns "Clock skew detected" and may
//! skip work. kvm-clock keeps the guest's time steady, but its wall clock is read
//! once at boot (in the nested harness it was 0.6–0.8 s behind), and the host's
//! own clock is slewed by NTP. So the host sends its clock
//! ([`aivmm_protocol::ToGuest::Clock`]) on every connection and every 30 s while a
//! command runs, and the agent moves the guest's clock forward to it, plus
//! [`LEAD`] for the message's way here. It never moves the clock back: a guest a
//! little ahead sees the host's files as just made, which is what they are.
//!
//! Only in a VM, as root ([`enable`]): the agent's tests run it beside its host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How far ahead of the host's time as sent the guest's clock is set: more than
/// the message takes to arrive on an idle guest.
pub const LEAD: Duration = Duration::from_millis(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Lets [`follow_host`] set the clock (the agent runs in its VM).
pub fn enable() {
    ENABLED.store(true, Ordering::SeqCst);
}

/// Moves the guest's clock forward to the host's `unix_ns` plus [`LEAD`], if it
/// is behind that. A failure is said once on the console.
pub fn follow_host(unix_ns: u64) {
    if !ENABLED.load(Ordering::SeqCst) {
        return;
    }
    let target = Duration::from_nanos(unix_ns) + LEAD;
    let now = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d,
        Err(_) => Duration::ZERO,
    };
    if now >= target {
        return;
    }
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(target.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(target.subsec_nanos() as i32),
    };
    // SAFETY: clock_settime reads the timespec we pass; nothing else is touched.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        static SAID: AtomicBool = AtomicBool::new(false);
        if !SAID.swap(true, Ordering::SeqCst) {
            eprintln!(
                "aivmm-agent: cannot set the guest's clock to the host's ({} ms behind): {}",
                (target - now).as_millis(),
                std::io::Error::last_os_error()
            );
        }
    }
}
