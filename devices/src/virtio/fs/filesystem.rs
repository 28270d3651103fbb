//! [`ShareFs`]: the `FileSystem` the FUSE server calls. It wraps `PassthroughFs`
//! and adds what aivmm needs on top:
//!
//! - **No privileges.** [`FileSystem::id_remap`] maps every request's uid/gid to 0, so
//!   `PassthroughFs` never switches credentials (`setresuid` needs `CAP_SETUID`);
//!   files are created as the user running aivmm. Hard links fall back to
//!   `linkat` on `/proc/self/fd` when `AT_EMPTY_PATH` is refused.
//! - **Read-only shares.** Every call that would change the tree or a file is
//!   answered with EROFS before it reaches the host, and so is an `open` for writing.
//! - **Bounded work.** Guest-given xattr buffer sizes are capped at the kernel's
//!   own limit, so a request cannot make the host allocate gigabytes.
//! - **The process umask.** `PassthroughFs` clears the process umask when it
//!   (re)imports the root (on INIT and DESTROY); the previous one is put back, so
//!   the rest of aivmm is unaffected and the host user's umask bounds the modes of
//!   files the guest creates.
//!
//! Containment stays with `PassthroughFs`: inodes are `O_PATH | O_NOFOLLOW` fds
//! opened with `openat` from their parent's fd; names with `/` are refused; `..`
//! looked up at the root gives the root; symlinks are returned as links (the guest
//! resolves them in its own view) and are never opened for I/O; operations by inode
//! go through the `/proc/self/fd` magic links, which name the object, not a path.
//! Every lookup resolves one name relative to a held directory fd with
//! `O_NOFOLLOW`, so a symlink swapped in during a lookup is found as a link, never
//! followed; `openat2(RESOLVE_BENEATH)` would add nothing to such one-component
//! lookups except for `..`, which is checked here instead.
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

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::ROOT_ID;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, ListxattrReply,
    OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::validate_path_component;
use fuse_backend_rs::passthrough::{self, PassthroughFs};

use super::{CachePolicy, FsConfig};

/// The largest xattr value or name list Linux has (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: u32 = 64 * 1024;

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

/// The process umask as it was when the first share was created.
pub fn host_umask() -> libc::mode_t {
    static HOST_UMASK: OnceLock<libc::mode_t> = OnceLock::new();
    *HOST_UMASK.get_or_init(|| {
        // SAFETY: umask only swaps the process's file mode creation mask; the old
        // value is put back at once.
        unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        }
    })
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

/// `PassthroughFs`'s configuration for `cfg`: the cache mapping and its timeouts.
pub fn passthrough_config(cfg: &FsConfig, root: &str) -> passthrough::Config {
    let (policy, timeout) = match cfg.cache {
        CachePolicy::None => (passthrough::CachePolicy::Never, Duration::ZERO),
        CachePolicy::Auto => (passthrough::CachePolicy::Auto, Duration::from_secs(1)),
        CachePolicy::Always => (
            passthrough::CachePolicy::Always,
            Duration::from_secs(24 * 60 * 60),
        ),
    };
    passthrough::Config {
        root_dir: root.to_owned(),
        cache_policy: policy,
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: true,
        writeback: false,
        // Import the root on INIT: there is no Vfs layer above us, and this also makes
        // PassthroughFs validate every path component itself.
        do_import: true,
        // O_PATH fds, not file handles: open_by_handle_at needs CAP_DAC_READ_SEARCH.
        inode_file_handles: false,
        no_open: false,
        no_opendir: false,
        killpriv_v2: false,
        ..Default::default()
    }
}

/// The file system behind a share.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    /// The share root, symlinks resolved.
    root: std::path::PathBuf,
}

impl ShareFs {
    /// Wraps `inner`, which serves `root` (resolved); with `read_only`, every
    /// change is refused with EROFS.
    pub fn new(inner: PassthroughFs<()>, root: std::path::PathBuf, read_only: bool) -> Self {
        host_umask();
        Self {
            inner,
            read_only,
            root,
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Refuses, on a read-only share, open flags that would change the file.
    fn check_open_flags(&self, flags: u32) -> io::Result<()> {
        // The flags are the guest's open(2) flags; reinterpret the bits as c_int.
        let flags = flags as i32;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY
            || flags & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0;
        if self.read_only && writes {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Runs `f` and then puts back the host's umask, which `PassthroughFs::import`
    /// clears. The host's value is read once, when the first share is created (before
    /// any guest runs), so two sessions INITing at once cannot leave it at 0.
    fn keeping_umask<T>(f: impl FnOnce() -> T) -> T {
        let host = host_umask();
        let r = f();
        // SAFETY: umask only sets the process's file mode creation mask.
        unsafe { libc::umask(host) };
        r
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
        let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
        // SAFETY: fstat64 writes a stat64 into `st`, which is large enough; checked.
        if unsafe { libc::fstat64(fd.as_raw_fd(), st.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat64 succeeded, so `st` is initialised.
        let st = unsafe { st.assume_init() };
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
        path == self.root || path.starts_with(&self.root)
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
        let want = Self::keeping_umask(|| self.inner.init(capable))?;
        let mut want = want | extra_init_options();
        if self.read_only {
            want.remove(FsOptions::WRITEBACK_CACHE);
        }
        Ok(want)
    }

    fn destroy(&self) {
        Self::keeping_umask(|| self.inner.destroy());
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        // The guest's ids mean nothing on the host: act as the user running aivmm.
        ctx.uid = 0;
        ctx.gid = 0;
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
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
        self.check_writable()?;
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
        self.check_writable()?;
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
        self.check_writable()?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
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
        self.check_writable()?;
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
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
        self.check_writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        match self.inner.link(ctx, inode, newparent, newname) {
            // Without CAP_DAC_READ_SEARCH, linkat(AT_EMPTY_PATH) fails with ENOENT.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                self.link_via_proc(ctx, inode, newparent, newname)
            }
            r => r,
        }
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        self.check_open_flags(flags)?;
        self.check_regular(ctx, inode)?;
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        // An existing special file of that name is not opened (see `open`); the
        // check after the create catches one swapped in meanwhile.
        if let Ok(e) = self.inner.lookup(ctx, parent, name) {
            let kind = e.attr.st_mode & libc::S_IFMT;
            self.inner.forget(ctx, e.inode, 1);
            if kind != libc::S_IFREG {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
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
        self.check_writable()?;
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
        self.check_writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner
            .getxattr(ctx, inode, name, size.min(XATTR_SIZE_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_SIZE_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
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
        if self.read_only && mask as i32 & libc::W_OK != 0 {
            return Err(erofs());
        }
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

    #[test]
    fn process_umask_is_kept() {
        let before = host_umask();
        let f = fixture(false);
        f.fs.destroy();
        f.fs.init(FsOptions::empty()).unwrap();
        // SAFETY: reads the umask by swapping it and putting it back.
        let now = unsafe {
            let m = libc::umask(before);
            libc::umask(m);
            m
        };
        assert_eq!(now, before);
    }
}
