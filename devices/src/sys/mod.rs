//! The host OS under the devices: notifiers and readiness polling.
//!
//! Devices use two OS facilities: an event notifier ([`EventFd`]: a queue
//! notification, a worker's stop signal, KVM's irqfd and ioeventfd) and
//! level-triggered readiness polling ([`Epoll`] with [`EventSet`],
//! [`EpollEvent`] and [`ControlOperation`]). Both keep the interface of
//! `vmm_sys_util`'s Linux types, so device code reads the same on every host:
//! - on Linux they *are* `vmm_sys_util::eventfd::EventFd` and
//!   `vmm_sys_util::epoll::Epoll` (eventfd(2), epoll(7)): nothing changes there;
//! - on macOS [`EventFd`] is [`pipe_event::PipeEventFd`] (a pipe) and [`Epoll`]
//!   is [`epoll::Emulated`] over kqueue(2) (`kqueue.rs`).
//!
//! The macOS types are portable code, compiled and tested on Linux (the
//! emulation over `poll(2)`); only `kqueue.rs`, a few dozen lines of system
//! calls, is macOS-only (type-checked on Linux by `macos/check-hvf-on-linux.sh`).
//!
//! `RUSTFLAGS="--cfg aivmm_portable_sys" cargo test -p aivmm-devices` builds the
//! devices on Linux with the macOS types (the pipe notifier, and the epoll
//! emulation over `poll(2)` in kqueue's place), so every device test also runs
//! over them; `macos/check-hvf-on-linux.sh` does that.

#[cfg(any(test, not(target_os = "linux"), aivmm_portable_sys))]
pub mod epoll;
#[cfg(target_os = "macos")]
mod kqueue;
#[cfg(any(test, not(target_os = "linux"), aivmm_portable_sys))]
pub mod pipe_event;
// Random bytes (the MAC address, virtio-rng): getrandom or getentropy.
pub mod random;

#[cfg(all(target_os = "linux", not(aivmm_portable_sys)))]
pub use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
#[cfg(all(target_os = "linux", not(aivmm_portable_sys)))]
pub use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[cfg(any(not(target_os = "linux"), aivmm_portable_sys))]
pub use epoll::{ControlOperation, EpollEvent, EventSet};
#[cfg(any(not(target_os = "linux"), aivmm_portable_sys))]
pub use pipe_event::{PipeEventFd as EventFd, EFD_NONBLOCK};

/// Level-triggered readiness polling: kqueue on macOS.
#[cfg(target_os = "macos")]
pub type Epoll = epoll::Emulated<kqueue::Kqueue>;
/// Level-triggered readiness polling: `poll(2)` on other hosts, and on Linux
/// when built with `--cfg aivmm_portable_sys`.
#[cfg(all(
    not(target_os = "macos"),
    any(not(target_os = "linux"), aivmm_portable_sys)
))]
pub type Epoll = epoll::Emulated<epoll::PollQueue>;
