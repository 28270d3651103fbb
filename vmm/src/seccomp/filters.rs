//! The filters themselves (Linux only): the rules of each thread kind, their
//! compilation with seccompiler, installing them, and the SIGSYS handler.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

/// Errors while building or installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filter could not be compiled.
    #[error("building the {0} seccomp filter: {1}")]
    Build(&'static str, seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("installing the {0} seccomp filter: {1} (--seccomp=off disables the filters, for debugging only)")]
    Apply(&'static str, seccompiler::Error),
    /// A signal handler could not be installed.
    #[error("installing the {0} handler: {1}")]
    Handler(&'static str, io::Error),
    /// Not every vCPU thread installed its filter in time.
    #[error("only {0} of {1} vCPU threads installed their seccomp filter")]
    VcpuFilters(usize, usize),
    /// The threads of the process could not be listed.
    #[error("listing the threads for their seccomp filters: {0}")]
    Threads(io::Error),
    /// The worker spawner thread could not be started.
    #[error("starting the device worker spawner: {0}")]
    Spawner(io::Error),
    /// The device threads' Landlock domain could not be made.
    #[error("confining the device threads: {0}")]
    Landlock(#[from] crate::landlock::Error),
}

/// `Result` of seccomp operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The kinds of threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread and the other control threads.
    Api,
    /// A thread running a vCPU.
    Vcpu,
    /// A device worker thread.
    Device,
    /// The user-mode network's gateway thread and its DNS resolver threads.
    Net,
}

impl ThreadKind {
    fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Api => "API",
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
            ThreadKind::Net => "network",
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
/// Talking over connected or accepted unix sockets: what device and API threads
/// both do (the API threads also bind, listen and make socket pairs).
const UNIX_SOCKET_IO: &[i64] = &[
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
];

/// Making event loops and notifiers (epoll sets, eventfds, pipes): control threads
/// and the user-mode network's.
const EVENT_LOOPS: &[i64] = &[
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_pipe2,
];

/// Waiting in an event loop or sleeping: device workers and API threads alike.
const WAITING: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
];

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
    allow(&mut r, WAITING);
    allow(
        &mut r,
        &[
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
            // virtio-fs as root: each request runs with the guest caller's fsuid
            // and fsgid on this thread (devices/src/virtio/fs/creds.rs).
            libc::SYS_setfsuid,
            libc::SYS_setfsgid,
            // ... and a write the guest marks KILL_SUIDGID runs without CAP_FSETID
            // (fuse-backend-rs reads the thread's capabilities, and drops that one
            // for the write if it holds it: only ever within what it already has).
            libc::SYS_capget,
            libc::SYS_capset,
        ],
    );
    // Unix sockets (vsock connections, the net backends).
    allow(&mut r, UNIX_SOCKET_IO);
    allow_arg(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX]);
    // virtio-fs imports a share's root on a thread with its own file system
    // attributes, so that PassthroughFs's umask(0) never reaches the process umask.
    allow_arg(&mut r, libc::SYS_unshare, 0, &[libc::CLONE_FS as u64]);
    r
}

/// Control threads, once the devices run: the workdir's files (the record, the
/// log, the lock, the console log read back on an error), unix sockets (the
/// session, `aivmm exec`), the terminal, signals, reaping passt, and threads. Not
/// `KVM_RUN` or TAP ioctls (vCPU), nor the share's and disks' own calls (device):
/// no links, nodes, owners, times or xattrs, no positioned or vectored file I/O,
/// no `openat2`; and no `seccomp`, since every filter is in place by then.
fn api_rules() -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    threads(&mut r);
    allow(&mut r, UNIX_SOCKET_IO);
    allow(&mut r, WAITING);
    allow(&mut r, EVENT_LOOPS);
    allow(
        &mut r,
        &[
            // Workdir state: the record (`vm.json`, written and renamed), the log,
            // the lock, removing the lock and socket at exit.
            libc::SYS_openat,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_stat,
            libc::SYS_lstat,
            libc::SYS_lseek,
            libc::SYS_readv,
            libc::SYS_getdents64,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_ftruncate,
            libc::SYS_flock,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rmdir,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            libc::SYS_getcwd,
            libc::SYS_chmod,
            libc::SYS_fchmod,
            // std::io::copy between files, pipes and sockets.
            libc::SYS_sendfile,
            libc::SYS_copy_file_range,
            libc::SYS_splice,
            // Unix sockets: the session and `aivmm exec` (with UNIX_SOCKET_IO below).
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_socketpair,
            // Signals, passt's end, identity.
            libc::SYS_rt_sigaction,
            libc::SYS_kill,
            libc::SYS_tgkill,
            libc::SYS_wait4,
            libc::SYS_waitid,
            libc::SYS_uname,
            libc::SYS_getppid,
            libc::SYS_getuid,
            libc::SYS_getgid,
            libc::SYS_geteuid,
            libc::SYS_getegid,
            // Executable mappings (glibc may load a shared object, e.g. for NSS).
            libc::SYS_mmap,
            libc::SYS_mprotect,
        ],
    );
    allow_arg(&mut r, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
    allow_arg(
        &mut r,
        libc::SYS_ioctl,
        1,
        &[TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, FIONBIO, FIOCLEX],
    );
    allow_arg(&mut r, libc::SYS_prctl, 0, &[libc::PR_GET_NAME as u64]);
    r
}

/// The user-mode network (`--net user`): its gateway thread and DNS resolver
/// threads, which parse the guest's frames and re-originate its connections:
/// network sockets, its event loop, threads, and what glibc's resolver
/// (getaddrinfo) does: read /etc files, talk to a DNS server over UDP or TCP or
/// to nscd over a unix socket, and load an NSS module on first use (executable
/// mappings). Nothing else: no file changes (unlink, rename, mkdir, chmod), no
/// signals to other processes, no `KVM_RUN`, none of the shares' or disks' calls.
fn net_rules() -> Rules {
    let mut r = Rules::new();
    common(&mut r);
    threads(&mut r);
    allow(&mut r, WAITING);
    allow(&mut r, UNIX_SOCKET_IO);
    allow(&mut r, EVENT_LOOPS);
    allow(
        &mut r,
        &[
            // Sockets beyond UNIX_SOCKET_IO.
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_sendmmsg,
            libc::SYS_recvmmsg,
            // The resolver reading /etc/hosts, resolv.conf, nsswitch.conf, gai.conf.
            libc::SYS_openat,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_readv,
            libc::SYS_fcntl,
            libc::SYS_uname,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            // An NSS module loaded on the first lookup, and a panic's abort.
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_rt_sigaction,
            libc::SYS_tgkill,
        ],
    );
    allow_arg(
        &mut r,
        libc::SYS_socket,
        0,
        &[
            libc::AF_UNIX as u64,
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
            libc::AF_NETLINK as u64,
        ],
    );
    allow_arg(&mut r, libc::SYS_ioctl, 1, &[FIONBIO, FIOCLEX, libc::FIONREAD]);
    r
}

/// Merges `part` into `r`: a call is allowed if either allows it.
fn union(r: &mut Rules, part: Rules) {
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

/// The process filter, under every thread's own: the union of the three lists,
/// plus what installing a filter takes (`seccomp`, `prctl(PR_SET_NO_NEW_PRIVS)`).
fn process_rules() -> Rules {
    let mut r = api_rules();
    union(&mut r, vcpu_rules());
    union(&mut r, device_rules());
    union(&mut r, net_rules());
    allow(&mut r, &[libc::SYS_seccomp]);
    allow_arg(&mut r, libc::SYS_prctl, 0, &[libc::PR_SET_NO_NEW_PRIVS as u64]);
    // The spawner enters its Landlock domain under the process filter alone;
    // these calls can only narrow what a thread may do.
    allow(
        &mut r,
        &[
            libc::SYS_landlock_create_ruleset,
            libc::SYS_landlock_add_rule,
            libc::SYS_landlock_restrict_self,
        ],
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

/// Compiles `rules` into filter `name` (a thread kind, or "process").
fn compile(name: &'static str, rules: Rules) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Error::Build(name, e))?;
    let body: BpfProgram = filter.try_into().map_err(|e| Error::Build(name, e))?;
    let mut prog = clone3_enosys();
    if name == ThreadKind::Vcpu.as_str() {
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

/// The compiled filters: the process filter and one per thread kind.
#[derive(Debug)]
pub struct Filters {
    process: BpfProgram,
    api: BpfProgram,
    vcpu: BpfProgram,
    device: BpfProgram,
    net: BpfProgram,
    /// How many vCPU threads have tried to install their filter.
    vcpu_applies: AtomicUsize,
}

thread_local! {
    /// The kind of the current thread, for the SIGSYS message.
    static KIND: Cell<ThreadKind> = const { Cell::new(ThreadKind::Api) };
    /// Whether the restrict handler has installed the API filter on this thread.
    static RESTRICTED: Cell<bool> = const { Cell::new(false) };
}

/// `struct sock_fprog`, as `seccomp(SECCOMP_SET_MODE_FILTER)` takes it.
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const sock_filter,
}

/// The API filter for [`on_restrict`]: set once, never freed.
static API_FPROG: AtomicPtr<SockFprog> = AtomicPtr::new(std::ptr::null_mut());

/// How long [`Filters::restrict_api_threads`] waits for vCPU threads and for
/// threads to take the API filter.
const RESTRICT_WAIT: Duration = Duration::from_secs(5);

/// The signal that makes a thread install the API filter on itself.
fn restrict_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

impl Filters {
    /// Compiles the five filters.
    pub fn build() -> Result<Self> {
        Ok(Self {
            process: compile("process", process_rules())?,
            api: compile(ThreadKind::Api.as_str(), api_rules())?,
            vcpu: compile(ThreadKind::Vcpu.as_str(), vcpu_rules())?,
            device: compile(ThreadKind::Device.as_str(), device_rules())?,
            net: compile(ThreadKind::Net.as_str(), net_rules())?,
            vcpu_applies: AtomicUsize::new(0),
        })
    }

    /// Installs the SIGSYS handler and then the process filter on every thread of
    /// the process. Call it once, before any vCPU or device thread exists.
    pub fn install_process(&self) -> Result<()> {
        install_sigsys_handler()?;
        seccompiler::apply_filter_all_threads(&self.process).map_err(|e| Error::Apply("process", e))
    }

    /// Adds the filter of `kind` to the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<()> {
        let prog = match kind {
            ThreadKind::Api => &self.api,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Device => &self.device,
            ThreadKind::Net => &self.net,
        };
        let r = seccompiler::apply_filter(prog).map_err(|e| Error::Apply(kind.as_str(), e));
        if kind == ThreadKind::Vcpu {
            self.vcpu_applies.fetch_add(1, Ordering::SeqCst);
        }
        r?;
        KIND.with(|k| k.set(kind));
        Ok(())
    }

    /// Once `vcpus` vCPU threads have tried to install their filter, gives the API
    /// filter to every other thread that has only the process filter, and then to
    /// the calling thread. Returns how many other threads took it. A thread that
    /// does not take it within [`RESTRICT_WAIT`] (it blocks the signal) keeps the
    /// process filter and is named in a warning.
    pub fn restrict_api_threads(&self, vcpus: usize) -> Result<usize> {
        let deadline = Instant::now() + RESTRICT_WAIT;
        // A vCPU thread still under the process filter alone would get the API
        // filter, which has no KVM_RUN.
        while self.vcpu_applies.load(Ordering::SeqCst) < vcpus {
            if Instant::now() >= deadline {
                return Err(Error::VcpuFilters(self.vcpu_applies.load(Ordering::SeqCst), vcpus));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if API_FPROG.load(Ordering::SeqCst).is_null() {
            let filter: &'static [sock_filter] = Box::leak(self.api.clone().into_boxed_slice());
            let fprog = Box::new(SockFprog {
                // A seccompiler program is at most BPF_MAXINSNS (4096) long.
                len: filter.len() as libc::c_ushort,
                filter: filter.as_ptr(),
            });
            let fprog = Box::into_raw(fprog);
            if API_FPROG
                .compare_exchange(std::ptr::null_mut(), fprog, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                // SAFETY: `fprog` came from Box::into_raw just above and was not shared.
                drop(unsafe { Box::from_raw(fprog) });
            }
        }
        install_restrict_handler()?;
        // SAFETY: getpid and gettid have no preconditions.
        let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
        let mut signalled = BTreeSet::new();
        loop {
            let Some(pending) = threads_under_process_filter_only(me)? else {
                tracing::warn!(
                    "seccomp: the kernel does not report Seccomp_filters (Linux 5.9 and later do); \
                     only the VM thread gets the API filter, the others keep the process filter"
                );
                break;
            };
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "seccomp: thread(s) {pending:?} did not take the API filter; they keep the process filter"
                );
                break;
            }
            for tid in pending {
                // SAFETY: a plain signal to a thread of this process; its handler
                // (on_restrict) is installed.
                unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, restrict_signal()) };
                signalled.insert(tid);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.apply(ThreadKind::Api)?;
        Ok(signalled.len())
    }
}

/// The threads of this process other than `me` whose `Seccomp_filters` count is 1:
/// the process filter only. `None` if the kernel does not report the count.
fn threads_under_process_filter_only(me: libc::pid_t) -> Result<Option<Vec<libc::pid_t>>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(Error::Threads)? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else {
            continue;
        };
        if tid == me {
            continue;
        }
        // A thread that has just ended has no status any more.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        match filter_count(&status) {
            Some(1) => out.push(tid),
            Some(_) => {}
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The `Seccomp_filters:` count of a `/proc/<pid>/task/<tid>/status` text.
fn filter_count(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The handler of [`restrict_signal`]: installs the API filter on this thread, once.
extern "C" fn on_restrict(_sig: libc::c_int) {
    if RESTRICTED.with(|r| r.get()) {
        return;
    }
    let fprog = API_FPROG.load(Ordering::SeqCst);
    if fprog.is_null() {
        return;
    }
    // SAFETY: errno is thread-local; the handler puts back what it interrupted.
    let saved = unsafe { *libc::__errno_location() };
    // SAFETY: `fprog` points to a leaked, never-freed sock_fprog whose filter is a
    // leaked, valid BPF program; seccomp(2) only reads it. The thread has
    // no_new_privs (the process filter's TSYNC gave it).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            fprog as *const SockFprog,
        )
    };
    if r == 0 {
        RESTRICTED.with(|c| c.set(true));
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

fn install_restrict_handler() -> Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid value.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_restrict as *const () as libc::sighandler_t;
    // Interrupted reads and waits go on; the handler only installs a filter.
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: the handler only makes the seccomp system call; sa is valid.
    if unsafe { libc::sigaction(restrict_signal(), &sa, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler("seccomp restrict", io::Error::last_os_error()));
    }
    Ok(())
}

/// A spawn request: the job and where the new thread's handle goes.
type SpawnRequest = (
    aivmm_devices::virtio::common::WorkerJob,
    mpsc::Sender<io::Result<std::thread::JoinHandle<()>>>,
);

/// Starts the thread that starts device workers and routes `spawner` to it.
/// The thread first enters the Landlock domain of `landlock` (if given; see
/// [`crate::landlock`]), then adds the device filter (if `filters` is given), so
/// its workers inherit both. Returns once both are in place.
pub fn start_worker_spawner(
    spawner: &aivmm_devices::virtio::Spawner,
    filters: Option<Arc<Filters>>,
    landlock: Option<crate::landlock::Rules>,
) -> Result<()> {
    let (job_tx, job_rx) = mpsc::channel::<SpawnRequest>();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("aivmm-spawner".into())
        .spawn(move || {
            let applied = (|| -> Result<()> {
                if let Some(rules) = landlock {
                    let status = rules.restrict_this_thread()?;
                    let line = crate::landlock::describe(status);
                    if status == crate::landlock::Status::Unsupported {
                        log::info!("{line}");
                    } else {
                        log::debug!("{line}");
                    }
                }
                if let Some(f) = filters {
                    f.apply(ThreadKind::Device)?;
                }
                Ok(())
            })();
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
    spawner.route(Arc::new(move |job| {
        let gone = || io::Error::other("the device worker spawner has stopped");
        let (reply_tx, reply_rx) = mpsc::channel();
        job_tx
            .lock()
            .map_err(|_| gone())?
            .send((job, reply_tx))
            .map_err(|_| gone())?;
        reply_rx.recv().map_err(|_| gone())?
    }));
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
    l.push(super::names::name(nr).unwrap_or("unknown").as_bytes());
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
        return Err(Error::Handler("SIGSYS", io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
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
        let spawner = aivmm_devices::virtio::Spawner::default();
        start_worker_spawner(&spawner, Some(filters.clone()), None).unwrap();
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
                    let h = spawner.spawn("w", || {
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
                "device-fs-share" => {
                    // What a device reset does: build a share's file system on a
                    // device thread; its import runs on a thread of its own that
                    // unshares CLONE_FS.
                    let tmp = vmm_sys_util::tempdir::TempDir::new().unwrap();
                    let cfg = aivmm_devices::virtio::fs::FsConfig::new(tmp.as_path(), "work");
                    f.apply(ThreadKind::Device).unwrap();
                    let server = aivmm_devices::virtio::fs::device::fuse_server(&cfg);
                    eprintln!("device-fs-share ok {}", server.is_ok());
                    // SAFETY: unshare with flags the device filter does not allow.
                    unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWUSER) };
                }
                "device-thread" => {
                    f.apply(ThreadKind::Device).unwrap();
                    // clone3 answers ENOSYS, glibc falls back to clone(CLONE_THREAD).
                    let n = std::thread::spawn(|| 5).join().unwrap();
                    eprintln!("device-thread ok {n}");
                }
                "api-restrict" | "api-allowed" => restrict_child(&what, &f),
                _ => unreachable!(),
            }
        });
        let _ = t.join();
        eprintln!("child end");
    }

    /// The child's VM thread, as `Vmm::run` does it: an API thread started before
    /// (a session relay), a vCPU thread with its filter, then `restrict_api_threads`.
    fn restrict_child(what: &str, f: &Arc<Filters>) {
        let (api_tx, api_rx) = mpsc::channel::<&'static str>();
        let helper = std::thread::spawn(move || {
            for cmd in api_rx {
                match cmd {
                    "write" => eprintln!("helper alive"),
                    _ => {
                        let (a, b) = (c"/nonexistent-a", c"/nonexistent-b");
                        // SAFETY: two NUL-terminated paths; a call only devices make.
                        unsafe { libc::linkat(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), 0) };
                    }
                }
            }
        });
        let (vcpu_tx, vcpu_rx) = mpsc::channel::<()>();
        let (vcpu_done_tx, vcpu_done_rx) = mpsc::channel::<i32>();
        let vf = f.clone();
        let _vcpu = std::thread::spawn(move || {
            vf.apply(ThreadKind::Vcpu).unwrap();
            let _ = vcpu_rx.recv();
            // SAFETY: KVM_RUN on no descriptor: EBADF, if the filter lets it through.
            let r = unsafe { libc::ioctl(-1, KVM_RUN as _, 0) };
            let _ = vcpu_done_tx.send(if r < 0 { io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 });
        });
        let n = f.restrict_api_threads(1).unwrap();
        eprintln!("restricted {n}");
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap();
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(c) = filter_count(&status) {
                eprintln!("thread filters {c}");
            }
        }
        vcpu_tx.send(()).unwrap();
        let errno = vcpu_done_rx.recv().unwrap();
        eprintln!("vcpu KVM_RUN errno {errno}");
        api_tx.send("write").unwrap();
        if what == "api-allowed" {
            // What the VM thread and the session do after the start.
            let dir = std::env::temp_dir().join(format!("aivmm-seccomp-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("vm.json.tmp"), b"{}").unwrap();
            std::fs::rename(dir.join("vm.json.tmp"), dir.join("vm.json")).unwrap();
            let lock = std::fs::File::create(dir.join("lock")).unwrap();
            // SAFETY: flock on an open file.
            assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            b.write_all(b"x").unwrap();
            drop(a);
            std::fs::remove_dir_all(&dir).unwrap();
            let t = std::thread::spawn(|| 6).join().unwrap();
            drop(api_tx);
            helper.join().unwrap();
            eprintln!("api-allowed ok {t}");
        } else {
            std::thread::sleep(std::time::Duration::from_millis(100));
            api_tx.send("linkat").unwrap();
            helper.join().unwrap();
        }
    }

    #[test]
    fn api_threads_get_their_own_filter_after_the_start() {
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "api-restrict");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        // The helper, and libtest's own threads; the vCPU thread and the spawner
        // already had their filters.
        assert!(err.contains("restricted "), "{err}");
        assert!(!err.contains("restricted 0"), "{err}");
        let counts: Vec<&str> = err.lines().filter(|l| l.starts_with("thread filters ")).collect();
        assert!(counts.len() >= 4, "{err}");
        assert!(counts.iter().all(|l| *l == "thread filters 2"), "{err}");
        assert!(err.contains(&format!("vcpu KVM_RUN errno {}", libc::EBADF)), "{err}");
        assert!(err.contains("helper alive"), "{err}");
        assert!(
            err.contains("aivmm: error: seccomp: an API thread made the forbidden system call 265 (linkat)"),
            "{err}"
        );
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "api-allowed");
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("api-allowed ok 6"), "{err}");
    }

    #[test]
    fn a_forbidden_call_on_a_vcpu_thread_stops_the_process_with_a_message() {
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "vcpu-socket");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(
            err.contains(
                "aivmm: error: seccomp: a vCPU thread made the forbidden system call 41 (socket)"
            ),
            "{err}"
        );
        assert!(!err.contains("child end"), "{err}");
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "vcpu-open");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(err.contains("vcpu-open refused"), "{err}");
        assert!(err.contains("system call 41 (socket)"), "{err}");
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "device-mmap-exec");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        assert!(
            err.contains("a device thread made the forbidden system call 9 (mmap)"),
            "{err}"
        );
    }

    /// The child of `device_workers_are_confined_by_landlock`: the process filter,
    /// then the spawner with the device filter and a Landlock domain holding `rw/`
    /// read-write and `ro/` read-only; `out/` is outside.
    #[test]
    #[ignore = "run by the landlock test in a child process"]
    fn landlock_child() {
        use crate::landlock::{Grant, Rules};
        use std::os::unix::fs::OpenOptionsExt;
        let Ok(dir) = std::env::var(CHILD_ENV) else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let abi = crate::landlock::kernel_abi();
        if abi <= 0 {
            eprintln!("landlock unsupported (landlock_create_ruleset: {abi})");
            return;
        }
        let filters = Arc::new(Filters::build().unwrap());
        filters.install_process().unwrap();
        let rules = Rules {
            paths: vec![
                (dir.join("rw"), Grant::ReadWrite),
                (dir.join("ro"), Grant::ReadOnly),
                (crate::landlock::MOUNTINFO.into(), Grant::ReadOnly),
                (dir.join("sock"), Grant::Connect),
            ],
        };
        let spawner = aivmm_devices::virtio::Spawner::default();
        start_worker_spawner(&spawner, Some(filters), Some(rules)).unwrap();
        let d = dir.clone();
        let h = spawner.spawn("w", move || {
            let errno = |r: io::Result<std::fs::File>| match r {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            // virtio-fs re-opens its O_PATH descriptors through /proc/self/fd.
            let reopen = |p: std::path::PathBuf| {
                let fd = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH)
                    .open(p)
                    .unwrap();
                errno(std::fs::File::open(format!("/proc/self/fd/{}", fd.as_raw_fd())))
            };
            let connect = |p: std::path::PathBuf| match std::os::unix::net::UnixStream::connect(p) {
                Ok(_) => 0,
                Err(e) => e.raw_os_error().unwrap_or(-1),
            };
            let write = |p: std::path::PathBuf| std::fs::OpenOptions::new().write(true).open(p);
            let v = vec![
                ("read rw/a", errno(std::fs::File::open(d.join("rw/a")))),
                ("create rw/new", errno(std::fs::File::create(d.join("rw/new")))),
                ("read ro/b", errno(std::fs::File::open(d.join("ro/b")))),
                ("write ro/b", errno(write(d.join("ro/b")))),
                ("create ro/new", errno(std::fs::File::create(d.join("ro/new")))),
                ("read out/secret", errno(std::fs::File::open(d.join("out/secret")))),
                ("read /etc/hostname", errno(std::fs::File::open("/etc/hostname"))),
                ("read /proc/self/status", errno(std::fs::File::open("/proc/self/status"))),
                ("connect sock/s", connect(d.join("sock/s"))),
                ("connect out/s", connect(d.join("out/s"))),
                ("read sock/f", errno(std::fs::File::open(d.join("sock/f")))),
                ("reopen rw/a", reopen(d.join("rw/a"))),
                ("reopen out/secret", reopen(d.join("out/secret"))),
            ];
            let cfg = aivmm_devices::virtio::fs::FsConfig::new(d.join("rw"), "work");
            let share = match aivmm_devices::virtio::fs::device::fuse_server(&cfg) {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("share error: {e:?}");
                    false
                }
            };
            (v, share)
        })
        .unwrap();
        let (v, share) = h.join().unwrap();
        for (what, e) in v {
            eprintln!("worker {what}: {e}");
        }
        eprintln!("worker share: {share}");
        // This thread is no worker: outside the domain.
        eprintln!("main read out/secret: {}", std::fs::read(dir.join("out/secret")).is_ok());
        eprintln!("landlock abi {abi}");
    }

    #[test]
    fn device_workers_are_confined_by_landlock() {
        let tmp = tempfile::tempdir().unwrap();
        for (d, f) in [("rw", "a"), ("ro", "b"), ("out", "secret"), ("sock", "f")] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
            std::fs::write(tmp.path().join(d).join(f), "x").unwrap();
        }
        let _in = std::os::unix::net::UnixListener::bind(tmp.path().join("sock/s")).unwrap();
        let _out = std::os::unix::net::UnixListener::bind(tmp.path().join("out/s")).unwrap();
        let (code, err) =
            child("seccomp::filters::tests::landlock_child", tmp.path().to_str().unwrap());
        assert_eq!(code, Some(0), "{err}");
        if err.contains("landlock unsupported") {
            eprintln!("SKIPPED: this kernel has no Landlock, nothing was enforced: {err}");
            return;
        }
        let eacces = libc::EACCES;
        for line in [
            "worker read rw/a: 0".to_string(),
            "worker create rw/new: 0".into(),
            "worker read ro/b: 0".into(),
            format!("worker write ro/b: {eacces}"),
            format!("worker create ro/new: {eacces}"),
            format!("worker read out/secret: {eacces}"),
            format!("worker read /etc/hostname: {eacces}"),
            format!("worker read /proc/self/status: {eacces}"),
            "worker reopen rw/a: 0".into(),
            format!("worker reopen out/secret: {eacces}"),
            "worker share: true".into(),
            "main read out/secret: true".into(),
            "worker connect sock/s: 0".into(),
            format!("worker read sock/f: {eacces}"),
        ] {
            assert!(err.contains(&line), "no `{line}` in:\n{err}");
        }
        // Connecting to a pathname socket is a Landlock right from ABI 9 only.
        let abi = crate::landlock::kernel_abi();
        let out = if abi >= 9 { eacces } else { 0 };
        assert!(err.contains(&format!("worker connect out/s: {out}")), "ABI {abi}:\n{err}");
        if abi < 9 {
            eprintln!("ABI {abi}: connect to a socket outside was allowed, as documented");
        }
        assert!(tmp.path().join("rw/new").exists());
        assert!(!tmp.path().join("ro/new").exists());
    }

    #[test]
    fn what_a_vcpu_needs_is_allowed_and_workers_get_the_device_filter() {
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "vcpu-allowed");
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("vcpu-allowed ok 7"), "{err}");
        assert!(err.contains("worker read "), "{err}");
        assert!(err.contains("child end"), "{err}");
    }

    #[test]
    fn device_threads_can_build_a_share_but_unshare_nothing_else() {
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "device-fs-share");
        assert!(err.contains("device-fs-share ok true"), "{err}");
        assert_eq!(code, Some(EXIT_STATUS), "{err}");
        let refused = format!("forbidden system call {} (unshare)", libc::SYS_unshare);
        assert!(err.contains(&refused), "{err}");
    }

    #[test]
    fn device_threads_can_make_threads_but_not_processes() {
        let (code, err) = child("seccomp::filters::tests::seccomp_child", "device-thread");
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("device-thread ok 5"), "{err}");
        // glibc's posix_spawn blocks every signal around its clone, so the kernel
        // cannot deliver the SIGSYS to the handler and kills the process with it.
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "seccomp::filters::tests::seccomp_child",
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

    fn ioctl_allowed(r: &Rules, request: u64) -> bool {
        match r.get(&libc::SYS_ioctl) {
            None => false,
            Some(rules) if rules.is_empty() => true,
            Some(rules) => rules.iter().any(|x| format!("{x:?}").contains(&format!("value: {request}"))),
        }
    }

    #[test]
    fn each_list_is_its_own_and_the_process_filter_holds_them_all() {
        let f = Filters::build().unwrap();
        assert!(f.vcpu.len() < f.device.len() && f.api.len() < f.process.len());
        let (v, d, a, p) = (vcpu_rules(), device_rules(), api_rules(), process_rules());
        for nr in v.keys().chain(d.keys()).chain(a.keys()) {
            assert!(p.contains_key(nr), "{nr}");
        }
        // The API list is not the union: the vCPU's and the devices' own calls are
        // not in it.
        assert!(ioctl_allowed(&v, KVM_RUN) && !ioctl_allowed(&a, KVM_RUN));
        assert!(ioctl_allowed(&v, libc::TUNSETOFFLOAD) && !ioctl_allowed(&a, libc::TUNSETOFFLOAD));
        for device_only in [
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_mknodat,
            libc::SYS_openat2,
            libc::SYS_pwrite64,
            libc::SYS_pwritev2,
            libc::SYS_fallocate,
            libc::SYS_fchownat,
            libc::SYS_utimensat,
            libc::SYS_fsetxattr,
            libc::SYS_umask,
            libc::SYS_unshare,
        ] {
            assert!(d.contains_key(&device_only), "{device_only}");
            assert!(!a.contains_key(&device_only), "{device_only}");
        }
        // Filters are installed from the process filter only.
        assert!(p.contains_key(&libc::SYS_seccomp));
        for list in [&v, &d, &a] {
            assert!(!list.contains_key(&libc::SYS_seccomp));
        }
        for forbidden in [libc::SYS_execve, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_socket] {
            assert!(!v.contains_key(&forbidden), "{forbidden}");
        }
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_fork,
            libc::SYS_vfork,
        ] {
            assert!(!p.contains_key(&forbidden), "{forbidden}");
        }
    }

    #[test]
    fn the_filter_count_is_read_from_status() {
        let status = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t2\nSpeculation_Store_Bypass:\tx\n";
        assert_eq!(filter_count(status), Some(2));
        assert_eq!(filter_count("Seccomp:\t0\n"), None);
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
