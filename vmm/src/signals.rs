//! Installing signal handlers on any Unix host.
//!
//! vmm-sys-util's `signal` module is Linux-only; the handlers aivmm installs
//! (SIGTERM/SIGHUP/SIGINT to a power-button press, the builder's shutdown) are
//! plain `sigaction(2)` calls, which macOS has too. [`register_handler`] does
//! what vmm-sys-util's `register_signal_handler` does: `SA_SIGINFO`, every
//! signal blocked while the handler runs, and no `SA_RESTART`, so a blocking
//! call the signal interrupts returns `EINTR`.

use std::io;

/// A `SA_SIGINFO` signal handler.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Installs `handler` for signal `sig`.
pub fn register_handler(sig: libc::c_int, handler: Handler) -> io::Result<()> {
    if sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: sigaction is plain data; all-zero is a valid value (no flags, empty mask).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset_t owned by `act`.
    if unsafe { libc::sigfillset(&mut act.sa_mask) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `act` is fully initialised and outlives the call; the old action is
    // not asked for.
    if unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicI32, Ordering};

    use super::*;

    static SEEN: AtomicI32 = AtomicI32::new(0);

    extern "C" fn note(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
        SEEN.store(sig, Ordering::SeqCst);
    }

    #[test]
    fn a_registered_handler_sees_its_signal() {
        // SIGUSR2: nothing else in the test binary handles it.
        register_handler(libc::SIGUSR2, note).unwrap();
        // SAFETY: raise sends the signal to this thread; the handler only stores.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR2) }, 0);
        assert_eq!(SEEN.load(Ordering::SeqCst), libc::SIGUSR2);
    }

    #[test]
    fn kill_and_stop_are_refused() {
        for sig in [libc::SIGKILL, libc::SIGSTOP] {
            let e = register_handler(sig, note).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        }
        // An invalid number is the kernel's to refuse.
        assert!(register_handler(-1, note).is_err());
    }
}
