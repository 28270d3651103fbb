//! [`ShareFs`]: the `FileSystem` the FUSE server calls. It wraps `PassthroughFs`
//! and adds what aivmm needs on top:
//!
//! - **Ownership.** `PassthroughFs` is always handed uid/gid 0, so it never does its
//!   own credential switch (`setresuid`, which needs `CAP_SETUID`, and only around
//!   creates). As a normal user, [`FileSystem::id_remap`] maps every request's ids
//!   to 0 and everything is done as that user: new files are theirs, and a chown
//!   to another uid fails on the host (EPERM). As root (`geteuid() == 0` when the
//!   share is made), each request that reaches the host (lookups, creates, links,
//!   removals, renames, `setattr`, opens, writes, xattrs) runs inside an
//!   [`AsCaller`] guard: the worker thread's fsuid/fsgid are the caller's from
//!   the FUSE header, so new objects are the guest user's and the host kernel
//!   checks permissions as Linux would for that user. A fsuid other than 0 drops
//!   the thread's file capabilities, so only guest root may chown or override
//!   modes. Supplementary groups stay the process's (see [`super::creds`]).
//!   Clearing execute bits after a rename or link into `.git/hooks` is aivmm's own
//!   rule and runs after the guard is dropped, as root. Hard links fall back to
//!   `linkat` on `/proc/self/fd` when `AT_EMPTY_PATH` is refused.
//! - **Read-only shares.** Every call that would change the tree or a file is
//!   answered with EROFS before it reaches the host, and so is an `open` for writing.
//! - **Bounded work.** Guest-given xattr buffer sizes are capped at the kernel's
//!   own limit, so a request cannot make the host allocate gigabytes.
//!
//! # The root, found once
//! [`ShareRoot::open`] resolves the shared path once, when the device is created,
//! and keeps an `O_PATH` fd on the directory with its device and inode number.
//! `PassthroughFs` never sees the path: its `root_dir` is `/proc/self/fd/N/.`,
//! which names the held directory whatever happened to the path since (a symlink
//! swapped in by a guest of an enclosing share, say). It is imported when the
//! `ShareFs` is built and again on DESTROY (which empties every table), never on
//! INIT (`do_import` is off); after each import, and on every INIT, the root inode
//! must still be that directory, or the INIT is refused.
//!
//! # Modes and the process umask
//! The guest chooses the modes of the host files it creates and chmods, minus
//! setuid and setgid, which are cleared in `setattr`, `create`, `mknod` and
//! `mkdir`: aivmm may run as root, and even as a user a setgid file hands out the
//! user's group. The sticky bit stays: on a directory it only limits who may
//! remove entries (the host kernel applies it to the caller when aivmm is root),
//! and Linux ignores it on files. New files, directories and nodes are also masked by the
//! umask aivmm started with ([`host_umask`]), explicitly, so a default ACL on a
//! host directory cannot lift it; `chmod` is not masked, so `chmod 0777` gives
//! 0777 as it would on the host.
//!
//! `PassthroughFs::import` sets the umask to 0 and leaves it so. The umask is
//! shared by every thread of the process, and files other threads create
//! meanwhile (the VM record, logs) would be world-writable; so every import runs
//! on a short-lived thread that first takes its own copy of the process's file
//! system attributes (`unshare(CLONE_FS)`), and the process umask is never
//! changed.
//!
//! # Extended attributes
//! `security.*` (file capabilities, LSM labels) and `trusted.*` cannot be set or
//! removed (EPERM). `system.*` answers EOPNOTSUPP, as a file system without ACL
//! support would (so `cp -a` and `tar` go on quietly), except the two POSIX ACL
//! names when [`FsConfig::posix_acls`] allows them. `user.*` passes through.
//!
//! # Protected paths
//! What the host runs or reads as config ([`super::protect`]) is read-only to
//! the guest whatever the share's mode, checked by identity, (device, inode),
//! resolved when the device was created: a protected object cannot be opened for
//! writing, truncated, chmodded, touched, linked or given xattrs; in a sealed
//! directory (`.git/hooks`) no entry can be made, removed or renamed; and a
//! protected name (`.git/config`, `aivmm.toml`, even before it exists, and the
//! `.git` of a protected repository) cannot be made, removed, renamed away or
//! renamed onto in its parent. All answer EROFS. Not covered: renaming a nested
//! repository's enclosing directory away and making a new repository at its old
//! path (the protections move with the objects; the stop-time report in
//! [`super::gitconfig`] catches the new config), and a `.git` that is a symlink
//! (its name is pinned, its target is not sealed).
//!
//! Independently of that set, a file made or chmodded in any `.git/hooks`
//! directory (of any repository, also one the guest makes later) never gets an
//! execute bit, so git does not run it: `create`, `mknod` and `setattr` mask
//! 0o111, and a file renamed or linked into one loses its execute bits. This
//! goes by the host path of the parent when the request arrives; a directory
//! renamed to `hooks` with executables already in it is not covered.
//!
//! # Containment
//! Containment stays with `PassthroughFs`: inodes are `O_PATH | O_NOFOLLOW` fds
//! opened with `openat` from their parent's fd; names with `/` are refused; `..`
//! looked up at the root gives the root; symlinks are returned as links (the guest
//! resolves them in its own view) and are never opened for I/O; operations by inode
//! go through the `/proc/self/fd` magic links, which name the object, not a path.
//! Every lookup resolves one name relative to a held directory fd with
//! `O_NOFOLLOW`, so a symlink swapped in during a lookup is found as a link, never
//! followed; `openat2(RESOLVE_BENEATH)` would add nothing to such one-component
//! lookups except for `..`, which is checked here instead. With `do_import` off,
//! `PassthroughFs` leaves name checks to the layer above, so [`ShareFs`] refuses
//! `.`, `..` and names with `/` in every call that makes, removes or renames one.
//!
//! On top of that, [`ShareFs`] adds:
//! - **No device nodes.** `mknod` of a character or block device is refused (EPERM):
//!   aivmm may run as root, and a device node made in the share would give the guest
//!   the host's device. FIFOs and sockets stay (the guest kernel serves them itself).
//! - **Only regular files and directories are opened.** A guest kernel is untrusted
//!   and can send `OPEN` or `CREATE` for any inode: opening a device node, FIFO or
//!   socket on the host is refused (EPERM), so it can neither reach a host device nor
//!   block a worker on a FIFO.
//! - **`..` stays inside.** A `..` lookup whose result is no longer under the share
//!   root (a directory the host moved out while the guest held it) is refused (EACCES).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::ROOT_ID;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::validate_path_component;
use fuse_backend_rs::passthrough::{self, PassthroughFs};
use log::error;

use super::creds::{running_as_root, AsCaller};
use super::protect::{is_hooks_dir, Id, Protection};
use super::{CachePolicy, FsConfig};

/// The largest xattr value or name list Linux has (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: u32 = 64 * 1024;

/// Mode bits the guest may not set on a host file.
const DENIED_MODE_BITS: u32 = libc::S_ISUID | libc::S_ISGID;

/// Options a read-write share asks of the guest kernel beyond what `PassthroughFs`
/// asks: large requests (1 MiB instead of 4 KiB writes), parallel lookups, and
/// dropping cached pages when the host changes a file.
fn extra_init_options() -> FsOptions {
    FsOptions::ASYNC_READ
        | FsOptions::BIG_WRITES
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::AUTO_INVAL_DATA
        | FsOptions::ATOMIC_O_TRUNC
        | FsOptions::ASYNC_DIO
}

/// Options `PassthroughFs::init` turns on whenever the guest offers them if
/// `do_import` is off (it then assumes a VFS layer negotiated them). aivmm wants
/// none of these: writeback caching acknowledges writes the host has not seen,
/// and the others are off in [`passthrough_config`]. (`HANDLE_KILLPRIV_V2` it
/// does want: see there.)
fn refused_init_options() -> FsOptions {
    FsOptions::WRITEBACK_CACHE | FsOptions::ZERO_MESSAGE_OPEN | FsOptions::ZERO_MESSAGE_OPENDIR
}

/// The process umask aivmm started with, read once (from `/proc/self/status`,
/// which does not change it) when the first share is created. Without `/proc`,
/// 0o077, the narrowest a user would choose.
pub fn host_umask() -> libc::mode_t {
    static HOST_UMASK: OnceLock<libc::mode_t> = OnceLock::new();
    *HOST_UMASK.get_or_init(|| proc_umask().unwrap_or(0o077))
}

/// The process umask as `/proc/self/status` shows it (Linux 4.7 and later).
pub fn proc_umask() -> Option<libc::mode_t> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    libc::mode_t::from_str_radix(line.trim(), 8).ok()
}

/// The mode a new host file gets for the guest's `mode`: no setuid or setgid,
/// and no bit the host umask clears.
fn creation_mode(mode: u32) -> u32 {
    mode & !(DENIED_MODE_BITS | host_umask())
}

/// Whether the guest's open(2) `flags` may change the file.
fn open_writes(flags: u32) -> bool {
    // Reinterpret the bits as c_int.
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY
        || flags & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The shared directory, resolved and opened once when the device is created.
#[derive(Debug)]
pub struct ShareRoot {
    /// An `O_PATH` fd on the directory; `PassthroughFs` imports the root through it.
    fd: OwnedFd,
    /// The directory's path when it was opened, symlinks resolved.
    path: PathBuf,
    /// The directory's device and inode number.
    id: (u64, u64),
}

impl ShareRoot {
    /// Opens `path` (following symlinks in it, this once) and records what it is.
    /// Fails with ENOTDIR if it is not a directory.
    pub fn open(path: &Path) -> io::Result<ShareRoot> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| errno(libc::EINVAL))?;
        // SAFETY: `c` is a NUL-terminated string; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        let path = proc_fd_path(&fd)?;
        Ok(ShareRoot {
            fd,
            path,
            id: (st.st_dev, st.st_ino),
        })
    }

    /// The resolved path of the directory, as it was when opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `PassthroughFs` opens as its root: the held directory through its
    /// magic link (the trailing `.` makes `O_NOFOLLOW` apply to `.`, not the link).
    fn import_path(&self) -> String {
        format!("/proc/self/fd/{}/.", self.fd.as_raw_fd())
    }
}

/// The path `fd`'s `/proc/self/fd` link names now (with `readlinkat`, which the
/// device threads' seccomp filter allows, unlike `readlink`).
fn proc_fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    let link = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| errno(libc::EINVAL))?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `link` is NUL-terminated and `buf` is as long as said; checked.
    let n = unsafe {
        libc::readlinkat(
            libc::AT_FDCWD,
            link.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    if n >= buf.len() {
        return Err(errno(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    Ok(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat64> {
    let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: fstat64 writes a stat64 into `st`, which is large enough; checked.
    if unsafe { libc::fstat64(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat64 succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

/// Runs `f` on a new thread that has its own copy of the process's file system
/// attributes (cwd, root and umask), so the `umask(0)` in
/// `PassthroughFs::import` changes that thread's umask and no other's.
fn with_private_umask<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("aivmm-fs-import".into())
            .spawn_scoped(s, || {
                // SAFETY: unshare(CLONE_FS) only gives this thread its own fs_struct.
                if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })?;
        worker
            .join()
            .map_err(|_| io::Error::other("the share import thread panicked"))?
    })
}

/// `PassthroughFs`'s configuration for `cfg`, rooted at `root`: the cache mapping
/// and its timeouts.
pub fn passthrough_config(cfg: &FsConfig, root: &ShareRoot) -> passthrough::Config {
    let (policy, timeout) = match cfg.cache {
        CachePolicy::None => (passthrough::CachePolicy::Never, Duration::ZERO),
        CachePolicy::Auto => (passthrough::CachePolicy::Auto, Duration::from_secs(1)),
        CachePolicy::Always => (
            passthrough::CachePolicy::Always,
            Duration::from_secs(24 * 60 * 60),
        ),
    };
    passthrough::Config {
        root_dir: root.import_path(),
        cache_policy: policy,
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: true,
        writeback: false,
        // No import on INIT: ShareFs imports once, off the shared umask (see the
        // module doc). This also turns off PassthroughFs's own name checks, which
        // ShareFs makes instead.
        do_import: false,
        // O_PATH fds, not file handles: open_by_handle_at needs CAP_DAC_READ_SEARCH.
        inode_file_handles: false,
        no_open: false,
        no_opendir: false,
        // The host kernel clears setuid/setgid and security.capability itself as
        // the write, truncate or chown happens (PassthroughFs drops CAP_FSETID for
        // a write the guest marks KILL_SUIDGID). Without it the guest kernel asks
        // for security.capability (a GETXATTR round trip) before every write.
        killpriv_v2: true,
        ..Default::default()
    }
}

/// The file system behind a share.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    /// Whether the guest may set POSIX ACLs.
    posix_acls: bool,
    /// The shared directory, held open.
    root: Arc<ShareRoot>,
    /// What the guest may not change, resolved when the device was created.
    protection: Arc<Protection>,
    /// Whether aivmm ran as root when the share was made, so each request is
    /// carried out as its caller ([`AsCaller`]).
    switch_ids: bool,
    /// The open flags of each handle, as the handle was opened. READ and WRITE
    /// pass these to fuse-backend-rs, never the guest's per-request flags: given
    /// other flags it `fcntl(F_SETFL)`s the handle's fd, and if that fails (an
    /// O_NOATIME the caller may not set, an O_DIRECT the file system lacks) it
    /// returns early through a path that closes the fd while the handle still
    /// holds it. The fd number is then free for the next open (any file aivmm
    /// opens), and the stale handle reads and writes that file, until its
    /// release closes it a second time. (fuse-backend-rs 0.14, sync_io.rs
    /// `read`/`write`: the borrowed `File` is dropped on the `?`.)
    handle_flags: Mutex<HashMap<u64, u32>>,
}

impl ShareFs {
    /// The file system serving `root` as `cfg` says, its root imported.
    pub fn new(
        cfg: &FsConfig,
        root: Arc<ShareRoot>,
        protection: Arc<Protection>,
    ) -> io::Result<Self> {
        host_umask();
        let inner = PassthroughFs::<()>::new(passthrough_config(cfg, &root))?;
        let fs = Self {
            inner,
            read_only: cfg.read_only,
            posix_acls: cfg.posix_acls,
            root,
            protection,
            switch_ids: running_as_root(),
            handle_flags: Mutex::new(HashMap::new()),
        };
        fs.import(false)?;
        Ok(fs)
    }

    /// Imports the root (after emptying every table, with `destroy`) on a thread
    /// of its own, then checks that the root inode is the shared directory.
    fn import(&self, destroy: bool) -> io::Result<()> {
        with_private_umask(|| {
            if destroy {
                // Empties the tables and imports again (logging a failure).
                self.handle_flags_table().clear();
                self.inner.destroy();
                Ok(())
            } else {
                self.inner.import()
            }
        })?;
        self.check_root()
    }

    fn handle_flags_table(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.handle_flags.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember_flags(&self, handle: u64, flags: u32) {
        self.handle_flags_table().insert(handle, flags);
    }

    /// The flags `handle` was opened with; for a handle aivmm does not know,
    /// `fallback`, the flags fuse-backend-rs opens a handle-less file with (so no
    /// `fcntl` happens either way).
    fn flags_of(&self, handle: u64, fallback: i32) -> u32 {
        self.handle_flags_table()
            .get(&handle)
            .copied()
            .unwrap_or(fallback as u32)
    }

    /// Whether the root inode is still the directory opened at creation (EIO if not).
    fn check_root(&self) -> io::Result<()> {
        let (st, _) = self.inner.getattr(&Context::default(), ROOT_ID, None)?;
        if (st.st_dev, st.st_ino) != self.root.id || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            error!(
                "virtio-fs: the root inode is not {} any more; refusing it",
                self.root.path.display()
            );
            return Err(errno(libc::EIO));
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// The host (device, inode) of `inode`.
    fn id(&self, ctx: &Context, inode: u64) -> io::Result<Id> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// Acts as the request's caller on this thread until the guard is dropped
    /// (when aivmm runs as root), and gives the context to hand `PassthroughFs`:
    /// ids 0, so that it never does its own `setresuid` switch, which would undo
    /// this one when it ends.
    fn as_caller(&self, ctx: &Context) -> io::Result<(Option<AsCaller>, Context)> {
        let guard = if self.switch_ids {
            Some(AsCaller::new(ctx.uid, ctx.gid)?)
        } else {
            None
        };
        let mut inner = *ctx;
        inner.uid = 0;
        inner.gid = 0;
        Ok((guard, inner))
    }

    /// Refuses (EROFS) a change to a protected object: one resolved at creation,
    /// or one the host put at a protected path since.
    fn check_unprotected(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        let p = &self.protection;
        if p.objects.is_empty() && p.paths.is_empty() {
            return Ok(());
        }
        if p.objects.contains(&self.id(ctx, inode)?) {
            return Err(erofs());
        }
        if let Ok(path) = self.inner.readlinkat_proc_file(inode) {
            if p.covers_path(&path) {
                return Err(erofs());
            }
        }
        Ok(())
    }

    /// Refuses (EROFS) making, removing or renaming `name` in `parent` when
    /// `parent` is sealed or `name` is protected there.
    fn check_entry(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let p = &self.protection;
        if p.sealed_dirs.is_empty() && p.names.is_empty() {
            return Ok(());
        }
        let id = self.id(ctx, parent)?;
        if p.sealed_dirs.contains(&id) || p.names.contains(&(id, name.to_bytes().to_vec())) {
            return Err(erofs());
        }
        Ok(())
    }

    /// Whether `dir` is now a `.git/hooks` directory (by its host path).
    fn is_hooks(&self, dir: u64) -> bool {
        self.inner
            .readlinkat_proc_file(dir)
            .is_ok_and(|p| is_hooks_dir(&p))
    }

    /// Whether `inode`'s host object is now directly in a `.git/hooks` directory.
    fn in_hooks(&self, inode: u64) -> bool {
        self.inner
            .readlinkat_proc_file(inode)
            .is_ok_and(|p| p.parent().is_some_and(is_hooks_dir))
    }

    /// Clears the execute bits of `name` in `parent`, a hooks directory, if it is
    /// a regular file that has any.
    fn strip_exec(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let e = self.inner.lookup(ctx, parent, name)?;
        let mode = e.attr.st_mode;
        let res = if mode & libc::S_IFMT == libc::S_IFREG && mode & 0o111 != 0 {
            // SAFETY: stat64 is plain data; all zeroes is a valid value.
            let mut attr: stat64 = unsafe { std::mem::zeroed() };
            attr.st_mode = mode & !0o111 & 0o7777;
            self.inner
                .setattr(ctx, e.inode, attr, None, SetattrValid::MODE)
                .map(|_| ())
        } else {
            Ok(())
        };
        self.inner.forget(ctx, e.inode, 1);
        res
    }

    /// Refuses xattr names the guest may not set or remove (see the module doc).
    fn check_xattr_name(&self, name: &CStr) -> io::Result<()> {
        let n = name.to_bytes();
        if n.starts_with(b"security.") || n.starts_with(b"trusted.") {
            return Err(errno(libc::EPERM));
        }
        if n.starts_with(b"system.") {
            let acl = n == b"system.posix_acl_access" || n == b"system.posix_acl_default";
            if !(acl && self.posix_acls) {
                return Err(errno(libc::EOPNOTSUPP));
            }
        }
        Ok(())
    }

    /// Refuses, on a read-only share, open flags that would change the file.
    fn check_open_flags(&self, flags: u32) -> io::Result<()> {
        if self.read_only && open_writes(flags) {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Opens `inode`'s host object again by its `/proc/self/fd` path and checks that
    /// it is still the same object (device and inode number), so nothing but the
    /// identity the guest already holds is ever used.
    fn reopen_verified(&self, ctx: &Context, inode: u64, dir: bool) -> io::Result<OwnedFd> {
        let path = self.inner.readlinkat_proc_file(inode)?;
        let path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOENT))?;
        let mut flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        if dir {
            flags |= libc::O_DIRECTORY;
        }
        // SAFETY: `path` is a NUL-terminated string; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(&fd)?;
        let (want, _) = self.inner.getattr(ctx, inode, None)?;
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(fd)
    }

    /// Refuses to open anything but a regular file: a device node would be the
    /// host's device, a FIFO could block the worker. The type of an inode never
    /// changes, so checking the held inode is race-free.
    fn check_regular(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
    }

    /// Whether `inode`'s host object is still the share root or under it, by the
    /// path its `/proc/self/fd` link names now.
    fn under_root(&self, inode: u64) -> bool {
        let Ok(path) = self.inner.readlinkat_proc_file(inode) else {
            return false;
        };
        path.starts_with(&self.root.path)
    }

    /// `link` without `AT_EMPTY_PATH` (which needs `CAP_DAC_READ_SEARCH`): link the
    /// object through its `/proc/self/fd` magic link, which names the object itself.
    fn link_via_proc(
        &self,
        ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        validate_path_component(newname)?;
        let src = self.reopen_verified(ctx, inode, false)?;
        let dir = self.reopen_verified(ctx, newparent, true)?;
        let src_path = CString::new(format!("/proc/self/fd/{}", src.as_raw_fd()))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: both strings are NUL-terminated, both fds are open; checked.
        let res = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src_path.as_ptr(),
                dir.as_raw_fd(),
                newname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if res < 0 {
            return Err(io::Error::last_os_error());
        }
        self.inner.lookup(ctx, newparent, newname)
    }
}

impl FileSystem for ShareFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // The root was imported when the ShareFs was built (or on DESTROY); an
        // INIT never resolves it again, and is refused if it is not the directory
        // opened at creation.
        self.check_root()?;
        let mut capable = capable;
        capable.remove(refused_init_options());
        let want = self.inner.init(capable)?;
        let mut want = want | extra_init_options();
        if self.read_only {
            want.remove(FsOptions::WRITEBACK_CACHE);
        }
        Ok(want)
    }

    fn destroy(&self) {
        if let Err(e) = self.import(true) {
            error!("virtio-fs: importing the root again after DESTROY failed: {e}");
        }
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        // As a normal user, the guest's ids mean nothing on the host: act as the
        // user running aivmm. As root, keep them for `as_caller`.
        if !self.switch_ids {
            ctx.uid = 0;
            ctx.gid = 0;
        }
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        let entry = self.inner.lookup(ctx, parent, name)?;
        if name.to_bytes() == b".." && parent != ROOT_ID && !self.under_root(entry.inode) {
            self.inner.forget(ctx, entry.inode, 1);
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        self.check_unprotected(ctx, inode)?;
        let mut attr = attr;
        if valid.contains(SetattrValid::MODE) {
            attr.st_mode &= !DENIED_MODE_BITS;
            if attr.st_mode & 0o111 != 0 && self.in_hooks(inode) {
                attr.st_mode &= !0o111;
            }
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        self.check_entry(ctx, parent, name)?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.check_entry(ctx, inode, name)?;
        let mut mode = creation_mode(mode);
        if self.is_hooks(inode) {
            mode &= !0o111;
        }
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        self.check_entry(ctx, parent, name)?;
        self.inner
            .mkdir(ctx, parent, name, creation_mode(mode), umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        self.check_entry(ctx, parent, name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        self.check_entry(ctx, parent, name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        let (caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(oldname)?;
        validate_path_component(newname)?;
        self.check_entry(ctx, olddir, oldname)?;
        self.check_entry(ctx, newdir, newname)?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)?;
        // Clearing execute bits in hooks is aivmm's rule, not the caller's
        // action: it is done with aivmm's own credentials.
        drop(caller);
        if self.is_hooks(newdir) {
            self.strip_exec(ctx, newdir, newname)?;
        }
        Ok(())
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let (caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(newname)?;
        self.check_entry(ctx, newparent, newname)?;
        self.check_unprotected(ctx, inode)?;
        let entry = match self.inner.link(ctx, inode, newparent, newname) {
            // Without CAP_DAC_READ_SEARCH, linkat(AT_EMPTY_PATH) fails with ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.link_via_proc(ctx, inode, newparent, newname)
            }
            r => r,
        }?;
        // As in `rename`: the fix-up below is aivmm's, not the caller's.
        drop(caller);
        if self.is_hooks(newparent) {
            self.strip_exec(ctx, newparent, newname)?;
            return self.inner.lookup(ctx, newparent, newname).inspect(|_| {
                self.inner.forget(ctx, entry.inode, 1);
            });
        }
        Ok(entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_open_flags(flags)?;
        self.check_regular(ctx, inode)?;
        if open_writes(flags) {
            self.check_unprotected(ctx, inode)?;
        }
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        if let Some(h) = opened.0 {
            self.remember_flags(h, flags);
        }
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        validate_path_component(name)?;
        self.check_entry(ctx, parent, name)?;
        let mut mode = creation_mode(args.mode);
        if self.is_hooks(parent) {
            mode &= !0o111;
        }
        let args = CreateIn { mode, ..args };
        // An existing special file of that name is not opened (see `open`), nor
        // a protected one (another hard link to it); the check after the create
        // catches one swapped in meanwhile.
        if let Ok(e) = self.inner.lookup(ctx, parent, name) {
            let kind = e.attr.st_mode & libc::S_IFMT;
            let id = (e.attr.st_dev, e.attr.st_ino);
            self.inner.forget(ctx, e.inode, 1);
            if kind != libc::S_IFREG {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            if self.protection.objects.contains(&id) {
                return Err(erofs());
            }
        }
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        if entry.attr.st_mode & libc::S_IFMT != libc::S_IFREG {
            if let Some(h) = handle {
                let _ = self
                    .inner
                    .release(ctx, entry.inode, 0, h, false, false, None);
            }
            self.inner.forget(ctx, entry.inode, 1);
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if let Some(h) = handle {
            self.remember_flags(h, args.flags);
        }
        Ok((entry, handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let _ = flags; // see `handle_flags`
        let flags = self.flags_of(handle, libc::O_RDONLY);
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        let _ = flags; // see `handle_flags`
        let flags = self.flags_of(handle, libc::O_RDWR);
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handle_flags_table().remove(&handle);
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut st = self.inner.statfs(ctx, inode)?;
        if self.read_only {
            st.f_flag |= libc::ST_RDONLY;
        }
        Ok(st)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        self.check_xattr_name(name)?;
        self.check_unprotected(ctx, inode)?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.inner
            .getxattr(ctx, inode, name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.inner.listxattr(ctx, inode, size.min(XATTR_SIZE_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.check_writable()?;
        self.check_xattr_name(name)?;
        self.check_unprotected(ctx, inode)?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let (_caller, ctx) = self.as_caller(ctx)?;
        let ctx = &ctx;
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    // No DAX window: setupmapping/removemapping keep the trait's ENOSYS.

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask as i32 & libc::W_OK != 0 {
            self.check_writable()?;
            self.check_unprotected(ctx, inode)?;
        }
        // `PassthroughFs::access` checks the mode bits against `ctx`'s ids
        // itself, without switching: it gets the caller's (0:0 for a normal user).
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    use fuse_backend_rs::api::filesystem::ROOT_ID;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::virtio::fs::device::share_fs;
    use crate::virtio::fs::test_utils::{self as fuse, Session};

    /// A share of `<tmp>/root` next to `<tmp>/outside/secret`, INITed.
    struct Fixture {
        _tmp: TempDir,
        root: std::path::PathBuf,
        outside: std::path::PathBuf,
        fs: ShareFs,
    }

    fn fixture(read_only: bool) -> Fixture {
        let tmp = TempDir::new().unwrap();
        let root = tmp.as_path().join("root");
        let outside = tmp.as_path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"secret").unwrap();
        fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(root.join("file"), b"inside").unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), root.join("abs_link")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", root.join("rel_link")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("dir_link")).unwrap();
        let mut cfg = FsConfig::new(&root, "work");
        cfg.read_only = read_only;
        let fs = share_fs(&cfg).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            outside,
            fs,
        }
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn ctx() -> Context {
        Context::default()
    }

    fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    fn outside_untouched(f: &Fixture) {
        let secret = f.outside.join("secret");
        assert_eq!(fs::read(&secret).unwrap(), b"secret");
        assert_eq!(fs::metadata(&secret).unwrap().mode() & 0o7777, 0o600);
        let names: Vec<_> = fs::read_dir(&f.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
    }

    fn ino_of(p: &Path) -> u64 {
        fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn dotdot_at_the_root_stays_at_the_root() {
        let f = fixture(false);
        let e = f.fs.lookup(&ctx(), ROOT_ID, &c("..")).unwrap();
        assert_eq!(e.inode, ROOT_ID);
        assert_eq!(e.attr.st_ino, ino_of(&f.root));
        let sub = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        let up = f.fs.lookup(&ctx(), sub.inode, &c("..")).unwrap();
        assert_eq!(up.inode, ROOT_ID);
        let upup = f.fs.lookup(&ctx(), up.inode, &c("..")).unwrap();
        assert_eq!(upup.attr.st_ino, ino_of(&f.root));
        // Names with a slash never reach the host.
        for name in ["../outside", "/etc", "sub/../../outside", "..//"] {
            assert_eq!(
                errno(f.fs.lookup(&ctx(), ROOT_ID, &c(name))),
                libc::EINVAL,
                "{name}"
            );
        }
        // Creating calls refuse "." and "..".
        assert_eq!(
            errno(f.fs.mkdir(&ctx(), ROOT_ID, &c(".."), 0o755, 0)),
            libc::EINVAL
        );
        assert_eq!(errno(f.fs.unlink(&ctx(), ROOT_ID, &c(".."))), libc::EINVAL);
        outside_untouched(&f);
    }

    #[test]
    fn symlinks_are_links_not_paths() {
        let f = fixture(false);
        for (name, target) in [
            (
                "abs_link",
                f.outside.join("secret").to_str().unwrap().to_owned(),
            ),
            ("rel_link", "../outside/secret".to_owned()),
        ] {
            let e = f.fs.lookup(&ctx(), ROOT_ID, &c(name)).unwrap();
            // The entry is the link itself, not what it points at.
            assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
            assert_eq!(e.attr.st_ino, ino_of(&f.root.join(name)));
            assert_eq!(f.fs.readlink(&ctx(), e.inode).unwrap(), target.as_bytes());
            // Opening a link for I/O is refused (the guest resolves links itself).
            for flags in [libc::O_RDONLY, libc::O_RDWR, libc::O_WRONLY | libc::O_TRUNC] {
                assert!(
                    f.fs.open(&ctx(), e.inode, flags as u32, 0).is_err(),
                    "{name}"
                );
            }
            // Attribute changes act on the link, never on the target.
            let mut attr: stat64 = unsafe_zeroed_stat();
            attr.st_mode = 0o777;
            attr.st_size = 0;
            let _ =
                f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE);
            let _ =
                f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::SIZE);
            let _ =
                f.fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::MTIME);
            let _ = f.fs.setxattr(&ctx(), e.inode, &c("user.x"), b"v", 0);
            let _ = f.fs.getxattr(&ctx(), e.inode, &c("user.x"), 64);
        }
        // A link to a directory outside cannot be walked through or created in.
        let d = f.fs.lookup(&ctx(), ROOT_ID, &c("dir_link")).unwrap();
        assert_eq!(d.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(f.fs.lookup(&ctx(), d.inode, &c("secret")).is_err());
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        assert!(f.fs.create(&ctx(), d.inode, &c("planted"), args).is_err());
        assert!(f
            .fs
            .mkdir(&ctx(), d.inode, &c("planted"), 0o755, 0)
            .is_err());
        assert!(f
            .fs
            .opendir(&ctx(), d.inode, libc::O_RDONLY as u32)
            .is_err());
        assert!(f.fs.unlink(&ctx(), d.inode, &c("secret")).is_err());
        assert!(f
            .fs
            .rename(&ctx(), d.inode, &c("secret"), ROOT_ID, &c("stolen"), 0)
            .is_err());
        // A hard link to the link is another link, never the directory it names.
        if let Ok(e) = f.fs.link(&ctx(), d.inode, ROOT_ID, &c("hard")) {
            assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        }
        outside_untouched(&f);
    }

    fn unsafe_zeroed_stat() -> stat64 {
        // SAFETY: stat64 is plain old data; all-zero is a valid value.
        unsafe { std::mem::zeroed() }
    }

    /// A directory the guest holds is swapped on the host for a link to outside
    /// (what a rename race would do): requests by the held inode still act on the
    /// directory it names, and a fresh lookup sees only the link.
    #[test]
    fn swapped_directory_does_not_redirect() {
        let f = fixture(false);
        let sub = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        fs::rename(f.root.join("sub"), f.root.join("sub_old")).unwrap();
        std::os::unix::fs::symlink(&f.outside, f.root.join("sub")).unwrap();
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        f.fs.create(&ctx(), sub.inode, &c("x"), args).unwrap();
        assert!(f.root.join("sub_old/x").exists());
        let again = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        assert_eq!(again.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(f.fs.create(&ctx(), again.inode, &c("y"), args).is_err());
        outside_untouched(&f);
    }

    #[test]
    fn read_only_refuses_every_change() {
        let f = fixture(true);
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        let sub = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        let erofs = libc::EROFS;
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        assert_eq!(errno(f.fs.create(&ctx(), ROOT_ID, &c("new"), args)), erofs);
        assert_eq!(errno(f.fs.mkdir(&ctx(), ROOT_ID, &c("d"), 0o755, 0)), erofs);
        assert_eq!(
            errno(f.fs.mknod(&ctx(), ROOT_ID, &c("n"), libc::S_IFIFO | 0o644, 0, 0)),
            erofs
        );
        assert_eq!(
            errno(f.fs.symlink(&ctx(), &c("file"), ROOT_ID, &c("l"))),
            erofs
        );
        assert_eq!(
            errno(f.fs.link(&ctx(), file.inode, ROOT_ID, &c("h"))),
            erofs
        );
        assert_eq!(errno(f.fs.unlink(&ctx(), ROOT_ID, &c("file"))), erofs);
        assert_eq!(errno(f.fs.rmdir(&ctx(), ROOT_ID, &c("sub"))), erofs);
        assert_eq!(
            errno(f.fs.rename(&ctx(), ROOT_ID, &c("file"), sub.inode, &c("f"), 0)),
            erofs
        );
        let mut attr = unsafe_zeroed_stat();
        attr.st_size = 0;
        assert_eq!(
            errno(f.fs.setattr(&ctx(), file.inode, attr, None, SetattrValid::SIZE)),
            erofs
        );
        assert_eq!(
            errno(f.fs.setxattr(&ctx(), file.inode, &c("user.a"), b"b", 0)),
            erofs
        );
        assert_eq!(
            errno(f.fs.removexattr(&ctx(), file.inode, &c("user.a"))),
            erofs
        );
        for flags in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_RDONLY | libc::O_TRUNC,
            libc::O_RDONLY | libc::O_APPEND,
        ] {
            assert_eq!(
                errno(f.fs.open(&ctx(), file.inode, flags as u32, 0)),
                erofs,
                "{flags:#x}"
            );
        }
        assert_eq!(
            errno(f.fs.access(&ctx(), file.inode, libc::W_OK as u32)),
            erofs
        );
        // Reading still works; handles opened read-only cannot write or fallocate.
        let (fh, _, _) =
            f.fs.open(&ctx(), file.inode, libc::O_RDONLY as u32, 0)
                .unwrap();
        let fh = fh.unwrap();
        assert_eq!(
            errno(f.fs.fallocate(&ctx(), file.inode, fh, 0, 0, 4096)),
            erofs
        );
        f.fs.fsync(&ctx(), file.inode, false, fh).unwrap();
        assert_ne!(
            f.fs.statfs(&ctx(), ROOT_ID).unwrap().f_flag & libc::ST_RDONLY,
            0
        );
        assert_eq!(fs::read(f.root.join("file")).unwrap(), b"inside");
        assert_eq!(fs::read_dir(&f.root).unwrap().count(), 5);
    }

    #[test]
    fn hard_links_through_proc() {
        let f = fixture(false);
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        let sub = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        // The fallback path, as used without CAP_DAC_READ_SEARCH.
        let e =
            f.fs.link_via_proc(&ctx(), file.inode, sub.inode, &c("hard"))
                .unwrap();
        assert_eq!(e.attr.st_ino, ino_of(&f.root.join("file")));
        assert_eq!(fs::read(f.root.join("sub/hard")).unwrap(), b"inside");
        assert_eq!(
            errno(f.fs.link_via_proc(&ctx(), file.inode, sub.inode, &c(".."))),
            libc::EINVAL
        );
        // A link to a link links the link.
        let l = f.fs.lookup(&ctx(), ROOT_ID, &c("abs_link")).unwrap();
        f.fs.link_via_proc(&ctx(), l.inode, sub.inode, &c("link2"))
            .unwrap();
        assert!(fs::symlink_metadata(f.root.join("sub/link2"))
            .unwrap()
            .file_type()
            .is_symlink());
        // And the public entry point works whichever path it takes.
        f.fs.link(&ctx(), file.inode, ROOT_ID, &c("hard2")).unwrap();
        assert_eq!(ino_of(&f.root.join("hard2")), ino_of(&f.root.join("file")));
        outside_untouched(&f);
    }

    fn create_args(flags: i32) -> CreateIn {
        CreateIn {
            flags: flags as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        }
    }

    #[test]
    fn device_nodes_cannot_be_made_and_special_files_are_not_opened() {
        let f = fixture(false);
        for (mode, rdev) in [
            (libc::S_IFCHR | 0o666, 0x0103),
            (libc::S_IFBLK | 0o666, 0x0800),
        ] {
            assert_eq!(
                errno(f.fs.mknod(&ctx(), ROOT_ID, &c("dev"), mode, rdev, 0)),
                libc::EPERM
            );
        }
        assert!(!f.root.join("dev").exists());
        // A FIFO may be made (the guest kernel serves it) but aivmm never opens it:
        // opening it for writing would block the worker until a reader came.
        let fifo =
            f.fs.mknod(&ctx(), ROOT_ID, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
                .unwrap();
        for flags in [libc::O_WRONLY, libc::O_RDONLY, libc::O_RDWR] {
            assert_eq!(
                errno(f.fs.open(&ctx(), fifo.inode, flags as u32, 0)),
                libc::EPERM
            );
        }
        assert_eq!(
            errno(f.fs.create(&ctx(), ROOT_ID, &c("fifo"), create_args(libc::O_WRONLY))),
            libc::EPERM
        );
        // A device node the host placed in the share (needs root to make one here).
        let node = CString::new(f.root.join("null").as_os_str().as_bytes()).unwrap();
        // SAFETY: mknod with a NUL-terminated path; the result is checked.
        if unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0 {
            let e = f.fs.lookup(&ctx(), ROOT_ID, &c("null")).unwrap();
            assert_eq!(
                errno(f.fs.open(&ctx(), e.inode, libc::O_RDWR as u32, 0)),
                libc::EPERM
            );
            assert_eq!(
                errno(f.fs.create(&ctx(), ROOT_ID, &c("null"), create_args(libc::O_RDWR))),
                libc::EPERM
            );
        }
        // Regular files still open and create.
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        f.fs.open(&ctx(), file.inode, libc::O_RDWR as u32, 0)
            .unwrap();
        f.fs.create(&ctx(), ROOT_ID, &c("new"), create_args(libc::O_RDWR))
            .unwrap();
        outside_untouched(&f);
    }

    #[test]
    fn dotdot_from_a_directory_moved_out_is_refused() {
        let f = fixture(false);
        let sub = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")).unwrap();
        fs::create_dir(f.root.join("sub/deeper")).unwrap();
        let deeper = f.fs.lookup(&ctx(), sub.inode, &c("deeper")).unwrap();
        // Inside the share, .. works as usual.
        let up = f.fs.lookup(&ctx(), deeper.inode, &c("..")).unwrap();
        assert_eq!(up.attr.st_ino, ino_of(&f.root.join("sub")));
        // The host moves `sub` out of the share while the guest holds it.
        fs::rename(f.root.join("sub"), f.outside.join("sub")).unwrap();
        assert_eq!(
            errno(f.fs.lookup(&ctx(), sub.inode, &c(".."))),
            libc::EACCES
        );
        assert_eq!(
            errno(f.fs.lookup(&ctx(), deeper.inode, &c(".."))),
            libc::EACCES
        );
        fs::rename(f.outside.join("sub"), f.root.join("sub")).unwrap();
        outside_untouched(&f);
    }

    #[test]
    fn proc_self_fd_links_are_only_links() {
        let f = fixture(false);
        // An fd aivmm holds on an outside file, named through /proc/self/fd.
        let secret = fs::File::open(f.outside.join("secret")).unwrap();
        for target in [
            format!("/proc/self/fd/{}", secret.as_raw_fd()),
            "/proc/self/root/etc/passwd".to_string(),
            "/proc/self/cwd".to_string(),
        ] {
            std::os::unix::fs::symlink(&target, f.root.join("pfd")).unwrap();
            let e = f.fs.lookup(&ctx(), ROOT_ID, &c("pfd")).unwrap();
            assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{target}");
            assert_eq!(f.fs.readlink(&ctx(), e.inode).unwrap(), target.as_bytes());
            for flags in [libc::O_RDONLY, libc::O_RDWR | libc::O_TRUNC] {
                assert!(
                    f.fs.open(&ctx(), e.inode, flags as u32, 0).is_err(),
                    "{target}"
                );
            }
            assert!(f.fs.lookup(&ctx(), e.inode, &c("secret")).is_err());
            assert!(f.fs.opendir(&ctx(), e.inode, 0).is_err());
            // The guest cannot make a name with a slash either.
            assert_eq!(
                errno(f.fs.lookup(&ctx(), ROOT_ID, &c(&target))),
                libc::EINVAL
            );
            f.fs.forget(&ctx(), e.inode, 1);
            fs::remove_file(f.root.join("pfd")).unwrap();
        }
        outside_untouched(&f);
    }

    #[test]
    fn hard_links_need_an_inode_from_inside() {
        let f = fixture(false);
        // Inode numbers the guest never got from a lookup name nothing.
        for forged in [0u64, 2, 999, u64::MAX] {
            assert!(f.fs.link(&ctx(), forged, ROOT_ID, &c("stolen")).is_err());
            assert!(f
                .fs
                .link_via_proc(&ctx(), forged, ROOT_ID, &c("stolen"))
                .is_err());
            assert!(f.fs.open(&ctx(), forged, libc::O_RDONLY as u32, 0).is_err());
        }
        assert!(!f.root.join("stolen").exists());
        // A link through a symlink to an outside file links the symlink, not the file.
        let l = f.fs.lookup(&ctx(), ROOT_ID, &c("abs_link")).unwrap();
        let e = f.fs.link(&ctx(), l.inode, ROOT_ID, &c("hl")).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(fs::metadata(f.outside.join("secret")).unwrap().nlink(), 1);
        outside_untouched(&f);
    }

    /// The host swaps `sub` between a directory and a symlink to outside as fast as
    /// it can while the guest looks it up and creates in it: nothing ever lands
    /// outside, and a lookup finds either the directory or the link, never the
    /// outside directory.
    #[test]
    fn symlink_swaps_during_lookups_never_escape() {
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let f = fixture(false);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let swaps = std::sync::Arc::new(AtomicU32::new(0));
        let swapper = {
            let (root, outside) = (f.root.clone(), f.outside.clone());
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = fs::rename(root.join("sub"), root.join("sub_real"));
                    let _ = std::os::unix::fs::symlink(&outside, root.join("sub"));
                    let _ = fs::remove_file(root.join("sub"));
                    let _ = fs::rename(root.join("sub_real"), root.join("sub"));
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let outside_ino = ino_of(&f.outside);
        let mut created = 0;
        // At least 3000 rounds, and on a loaded machine until the swapper has run
        // a while and some creates landed (bounded in time).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut i = 0;
        while (i < 3000 || swaps.load(Ordering::Relaxed) < 100 || created == 0)
            && std::time::Instant::now() < deadline
        {
            i += 1;
            let Ok(e) = f.fs.lookup(&ctx(), ROOT_ID, &c("sub")) else {
                continue;
            };
            assert_ne!(e.attr.st_ino, outside_ino);
            let name = c(&format!("x{i}"));
            if f.fs
                .create(&ctx(), e.inode, &name, create_args(libc::O_RDWR))
                .is_ok()
            {
                created += 1;
            }
            let _ = f.fs.mkdir(&ctx(), e.inode, &c(&format!("d{i}")), 0o755, 0);
            let _ = f.fs.lookup(&ctx(), e.inode, &c("secret"));
            f.fs.forget(&ctx(), e.inode, 1);
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().unwrap();
        let swaps = swaps.load(Ordering::Relaxed);
        assert!(swaps > 0 && created > 0, "swaps {swaps} created {created}");
        outside_untouched(&f);
    }

    #[test]
    fn xattr_sizes_are_capped() {
        let f = fixture(false);
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        // A 4 GiB buffer request must not make the host allocate 4 GiB.
        let _ = f.fs.getxattr(&ctx(), file.inode, &c("user.none"), u32::MAX);
        let _ = f.fs.listxattr(&ctx(), file.inode, u32::MAX).unwrap();
    }

    /// A session over real queues on a share of `<tmp>/root` (with `file` and
    /// `sub`), next to `<tmp>/outside/secret`.
    struct QueueFixture {
        tmp: TempDir,
        server: std::sync::Arc<fuse_backend_rs::api::server::Server<ShareFs>>,
    }

    fn queue_fixture(posix_acls: bool) -> QueueFixture {
        let tmp = TempDir::new().unwrap();
        let root = tmp.as_path().join("root");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::create_dir(tmp.as_path().join("outside")).unwrap();
        fs::write(root.join("file"), b"inside").unwrap();
        fs::write(tmp.as_path().join("outside/secret"), b"secret").unwrap();
        let mut cfg = FsConfig::new(&root, "work");
        cfg.posix_acls = posix_acls;
        let server = crate::virtio::fs::device::fuse_server(&cfg).unwrap();
        QueueFixture { tmp, server }
    }

    impl QueueFixture {
        fn root(&self) -> std::path::PathBuf {
            self.tmp.as_path().join("root")
        }

        /// Runs `f` with a session whose INIT is done and a handler for it.
        fn with_session(
            &self,
            f: impl FnOnce(
                &mut Session,
                &mut dyn FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> u32,
            ),
        ) {
            let mem = crate::test_utils::guest_memory(fuse::SESSION_MEM);
            let mut s = Session::new(&mem);
            let server = self.server.clone();
            let mut h = |c: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>| {
                crate::virtio::fs::worker::handle_chain(&server, &mem, c)
            };
            assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
            f(&mut s, &mut h);
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode()
    }

    /// The (real, effective, saved, fs) uids and gids in a `/proc` status file.
    fn status_ids(path: &str) -> (String, String) {
        let s = fs::read_to_string(path).unwrap();
        let line = |key: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .trim()
                .to_owned()
        };
        (line("Uid:"), line("Gid:"))
    }

    /// As root, what a guest user makes is theirs on the host, that user cannot
    /// remove, chmod or give away what is not theirs, and the switch to the
    /// caller is undone after each request, on this thread and in the process.
    #[test]
    fn guest_users_own_what_they_make() {
        if !running_as_root() {
            println!("SKIPPED guest_users_own_what_they_make: needs root (ownership cannot change as a normal user)");
            return;
        }
        let q = queue_fixture(false);
        let root = q.root();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(root.join("sub/roots"), b"x").unwrap();
        let process = status_ids("/proc/self/status");
        let thread = status_ids("/proc/thread-self/status");
        assert_eq!(process.0, "0\t0\t0\t0", "the test runs as root");
        q.with_session(|s, h| {
            for (uid, gid) in [(65534, 65534), (0, 0), (65534, 100)] {
                s.ids = (uid, gid);
                let n = format!("{uid}.{gid}");
                let made = [
                    s.call(
                        &fuse::create(ROOT_ID, &format!("f{n}"), libc::O_RDWR as u32, 0o644),
                        h,
                    ),
                    s.call(&fuse::mkdir(ROOT_ID, &format!("d{n}"), 0o755), h),
                    s.call(&fuse::symlink(ROOT_ID, &format!("l{n}"), "file"), h),
                    s.call(
                        &fuse::mknod(ROOT_ID, &format!("p{n}"), libc::S_IFIFO | 0o644),
                        h,
                    ),
                ];
                for (r, name) in made.iter().zip(["f", "d", "l", "p"]) {
                    assert_eq!(r.errno(), 0, "{name}{n}");
                    let md = fs::symlink_metadata(root.join(format!("{name}{n}"))).unwrap();
                    assert_eq!((md.uid(), md.gid()), (uid, gid), "{name}{n}");
                    let attr = r.entry().attr;
                    assert_eq!(
                        (attr.uid, attr.gid),
                        (uid, gid),
                        "{name}{n}, as the guest sees it"
                    );
                }
            }

            s.ids = (65534, 65534);
            // Not in a root-owned 0755 directory, nor root's file, nor away.
            let sub = s.call(&fuse::lookup(ROOT_ID, "sub"), h).entry().nodeid;
            assert_eq!(s.call(&fuse::unlink(sub, "roots"), h).errno(), libc::EACCES);
            assert!(root.join("sub/roots").exists());
            assert_eq!(
                s.call(&fuse::rename(sub, "roots", ROOT_ID, "stolen"), h)
                    .errno(),
                libc::EACCES
            );
            let file = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().nodeid;
            assert_eq!(s.call(&fuse::chmod(file, 0o666), h).errno(), libc::EPERM);
            assert_eq!(
                s.call(&fuse::open(file, libc::O_WRONLY as u32), h).errno(),
                libc::EACCES
            );
            let own = s
                .call(&fuse::lookup(ROOT_ID, "f65534.65534"), h)
                .entry()
                .nodeid;
            assert_eq!(s.call(&fuse::chown(own, 0, 0), h).errno(), libc::EPERM);
            // Its own file: the mode changes, setuid is never set.
            let r = s.call(&fuse::chmod(own, 0o4755), h);
            assert_eq!(r.attr().attr.mode & 0o7777, 0o755);
            assert_eq!(mode_of(&root.join("f65534.65534")) & 0o7777, 0o755);
            // Guest root may give files away, as root may on Linux.
            s.ids = (0, 0);
            assert_eq!(s.call(&fuse::chown(own, 1234, 1235), h).errno(), 0);
            let md = fs::metadata(root.join("f65534.65534")).unwrap();
            assert_eq!((md.uid(), md.gid()), (1234, 1235));
            // An id Linux reserves is refused, not carried out as root.
            s.ids = (u32::MAX, 0);
            assert_eq!(
                s.call(&fuse::mkdir(ROOT_ID, "noid", 0o755), h).errno(),
                libc::EPERM
            );
            assert!(!root.join("noid").exists());
        });
        assert_eq!(status_ids("/proc/self/status"), process);
        assert_eq!(status_ids("/proc/thread-self/status"), thread);
        let (mut r, mut e, mut sv) = (1, 1, 1);
        // SAFETY: getresuid writes three uid_t through valid pointers.
        assert_eq!(unsafe { libc::getresuid(&mut r, &mut e, &mut sv) }, 0);
        assert_eq!((r, e, sv), (0, 0, 0));
        // SAFETY: as above, for gids.
        assert_eq!(unsafe { libc::getresgid(&mut r, &mut e, &mut sv) }, 0);
        assert_eq!((r, e, sv), (0, 0, 0));
    }

    /// chmod, create, mkdir and mknod from the guest with setuid or setgid: the host
    /// file never has either bit; the permission bits and the sticky bit stay.
    #[test]
    fn setuid_and_setgid_never_reach_the_host() {
        let q = queue_fixture(false);
        let root = q.root();
        let umask = host_umask();
        q.with_session(|s, h| {
            let file = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().nodeid;
            let sub = s.call(&fuse::lookup(ROOT_ID, "sub"), h).entry().nodeid;
            for mode in [0o4755, 0o2755, 0o6755, 0o6777] {
                let r = s.call(&fuse::chmod(file, mode), h);
                assert_eq!(r.attr().attr.mode & 0o7777, mode & 0o777, "{mode:o}");
                assert_eq!(
                    mode_of(&root.join("file")) & 0o7777,
                    mode & 0o777,
                    "{mode:o}"
                );
            }
            // Sticky stays (harmless on a directory, ignored on a file); sgid goes.
            s.call(&fuse::chmod(sub, 0o3775), h).attr();
            assert_eq!(mode_of(&root.join("sub")) & 0o7777, 0o1775);
            let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
            for (i, mode) in [0o4755u32, 0o2755, 0o6777].into_iter().enumerate() {
                let name = format!("c{i}");
                let r = s.call(&fuse::create(ROOT_ID, &name, flags, mode), h);
                assert_eq!(r.errno(), 0, "{mode:o}");
                assert_eq!(mode_of(&root.join(&name)) & 0o7777, mode & 0o777 & !umask);
                let name = format!("d{i}");
                s.call(&fuse::mkdir(ROOT_ID, &name, mode), h).entry();
                assert_eq!(mode_of(&root.join(&name)) & 0o7777, mode & 0o777 & !umask);
                let name = format!("n{i}");
                s.call(&fuse::mknod(ROOT_ID, &name, libc::S_IFREG | mode), h)
                    .entry();
                assert_eq!(mode_of(&root.join(&name)) & 0o7777, mode & 0o777 & !umask);
            }
        });
        // The FileSystem calls directly, without the kernel's umask argument.
        let f = fixture(false);
        let mut attr = unsafe_zeroed_stat();
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        attr.st_mode = 0o6755;
        f.fs.setattr(&ctx(), file.inode, attr, None, SetattrValid::MODE)
            .unwrap();
        assert_eq!(mode_of(&f.root.join("file")) & 0o7777, 0o755);
        let args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: libc::S_IFREG | 0o4755,
            umask: 0,
            fuse_flags: 0,
        };
        f.fs.create(&ctx(), ROOT_ID, &c("x"), args).unwrap();
        f.fs.mkdir(&ctx(), ROOT_ID, &c("y"), 0o2755, 0).unwrap();
        f.fs.mknod(&ctx(), ROOT_ID, &c("z"), libc::S_IFREG | 0o6755, 0, 0)
            .unwrap();
        for name in ["x", "y", "z"] {
            let m = mode_of(&f.root.join(name));
            assert_eq!(m & (libc::S_ISUID | libc::S_ISGID), 0, "{name} {m:o}");
        }
    }

    /// A minimal POSIX ACL xattr (version 2: user::rw-, group::r--, other::r--).
    fn acl_0644() -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 4)] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        v
    }

    /// File capabilities, LSM labels, `trusted.*` and ACLs cannot be set or removed;
    /// `user.*` can; ACLs only reach the host when the config allows them.
    #[test]
    fn privileged_xattrs_are_refused() {
        let q = queue_fixture(false);
        let root = q.root();
        q.with_session(|s, h| {
            let file = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().nodeid;
            let sub = s.call(&fuse::lookup(ROOT_ID, "sub"), h).entry().nodeid;
            // A VFS_CAP_REVISION_2 blob giving CAP_SYS_ADMIN (what setcap writes).
            let mut cap = 0x0200_0001u32.to_le_bytes().to_vec();
            cap.extend_from_slice(&(1u32 << 21).to_le_bytes());
            cap.extend_from_slice(&[0; 12]);
            for (name, value, want) in [
                ("security.capability", &cap[..], libc::EPERM),
                (
                    "security.selinux",
                    b"system_u:object_r:bin_t:s0",
                    libc::EPERM,
                ),
                ("trusted.x", b"v", libc::EPERM),
                ("trusted.overlay.opaque", b"y", libc::EPERM),
                ("system.posix_acl_access", &acl_0644()[..], libc::EOPNOTSUPP),
                (
                    "system.posix_acl_default",
                    &acl_0644()[..],
                    libc::EOPNOTSUPP,
                ),
                ("system.nfs4_acl", b"x", libc::EOPNOTSUPP),
            ] {
                for ino in [file, sub] {
                    assert_eq!(
                        s.call(&fuse::setxattr(ino, name, value), h).errno(),
                        want,
                        "{name}"
                    );
                    assert_eq!(
                        s.call(&fuse::removexattr(ino, name), h).errno(),
                        want,
                        "{name}"
                    );
                }
            }
            for p in [root.join("file"), root.join("sub")] {
                assert!(
                    xattr_names(&p).iter().all(|n| n.starts_with("user.")),
                    "{p:?}"
                );
            }
            // user.* still works, where the host file system has user xattrs.
            let r = s.call(&fuse::setxattr(file, "user.note", b"hi"), h);
            if r.errno() != libc::EOPNOTSUPP {
                assert_eq!(r.errno(), 0);
                assert_eq!(
                    xattr_names(&root.join("file")),
                    vec!["user.note".to_string()]
                );
                assert_eq!(s.call(&fuse::removexattr(file, "user.note"), h).errno(), 0);
            }
        });
        // With ACLs allowed, the ACL reaches the host (if its file system has ACLs).
        let q = queue_fixture(true);
        let root = q.root();
        q.with_session(|s, h| {
            let file = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().nodeid;
            let r = s.call(
                &fuse::setxattr(file, "system.posix_acl_access", &acl_0644()),
                h,
            );
            assert!(
                r.errno() == 0 || r.errno() == libc::EOPNOTSUPP,
                "{}",
                r.errno()
            );
            if r.errno() == 0 {
                assert_eq!(mode_of(&root.join("file")) & 0o777, 0o644);
            }
            let r = s.call(&fuse::setxattr(file, "security.capability", b"x"), h);
            assert_eq!(r.errno(), libc::EPERM);
        });
    }

    fn xattr_names(p: &Path) -> Vec<String> {
        let path = CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: `path` is NUL-terminated and `buf` is as long as said; checked.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        buf.truncate(usize::try_from(n).unwrap());
        buf.split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    /// Names the guest may not make or remove are refused by ShareFs itself
    /// (PassthroughFs leaves that to the layer above once `do_import` is off).
    #[test]
    fn bad_names_are_refused_in_every_changing_call() {
        let f = fixture(false);
        let file = f.fs.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        for name in [".", "..", "a/b"] {
            let n = c(name);
            let args = create_args(libc::O_RDWR);
            assert_eq!(
                errno(f.fs.create(&ctx(), ROOT_ID, &n, args)),
                libc::EINVAL,
                "{name}"
            );
            assert_eq!(
                errno(f.fs.mkdir(&ctx(), ROOT_ID, &n, 0o755, 0)),
                libc::EINVAL
            );
            assert_eq!(
                errno(f.fs.mknod(&ctx(), ROOT_ID, &n, libc::S_IFIFO | 0o644, 0, 0)),
                libc::EINVAL
            );
            assert_eq!(
                errno(f.fs.symlink(&ctx(), &c("file"), ROOT_ID, &n)),
                libc::EINVAL
            );
            assert_eq!(
                errno(f.fs.link(&ctx(), file.inode, ROOT_ID, &n)),
                libc::EINVAL
            );
            assert_eq!(errno(f.fs.unlink(&ctx(), ROOT_ID, &n)), libc::EINVAL);
            assert_eq!(errno(f.fs.rmdir(&ctx(), ROOT_ID, &n)), libc::EINVAL);
            assert_eq!(
                errno(f.fs.rename(&ctx(), ROOT_ID, &c("file"), ROOT_ID, &n, 0)),
                libc::EINVAL
            );
            assert_eq!(
                errno(f.fs.rename(&ctx(), ROOT_ID, &n, ROOT_ID, &c("moved"), 0)),
                libc::EINVAL
            );
        }
        assert_eq!(fs::read(f.root.join("file")).unwrap(), b"inside");
        outside_untouched(&f);
    }

    /// The share's path is swapped on the host for a symlink to outside, then for
    /// another directory: INIT, DESTROY and INIT again keep serving the directory
    /// opened at creation, and a new server built from the same root does too.
    #[test]
    fn the_root_is_resolved_once() {
        let q = queue_fixture(false);
        let root = q.root();
        let moved = q.tmp.as_path().join("moved");
        let outside = q.tmp.as_path().join("outside");
        let file_ino = ino_of(&root.join("file"));
        q.with_session(|s, h| {
            s.send(&fuse::destroy(), h);
            fs::rename(&root, &moved).unwrap();
            std::os::unix::fs::symlink(&outside, &root).unwrap();
            assert_eq!(s.call(&fuse::init(), h).errno(), 0);
            let e = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry();
            assert_eq!(e.attr.ino, file_ino);
            assert_eq!(
                s.call(&fuse::lookup(ROOT_ID, "secret"), h).errno(),
                libc::ENOENT
            );
            // DESTROY imports again, still from the held directory.
            s.send(&fuse::destroy(), h);
            fs::remove_file(&root).unwrap();
            fs::create_dir(&root).unwrap();
            fs::write(root.join("decoy"), b"d").unwrap();
            assert_eq!(s.call(&fuse::init(), h).errno(), 0);
            assert_eq!(
                s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().attr.ino,
                file_ino
            );
            assert_eq!(
                s.call(&fuse::lookup(ROOT_ID, "decoy"), h).errno(),
                libc::ENOENT
            );
            let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
            assert_eq!(
                s.call(&fuse::create(ROOT_ID, "new", flags, 0o644), h)
                    .errno(),
                0
            );
        });
        assert!(moved.join("new").exists());
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1);
        // What a device reset does: a new ShareFs from the root opened at creation.
        let share_root = Arc::new(ShareRoot::open(&moved).unwrap());
        fs::rename(&moved, q.tmp.as_path().join("moved2")).unwrap();
        let again = ShareFs::new(&FsConfig::new(&moved, "work"), share_root, Arc::default()).unwrap();
        let e = again.lookup(&ctx(), ROOT_ID, &c("file")).unwrap();
        assert_eq!(e.attr.st_ino, file_ino);
    }

    /// A root inode that is not the directory opened at creation fails the import
    /// and refuses INIT.
    #[test]
    fn an_init_on_another_root_is_refused() {
        let tmp = TempDir::new().unwrap();
        let other = TempDir::new().unwrap();
        let st = fs::metadata(other.as_path()).unwrap();
        let other_id = (st.dev(), st.ino());
        let mut forged = ShareRoot::open(tmp.as_path()).unwrap();
        forged.id = other_id;
        let cfg = FsConfig::new(tmp.as_path(), "work");
        let r = ShareFs::new(&cfg, Arc::new(forged), Arc::default()).map(|_| ());
        assert_eq!(errno(r), libc::EIO);
        let mut share =
            ShareFs::new(&cfg, Arc::new(ShareRoot::open(tmp.as_path()).unwrap()), Arc::default()).unwrap();
        share.init(FsOptions::empty()).unwrap();
        // The root fd stays (PassthroughFs imports through it); only the identity
        // it must have changes.
        Arc::get_mut(&mut share.root).unwrap().id = other_id;
        assert_eq!(errno(share.init(FsOptions::empty())), libc::EIO);
        share.destroy();
        assert_eq!(errno(share.init(FsOptions::empty())), libc::EIO);
        // A share of something that is not a directory is refused at creation.
        fs::write(tmp.as_path().join("f"), b"").unwrap();
        let e = ShareRoot::open(&tmp.as_path().join("f")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
    }

    /// INIT never asks the guest for writeback caching or zero-message opens,
    /// whatever it offers.
    #[test]
    fn init_keeps_writeback_and_zero_message_open_off() {
        let f = fixture(false);
        let want = f.fs.init(FsOptions::all()).unwrap();
        assert!(!want.intersects(refused_init_options()), "{want:?}");
    }

    /// The process umask never changes, not even for a moment, while shares are
    /// built, INITed and DESTROYed: a watcher thread reads it all along.
    #[test]
    fn the_process_umask_never_changes() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let before = proc_umask().unwrap();
        assert_eq!(host_umask(), before);
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = std::collections::BTreeSet::new();
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) || reads == 0 {
                    seen.insert(proc_umask().unwrap());
                    reads += 1;
                }
                (seen, reads)
            })
        };
        let q = queue_fixture(false);
        q.with_session(|s, h| {
            for _ in 0..50 {
                s.send(&fuse::destroy(), h);
                assert_eq!(s.call(&fuse::init(), h).errno(), 0);
            }
        });
        for _ in 0..20 {
            let f = fixture(false);
            f.fs.destroy();
            f.fs.init(FsOptions::empty()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, reads) = watcher.join().unwrap();
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![before],
            "{reads} reads"
        );
        assert_eq!(proc_umask().unwrap(), before);
    }

    /// A workdir share with a repository at the root (config, a hook, an index),
    /// a nested one, `aivmm.toml` (but no `.envrc`), and a hard link to the root
    /// repository's config; protected as a workdir.
    fn protected_fixture() -> (TempDir, Arc<fuse_backend_rs::api::server::Server<ShareFs>>) {
        let tmp = TempDir::new().unwrap();
        let root = tmp.as_path().join("root");
        fs::create_dir_all(root.join(".git/hooks")).unwrap();
        fs::create_dir_all(root.join(".git/objects")).unwrap();
        fs::create_dir_all(root.join("sub/.git")).unwrap();
        fs::write(root.join(".git/config"), "[core]\n").unwrap();
        fs::write(root.join(".git/index"), "i").unwrap();
        fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
        fs::write(root.join(".git/hooks/pre-commit"), "#!/bin/sh\n").unwrap();
        fs::write(root.join("sub/.git/config"), "[core]\n").unwrap();
        fs::write(root.join("aivmm.toml"), "").unwrap();
        fs::write(root.join("file"), "f").unwrap();
        fs::hard_link(root.join(".git/config"), root.join("alias")).unwrap();
        let mut cfg = FsConfig::new(&root, "work");
        cfg.protect_workdir = true;
        let server = crate::virtio::fs::device::fuse_server(&cfg).unwrap();
        (tmp, server)
    }

    fn with_server(
        server: &Arc<fuse_backend_rs::api::server::Server<ShareFs>>,
        f: impl FnOnce(
            &mut Session,
            &mut dyn FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> u32,
        ),
    ) {
        let mem = crate::test_utils::guest_memory(fuse::SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>| {
            crate::virtio::fs::worker::handle_chain(server, &mem, c)
        };
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        f(&mut s, &mut h);
    }

    const EROFS: i32 = libc::EROFS;

    /// Every change to `.git/config`, `.git/hooks`, `aivmm.toml`, `.envrc` (which
    /// does not exist) and `.git` itself is refused with EROFS, by name and by
    /// identity (a hard link), also in a nested repository.
    #[test]
    fn protected_paths_refuse_every_change() {
        let (tmp, server) = protected_fixture();
        let root = tmp.as_path().join("root");
        let before: Vec<_> = [".git/config", ".git/hooks/pre-commit", "aivmm.toml"]
            .iter()
            .map(|p| (fs::read(root.join(p)).unwrap(), mode_of(&root.join(p))))
            .collect();
        with_server(&server, |s, h| {
            let wr = libc::O_WRONLY as u32;
            let creat = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32;
            let git = s.call(&fuse::lookup(ROOT_ID, ".git"), h).entry().nodeid;
            let hooks = s.call(&fuse::lookup(git, "hooks"), h).entry().nodeid;
            let file = s.call(&fuse::lookup(ROOT_ID, "file"), h).entry().nodeid;
            let mut files = Vec::new();
            for (dir, name) in [(git, "config"), (hooks, "pre-commit"), (ROOT_ID, "aivmm.toml"), (ROOT_ID, "alias")] {
                let ino = s.call(&fuse::lookup(dir, name), h).entry().nodeid;
                files.push(ino);
                assert_eq!(s.call(&fuse::open(ino, wr), h).errno(), EROFS, "{name}");
                assert_eq!(s.call(&fuse::open(ino, libc::O_RDWR as u32), h).errno(), EROFS);
                assert_eq!(s.call(&fuse::truncate(ino, 0), h).errno(), EROFS, "{name}");
                assert_eq!(s.call(&fuse::chmod(ino, 0o777), h).errno(), EROFS, "{name}");
                assert_eq!(s.call(&fuse::setxattr(ino, "user.x", b"v"), h).errno(), EROFS);
                assert_eq!(s.call(&fuse::link(ino, ROOT_ID, "l2"), h).errno(), EROFS);
                // Reading stays.
                assert_eq!(s.call(&fuse::open(ino, libc::O_RDONLY as u32), h).errno(), 0);
                if name != "alias" {
                    assert_eq!(s.call(&fuse::create(dir, name, creat, 0o644), h).errno(), EROFS);
                    assert_eq!(s.call(&fuse::unlink(dir, name), h).errno(), EROFS, "{name}");
                    assert_eq!(s.call(&fuse::rename(dir, name, ROOT_ID, "away"), h).errno(), EROFS);
                    assert_eq!(s.call(&fuse::rename(ROOT_ID, "file", dir, name), h).errno(), EROFS);
                    assert_eq!(s.call(&fuse::link(file, dir, name), h).errno(), EROFS);
                }
            }
            // The alias opened by creating over its own name is refused too.
            assert_eq!(s.call(&fuse::create(ROOT_ID, "alias", creat, 0o644), h).errno(), EROFS);
            // A name that does not exist yet.
            for (dir, name) in [(ROOT_ID, ".envrc"), (git, "commondir"), (hooks, "post-checkout")] {
                assert_eq!(s.call(&fuse::create(dir, name, creat, 0o644), h).errno(), EROFS, "{name}");
                assert_eq!(s.call(&fuse::mknod(dir, name, libc::S_IFREG | 0o644), h).errno(), EROFS);
                assert_eq!(s.call(&fuse::mkdir(dir, name, 0o755), h).errno(), EROFS);
                assert_eq!(s.call(&fuse::symlink(dir, name, "/bin/sh"), h).errno(), EROFS);
                assert_eq!(s.call(&fuse::rename(ROOT_ID, "file", dir, name), h).errno(), EROFS);
            }
            // git's lock-then-rename of its config.
            let lock = s.call(&fuse::create(git, "config.lock", creat, 0o644), h);
            assert_eq!(lock.errno(), 0);
            assert_eq!(s.call(&fuse::rename(git, "config.lock", git, "config"), h).errno(), EROFS);
            // The hooks directory and `.git` cannot be removed or moved away.
            assert_eq!(s.call(&fuse::rmdir(git, "hooks"), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::rename(git, "hooks", git, "h2"), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::chmod(hooks, 0o777), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::rename(ROOT_ID, ".git", ROOT_ID, "g2"), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::rmdir(ROOT_ID, ".git"), h).errno(), EROFS);
            // A nested repository is protected the same way.
            let sub = s.call(&fuse::lookup(ROOT_ID, "sub"), h).entry().nodeid;
            let subgit = s.call(&fuse::lookup(sub, ".git"), h).entry().nodeid;
            let subcfg = s.call(&fuse::lookup(subgit, "config"), h).entry().nodeid;
            assert_eq!(s.call(&fuse::open(subcfg, wr), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::unlink(subgit, "config"), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::create(subgit, "hooks", creat, 0o755), h).errno(), EROFS);
        });
        // The host's own git replaces its config (a new inode): still read-only.
        fs::write(root.join(".git/config.new"), "[core]\n").unwrap();
        fs::rename(root.join(".git/config.new"), root.join(".git/config")).unwrap();
        with_server(&server, |s, h| {
            let git = s.call(&fuse::lookup(ROOT_ID, ".git"), h).entry().nodeid;
            let cfg = s.call(&fuse::lookup(git, "config"), h).entry().nodeid;
            assert_eq!(s.call(&fuse::open(cfg, libc::O_WRONLY as u32), h).errno(), EROFS);
            assert_eq!(s.call(&fuse::truncate(cfg, 0), h).errno(), EROFS);
        });
        let after: Vec<_> = [".git/config", ".git/hooks/pre-commit", "aivmm.toml"]
            .iter()
            .map(|p| (fs::read(root.join(p)).unwrap(), mode_of(&root.join(p))))
            .collect();
        assert_eq!(before, after);
        assert!(!root.join(".envrc").exists());
        assert!(!root.join(".git/hooks/post-checkout").exists());
        assert!(!root.join("sub/.git/hooks").exists());
    }

    /// Everything else in `.git` stays writable: the index, objects, HEAD.
    #[test]
    fn git_data_stays_writable() {
        let (tmp, server) = protected_fixture();
        let root = tmp.as_path().join("root");
        with_server(&server, |s, h| {
            let creat = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32;
            let git = s.call(&fuse::lookup(ROOT_ID, ".git"), h).entry().nodeid;
            let lock = s.call(&fuse::create(git, "index.lock", creat, 0o644), h);
            let (ino, fh) = (lock.entry().nodeid, lock.create_open().fh);
            assert_eq!(s.call(&fuse::write(ino, fh, 0, b"new index"), h).write().size, 9);
            assert_eq!(s.call(&fuse::release(ino, fh), h).errno(), 0);
            assert_eq!(s.call(&fuse::rename(git, "index.lock", git, "index"), h).errno(), 0);
            let objects = s.call(&fuse::lookup(git, "objects"), h).entry().nodeid;
            let ab = s.call(&fuse::mkdir(objects, "ab", 0o755), h).entry().nodeid;
            assert_eq!(s.call(&fuse::create(ab, "cdef", creat, 0o444), h).errno(), 0);
            let head = s.call(&fuse::lookup(git, "HEAD"), h).entry().nodeid;
            let trunc = (libc::O_WRONLY | libc::O_TRUNC) as u32;
            let fh = s.call(&fuse::open(head, trunc), h).open().fh;
            assert_eq!(s.call(&fuse::write(head, fh, 0, b"ref: refs/heads/x\n"), h).write().size, 18);
            assert_eq!(s.call(&fuse::release(head, fh), h).errno(), 0);
            assert_eq!(s.call(&fuse::mkdir(git, "refs", 0o755), h).errno(), 0);
        });
        assert_eq!(fs::read(root.join(".git/index")).unwrap(), b"new index");
        assert!(root.join(".git/objects/ab/cdef").is_file());
        assert_eq!(fs::read(root.join(".git/HEAD")).unwrap(), b"ref: refs/heads/x\n");
    }

    /// In a repository the guest makes, a hooks file never gets an execute bit:
    /// not on create, mknod, chmod, rename or link into the hooks directory.
    #[test]
    fn new_hooks_never_get_execute_bits() {
        let (tmp, server) = protected_fixture();
        let root = tmp.as_path().join("root");
        with_server(&server, |s, h| {
            let creat = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32;
            let new = s.call(&fuse::mkdir(ROOT_ID, "new", 0o755), h).entry().nodeid;
            let git = s.call(&fuse::mkdir(new, ".git", 0o755), h).entry().nodeid;
            let hooks = s.call(&fuse::mkdir(git, "hooks", 0o755), h).entry().nodeid;
            let r = s.call(&fuse::create(hooks, "pre-commit", creat, 0o755), h);
            assert_eq!(r.entry().attr.mode & 0o111, 0);
            let ino = r.entry().nodeid;
            assert_eq!(s.call(&fuse::chmod(ino, 0o755), h).attr().attr.mode & 0o111, 0);
            let r = s.call(&fuse::mknod(hooks, "post-checkout", libc::S_IFREG | 0o755), h);
            assert_eq!(r.errno(), 0);
            // Made executable elsewhere, then moved or linked in.
            assert_eq!(s.call(&fuse::create(new, "x", creat, 0o755), h).errno(), 0);
            let y = s.call(&fuse::create(new, "y", creat, 0o755), h).entry().nodeid;
            assert_eq!(s.call(&fuse::rename(new, "x", hooks, "pre-push"), h).errno(), 0);
            let l = s.call(&fuse::link(y, hooks, "post-merge"), h);
            assert_eq!(l.entry().attr.mode & 0o111, 0);
            assert_eq!(s.call(&fuse::create(new, "run.sh", creat, 0o755), h).errno(), 0);
        });
        let umask = host_umask();
        for name in ["pre-commit", "post-checkout", "pre-push", "post-merge"] {
            let mode = mode_of(&root.join("new/.git/hooks").join(name));
            assert_eq!(mode & 0o111, 0, "{name} {mode:o}");
        }
        // Outside a hooks directory the bits stay (as the host umask leaves them).
        assert_eq!(mode_of(&root.join("new/run.sh")) & 0o111, 0o111 & !umask);
    }
}
