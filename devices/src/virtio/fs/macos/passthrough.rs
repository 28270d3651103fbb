//! [`PosixFs`]: a passthrough file system for virtio-fs built only from calls
//! that POSIX hosts share (`openat`, `fstatat`, `mkdirat`, `unlinkat`,
//! `renameat`, `readlinkat`, `symlinkat`, `linkat`, `fchmod`, `fchownat`,
//! `utimensat`, `ftruncate`, `pread`, `pwrite`, `fsync`, `fdopendir`,
//! `fstatvfs`), so the same code serves a share on macOS and is tested on Linux.
//!
//! It answers in the guest's terms: errors carry Linux errno values and open
//! flags are read as Linux values. On a macOS host the tables of the sibling
//! modules ([`super::errno`], [`super::flags`]) translate; on Linux both are the
//! identity.
//!
//! # Inodes
//! macOS has no `O_PATH`, so an inode cannot always be held as an fd:
//! - a **directory** is held as its own fd, opened `O_RDONLY | O_DIRECTORY |
//!   O_NOFOLLOW`. Every name is resolved from such an fd, one component at a
//!   time;
//! - **anything else** (files, symlinks, FIFOs, sockets) is held as its parent
//!   directory's inode plus its name. Each use re-resolves the name with
//!   `O_NOFOLLOW` or `AT_SYMLINK_NOFOLLOW` and checks that the object is still the
//!   one the guest looked up (same device and inode number); if not, the answer is
//!   ENOENT. A file is opened for I/O only after that check passes on the opened
//!   fd itself.
//!
//! The cost of that choice: a directory the host user cannot read (mode `0300`)
//! cannot be looked up, and a file the guest still holds by inode (not by open
//! handle) is lost once it is unlinked or renamed behind aivmm's back. Renames the
//! guest makes itself move the inode's name.
//!
//! # Containment
//! Names with `/`, empty names and NUL bytes are refused. `..` at the share root
//! is the root, and `..` anywhere else is accepted only if walking up from the
//! result reaches the root (a directory the host moved out of the share cannot
//! lead the guest further out). A symlink is never followed on the host: it is
//! returned as a link (the guest resolves it in its own view), it is not a
//! directory to look names up in, and opening it fails (ELOOP). Only regular files
//! are opened for I/O (`O_NONBLOCK` during the open, so a FIFO swapped in cannot
//! block a worker).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::attr::{self, HostStat, HostStatfs};

/// The FUSE node id of the share root.
pub const ROOT_INODE: u64 = 1;
/// Longest name the guest may use (bytes).
const NAME_MAX: usize = 255;
/// How many `..` steps a containment check takes before giving up.
const MAX_DEPTH: usize = 4096;

/// A host errno as the guest's (Linux) errno.
#[cfg(target_os = "macos")]
fn guest_errno(host: i32) -> i32 {
    super::errno::to_linux(host)
}

/// A host errno as the guest's (Linux) errno: the same numbers on a Linux host.
#[cfg(not(target_os = "macos"))]
fn guest_errno(host: i32) -> i32 {
    host
}

/// An error carrying a Linux errno.
fn err(linux: i32) -> io::Error {
    io::Error::from_raw_os_error(linux)
}

/// The last host error, as the guest's errno.
fn last_err() -> io::Error {
    let e = io::Error::last_os_error();
    err(e
        .raw_os_error()
        .map_or(super::errno::linux::EIO, guest_errno))
}

/// Maps an error from `std` (a host errno) to the guest's errno.
fn host_err(e: io::Error) -> io::Error {
    err(e
        .raw_os_error()
        .map_or(super::errno::linux::EIO, guest_errno))
}

/// Checks a libc return value.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(last_err())
    } else {
        Ok(ret)
    }
}

/// Linux errno values this module answers with (the same on every host).
mod lx {
    pub use super::super::errno::linux::*;
    pub const EBADF: i32 = 9;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
}

/// How the guest's open flags are opened on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFlags {
    /// Flags for `openat`.
    pub flags: i32,
    /// Bypass the host's cache (the guest asked for `O_DIRECT` on a macOS host).
    pub nocache: bool,
}

/// The guest's (Linux arm64) open flags as macOS flags.
#[cfg(target_os = "macos")]
pub fn host_open_flags(guest: u32) -> io::Result<HostFlags> {
    let h = super::flags::open_flags(guest).map_err(|e| err(e.linux_errno()))?;
    Ok(HostFlags {
        flags: h.flags,
        nocache: h.nocache,
    })
}

/// The guest's open flags on a Linux host: the same values; `O_PATH` and
/// `O_TMPFILE` (which would bypass the checks here) are refused.
#[cfg(not(target_os = "macos"))]
pub fn host_open_flags(guest: u32) -> io::Result<HostFlags> {
    let flags = guest as i32;
    if flags & libc::O_PATH != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
        return Err(err(lx::EINVAL));
    }
    if flags & libc::O_ACCMODE == libc::O_ACCMODE {
        return Err(err(lx::EINVAL));
    }
    Ok(HostFlags {
        flags,
        nocache: false,
    })
}

/// `fcntl(F_NOCACHE)` on a macOS host.
#[cfg(target_os = "macos")]
fn set_nocache(fd: RawFd) -> io::Result<()> {
    /// `F_NOCACHE` from `<sys/fcntl.h>`.
    const F_NOCACHE: libc::c_int = 48;
    // SAFETY: fcntl on an fd this module owns; F_NOCACHE takes an int argument.
    check(unsafe { libc::fcntl(fd, F_NOCACHE, 1) }).map(drop)
}

#[cfg(not(target_os = "macos"))]
fn set_nocache(_fd: RawFd) -> io::Result<()> {
    Ok(())
}

/// The attributes of a host object, in widths that hold both hosts' values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    /// `st_dev` (host value; used with `ino` to tell objects apart).
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_mode`: type and permission bits (the same values on both hosts).
    pub mode: u32,
    /// `st_nlink`.
    pub nlink: u64,
    /// `st_uid`.
    pub uid: u32,
    /// `st_gid`.
    pub gid: u32,
    /// `st_rdev` (host encoding).
    pub rdev: u64,
    /// `st_size`.
    pub size: i64,
    /// `st_blksize`.
    pub blksize: i64,
    /// `st_blocks` (512-byte units).
    pub blocks: i64,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, i64),
    /// Modification time.
    pub mtime: (i64, i64),
    /// Status change time.
    pub ctime: (i64, i64),
}

impl Attr {
    // The libc field types differ between hosts (u16 modes and i32 devices on
    // macOS), so the same cast is needed on one host and a no-op on the other.
    #[allow(clippy::unnecessary_cast)]
    fn from_stat(st: &libc::stat) -> Self {
        Attr {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u64,
            size: st.st_size as i64,
            blksize: st.st_blksize as i64,
            blocks: st.st_blocks as i64,
            atime: (st.st_atime as i64, st.st_atime_nsec as i64),
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        }
    }

    /// The object's identity on the host.
    pub fn key(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The file type bits.
    pub fn kind(&self) -> u32 {
        self.mode & attr::S_IFMT
    }

    /// The Linux `fuse_attr` record for a reply, as a macOS request loop writes
    /// it (the fields a macOS `stat` has, in the Linux layout).
    pub fn fuse_attr(&self) -> io::Result<[u8; attr::FUSE_ATTR_SIZE]> {
        let st = HostStat {
            ino: self.ino,
            size: self.size,
            blocks: self.blocks,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            mode: u16::try_from(self.mode).map_err(|_| err(lx::EOVERFLOW))?,
            nlink: u16::try_from(self.nlink).unwrap_or(u16::MAX),
            uid: self.uid,
            gid: self.gid,
            rdev: darwin_rdev(self.rdev),
            blksize: i32::try_from(self.blksize).unwrap_or(i32::MAX),
        };
        attr::fuse_attr(&st, None).map_err(|e| err(e.linux_errno()))
    }
}

/// A host device number in macOS's encoding (8-bit major, 24-bit minor), which
/// [`attr::fuse_attr`] re-encodes for Linux.
#[cfg(target_os = "macos")]
fn darwin_rdev(rdev: u64) -> i32 {
    rdev as i32
}

/// A Linux host's device number in macOS's encoding (numbers beyond its 8-bit
/// major or 24-bit minor become 0).
#[cfg(not(target_os = "macos"))]
fn darwin_rdev(rdev: u64) -> i32 {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    if major > 0xff || minor > 0xff_ffff {
        return 0;
    }
    ((major << 24) | minor) as i32
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// A time to set with [`PosixFs::setattr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The host's current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, i64),
}

impl SetTime {
    fn timespec(t: Option<SetTime>) -> libc::timespec {
        let (sec, nsec) = match t {
            None => (0, libc::UTIME_OMIT),
            Some(SetTime::Now) => (0, libc::UTIME_NOW),
            Some(SetTime::At(s, n)) => (s, n.clamp(0, 999_999_999)),
        };
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        }
    }
}

/// What a SETATTR changes; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (the type bits are ignored).
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Truncate or extend to this size.
    pub size: Option<u64>,
    /// Access time.
    pub atime: Option<SetTime>,
    /// Modification time.
    pub mtime: Option<SetTime>,
}

/// One directory entry of READDIR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// `d_ino`.
    pub ino: u64,
    /// The offset of the next entry (1-based index).
    pub offset: u64,
    /// `d_type` (DT_* values are the same on both hosts).
    pub dtype: u32,
    /// The name.
    pub name: Vec<u8>,
}

/// The Linux `fuse_dirent` records for `entries`, at most `max` bytes, as a
/// macOS request loop writes a READDIR reply.
pub fn dirent_bytes(entries: &[DirEntry], max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    for e in entries {
        let fits = attr::push_dirent(&mut buf, max, e.ino, e.offset, e.dtype, &e.name)
            .map_err(|e| err(e.linux_errno()))?;
        if !fits {
            break;
        }
    }
    Ok(buf)
}

/// File-system statistics (`fstatvfs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statfs {
    /// Preferred I/O size.
    pub bsize: u64,
    /// The unit of the block counts.
    pub frsize: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Blocks free for unprivileged users.
    pub bavail: u64,
    /// Total inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Longest name.
    pub namemax: u64,
}

impl Statfs {
    /// The Linux `fuse_kstatfs` record for a reply.
    pub fn fuse_kstatfs(&self) -> [u8; attr::FUSE_KSTATFS_SIZE] {
        attr::fuse_kstatfs(&HostStatfs {
            bsize: u32::try_from(self.frsize).unwrap_or(u32::MAX),
            iosize: i32::try_from(self.bsize).unwrap_or(i32::MAX),
            blocks: self.blocks,
            bfree: self.bfree,
            bavail: self.bavail,
            files: self.files,
            ffree: self.ffree,
        })
    }
}

/// Where an inode lives on the host.
enum Place {
    /// A directory, held open.
    Dir(Arc<OwnedFd>),
    /// Anything else: a name in a parent directory (whose inode this one keeps alive).
    Named { parent: u64, name: CString },
}

struct Node {
    key: (u64, u64),
    place: Place,
    /// Lookups the guest has not forgotten (plus one per child held by name).
    refs: u64,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

/// What an inode resolves to for one operation (cloned out of the table).
enum Located {
    Dir(Arc<OwnedFd>),
    Named { parent: Arc<OwnedFd>, name: CString },
}

enum Handle {
    File(File),
    /// A directory listing, read at offset 0 (so a rewind sees new entries).
    Dir(Mutex<Vec<DirEntry>>),
}

/// Timeouts and options of a share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Refuse every change with EROFS.
    pub read_only: bool,
}

/// The passthrough file system of one share. Node ids and handles are plain
/// `u64`s, so a FUSE server of either ABI can sit on top.
pub struct PosixFs {
    root_key: (u64, u64),
    table: Mutex<Table>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    opts: Options,
}

/// `fstat` of an fd.
fn fstat(fd: RawFd) -> io::Result<Attr> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes one `struct stat` into `st`; the result is checked.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so `st` is initialised.
    Ok(Attr::from_stat(unsafe { &st.assume_init() }))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
fn lstatat(dir: RawFd, name: &CStr) -> io::Result<Attr> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `name` is NUL-terminated, fstatat writes one `struct stat`; checked.
    check(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so `st` is initialised.
    Ok(Attr::from_stat(unsafe { &st.assume_init() }))
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
fn open_at(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the result is checked and owned below.
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Clears the `O_NONBLOCK` a regular file was opened with, unless the guest asked for it.
fn restore_blocking(fd: &OwnedFd, flags: i32) -> io::Result<()> {
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: fcntl on a valid fd; F_GETFL takes no argument.
        let now = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
        // SAFETY: fcntl on a valid fd; F_SETFL takes an int.
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, now & !libc::O_NONBLOCK) })?;
    }
    Ok(())
}

/// Opens a directory below `dir` (never through a symlink).
fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// Checks a guest-given name: one path component, not `.` or `..`.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(err(lx::EINVAL));
    }
    if b.len() > NAME_MAX {
        return Err(err(lx::ENAMETOOLONG));
    }
    Ok(())
}

/// Reads a whole directory from `dir` (a fresh fd, so the held one keeps its offset).
fn read_dir(dir: RawFd) -> io::Result<Vec<DirEntry>> {
    let fd = open_dir_at(dir, c".")?;
    // SAFETY: fdopendir takes ownership of a valid directory fd; checked below.
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(last_err());
    }
    // The stream owns the fd now; closedir closes it.
    std::mem::forget(fd);
    let mut out = Vec::new();
    let result = loop {
        // readdir reports errors only through errno; clear it first.
        set_errno(0);
        // SAFETY: `stream` is a live DIR* owned by this function.
        let ent = unsafe { libc::readdir(stream) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(host_err(e)),
            };
        }
        // SAFETY: readdir returned a valid entry, valid until the next readdir call;
        // d_name is NUL-terminated.
        let (ino, dtype, name) = unsafe {
            let ent = &*ent;
            let name = CStr::from_ptr(ent.d_name.as_ptr()).to_bytes().to_vec();
            (ent.d_ino, ent.d_type, name)
        };
        #[allow(clippy::unnecessary_cast)]
        out.push(DirEntry {
            ino: ino as u64,
            offset: out.len() as u64 + 1,
            dtype: u32::from(dtype),
            name,
        });
    };
    // SAFETY: `stream` is live and closed exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

#[cfg(target_os = "linux")]
fn set_errno(v: i32) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = v };
}

#[cfg(target_os = "macos")]
fn set_errno(v: i32) {
    extern "C" {
        // <sys/errno.h>: this thread's errno.
        fn __error() -> *mut libc::c_int;
    }
    // SAFETY: __error returns this thread's errno slot.
    unsafe { *__error() = v };
}

/// `renameat` with renameat2 flags: the host's native call for each.
#[cfg(target_os = "linux")]
fn rename_at(od: RawFd, on: &CStr, nd: RawFd, nn: &CStr, flags: u32) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated; the result is checked.
    check(unsafe { libc::renameat2(od, on.as_ptr(), nd, nn.as_ptr(), flags) }).map(drop)
}

#[cfg(target_os = "macos")]
fn rename_at(od: RawFd, on: &CStr, nd: RawFd, nn: &CStr, flags: u32) -> io::Result<()> {
    extern "C" {
        // <stdio.h>, macOS 10.12 and later.
        fn renameatx_np(
            fromfd: libc::c_int,
            from: *const libc::c_char,
            tofd: libc::c_int,
            to: *const libc::c_char,
            flags: libc::c_uint,
        ) -> libc::c_int;
    }
    let flags = super::flags::rename_flags(flags).map_err(|e| err(e.linux_errno()))?;
    // SAFETY: both names are NUL-terminated; the result is checked.
    check(unsafe { renameatx_np(od, on.as_ptr(), nd, nn.as_ptr(), flags) }).map(drop)
}

impl PosixFs {
    /// Opens the share at `root` (symlinks in `root` itself are resolved once).
    pub fn new(root: &Path, opts: Options) -> io::Result<Self> {
        let path = CString::new(root.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `path` is NUL-terminated; the result is checked and owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let key = fstat(fd.as_raw_fd())?.key();
        let mut table = Table {
            next: ROOT_INODE + 1,
            ..Table::default()
        };
        table.nodes.insert(
            ROOT_INODE,
            Node {
                key,
                place: Place::Dir(Arc::new(fd)),
                refs: 1,
            },
        );
        table.by_key.insert(key, ROOT_INODE);
        Ok(Self {
            root_key: key,
            table: Mutex::new(table),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            opts,
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while the lock was held leaves the table consistent (every
        // change is one insert or remove), so keep serving.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writable(&self) -> io::Result<()> {
        if self.opts.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    fn locate(&self, inode: u64) -> io::Result<(Located, (u64, u64))> {
        let t = self.table();
        let node = t.nodes.get(&inode).ok_or_else(|| err(lx::EBADF))?;
        let loc = match &node.place {
            Place::Dir(fd) => Located::Dir(fd.clone()),
            Place::Named { parent, name } => match t.nodes.get(parent).map(|p| &p.place) {
                Some(Place::Dir(pfd)) => Located::Named {
                    parent: pfd.clone(),
                    name: name.clone(),
                },
                _ => return Err(err(lx::ESTALE)),
            },
        };
        Ok((loc, node.key))
    }

    /// The fd of directory `inode`.
    fn dir_fd(&self, inode: u64) -> io::Result<Arc<OwnedFd>> {
        match self.locate(inode)?.0 {
            Located::Dir(fd) => Ok(fd),
            Located::Named { .. } => Err(err(lx::ENOTDIR)),
        }
    }

    /// Re-resolves a named inode and checks it is the same object.
    fn named(&self, inode: u64) -> io::Result<(Arc<OwnedFd>, CString, Attr)> {
        match self.locate(inode)? {
            (Located::Named { parent, name }, key) => {
                let a = lstatat(parent.as_raw_fd(), &name)?;
                if a.key() != key {
                    return Err(err(lx::ENOENT));
                }
                Ok((parent, name, a))
            }
            (Located::Dir(_), _) => Err(err(lx::EISDIR)),
        }
    }

    /// Adds a lookup reference to the object `a` found as `name` in `parent`,
    /// creating its inode if it is new. `dir` is its fd when it is a directory.
    fn remember(
        &self,
        parent: u64,
        name: &CStr,
        a: &Attr,
        dir: Option<OwnedFd>,
    ) -> io::Result<u64> {
        let mut t = self.table();
        if !t.nodes.contains_key(&parent) {
            return Err(err(lx::ESTALE));
        }
        if let Some(&id) = t.by_key.get(&a.key()) {
            let old_parent = match t.nodes.get_mut(&id) {
                Some(node) => {
                    node.refs += 1;
                    match &mut node.place {
                        // A hard link or a rename seen from the host: use the newest name.
                        Place::Named { parent: p, name: n }
                            if *p != parent || n.as_c_str() != name =>
                        {
                            let old = *p;
                            *p = parent;
                            *n = name.to_owned();
                            Some(old)
                        }
                        _ => None,
                    }
                }
                None => None,
            };
            if let Some(old) = old_parent {
                if let Some(p) = t.nodes.get_mut(&parent) {
                    p.refs += 1;
                }
                Self::unref(&mut t, old, 1);
            }
            return Ok(id);
        }
        let place = match dir {
            Some(fd) => Place::Dir(Arc::new(fd)),
            None => {
                if let Some(p) = t.nodes.get_mut(&parent) {
                    p.refs += 1;
                }
                Place::Named {
                    parent,
                    name: name.to_owned(),
                }
            }
        };
        let id = t.next;
        t.next += 1;
        t.nodes.insert(
            id,
            Node {
                key: a.key(),
                place,
                refs: 1,
            },
        );
        t.by_key.insert(a.key(), id);
        Ok(id)
    }

    /// Drops `n` references to `inode`, and the inode (and what it kept alive)
    /// when none are left. The root stays.
    fn unref(t: &mut Table, inode: u64, n: u64) {
        let (mut inode, mut n) = (inode, n);
        loop {
            if inode == ROOT_INODE {
                return;
            }
            let Some(node) = t.nodes.get_mut(&inode) else {
                return;
            };
            node.refs = node.refs.saturating_sub(n);
            if node.refs > 0 {
                return;
            }
            let Some(node) = t.nodes.remove(&inode) else {
                return;
            };
            if t.by_key.get(&node.key) == Some(&inode) {
                t.by_key.remove(&node.key);
            }
            match node.place {
                Place::Named { parent, .. } => {
                    inode = parent;
                    n = 1;
                }
                Place::Dir(_) => return,
            }
        }
    }

    /// Whether `dir` is the root or below it, walking `..` up.
    fn inside_root(&self, dir: OwnedFd) -> io::Result<bool> {
        let mut cur = dir;
        for _ in 0..MAX_DEPTH {
            let key = fstat(cur.as_raw_fd())?.key();
            if key == self.root_key {
                return Ok(true);
            }
            let up = open_dir_at(cur.as_raw_fd(), c"..")?;
            if fstat(up.as_raw_fd())?.key() == key {
                // The host's `/`: the walk left without meeting the root.
                return Ok(false);
            }
            cur = up;
        }
        Ok(false)
    }

    /// LOOKUP: `name` in directory `parent`. Returns the node id and attributes.
    pub fn lookup(&self, parent: u64, name: &CStr) -> io::Result<(u64, Attr)> {
        let pfd = self.dir_fd(parent)?;
        let bytes = name.to_bytes();
        if bytes == b"." || (bytes == b".." && parent == ROOT_INODE) {
            let a = fstat(pfd.as_raw_fd())?;
            let mut t = self.table();
            let node = t.nodes.get_mut(&parent).ok_or_else(|| err(lx::ESTALE))?;
            node.refs += 1;
            return Ok((parent, a));
        }
        if bytes == b".." {
            let up = open_dir_at(pfd.as_raw_fd(), c"..")?;
            let a = fstat(up.as_raw_fd())?;
            let probe = open_dir_at(up.as_raw_fd(), c".")?;
            if !self.inside_root(probe)? {
                return Err(err(lx::EACCES));
            }
            // `..` has no name of its own in `parent`; directories need none.
            return self.remember(parent, name, &a, Some(up)).map(|id| (id, a));
        }
        check_name(name)?;
        let a = lstatat(pfd.as_raw_fd(), name)?;
        if a.kind() == S_IFDIR {
            let fd = open_dir_at(pfd.as_raw_fd(), name)?;
            // The fd is what the inode will use: describe that, not the earlier stat.
            let a = fstat(fd.as_raw_fd())?;
            return self.remember(parent, name, &a, Some(fd)).map(|id| (id, a));
        }
        self.remember(parent, name, &a, None).map(|id| (id, a))
    }

    /// FORGET: the guest drops `n` lookups of `inode`.
    pub fn forget(&self, inode: u64, n: u64) {
        Self::unref(&mut self.table(), inode, n);
    }

    /// How many inodes are held (the root included).
    pub fn inode_count(&self) -> usize {
        self.table().nodes.len()
    }

    fn handle(&self, fh: u64) -> io::Result<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or_else(|| err(lx::EBADF))
    }

    fn file(&self, fh: u64) -> io::Result<Arc<Handle>> {
        let h = self.handle(fh)?;
        match *h {
            Handle::File(_) => Ok(h),
            Handle::Dir(_) => Err(err(lx::EISDIR)),
        }
    }

    fn add_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(h));
        fh
    }

    /// GETATTR (of the open file `fh` when given).
    pub fn getattr(&self, inode: u64, fh: Option<u64>) -> io::Result<Attr> {
        if let Some(fh) = fh {
            if let Handle::File(f) = &*self.file(fh)? {
                return fstat(f.as_raw_fd());
            }
        }
        match self.locate(inode)?.0 {
            Located::Dir(fd) => fstat(fd.as_raw_fd()),
            Located::Named { .. } => self.named(inode).map(|(_, _, a)| a),
        }
    }

    /// Opens named inode `inode` as a regular file with host `flags`, checking it
    /// is the object the guest looked up.
    fn open_named(&self, inode: u64, flags: i32) -> io::Result<OwnedFd> {
        let (parent, name, a) = self.named(inode)?;
        match a.kind() {
            S_IFREG => {}
            S_IFLNK => return Err(err(lx::ELOOP)),
            _ => return Err(err(lx::EPERM)),
        }
        let fd = open_at(parent.as_raw_fd(), &name, flags | libc::O_NONBLOCK, 0)?;
        let got = fstat(fd.as_raw_fd())?;
        if got.key() != a.key() || got.kind() != S_IFREG {
            return Err(err(lx::ENOENT));
        }
        restore_blocking(&fd, flags)?;
        Ok(fd)
    }

    /// SETATTR: applies `s` and returns the new attributes.
    pub fn setattr(&self, inode: u64, s: SetAttr, fh: Option<u64>) -> io::Result<Attr> {
        self.writable()?;
        let handle = match fh {
            Some(fh) => Some(self.file(fh)?),
            None => None,
        };
        let (loc, _) = self.locate(inode)?;
        // An fd on the object for fchmod/ftruncate/futimens when one is at hand.
        let held: Option<RawFd> = match (&handle, &loc) {
            (Some(h), _) => match &**h {
                Handle::File(f) => Some(f.as_raw_fd()),
                Handle::Dir(_) => None,
            },
            (None, Located::Dir(fd)) => Some(fd.as_raw_fd()),
            (None, Located::Named { .. }) => None,
        };
        if let Some(size) = s.size {
            let size = libc::off_t::try_from(size).map_err(|_| err(lx::EINVAL))?;
            let opened;
            let fd = match (held, &loc) {
                (_, Located::Dir(_)) => return Err(err(lx::EISDIR)),
                (Some(fd), _) => fd,
                (None, _) => {
                    opened = self.open_named(inode, libc::O_WRONLY)?;
                    opened.as_raw_fd()
                }
            };
            // SAFETY: ftruncate on a valid fd; checked.
            check(unsafe { libc::ftruncate(fd, size) })?;
        }
        if let Some(mode) = s.mode {
            let mode = (mode & 0o7777) as libc::mode_t;
            let opened;
            let fd = match held {
                Some(fd) => fd,
                None => {
                    opened = self
                        .open_named(inode, libc::O_RDONLY)
                        .or_else(|_| self.open_named(inode, libc::O_WRONLY))?;
                    opened.as_raw_fd()
                }
            };
            // SAFETY: fchmod on a valid fd; checked.
            check(unsafe { libc::fchmod(fd, mode) })?;
        }
        if s.uid.is_some() || s.gid.is_some() {
            // (uid_t)-1 leaves a field alone.
            let uid = s.uid.unwrap_or(u32::MAX) as libc::uid_t;
            let gid = s.gid.unwrap_or(u32::MAX) as libc::gid_t;
            match (held, &loc) {
                // SAFETY: fchown on a valid fd; checked.
                (Some(fd), _) => check(unsafe { libc::fchown(fd, uid, gid) })?,
                (None, _) => {
                    let (parent, name, _) = self.named(inode)?;
                    // SAFETY: one NUL-terminated component, never followed; checked.
                    check(unsafe {
                        libc::fchownat(
                            parent.as_raw_fd(),
                            name.as_ptr(),
                            uid,
                            gid,
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?
                }
            };
        }
        if s.atime.is_some() || s.mtime.is_some() {
            let ts = [SetTime::timespec(s.atime), SetTime::timespec(s.mtime)];
            match (held, &loc) {
                // SAFETY: futimens on a valid fd with two timespecs; checked.
                (Some(fd), _) => check(unsafe { libc::futimens(fd, ts.as_ptr()) })?,
                (None, _) => {
                    let (parent, name, _) = self.named(inode)?;
                    // SAFETY: one NUL-terminated component, never followed; two timespecs.
                    check(unsafe {
                        libc::utimensat(
                            parent.as_raw_fd(),
                            name.as_ptr(),
                            ts.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    })?
                }
            };
        }
        self.getattr(inode, fh)
    }

    /// READLINK.
    pub fn readlink(&self, inode: u64) -> io::Result<Vec<u8>> {
        let (parent, name, a) = self.named(inode)?;
        if a.kind() != S_IFLNK {
            return Err(err(lx::EINVAL));
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: `buf` has room for `buf.len()` bytes; the result is checked.
        let n = unsafe {
            libc::readlinkat(
                parent.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(last_err());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// OPEN: returns a handle. `flags` are the guest's open flags.
    pub fn open(&self, inode: u64, guest_flags: u32) -> io::Result<u64> {
        let h = host_open_flags(guest_flags)?;
        let mut flags = h.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        if self.opts.read_only
            && (flags & libc::O_ACCMODE != libc::O_RDONLY
                || flags & (libc::O_TRUNC | libc::O_APPEND) != 0)
        {
            return Err(err(libc::EROFS));
        }
        flags &= !libc::O_DIRECTORY;
        let fd = self.open_named(inode, flags)?;
        if h.nocache {
            set_nocache(fd.as_raw_fd())?;
        }
        Ok(self.add_handle(Handle::File(File::from(fd))))
    }

    /// CREATE: makes and opens `name` in `parent`; returns the node, its
    /// attributes and a handle.
    pub fn create(
        &self,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        guest_flags: u32,
    ) -> io::Result<(u64, Attr, u64)> {
        self.writable()?;
        check_name(name)?;
        let h = host_open_flags(guest_flags)?;
        let pfd = self.dir_fd(parent)?;
        let flags = (h.flags & !(libc::O_DIRECTORY | libc::O_NOCTTY)) | libc::O_CREAT;
        // O_NONBLOCK: an existing FIFO at `name` must not block the open.
        let fd = open_at(
            pfd.as_raw_fd(),
            name,
            flags | libc::O_NONBLOCK,
            mode & !umask & 0o7777,
        )?;
        let a = fstat(fd.as_raw_fd())?;
        if a.kind() != S_IFREG {
            return Err(err(lx::EPERM));
        }
        restore_blocking(&fd, flags)?;
        if h.nocache {
            set_nocache(fd.as_raw_fd())?;
        }
        let id = self.remember(parent, name, &a, None)?;
        Ok((id, a, self.add_handle(Handle::File(File::from(fd)))))
    }

    /// MKDIR.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<(u64, Attr)> {
        self.writable()?;
        check_name(name)?;
        let pfd = self.dir_fd(parent)?;
        let mode = (mode & !umask & 0o7777) as libc::mode_t;
        // SAFETY: one NUL-terminated component; checked.
        check(unsafe { libc::mkdirat(pfd.as_raw_fd(), name.as_ptr(), mode) })?;
        self.lookup(parent, name)
    }

    /// SYMLINK: `name` in `parent` pointing at `target` (stored as given; only
    /// the guest resolves it).
    pub fn symlink(&self, parent: u64, name: &CStr, target: &CStr) -> io::Result<(u64, Attr)> {
        self.writable()?;
        check_name(name)?;
        let pfd = self.dir_fd(parent)?;
        // SAFETY: both strings are NUL-terminated; checked.
        check(unsafe { libc::symlinkat(target.as_ptr(), pfd.as_raw_fd(), name.as_ptr()) })?;
        self.lookup(parent, name)
    }

    /// LINK: a new name for `inode` (not a directory).
    pub fn link(&self, inode: u64, newparent: u64, newname: &CStr) -> io::Result<(u64, Attr)> {
        self.writable()?;
        check_name(newname)?;
        let (parent, name, _) = self.named(inode)?;
        let npfd = self.dir_fd(newparent)?;
        // SAFETY: both names are NUL-terminated single components; flags 0 never follows.
        check(unsafe {
            libc::linkat(
                parent.as_raw_fd(),
                name.as_ptr(),
                npfd.as_raw_fd(),
                newname.as_ptr(),
                0,
            )
        })?;
        self.lookup(newparent, newname)
    }

    fn remove(&self, parent: u64, name: &CStr, flags: i32) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        let pfd = self.dir_fd(parent)?;
        // SAFETY: one NUL-terminated component; checked.
        check(unsafe { libc::unlinkat(pfd.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
    }

    /// UNLINK.
    pub fn unlink(&self, parent: u64, name: &CStr) -> io::Result<()> {
        self.remove(parent, name, 0)
    }

    /// RMDIR.
    pub fn rmdir(&self, parent: u64, name: &CStr) -> io::Result<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    /// RENAME (RENAME2 with `flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    pub fn rename(
        &self,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        let ofd = self.dir_fd(olddir)?;
        let nfd = self.dir_fd(newdir)?;
        if flags == 0 {
            // SAFETY: both names are NUL-terminated single components; checked.
            check(unsafe {
                libc::renameat(
                    ofd.as_raw_fd(),
                    oldname.as_ptr(),
                    nfd.as_raw_fd(),
                    newname.as_ptr(),
                )
            })?;
        } else {
            rename_at(ofd.as_raw_fd(), oldname, nfd.as_raw_fd(), newname, flags)?;
        }
        // Move the names of the inodes the guest holds.
        self.renamed(newdir, nfd.as_raw_fd(), newname);
        if flags & 2 != 0 {
            // RENAME_EXCHANGE: the other object now sits at the old name.
            self.renamed(olddir, ofd.as_raw_fd(), oldname);
        }
        Ok(())
    }

    /// After a rename, points the inode now found at `name` in `dir` at that name.
    fn renamed(&self, dir: u64, dir_fd: RawFd, name: &CStr) {
        let Ok(a) = lstatat(dir_fd, name) else {
            return;
        };
        let mut t = self.table();
        let Some(&id) = t.by_key.get(&a.key()) else {
            return;
        };
        let old = match t.nodes.get_mut(&id).map(|n| &mut n.place) {
            Some(Place::Named { parent, name: n }) => {
                let old = *parent;
                *parent = dir;
                *n = name.to_owned();
                old
            }
            _ => return,
        };
        if let Some(p) = t.nodes.get_mut(&dir) {
            p.refs += 1;
        }
        Self::unref(&mut t, old, 1);
    }

    /// READ: up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let h = self.file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(err(lx::EISDIR));
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(host_err(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// WRITE: `data` at `offset`; returns the bytes written.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.writable()?;
        let h = self.file(fh)?;
        let Handle::File(f) = &*h else {
            return Err(err(lx::EISDIR));
        };
        f.write_all_at(data, offset).map_err(host_err)?;
        Ok(data.len())
    }

    /// FSYNC (`datasync`: data only). On macOS `sync_all` is `F_FULLFSYNC`.
    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        let h = self.handle(fh)?;
        match &*h {
            Handle::File(f) if datasync => f.sync_data().map_err(host_err),
            Handle::File(f) => f.sync_all().map_err(host_err),
            Handle::Dir(_) => Ok(()),
        }
    }

    /// RELEASE and RELEASEDIR.
    pub fn release(&self, fh: u64) -> io::Result<()> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh)
            .map(drop)
            .ok_or_else(|| err(lx::EBADF))
    }

    /// OPENDIR.
    pub fn opendir(&self, inode: u64) -> io::Result<u64> {
        self.dir_fd(inode)?;
        Ok(self.add_handle(Handle::Dir(Mutex::new(Vec::new()))))
    }

    /// READDIR: the entries after `offset` (0 re-reads the directory); the caller
    /// stops when its reply is full.
    pub fn readdir(&self, inode: u64, fh: u64, offset: u64) -> io::Result<Vec<DirEntry>> {
        let h = self.handle(fh)?;
        let Handle::Dir(list) = &*h else {
            return Err(err(lx::ENOTDIR));
        };
        let mut list = list.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 {
            let fd = self.dir_fd(inode)?;
            *list = read_dir(fd.as_raw_fd())?;
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(list.iter().skip(start).cloned().collect())
    }

    /// STATFS of the file system holding `inode`.
    #[allow(clippy::unnecessary_cast)]
    pub fn statfs(&self, inode: u64) -> io::Result<Statfs> {
        let fd = match self.locate(inode)?.0 {
            Located::Dir(fd) => fd,
            Located::Named { parent, .. } => parent,
        };
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: fstatvfs writes one `struct statvfs`; checked.
        check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs succeeded, so `st` is initialised.
        let st = unsafe { st.assume_init() };
        Ok(Statfs {
            bsize: st.f_bsize as u64,
            frsize: st.f_frsize as u64,
            blocks: st.f_blocks as u64,
            bfree: st.f_bfree as u64,
            bavail: st.f_bavail as u64,
            files: st.f_files as u64,
            ffree: st.f_ffree as u64,
            namemax: st.f_namemax as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::virtio::fs::macos::test_utils::{posix_fs, share};

    const O_RDONLY: u32 = 0;
    const O_WRONLY: u32 = 1;
    const O_RDWR: u32 = 2;

    /// The shared fixture ([`share`]) served by a [`PosixFs`].
    struct Fixture {
        _tmp: TempDir,
        share: PathBuf,
        outside: PathBuf,
        fs: PosixFs,
    }

    fn fixture(read_only: bool) -> Fixture {
        let s = share();
        Fixture {
            fs: posix_fs(&s.share, read_only),
            _tmp: s.tmp,
            share: s.share,
            outside: s.outside,
        }
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
        r.unwrap_err().raw_os_error().unwrap()
    }

    fn secret_untouched(f: &Fixture) {
        let p = f.outside.join("secret");
        assert_eq!(fs::read(&p).unwrap(), b"host secret");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn macos_passthrough_lookup_getattr_read_write() {
        let f = fixture(false);
        let (ino, a) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        assert_eq!(a.size, 19);
        assert_eq!(a.kind(), S_IFREG);
        assert_eq!(
            a.ino,
            fs::metadata(f.share.join("hello.txt")).unwrap().ino()
        );
        assert_eq!(f.fs.getattr(ino, None).unwrap(), a);
        let fh = f.fs.open(ino, O_RDWR).unwrap();
        assert_eq!(f.fs.read(fh, 6, 4).unwrap(), b"from");
        assert_eq!(f.fs.read(fh, 100, 4).unwrap(), b"", "past the end");
        assert_eq!(f.fs.write(fh, 0, b"HELLO").unwrap(), 5);
        f.fs.fsync(fh, false).unwrap();
        f.fs.release(fh).unwrap();
        assert_eq!(errno(f.fs.release(fh)), lx::EBADF);
        assert_eq!(
            fs::read(f.share.join("hello.txt")).unwrap(),
            b"HELLO from the host"
        );
        assert_eq!(errno(f.fs.lookup(ROOT_INODE, &c("nope"))), lx::ENOENT);
        // The root's own attributes and a directory below it.
        let (src, sa) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        assert_eq!(sa.kind(), S_IFDIR);
        let (_, m) = f.fs.lookup(src, &c("main.rs")).unwrap();
        assert_eq!(m.size, 13);
        assert_eq!(f.fs.getattr(ROOT_INODE, None).unwrap().kind(), S_IFDIR);
        // Directories are not opened as files.
        assert_eq!(errno(f.fs.open(src, O_RDONLY)), lx::EISDIR);
    }

    #[test]
    fn macos_passthrough_create_mkdir_link_unlink_rmdir() {
        let f = fixture(false);
        let (d, _) = f.fs.mkdir(ROOT_INODE, &c("new"), 0o777, 0o022).unwrap();
        let mode = fs::metadata(f.share.join("new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "umask applied");
        let (ino, a, fh) = f.fs.create(d, &c("a.txt"), 0o666, 0o022, O_WRONLY).unwrap();
        assert_eq!(a.size, 0);
        f.fs.write(fh, 0, b"abc").unwrap();
        f.fs.release(fh).unwrap();
        assert_eq!(fs::read(f.share.join("new/a.txt")).unwrap(), b"abc");
        assert_eq!(f.fs.getattr(ino, None).unwrap().size, 3);
        // O_EXCL on an existing name.
        let excl = 0o100 | 0o200 | O_WRONLY;
        assert_eq!(errno(f.fs.create(d, &c("a.txt"), 0o644, 0, excl)), 17);
        let (l, la) = f.fs.link(ino, ROOT_INODE, &c("hard")).unwrap();
        assert_eq!(l, ino, "a hard link is the same inode");
        assert_eq!(la.nlink, 2);
        f.fs.unlink(ROOT_INODE, &c("hard")).unwrap();
        assert_eq!(
            errno(f.fs.getattr(ino, None)),
            lx::ENOENT,
            "the inode's newest name is gone"
        );
        f.fs.unlink(d, &c("a.txt")).unwrap();
        assert_eq!(errno(f.fs.rmdir(ROOT_INODE, &c("src"))), lx::ENOTEMPTY);
        f.fs.rmdir(ROOT_INODE, &c("new")).unwrap();
        assert!(!f.share.join("new").exists());
        for bad in ["", ".", "..", "a/b"] {
            assert_eq!(errno(f.fs.mkdir(ROOT_INODE, &c(bad), 0o755, 0)), lx::EINVAL);
        }
        assert_eq!(
            errno(f.fs.mkdir(ROOT_INODE, &c(&"x".repeat(256)), 0o755, 0)),
            lx::ENAMETOOLONG
        );
    }

    #[test]
    fn macos_passthrough_readdir_pages_and_rewinds() {
        let f = fixture(false);
        let fh = f.fs.opendir(ROOT_INODE).unwrap();
        let all = f.fs.readdir(ROOT_INODE, fh, 0).unwrap();
        let mut names: Vec<_> = all.iter().map(|e| e.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            [&b"."[..], b"..", b"hello.txt", b"src"].map(|n| n.to_vec())
        );
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.offset, i as u64 + 1);
        }
        let src = all.iter().find(|e| e.name == b"src").unwrap();
        assert_eq!(src.dtype, u32::from(libc::DT_DIR));
        assert_eq!(src.ino, fs::metadata(f.share.join("src")).unwrap().ino());
        // Resume after the second entry.
        let rest = f.fs.readdir(ROOT_INODE, fh, 2).unwrap();
        assert_eq!(rest, all[2..].to_vec());
        // A rewind sees a file made since.
        fs::write(f.share.join("late"), b"").unwrap();
        assert_eq!(f.fs.readdir(ROOT_INODE, fh, 0).unwrap().len(), 5);
        f.fs.release(fh).unwrap();
        // The Linux READDIR records of what was read.
        let bytes = dirent_bytes(&all, 4096).unwrap();
        assert_eq!(bytes.len() % 8, 0);
        assert_eq!(
            u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            all[0].ino
        );
        assert!(
            dirent_bytes(&all, 40).unwrap().len() <= 40,
            "stops when full"
        );
        // A file is not a directory.
        let (file, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        assert_eq!(errno(f.fs.opendir(file)), lx::ENOTDIR);
    }

    #[test]
    fn macos_passthrough_rename_moves_the_inode() {
        let f = fixture(false);
        let (ino, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        let (src, _) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        f.fs.rename(ROOT_INODE, &c("hello.txt"), src, &c("moved.txt"), 0)
            .unwrap();
        assert!(f.share.join("src/moved.txt").exists());
        assert_eq!(
            f.fs.getattr(ino, None).unwrap().size,
            19,
            "same inode, new name"
        );
        let fh = f.fs.open(ino, O_RDONLY).unwrap();
        assert_eq!(f.fs.read(fh, 0, 5).unwrap(), b"hello");
        f.fs.release(fh).unwrap();
        // RENAME_NOREPLACE refuses an existing target.
        fs::write(f.share.join("other"), b"x").unwrap();
        assert_eq!(
            errno(f.fs.rename(src, &c("moved.txt"), ROOT_INODE, &c("other"), 1)),
            17
        );
        // RENAME_EXCHANGE swaps, and both inodes follow.
        let (other, _) = f.fs.lookup(ROOT_INODE, &c("other")).unwrap();
        f.fs.rename(src, &c("moved.txt"), ROOT_INODE, &c("other"), 2)
            .unwrap();
        assert_eq!(
            fs::read(f.share.join("other")).unwrap(),
            b"hello from the host"
        );
        assert_eq!(f.fs.getattr(ino, None).unwrap().size, 19);
        assert_eq!(f.fs.getattr(other, None).unwrap().size, 1);
        assert_eq!(
            errno(f.fs.rename(src, &c(".."), ROOT_INODE, &c("x"), 0)),
            lx::EINVAL
        );
    }

    #[test]
    fn macos_passthrough_setattr_mode_size_times() {
        let f = fixture(false);
        let p = f.share.join("hello.txt");
        let (ino, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        let a =
            f.fs.setattr(
                ino,
                SetAttr {
                    mode: Some(0o600),
                    size: Some(5),
                    mtime: Some(SetTime::At(1_000_000_000, 7)),
                    atime: Some(SetTime::At(1_000_000_001, 0)),
                    ..SetAttr::default()
                },
                None,
            )
            .unwrap();
        assert_eq!((a.mode & 0o7777, a.size), (0o600, 5));
        assert_eq!(a.mtime, (1_000_000_000, 7));
        let md = fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            (md.len(), md.mtime(), md.atime()),
            (5, 1_000_000_000, 1_000_000_001)
        );
        // Through an open handle, and on a directory.
        let fh = f.fs.open(ino, O_RDWR).unwrap();
        let a =
            f.fs.setattr(
                ino,
                SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
                Some(fh),
            )
            .unwrap();
        assert_eq!(a.size, 0);
        f.fs.release(fh).unwrap();
        let (src, _) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        f.fs.setattr(
            src,
            SetAttr {
                mode: Some(0o700),
                ..SetAttr::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(
            fs::metadata(f.share.join("src"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        assert_eq!(
            errno(f.fs.setattr(
                src,
                SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
                None
            )),
            lx::EISDIR
        );
        // chown to ourselves is allowed without privileges.
        let me = md.uid();
        f.fs.setattr(
            ino,
            SetAttr {
                uid: Some(me),
                ..SetAttr::default()
            },
            None,
        )
        .unwrap();
    }

    #[test]
    fn macos_passthrough_symlinks_are_links_never_followed() {
        let f = fixture(false);
        let secret = f.outside.join("secret");
        std::os::unix::fs::symlink(&secret, f.share.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", f.share.join("rel")).unwrap();
        let (abs, a) = f.fs.lookup(ROOT_INODE, &c("abs")).unwrap();
        assert_eq!(a.kind(), S_IFLNK);
        assert_eq!(
            f.fs.readlink(abs).unwrap(),
            secret.as_os_str().as_encoded_bytes()
        );
        assert_eq!(errno(f.fs.open(abs, O_RDONLY)), lx::ELOOP);
        assert_eq!(
            errno(f.fs.open(abs, O_RDWR | 0o1000)),
            lx::ELOOP,
            "no O_TRUNC through a link"
        );
        let chmod = SetAttr {
            mode: Some(0o777),
            ..SetAttr::default()
        };
        assert!(f.fs.setattr(abs, chmod, None).is_err());
        let trunc = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert!(f.fs.setattr(abs, trunc, None).is_err());
        // Times on a link change the link, not its target.
        let touch = SetAttr {
            mtime: Some(SetTime::At(5, 0)),
            ..SetAttr::default()
        };
        f.fs.setattr(abs, touch, None).unwrap();
        assert_ne!(fs::metadata(&secret).unwrap().mtime(), 5);
        // A link to a directory is not a directory to look in or create in.
        let (rel, _) = f.fs.lookup(ROOT_INODE, &c("rel")).unwrap();
        assert_eq!(errno(f.fs.lookup(rel, &c("secret"))), lx::ENOTDIR);
        assert_eq!(
            errno(f.fs.create(rel, &c("x"), 0o644, 0, O_WRONLY)),
            lx::ENOTDIR
        );
        assert_eq!(errno(f.fs.opendir(rel)), lx::ENOTDIR);
        // CREATE over an existing link does not write through it.
        assert_eq!(
            errno(f.fs.create(ROOT_INODE, &c("abs"), 0o644, 0, O_WRONLY | 0o1000)),
            lx::ELOOP
        );
        // A symlink the guest makes is stored as given.
        let (mine, _) =
            f.fs.symlink(ROOT_INODE, &c("mine"), &c("/etc/passwd"))
                .unwrap();
        assert_eq!(f.fs.readlink(mine).unwrap(), b"/etc/passwd");
        assert_eq!(
            fs::read_link(f.share.join("mine")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        assert_eq!(errno(f.fs.readlink(ROOT_INODE)), lx::EISDIR);
        secret_untouched(&f);
    }

    #[test]
    fn macos_passthrough_dotdot_stays_inside_the_share() {
        let f = fixture(false);
        let (root, _) = f.fs.lookup(ROOT_INODE, &c("..")).unwrap();
        assert_eq!(root, ROOT_INODE, ".. of the root is the root");
        let (src, _) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        let (up, _) = f.fs.lookup(src, &c("..")).unwrap();
        assert_eq!(up, ROOT_INODE, ".. of src is the root inode");
        assert_eq!(f.fs.lookup(src, &c(".")).unwrap().0, src);
        // A directory the host moves out of the share cannot lead further out.
        fs::create_dir(f.share.join("d")).unwrap();
        let (d, _) = f.fs.lookup(ROOT_INODE, &c("d")).unwrap();
        fs::rename(f.share.join("d"), f.outside.join("d")).unwrap();
        assert_eq!(errno(f.fs.lookup(d, &c(".."))), lx::EACCES);
        for bad in ["a/b", "../outside", "/etc"] {
            assert_eq!(errno(f.fs.lookup(ROOT_INODE, &c(bad))), lx::EINVAL, "{bad}");
        }
        secret_untouched(&f);
    }

    #[test]
    fn macos_passthrough_swapped_in_symlink_is_not_followed() {
        let f = fixture(false);
        let (ino, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        // The host (or a racing guest request) replaces the file by a link out.
        // (Made before the file goes, so the link cannot reuse its inode number.)
        std::os::unix::fs::symlink(f.outside.join("secret"), f.share.join("tmp")).unwrap();
        fs::rename(f.share.join("tmp"), f.share.join("hello.txt")).unwrap();
        assert_eq!(errno(f.fs.open(ino, O_RDWR)), lx::ENOENT);
        assert_eq!(errno(f.fs.getattr(ino, None)), lx::ENOENT);
        let bad = SetAttr {
            mode: Some(0o777),
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(errno(f.fs.setattr(ino, bad, None)), lx::ENOENT);
        // Same for a directory replaced by a link: the held fd still names the old one.
        let (src, _) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        fs::rename(f.share.join("src"), f.share.join("src.old")).unwrap();
        std::os::unix::fs::symlink(&f.outside, f.share.join("src")).unwrap();
        assert_eq!(f.fs.lookup(src, &c("main.rs")).unwrap().1.size, 13);
        assert_eq!(errno(f.fs.lookup(src, &c("secret"))), lx::ENOENT);
        secret_untouched(&f);
    }

    #[test]
    fn macos_passthrough_only_regular_files_are_opened() {
        let f = fixture(false);
        let fifo = c(f.share.join("fifo").to_str().unwrap());
        // SAFETY: a NUL-terminated path; checked.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let (ino, a) = f.fs.lookup(ROOT_INODE, &c("fifo")).unwrap();
        assert_eq!(a.kind(), 0o010000);
        // Would block forever if it were opened.
        assert_eq!(errno(f.fs.open(ino, O_RDONLY)), lx::EPERM);
        // CREATE on it: the non-blocking open finds no reader (ENXIO) or the type check refuses.
        let e = errno(f.fs.create(ROOT_INODE, &c("fifo"), 0o644, 0, O_WRONLY));
        assert!(e == lx::EPERM || e == 6, "errno {e}");
        let e = errno(f.fs.create(ROOT_INODE, &c("fifo"), 0o644, 0, O_RDONLY));
        assert_eq!(e, lx::EPERM);
        // O_PATH (and O_TMPFILE) would bypass the checks.
        let (file, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        let o_path = crate::virtio::fs::macos::flags::linux_open::O_PATH;
        assert_eq!(errno(f.fs.open(file, o_path)), lx::EINVAL);
        assert_eq!(errno(f.fs.open(file, 3)), lx::EINVAL);
    }

    #[test]
    fn macos_passthrough_read_only_refuses_changes() {
        let f = fixture(true);
        let (ino, _) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        let erofs = libc::EROFS;
        assert_eq!(errno(f.fs.open(ino, O_WRONLY)), erofs);
        assert_eq!(errno(f.fs.open(ino, O_RDONLY | 0o1000)), erofs);
        assert_eq!(
            errno(f.fs.create(ROOT_INODE, &c("n"), 0o644, 0, O_WRONLY)),
            erofs
        );
        assert_eq!(errno(f.fs.mkdir(ROOT_INODE, &c("n"), 0o755, 0)), erofs);
        assert_eq!(errno(f.fs.unlink(ROOT_INODE, &c("hello.txt"))), erofs);
        assert_eq!(
            errno(f.fs.rename(ROOT_INODE, &c("hello.txt"), ROOT_INODE, &c("x"), 0)),
            erofs
        );
        assert_eq!(errno(f.fs.symlink(ROOT_INODE, &c("l"), &c("x"))), erofs);
        let chmod = SetAttr {
            mode: Some(0o777),
            ..SetAttr::default()
        };
        assert_eq!(errno(f.fs.setattr(ino, chmod, None)), erofs);
        let fh = f.fs.open(ino, O_RDONLY).unwrap();
        assert_eq!(errno(f.fs.write(fh, 0, b"x")), erofs);
        assert_eq!(f.fs.read(fh, 0, 5).unwrap(), b"hello");
        assert_eq!(
            fs::read(f.share.join("hello.txt")).unwrap(),
            b"hello from the host"
        );
    }

    #[test]
    fn macos_passthrough_forget_frees_inodes_and_parents() {
        let f = fixture(false);
        assert_eq!(f.fs.inode_count(), 1);
        let (src, _) = f.fs.lookup(ROOT_INODE, &c("src")).unwrap();
        let (m, _) = f.fs.lookup(src, &c("main.rs")).unwrap();
        let (m2, _) = f.fs.lookup(src, &c("main.rs")).unwrap();
        assert_eq!(m, m2, "one inode per host object");
        assert_eq!(f.fs.inode_count(), 3);
        // The guest forgets src first; main.rs keeps it alive.
        f.fs.forget(src, 1);
        assert_eq!(f.fs.inode_count(), 3);
        assert_eq!(f.fs.getattr(m, None).unwrap().size, 13);
        f.fs.forget(m, 2);
        assert_eq!(f.fs.inode_count(), 1, "main.rs and then src are gone");
        assert_eq!(errno(f.fs.getattr(m, None)), lx::EBADF);
        f.fs.forget(ROOT_INODE, 100);
        assert_eq!(f.fs.getattr(ROOT_INODE, None).unwrap().kind(), S_IFDIR);
    }

    #[test]
    fn macos_passthrough_linux_records_match_getattr_and_statfs() {
        let f = fixture(false);
        let (_, a) = f.fs.lookup(ROOT_INODE, &c("hello.txt")).unwrap();
        let b = a.fuse_attr().unwrap();
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!((u64_at(0), u64_at(8)), (a.ino, 19));
        assert_eq!(u64_at(32) as i64, a.mtime.0);
        assert_eq!(u32_at(60), a.mode);
        assert_eq!((u32_at(68), u32_at(72)), (a.uid, a.gid));
        let s = f.fs.statfs(ROOT_INODE).unwrap();
        assert!(s.blocks > 0 && s.namemax >= 255, "{s:?}");
        let k = s.fuse_kstatfs();
        assert_eq!(u64::from_le_bytes(k[0..8].try_into().unwrap()), s.blocks);
        assert_eq!(
            u64::from(u32::from_le_bytes(k[48..52].try_into().unwrap())),
            s.frsize
        );
    }
}
