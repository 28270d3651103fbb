//! Seccomp filters, one per thread kind, built with seccompiler (Linux only; the
//! filters live in `filters.rs`, and only [`SeccompMode`] is built elsewhere, so
//! `--seccomp` parses on every host).
//!
//! aivmm has three kinds of threads:
//! - **vCPU** threads run guest code and emulate port and MMIO accesses. They are
//!   what a guest reaches first, so their filter is the narrowest: `KVM_RUN`, memory
//!   allocation, futexes, writes to the console and eventfds, and the few calls that
//!   activating or resetting a device makes (eventfd, epoll set-up, dup).
//! - **device** threads (the block, fs, net, vsock and rng workers) do the I/O that
//!   guest requests ask for: file system calls on the shared directory and disk
//!   images, and unix-socket I/O, but no `execve`, no process `clone`, no `ptrace`,
//!   no new network sockets, no mounts, no `KVM_RUN`.
//! - **API** threads are the rest: the main thread, the terminal and session
//!   relays, signal forwarding, the passt monitor. Their list is what they need once
//!   the devices run: the workdir's files, unix sockets, the terminal, signals,
//!   reaping passt, threads; but no `KVM_RUN`, no TAP ioctls, none of the share's
//!   link, node, owner, time or xattr calls, no positioned or vectored file I/O, no
//!   new filters.
//!
//! # How the filters are installed
//! Filters stack: a thread inherits its creator's filter, and a new filter only
//! narrows what the thread already may do. So the filters are installed in two
//! steps, from the thread that runs the VM:
//! 1. [`Filters::install_process`], before any vCPU exists, installs the SIGSYS
//!    handler and a *process* filter on every thread at once (`TSYNC`), so no thread
//!    started earlier (the stdin relay, the passt monitor, the session) is left
//!    unfiltered. It allows the union of the three lists and `seccomp`, because every
//!    thread's own filter goes on top of it.
//! 2. Each vCPU thread adds the vCPU filter before its first `KVM_RUN`, and
//!    [`start_worker_spawner`] starts a spawner thread that enters the device
//!    threads' Landlock domain ([`crate::landlock`]; the process filter allows the
//!    three Landlock calls for it) and then adds the device filter.
//!    Devices are activated by a guest register write, on a vCPU thread; they start
//!    their workers through the `Spawner` their transport passes them on
//!    activation, which hands the job to that thread, so a worker inherits the
//!    device filter.
//!    Then [`Filters::restrict_api_threads`] waits until every vCPU thread has its
//!    filter and gives the API filter to every other thread that still has only the
//!    process filter: it signals each one (`tgkill`), and the handler installs the
//!    filter on its own thread. The calling thread takes it last. From then on every
//!    thread runs under exactly two filters: the process filter and its own kind's,
//!    and no thread may install another.
//!
//! # A forbidden call
//! The filters answer any other call with `SECCOMP_RET_TRAP`: the kernel sends
//! SIGSYS to the calling thread, whose handler writes one line naming the thread kind
//! and the system call (number and name) to stderr and ends the process with status
//! [`EXIT_STATUS`]. `clone3` is answered with `ENOSYS` instead: its flags live in
//! memory, out of a filter's reach, and glibc then falls back to `clone`, whose flags
//! the filters check (threads only, no new processes). A forbidden call made with
//! SIGSYS blocked (glibc's `posix_spawn` blocks every signal around its `clone`)
//! cannot reach the handler: the kernel then kills the process with SIGSYS, without
//! the message. `--seccomp=off` turns all of this off, for debugging only.

#[cfg(target_os = "linux")]
mod filters;
#[cfg(target_os = "linux")]
mod names;

#[cfg(target_os = "linux")]
pub use filters::{start_worker_spawner, Error, Filters, Result, ThreadKind, EXIT_STATUS};

/// Whether aivmm installs its seccomp filters (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Filters on every thread (the default).
    #[default]
    On,
    /// No filters: for debugging only.
    Off,
}

