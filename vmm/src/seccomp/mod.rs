//! Seccomp filters, one per thread kind, built with seccompiler.
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
//!   relays, signal forwarding, the passt monitor.
//!
//! # How the filters are installed
//! Filters stack: a thread inherits its creator's filter, and a new filter only
//! narrows what the thread already may do. [`Filters::install_process`] runs on the
//! thread that starts the VM, before any vCPU exists: it installs the SIGSYS handler
//! and then the API filter on every thread of the process at once (`TSYNC`), so no
//! thread started earlier (the stdin relay, the passt monitor) is left unfiltered.
//! The API filter is therefore the union of all three lists. Each vCPU thread then
//! adds the vCPU filter before its first `KVM_RUN`, and [`start_worker_spawner`]
//! starts a spawner thread that adds the device filter. Devices are activated by a
//! guest register write, on a vCPU thread; they start their workers through
//! `aivmm_devices::virtio::queue_thread::spawn_worker`, which hands the job to the
//! spawner, so a worker inherits the device filter rather than the vCPU one.
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

mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::{mpsc, Arc, Mutex};

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

/// Errors while building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filter could not be compiled.
    #[error("building the {0} seccomp filter: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("installing the {0} seccomp filter: {1} (--seccomp=off disables the filters, for debugging only)")]
    Apply(ThreadKind, seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(io::Error),
    /// The worker spawner thread could not be started.
    #[error("starting the device worker spawner: {0}")]
    Spawner(io::Error),
}

/// `Result` of seccomp operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether aivmm installs its seccomp filters (`--seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Filters on every thread (the default).
    #[default]
    On,
    /// No filters: for debugging only.
    Off,
}

/// The kinds of threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread and the other control threads.
    Api,
    /// A thread running a vCPU.
    Vcpu,
    /// A device worker thread.
    Device,
}

impl ThreadKind {
    fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Api => "API",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The exit status of aivmm after a forbidden system call (128 + SIGSYS).
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

// The `ioctl` requests the filters allow (x86_64 values).
const KVM_RUN: u64 = 0xae80;
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TCSETSW: u64 = 0x5403;
const TCSETSF: u64 = 0x5404;
const TIOCGWINSZ: u64 = 0x5413;
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: Op, value: u64) -> Cond {
    // Arguments 0..=5 and a Dword compare are always valid.
    Cond::new(arg, Len::Dword, op, value).unwrap_or_else(|_| unreachable!())
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    // A rule with at least one condition is always valid.
    SeccompRule::new(conds).unwrap_or_else(|_| unreachable!())
}

/// Adds `calls` without conditions.
fn allow(rules: &mut Rules, calls: &[i64]) {
    for &nr in calls {
        rules.insert(nr, Vec::new());
    }
}

/// Allows `nr` when argument `arg` equals one of `values` (an entry without
/// conditions already allows every value).
fn allow_arg(rules: &mut Rules, nr: i64, arg: u8, values: &[u64]) {
    let new = values.iter().map(|&v| rule(vec![cond(arg, Op::Eq, v)]));
    match rules.get_mut(&nr) {
        Some(have) if have.is_empty() => {}
        Some(have) => have.extend(new),
        None => {
            rules.insert(nr, new.collect());
        }
    }
}

/// What every thread needs: Rust's runtime, glibc's allocator (memory that is
/// never executable), futexes, logging to stderr, and ending the thread or the
/// process.
fn common(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_getrandom,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // No new executable memory (W^X): code injected into a vCPU or device thread
    // cannot map or make executable pages. Control threads may (see `api_rules`).
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        r.insert(
            nr,
            vec![rule(vec![cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)])],
        );
    }
}

/// A vCPU thread: `KVM_RUN`, and what the device registers it emulates do (eventfd
/// writes, activation and reset of a device: eventfds, an epoll set, `dup` of a
/// descriptor, handing workers to the spawner and joining them on reset).
fn vcpu_rules() -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    allow(
        &mut r,
        &[
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
        ],
    );
    // virtio-net asks a TAP device for the offloads the driver accepted on activation.
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[KVM_RUN, libc::TUNSETOFFLOAD]);
    allow_arg(
        &mut r,
        libc::SYS_fcntl,
        1,
        &[
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
        ],
    );
    r
}

/// Creating threads (not processes): `clone` with `CLONE_THREAD`, and what a new
/// thread does before its body runs.
fn threads(r: &mut Rules) {
    r.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )])],
    );
    allow(
        r,
        &[
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
        ],
    );
    allow_arg(r, libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64]);
}

/// A device worker: file I/O on disk images and in the shared directories
/// (virtio-fs passthrough), unix-socket I/O (net, vsock), epoll loops.
fn device_rules() -> Rules {
    let mut r = vcpu_rules();
    r.remove(&libc::SYS_ioctl);
    r.remove(&libc::SYS_fcntl);
    threads(&mut r);
    allow(
        &mut r,
        &[
            // Event loops.
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            // Files: disk images and virtio-fs passthrough.
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_getdents64,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_readv,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_mkdirat,
            libc::SYS_mknodat,
            libc::SYS_unlinkat,
            libc::SYS_renameat2,
            libc::SYS_readlinkat,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fchown,
            libc::SYS_fchownat,
            libc::SYS_utimensat,
            libc::SYS_getxattr,
            libc::SYS_lgetxattr,
            libc::SYS_fgetxattr,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_listxattr,
            libc::SYS_llistxattr,
            libc::SYS_flistxattr,
            libc::SYS_removexattr,
            libc::SYS_lremovexattr,
            libc::SYS_fremovexattr,
            libc::SYS_flock,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_umask,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            // Unix sockets (vsock connections, the net backends).
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ],
    );
    allow_arg(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX]);
    r
}

/// Control threads: everything the others may do (they are created under this
/// filter) plus the terminal, the session socket, signals, reaping passt, removing
/// the workdir's lock and socket, and installing the narrower filters.
fn api_rules() -> Rules {
    let mut r = Rules::new();
    for part in [vcpu_rules(), device_rules()] {
        for (nr, rules) in part {
            match r.get_mut(&nr) {
                None => {
                    r.insert(nr, rules);
                }
                Some(have) if have.is_empty() || rules.is_empty() => have.clear(),
                Some(have) => have.extend(rules),
            }
        }
    }
    allow(
        &mut r,
        &[
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_socketpair,
            libc::SYS_pipe2,
            libc::SYS_rt_sigaction,
            libc::SYS_kill,
            libc::SYS_tgkill,
            libc::SYS_wait4,
            libc::SYS_waitid,
            // Workdir state: the record (`vm.json`, written and renamed), the log,
            // removing the lock and socket at exit; the console log read back on
            // an error.
            libc::SYS_unlink,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_mkdir,
            libc::SYS_rmdir,
            libc::SYS_symlink,
            libc::SYS_link,
            libc::SYS_readlink,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_getcwd,
            libc::SYS_stat,
            libc::SYS_lstat,
            libc::SYS_chmod,
            libc::SYS_sendfile,
            libc::SYS_copy_file_range,
            libc::SYS_uname,
            libc::SYS_getppid,
            libc::SYS_sched_getaffinity,
            // Installing the vCPU and device filters on their threads.
            libc::SYS_seccomp,
            // Executable mappings (glibc may load a shared object, e.g. for NSS).
            libc::SYS_mmap,
            libc::SYS_mprotect,
        ],
    );
    allow_arg(
        &mut r,
        libc::SYS_ioctl,
        1,
        &[TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ],
    );
    allow_arg(
        &mut r,
        libc::SYS_prctl,
        0,
        &[libc::PR_SET_NO_NEW_PRIVS as u64, libc::PR_GET_NAME as u64],
    );
    r
}

/// Instructions put before every filter: `clone3` fails with `ENOSYS` (glibc then
/// uses `clone`, whose flags a filter can check).
fn clone3_enosys() -> Vec<sock_filter> {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    vec![
        // A = seccomp_data.nr
        sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
    ]
}

fn compile(kind: ThreadKind, rules: Rules) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Build(kind, e))?;
    let body: BpfProgram = filter.try_into().map_err(|e| Error::Build(kind, e))?;
    let mut prog = clone3_enosys();
    if kind == ThreadKind::Vcpu {
        prog.extend(open_eacces());
    }
    prog.extend(body);
    Ok(prog)
}

/// For vCPU threads: `open`/`openat` fail with `EACCES` instead of killing the
/// VMM. They still open nothing; but glibc itself opens
/// /proc/sys/vm/overcommit_memory the first time a thread's malloc arena shrinks
/// (often at thread exit), and handles a failure there. Follows `clone3_enosys`,
/// so the accumulator already holds the syscall number.
fn open_eacces() -> Vec<sock_filter> {
    const BPF_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let mut v = Vec::new();
    for nr in [libc::SYS_openat, libc::SYS_open] {
        v.push(sock_filter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: nr as u32,
        });
        v.push(sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EACCES as u32,
        });
    }
    v
}

/// The compiled filters of the three thread kinds.
#[derive(Debug)]
pub struct Filters {
    api: BpfProgram,
    vcpu: BpfProgram,
    device: BpfProgram,
}

thread_local! {
    /// The kind of the current thread, for the SIGSYS message.
    static KIND: Cell<ThreadKind> = const { Cell::new(ThreadKind::Api) };
}

impl Filters {
    /// Compiles the three filters.
    pub fn build() -> Result<Self> {
        Ok(Self {
            api: compile(ThreadKind::Api, api_rules())?,
            vcpu: compile(ThreadKind::Vcpu, vcpu_rules())?,
            device: compile(ThreadKind::Device, device_rules())?,
        })
    }

    /// Installs the SIGSYS handler and then the API filter on every thread of the
    /// process. Call it once, before any vCPU or device thread exists.
    pub fn install_process(&self) -> Result<()> {
        install_sigsys_handler()?;
        seccompiler::apply_filter_all_threads(&self.api)
            .map_err(|e| Error::Apply(ThreadKind::Api, e))
    }

    /// Adds the filter of `kind` to the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<()> {
        let prog = match kind {
            ThreadKind::Api => &self.api,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Device => &self.device,
        };
        seccompiler::apply_filter(prog).map_err(|e| Error::Apply(kind, e))?;
        KIND.with(|k| k.set(kind));
        Ok(())
    }
}

/// A spawn request: the job and where the new thread's handle goes.
type SpawnRequest = (
    aivmm_devices::virtio::queue_thread::WorkerJob,
    mpsc::Sender<io::Result<std::thread::JoinHandle<()>>>,
);

/// Starts the thread that starts device workers, under the device filter, and
/// routes `spawn_worker` to it. Returns once its filter is in place.
pub fn start_worker_spawner(filters: Arc<Filters>) -> Result<()> {
    use aivmm_devices::virtio::queue_thread::set_worker_spawner;
    let (job_tx, job_rx) = mpsc::channel::<SpawnRequest>();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("aivmm-spawner".into())
        .spawn(move || {
            let applied = filters.apply(ThreadKind::Device);
            let ok = applied.is_ok();
            let _ = ready_tx.send(applied);
            if !ok {
                return;
            }
            for ((name, job), reply) in job_rx {
                let job = move || {
                    KIND.with(|k| k.set(ThreadKind::Device));
                    job()
                };
                let _ = reply.send(std::thread::Builder::new().name(name).spawn(job));
            }
        })
        .map_err(Error::Spawner)?;
    ready_rx
        .recv()
        .map_err(|_| Error::Spawner(io::Error::other("the spawner thread ended")))??;
    let job_tx = Mutex::new(job_tx);
    set_worker_spawner(Some(Arc::new(move |job| {
        let gone = || io::Error::other("the device worker spawner has stopped");
        let (reply_tx, reply_rx) = mpsc::channel();
        job_tx
            .lock()
            .map_err(|_| gone())?
            .send((job, reply_tx))
            .map_err(|_| gone())?;
        reply_rx.recv().map_err(|_| gone())?
    })));
    Ok(())
}

/// Offset of `si_syscall` in the x86_64 `siginfo_t` of a SIGSYS: signo, errno,
/// code and padding (16 bytes), then `_call_addr` (8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

/// A small stack buffer for building the message without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The one-line message for a forbidden call `nr` on a thread of `kind`.
fn message(kind: ThreadKind, nr: u32) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(b"aivmm: error: seccomp: ");
    l.push(if kind == ThreadKind::Api {
        b"an "
    } else {
        b"a "
    });
    l.push(kind.as_str().as_bytes());
    l.push(b" thread made the forbidden system call ");
    l.push_num(nr);
    l.push(b" (");
    l.push(names::name(nr).unwrap_or("unknown").as_bytes());
    l.push(b"); stopping the VM (--seccomp=off disables the filters, for debugging only)\n");
    l
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SIGSYS raised by seccomp;
    // si_syscall is an int at SI_SYSCALL_OFFSET in it.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    // A const thread-local without a destructor is a plain TLS read.
    let kind = KIND.with(|k| k.get());
    let l = message(kind, nr as u32);
    // SAFETY: write and _exit are async-signal-safe, and every filter allows
    // write and exit_group; the buffer is live for the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, l.buf.as_ptr().cast(), l.len);
    }
    // Where the call came from, as `binary(+offset)` lines for addr2line: glibc's
    // backtrace() reads only memory once warmed up (install_sigsys_handler), and
    // backtrace_symbols_fd writes without allocating.
    let mut frames = [std::ptr::null_mut::<libc::c_void>(); 32];
    // SAFETY: the buffer holds 32 pointers, as passed; the fd is stderr.
    unsafe {
        let n = libc::backtrace(frames.as_mut_ptr(), frames.len() as libc::c_int);
        libc::backtrace_symbols_fd(frames.as_ptr(), n, libc::STDERR_FILENO);
        libc::_exit(EXIT_STATUS);
    }
}

fn install_sigsys_handler() -> Result<()> {
    // The first backtrace() loads libgcc_s (files, mmap): do it now, while allowed.
    let mut warm = [std::ptr::null_mut::<libc::c_void>(); 2];
    // SAFETY: the buffer holds 2 pointers, as passed.
    unsafe { libc::backtrace(warm.as_mut_ptr(), 2) };
    // SAFETY: sigaction is plain data; all-zero is a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the handler only calls async-signal-safe functions; sa is valid.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::process::Command;

    /// Set in the environment of the child processes the tests run.
    const CHILD_ENV: &str = "AIVMM_SECCOMP_TEST_CHILD";

    /// Runs the ignored test `name` of this binary in a child process with
    /// `CHILD_ENV=what`; returns (exit code, stderr).
    fn child(name: &str, what: &str) -> (Option<i32>, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                name,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, what)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The body the child processes run: install the process filters as aivmm
    /// does, then in a thread of the kind asked for, make one call.
    #[test]
    #[ignore = "run by the seccomp tests in a child process"]
    fn seccomp_child() {
        let Ok(what) = std::env::var(CHILD_ENV) else {
            return;
        };
        let filters = Arc::new(Filters::build().unwrap());
        filters.install_process().unwrap();
        start_worker_spawner(filters.clone()).unwrap();
        let f = filters.clone();
        let t = std::thread::spawn(move || {
            match what.as_str() {
                "vcpu-socket" => {
                    f.apply(ThreadKind::Vcpu).unwrap();
                    // SAFETY: a plain system call the vCPU filter forbids.
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                }
                "vcpu-open" => {
                    f.apply(ThreadKind::Vcpu).unwrap();
                    // Opening fails (EACCES) without killing: glibc's malloc opens
                    // /proc/sys/vm/overcommit_memory on its own at thread exit.
                    let e = std::fs::File::open("/etc/hostname").unwrap_err();
                    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
                    eprintln!("vcpu-open refused");
                    // SAFETY: a plain system call the vCPU filter forbids.
                    unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
                }
                "device-mmap-exec" => {
                    f.apply(ThreadKind::Device).unwrap();
                    // SAFETY: a fresh anonymous mapping; the filter forbids PROT_EXEC.
                    unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            4096,
                            libc::PROT_READ | libc::PROT_EXEC,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                }
                "vcpu-allowed" => {
                    f.apply(ThreadKind::Vcpu).unwrap();
                    // Allowed: allocation, eventfds, epoll, logging, dup.
                    let v: Vec<u8> = vec![7; 8 << 20];
                    let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
                    e.write(1).unwrap();
                    let _e2 = e.try_clone().unwrap();
                    let _ep = vmm_sys_util::epoll::Epoll::new().unwrap();
                    eprintln!("vcpu-allowed ok {}", v[100]);
                    // A worker started from here runs under the device filter.
                    let h = aivmm_devices::virtio::queue_thread::spawn_worker("w", || {
                        std::fs::read("/proc/self/status")
                            .map(|s| s.len())
                            .unwrap_or(0)
                    })
                    .unwrap();
                    eprintln!("worker read {} bytes", h.join().unwrap());
                }
                "device-exec" => {
                    f.apply(ThreadKind::Device).unwrap();
                    let _ = Command::new("/bin/true").status();
                }
                "device-thread" => {
                    f.apply(ThreadKind::Device).unwrap();
                    // clone3 answers ENOSYS, glibc falls back to clone(CLONE_THREAD).
                    let n = std::thread::spawn(|| 5).join().unwrap();
                    eprintln!("device-thread ok {n}");
                }
                _ => unreachable!(),
            }
        });
        let _ = t.join();
        eprintln!("child end");
    }

    #[test]
    fn a_forbidden_call_on_a_vcpu_thread_stops_the_process_with_a_message() {
        let (code, err) = child("seccomp::tests::seccomp_child", "vcpu-socket");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(
            err.contains(
                "aivmm: error: seccomp: a vCPU thread made the forbidden system call 41 (socket)"
            ),
            "{err}"
        );
        assert!(!err.contains("child end"), "{err}");
        let (code, err) = child("seccomp::tests::seccomp_child", "vcpu-open");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(err.contains("vcpu-open refused"), "{err}");
        assert!(err.contains("system call 41 (socket)"), "{err}");
        let (code, err) = child("seccomp::tests::seccomp_child", "device-mmap-exec");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(
            err.contains("a device thread made the forbidden system call 9 (mmap)"),
            "{err}"
        );
    }

    #[test]
    fn what_a_vcpu_needs_is_allowed_and_workers_get_the_device_filter() {
        let (code, err) = child("seccomp::tests::seccomp_child", "vcpu-allowed");
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("vcpu-allowed ok 7"), "{err}");
        assert!(err.contains("worker read "), "{err}");
        assert!(err.contains("child end"), "{err}");
    }

    #[test]
    fn device_threads_can_make_threads_but_not_processes() {
        let (code, err) = child("seccomp::tests::seccomp_child", "device-thread");
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("device-thread ok 5"), "{err}");
        // glibc's posix_spawn blocks every signal around its clone, so the kernel
        // cannot deliver the SIGSYS to the handler and kills the process with it.
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "seccomp::tests::seccomp_child",
                "--nocapture",
            ])
            .env(CHILD_ENV, "device-exec")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.code() == Some(EXIT_STATUS) || out.status.signal() == Some(libc::SIGSYS),
            "{:?} {err}",
            out.status
        );
        assert!(!err.contains("child end"), "{err}");
    }

    #[test]
    fn filters_compile_and_the_api_filter_is_the_union() {
        let f = Filters::build().unwrap();
        assert!(f.vcpu.len() < f.device.len() && f.device.len() < f.api.len());
        let v = vcpu_rules();
        let d = device_rules();
        let a = api_rules();
        for nr in v.keys().chain(d.keys()) {
            assert!(a.contains_key(nr), "{nr}");
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_socket,
        ] {
            assert!(!v.contains_key(&forbidden), "{forbidden}");
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_fork,
        ] {
            assert!(!a.contains_key(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn the_message_names_the_call() {
        let l = message(ThreadKind::Vcpu, 59);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(s.starts_with(
            "aivmm: error: seccomp: a vCPU thread made the forbidden system call 59 (execve);"
        ));
        assert!(s.ends_with('\n'));
        let l = message(ThreadKind::Device, 4000);
        assert!(std::str::from_utf8(&l.buf[..l.len])
            .unwrap()
            .contains("4000 (unknown)"));
        let l = message(ThreadKind::Api, 82);
        assert!(std::str::from_utf8(&l.buf[..l.len])
            .unwrap()
            .contains("an API thread made the forbidden system call 82 (rename)"));
    }
}
