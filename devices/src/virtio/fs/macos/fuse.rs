//! [`PosixFs`] as a fuse-backend-rs [`FileSystem`], so the FUSE server the
//! device already runs can serve it.
//!
//! Only on Linux: there fuse-backend-rs encodes the Linux FUSE ABI, which is
//! what the guest speaks. On macOS the same crate encodes macFUSE's ABI (a
//! longer `fuse_attr` with `crtime` and `flags`), so a macOS host needs a request
//! loop that writes the Linux records itself ([`super::passthrough::Attr::fuse_attr`],
//! [`super::passthrough::dirent_bytes`], [`super::passthrough::Statfs::fuse_kstatfs`]).

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, OpenOptions, SetattrValid, ZeroCopyReader,
    ZeroCopyWriter,
};

use super::passthrough::{Attr, PosixFs, SetAttr, SetTime};

/// A [`PosixFs`] with the cache timeouts its replies carry.
pub struct PosixShare {
    /// The file system.
    pub fs: PosixFs,
    /// Entry and attribute timeout.
    pub ttl: Duration,
}

fn stat64_of(a: &Attr) -> stat64 {
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_dev = a.dev;
    st.st_ino = a.ino;
    st.st_mode = a.mode;
    st.st_nlink = a.nlink;
    st.st_uid = a.uid;
    st.st_gid = a.gid;
    st.st_rdev = a.rdev;
    st.st_size = a.size;
    st.st_blksize = a.blksize;
    st.st_blocks = a.blocks;
    (st.st_atime, st.st_atime_nsec) = a.atime;
    (st.st_mtime, st.st_mtime_nsec) = a.mtime;
    (st.st_ctime, st.st_ctime_nsec) = a.ctime;
    st
}

impl PosixShare {
    fn entry(&self, (inode, a): (u64, Attr)) -> Entry {
        Entry {
            inode,
            generation: 0,
            attr: stat64_of(&a),
            attr_flags: 0,
            attr_timeout: self.ttl,
            entry_timeout: self.ttl,
        }
    }
}

fn set_time(now: bool, given: bool, sec: i64, nsec: i64) -> Option<SetTime> {
    match (now, given) {
        (true, _) => Some(SetTime::Now),
        (false, true) => Some(SetTime::At(sec, nsec)),
        (false, false) => None,
    }
}

impl FileSystem for PosixShare {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, _capable: FsOptions) -> io::Result<FsOptions> {
        Ok(FsOptions::ASYNC_READ | FsOptions::BIG_WRITES | FsOptions::MAX_PAGES)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.fs.lookup(parent, name).map(|e| self.entry(e))
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.fs.forget(inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.fs.forget(inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        Ok((stat64_of(&self.fs.getattr(inode, handle)?), self.ttl))
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let s = SetAttr {
            mode: valid.contains(SetattrValid::MODE).then_some(attr.st_mode),
            uid: valid.contains(SetattrValid::UID).then_some(attr.st_uid),
            gid: valid.contains(SetattrValid::GID).then_some(attr.st_gid),
            size: if valid.contains(SetattrValid::SIZE) {
                Some(
                    u64::try_from(attr.st_size)
                        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
                )
            } else {
                None
            },
            atime: set_time(
                valid.contains(SetattrValid::ATIME_NOW),
                valid.contains(SetattrValid::ATIME),
                attr.st_atime,
                attr.st_atime_nsec,
            ),
            mtime: set_time(
                valid.contains(SetattrValid::MTIME_NOW),
                valid.contains(SetattrValid::MTIME),
                attr.st_mtime,
                attr.st_mtime_nsec,
            ),
        };
        Ok((stat64_of(&self.fs.setattr(inode, s, handle)?), self.ttl))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.fs.readlink(inode)
    }

    fn symlink(
        &self,
        _ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.fs
            .symlink(parent, name, linkname)
            .map(|e| self.entry(e))
    }

    fn mkdir(
        &self,
        _ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.fs
            .mkdir(parent, name, mode, umask)
            .map(|e| self.entry(e))
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.fs.unlink(parent, name)
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.fs.rmdir(parent, name)
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.rename(olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.fs
            .link(inode, newparent, newname)
            .map(|e| self.entry(e))
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        Ok((
            Some(self.fs.open(inode, flags)?),
            OpenOptions::empty(),
            None,
        ))
    }

    fn create(
        &self,
        _ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let (inode, a, fh) = self
            .fs
            .create(parent, name, args.mode, args.umask, args.flags)?;
        Ok((self.entry((inode, a)), Some(fh), OpenOptions::empty(), None))
    }

    fn read(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let data = self.fs.read(handle, offset, size)?;
        w.write_all(&data)?;
        Ok(data.len())
    }

    fn write(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        let mut data = vec![0u8; size as usize];
        r.read_exact(&mut data)?;
        self.fs.write(handle, offset, &data)
    }

    fn flush(&self, _ctx: &Context, _inode: u64, _handle: u64, _lock_owner: u64) -> io::Result<()> {
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, _inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsync(handle, datasync)
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.fs.release(handle)
    }

    fn statfs(&self, _ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let s = self.fs.statfs(inode)?;
        // SAFETY: statvfs64 is plain old data; all-zero is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = s.bsize;
        st.f_frsize = s.frsize;
        st.f_blocks = s.blocks;
        st.f_bfree = s.bfree;
        st.f_bavail = s.bavail;
        st.f_files = s.files;
        st.f_ffree = s.ffree;
        st.f_namemax = s.namemax;
        Ok(st)
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        Ok((Some(self.fs.opendir(inode)?), OpenOptions::empty()))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        for e in self.fs.readdir(inode, handle, offset)? {
            let added = add_entry(DirEntry {
                ino: e.ino,
                offset: e.offset,
                type_: e.dtype,
                name: &e.name,
            })?;
            if added == 0 {
                break;
            }
        }
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Context, _inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fs.fsync(handle, datasync)
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.fs.release(handle)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;

    use fuse_backend_rs::api::server::Server;
    use virtio_queue::DescriptorChain;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::test_utils::guest_memory;
    use crate::virtio::fs::macos::passthrough::ROOT_INODE;
    use crate::virtio::fs::macos::test_utils::{posix_fs, share};
    use crate::virtio::fs::test_utils::{self as fuse, Session, SESSION_MEM};
    use crate::virtio::fs::worker::handle_chain;

    #[test]
    fn macos_passthrough_serves_the_linux_fuse_abi_through_the_server() {
        let tmp = share();
        let share = &tmp.share;
        std::os::unix::fs::symlink("/etc", share.join("etc")).unwrap();
        let server = Server::new(PosixShare {
            fs: posix_fs(share, false),
            ttl: Duration::from_secs(1),
        });
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);

        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let hello = s
            .call(&fuse::lookup(ROOT_INODE, "hello.txt"), &mut h)
            .entry();
        assert_eq!(hello.attr.size, 19);
        assert_eq!(hello.attr_valid, 1);

        // CREATE, WRITE, READ back, FSYNC, RELEASE.
        let r = s.call(&fuse::create(ROOT_INODE, "new.txt", 0o101, 0o644), &mut h);
        assert_eq!(r.errno(), 0);
        let (node, fh) = (r.entry().nodeid, r.create_open().fh);
        let w = s.call(&fuse::write(node, fh, 0, b"written by the guest"), &mut h);
        assert_eq!(w.write().size, 20);
        assert_eq!(s.call(&fuse::fsync(node, fh), &mut h).errno(), 0);
        assert_eq!(s.call(&fuse::release(node, fh), &mut h).errno(), 0);
        assert_eq!(
            fs::read(share.join("new.txt")).unwrap(),
            b"written by the guest"
        );
        let fh = s.call(&fuse::open(hello.nodeid, 0), &mut h).open().fh;
        let r = s.call(&fuse::read(hello.nodeid, fh, 6, 4), &mut h);
        assert_eq!(r.body, b"from");
        assert_eq!(s.call(&fuse::getattr(node), &mut h).attr().attr.size, 20);

        // READDIR in Linux fuse_dirent records.
        let dh = s.call(&fuse::opendir(ROOT_INODE), &mut h).open().fh;
        let mut names: Vec<_> = s
            .call(&fuse::readdir(ROOT_INODE, dh, 0, 4096), &mut h)
            .dirents()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        names.sort();
        assert_eq!(names, [".", "..", "etc", "hello.txt", "new.txt", "src"]);

        // RENAME and UNLINK; the escape attempts fail.
        let mv = fuse::rename(ROOT_INODE, "new.txt", ROOT_INODE, "renamed.txt");
        assert_eq!(s.call(&mv, &mut h).errno(), 0);
        assert!(share.join("renamed.txt").exists());
        let etc = s.call(&fuse::lookup(ROOT_INODE, "etc"), &mut h).entry();
        assert_eq!(etc.attr.mode & 0o170000, 0o120000, "a link, not /etc");
        let through = s.call(&fuse::lookup(etc.nodeid, "passwd"), &mut h);
        assert_eq!(through.errno(), libc::ENOTDIR);
        assert_eq!(
            s.call(&fuse::opendir(etc.nodeid), &mut h).errno(),
            libc::ENOTDIR
        );
        let up = s.call(&fuse::lookup(ROOT_INODE, ".."), &mut h).entry();
        assert_eq!(up.nodeid, ROOT_INODE);
        assert_eq!(
            s.call(&fuse::unlink(ROOT_INODE, "renamed.txt"), &mut h)
                .errno(),
            0
        );
        assert!(!share.join("renamed.txt").exists());
    }
}
