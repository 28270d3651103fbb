//! [`LinuxFuseServer`]: a FUSE request loop that speaks the Linux FUSE ABI
//! (`include/uapi/linux/fuse.h`, protocol 7.31) over [`PosixFs`], on any host.
//!
//! On macOS, fuse-backend-rs encodes macFUSE's ABI, which a Linux guest does not
//! speak, so the device needs this loop there. Every record is read and written
//! as little-endian bytes at the ABI's offsets (both guest architectures aivmm
//! runs are little-endian), independent of the host's struct definitions.
//!
//! The data flow: [`read_request`] gathers a chain's readable descriptors into
//! one buffer (bounded), [`LinuxFuseServer::handle`] decodes the header and the
//! opcode's body, calls [`PosixFs`], and encodes the reply, and [`write_reply`]
//! scatters it into the chain's writable descriptors. FORGET, BATCH_FORGET and
//! INTERRUPT get no reply, as the protocol says.
//!
//! Not served (ENOSYS, which makes the guest kernel stop asking or fall back):
//! extended attributes, locks, `fallocate`, `lseek`, `copy_file_range`,
//! READDIRPLUS, DAX mappings, `mknod` of FIFOs and sockets. Device nodes are
//! refused (EPERM).

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::errno::linux;
use super::passthrough::{dirent_bytes, Attr, PosixFs, SetAttr, SetTime};

/// The protocol version aivmm answers with.
pub const KERNEL_VERSION: u32 = 7;
/// The minor version aivmm answers with (virtio-fs arrived in 7.31).
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The oldest minor version accepted from the guest.
pub const MIN_MINOR_VERSION: u32 = 27;
/// Largest WRITE the guest may send, and largest READ it may ask for.
pub const MAX_WRITE: u32 = 1 << 20;
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_SIZE: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_SIZE: usize = 16;
/// The largest request read from a chain: a full WRITE with its headers.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// Opcodes (`enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const RENAME2: u32 = 45;
}

/// INIT flags aivmm may grant (`FUSE_*` in fuse.h).
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// SETATTR `valid` bits (`FATTR_*`).
mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `FUSE_GETATTR_FH`.
const GETATTR_FH: u32 = 1;
/// `FUSE_FSYNC_FDATASYNC`.
const FSYNC_FDATASYNC: u32 = 1;
/// `S_IFCHR` and `S_IFBLK` (the same on both hosts).
const S_IFMT: u32 = 0o170000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(linux::EINVAL)
}

/// A little-endian cursor over a request body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(einval());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> io::Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> io::Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A NUL-terminated name.
    fn name(&mut self) -> io::Result<&'a CStr> {
        let name = CStr::from_bytes_until_nul(self.0).map_err(|_| einval())?;
        self.0 = &self.0[name.to_bytes_with_nul().len()..];
        Ok(name)
    }
}

/// The decoded `fuse_in_header`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    /// The request's length, header included.
    pub len: u32,
    /// The opcode.
    pub opcode: u32,
    /// The request's ID, echoed in the reply.
    pub unique: u64,
    /// The inode the request is about.
    pub nodeid: u64,
}

impl InHeader {
    /// Decodes the header at the start of `req`.
    pub fn parse(req: &[u8]) -> io::Result<Self> {
        let mut b = Body(req);
        let len = b.u32()?;
        let opcode = b.u32()?;
        let unique = b.u64()?;
        let nodeid = b.u64()?;
        b.take(IN_HEADER_SIZE - 24)?;
        Ok(Self {
            len,
            opcode,
            unique,
            nodeid,
        })
    }
}

/// A reply body under construction.
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// The Linux FUSE server of one share.
pub struct LinuxFuseServer {
    fs: PosixFs,
    ttl: Duration,
}

impl LinuxFuseServer {
    /// Serves `fs`; entries and attributes are valid in the guest for `ttl`.
    pub fn new(fs: PosixFs, ttl: Duration) -> Self {
        Self { fs, ttl }
    }

    /// The file system served.
    pub fn fs(&self) -> &PosixFs {
        &self.fs
    }

    /// Serves one request; returns the reply, or `None` when the opcode has none
    /// (or the header is too broken to answer).
    pub fn handle(&self, req: &[u8]) -> Option<Vec<u8>> {
        let h = InHeader::parse(req).ok()?;
        let len = usize::try_from(h.len).ok()?;
        if len < IN_HEADER_SIZE || len > req.len() {
            return Some(reply(h.unique, Err(einval())));
        }
        let body = Body(&req[IN_HEADER_SIZE..len]);
        match h.opcode {
            op::FORGET => {
                if let Ok(n) = Body(body.0).u64() {
                    self.fs.forget(h.nodeid, n);
                }
                None
            }
            op::BATCH_FORGET => {
                self.batch_forget(body);
                None
            }
            // Requests are served one at a time, so there is nothing to interrupt.
            op::INTERRUPT => None,
            _ => Some(reply(h.unique, self.dispatch(h, body))),
        }
    }

    fn batch_forget(&self, mut b: Body<'_>) {
        let Ok(count) = b.u32() else { return };
        if b.u32().is_err() {
            return;
        }
        for _ in 0..count {
            let (Ok(node), Ok(n)) = (b.u64(), b.u64()) else {
                return;
            };
            self.fs.forget(node, n);
        }
    }

    fn entry(&self, out: &mut Out, (node, a): (u64, Attr)) -> io::Result<()> {
        let attr = a.fuse_attr()?;
        out.u64(node)
            .u64(0)
            .u64(self.ttl.as_secs())
            .u64(self.ttl.as_secs())
            .u32(self.ttl.subsec_nanos())
            .u32(self.ttl.subsec_nanos())
            .bytes(&attr);
        Ok(())
    }

    fn attr(&self, out: &mut Out, a: &Attr) -> io::Result<()> {
        let attr = a.fuse_attr()?;
        out.u64(self.ttl.as_secs())
            .u32(self.ttl.subsec_nanos())
            .u32(0)
            .bytes(&attr);
        Ok(())
    }

    fn dispatch(&self, h: InHeader, mut b: Body<'_>) -> io::Result<Vec<u8>> {
        let mut out = Out::default();
        let node = h.nodeid;
        match h.opcode {
            op::INIT => self.init(&mut out, b)?,
            op::DESTROY => {}
            op::LOOKUP => {
                let name = b.name()?;
                self.entry(&mut out, self.fs.lookup(node, name)?)?;
            }
            op::GETATTR => {
                let flags = b.u32()?;
                b.u32()?;
                let fh = b.u64()?;
                let fh = (flags & GETATTR_FH != 0).then_some(fh);
                self.attr(&mut out, &self.fs.getattr(node, fh)?)?;
            }
            op::SETATTR => {
                let (s, fh) = parse_setattr(&mut b)?;
                self.attr(&mut out, &self.fs.setattr(node, s, fh)?)?;
            }
            op::READLINK => {
                out.bytes(&self.fs.readlink(node)?);
            }
            op::SYMLINK => {
                let name = b.name()?;
                let target = b.name()?;
                self.entry(&mut out, self.fs.symlink(node, name, target)?)?;
            }
            op::MKNOD => {
                let mode = b.u32()?;
                let kind = mode & S_IFMT;
                // A device node in the share would hand the guest a host device.
                return Err(io::Error::from_raw_os_error(
                    if kind == S_IFCHR || kind == S_IFBLK {
                        linux::EPERM
                    } else {
                        linux::ENOSYS
                    },
                ));
            }
            op::MKDIR => {
                let mode = b.u32()?;
                let umask = b.u32()?;
                let name = b.name()?;
                self.entry(&mut out, self.fs.mkdir(node, name, mode, umask)?)?;
            }
            op::UNLINK => self.fs.unlink(node, b.name()?)?,
            op::RMDIR => self.fs.rmdir(node, b.name()?)?,
            op::RENAME | op::RENAME2 => {
                let newdir = b.u64()?;
                let flags = if h.opcode == op::RENAME2 {
                    let f = b.u32()?;
                    b.u32()?;
                    f
                } else {
                    0
                };
                let old = b.name()?;
                let new = b.name()?;
                self.fs.rename(node, old, newdir, new, flags)?;
            }
            op::LINK => {
                let target = b.u64()?;
                let name = b.name()?;
                self.entry(&mut out, self.fs.link(target, node, name)?)?;
            }
            op::OPEN => {
                let flags = b.u32()?;
                let fh = self.fs.open(node, flags)?;
                out.u64(fh).u32(0).u32(0);
            }
            op::CREATE => {
                let flags = b.u32()?;
                let mode = b.u32()?;
                let umask = b.u32()?;
                b.u32()?;
                let name = b.name()?;
                let (id, a, fh) = self.fs.create(node, name, mode, umask, flags)?;
                self.entry(&mut out, (id, a))?;
                out.u64(fh).u32(0).u32(0);
            }
            op::READ => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()?.min(MAX_WRITE);
                out.bytes(&self.fs.read(fh, offset, size)?);
            }
            op::WRITE => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()?;
                b.take(20)?; // write_flags, lock_owner, flags, padding
                if size > MAX_WRITE {
                    return Err(einval());
                }
                let data = b.take(size as usize)?;
                let n = self.fs.write(fh, offset, data)?;
                out.u32(u32::try_from(n).map_err(|_| einval())?).u32(0);
            }
            op::STATFS => {
                out.bytes(&self.fs.statfs(node)?.fuse_kstatfs());
            }
            op::RELEASE | op::RELEASEDIR => self.fs.release(b.u64()?)?,
            op::FSYNC | op::FSYNCDIR => {
                let fh = b.u64()?;
                let flags = b.u32()?;
                self.fs.fsync(fh, flags & FSYNC_FDATASYNC != 0)?;
            }
            // Writes reach the host at once; there is nothing to flush.
            op::FLUSH => {}
            op::OPENDIR => {
                let fh = self.fs.opendir(node)?;
                out.u64(fh).u32(0).u32(0);
            }
            op::READDIR => {
                let fh = b.u64()?;
                let offset = b.u64()?;
                let size = b.u32()?.min(MAX_WRITE);
                let entries = self.fs.readdir(node, fh, offset)?;
                out.bytes(&dirent_bytes(&entries, size as usize)?);
            }
            _ => return Err(io::Error::from_raw_os_error(linux::ENOSYS)),
        }
        Ok(out.0)
    }

    fn init(&self, out: &mut Out, mut b: Body<'_>) -> io::Result<()> {
        let major = b.u32()?;
        let minor = b.u32()?;
        let readahead = b.u32()?;
        let flags = b.u32()?;
        if major != KERNEL_VERSION || minor < MIN_MINOR_VERSION {
            return Err(io::Error::from_raw_os_error(linux::EPROTO));
        }
        let wanted = init_flags::ASYNC_READ
            | init_flags::BIG_WRITES
            | init_flags::PARALLEL_DIROPS
            | init_flags::MAX_PAGES;
        let max_pages = (MAX_WRITE / 4096) as u16;
        out.u32(KERNEL_VERSION)
            .u32(KERNEL_MINOR_VERSION.min(minor))
            .u32(readahead)
            .u32(flags & wanted)
            .u16(16) // max_background
            .u16(12) // congestion_threshold
            .u32(MAX_WRITE)
            .u32(1) // time_gran: nanoseconds
            .u16(max_pages)
            .u16(0) // map_alignment
            .u32(0) // flags2
            .bytes(&[0u8; 28]);
        Ok(())
    }
}

fn parse_setattr(b: &mut Body<'_>) -> io::Result<(SetAttr, Option<u64>)> {
    let valid = b.u32()?;
    b.u32()?;
    let fh = b.u64()?;
    let size = b.u64()?;
    b.u64()?; // lock_owner
    let atime = b.u64()?;
    let mtime = b.u64()?;
    b.u64()?; // ctime
    let atimensec = b.u32()?;
    let mtimensec = b.u32()?;
    b.u32()?; // ctimensec
    let mode = b.u32()?;
    b.u32()?;
    let uid = b.u32()?;
    let gid = b.u32()?;
    let time = |now: u32, set: u32, sec: u64, nsec: u32| {
        if valid & now != 0 {
            Some(SetTime::Now)
        } else if valid & set != 0 {
            Some(SetTime::At(sec as i64, i64::from(nsec)))
        } else {
            None
        }
    };
    let s = SetAttr {
        mode: (valid & fattr::MODE != 0).then_some(mode),
        uid: (valid & fattr::UID != 0).then_some(uid),
        gid: (valid & fattr::GID != 0).then_some(gid),
        size: (valid & fattr::SIZE != 0).then_some(size),
        atime: time(fattr::ATIME_NOW, fattr::ATIME, atime, atimensec),
        mtime: time(fattr::MTIME_NOW, fattr::MTIME, mtime, mtimensec),
    };
    Ok((s, (valid & fattr::FH != 0).then_some(fh)))
}

/// The reply to request `unique`: a header and the body, or the error alone.
pub fn reply(unique: u64, r: io::Result<Vec<u8>>) -> Vec<u8> {
    let (error, body) = match r {
        Ok(body) => (0i32, body),
        Err(e) => (-e.raw_os_error().unwrap_or(linux::EIO), Vec::new()),
    };
    let len = OUT_HEADER_SIZE + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The writable buffers of a chain, in order.
pub type ReplyBufs = Vec<(GuestAddress, usize)>;

/// Gathers the readable descriptors of `chain` (those before the first
/// writable one) into one buffer of at most [`MAX_REQUEST`] bytes.
pub fn read_request<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
) -> io::Result<(Vec<u8>, ReplyBufs)> {
    let mut req = Vec::new();
    let mut writable = Vec::new();
    for d in chain {
        let len = d.len() as usize;
        if d.is_write_only() {
            writable.push((d.addr(), len));
            continue;
        }
        if !writable.is_empty() || req.len() + len > MAX_REQUEST {
            return Err(einval());
        }
        let start = req.len();
        req.resize(start + len, 0);
        mem.read_slice(&mut req[start..], d.addr())
            .map_err(|_| io::Error::from_raw_os_error(linux::EIO))?;
    }
    Ok((req, writable))
}

/// Scatters `reply` into the writable buffers; returns the bytes written, or
/// an error when they are too small or not in guest memory.
pub fn write_reply<M: GuestMemory>(
    mem: &M,
    bufs: &[(GuestAddress, usize)],
    reply: &[u8],
) -> io::Result<u32> {
    let room: usize = bufs.iter().map(|b| b.1).sum();
    if room < reply.len() {
        return Err(io::Error::from_raw_os_error(linux::ENOBUFS));
    }
    let mut rest = reply;
    for &(addr, len) in bufs {
        if rest.is_empty() {
            break;
        }
        let n = len.min(rest.len());
        mem.write_slice(&rest[..n], addr)
            .map_err(|_| io::Error::from_raw_os_error(linux::EIO))?;
        rest = &rest[n..];
    }
    u32::try_from(reply.len()).map_err(|_| einval())
}

/// Serves one chain; returns the used length (0 for no reply or a bad chain).
pub fn handle_chain<M: GuestMemory>(
    server: &LinuxFuseServer,
    mem: &M,
    chain: DescriptorChain<&M>,
) -> u32 {
    let Ok((req, bufs)) = read_request(mem, chain) else {
        return 0;
    };
    match server.handle(&req) {
        Some(r) => write_reply(mem, &bufs, &r).unwrap_or(0),
        None => 0,
    }
}

// The requests are built with fuse-backend-rs's Linux ABI structs (Linux hosts only).
#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::ffi::CString;
    use std::fs;
    use std::path::Path;

    use fuse_backend_rs::abi::fuse_abi::{InitOut, Opcode};
    use vm_memory::{ByteValued, GuestMemoryMmap};

    use super::*;
    use crate::test_utils::{guest_memory, Buf};
    use crate::virtio::fs::macos::passthrough::ROOT_INODE;
    use crate::virtio::fs::macos::test_utils::{self, posix_fs, posix_server as server, Share};
    use crate::virtio::fs::test_utils::{self as fuse, Request, Session, REQ_ADDR, SESSION_MEM};

    /// The shared fixture, plus `link` -> /etc/passwd in the share.
    fn share() -> Share {
        let s = test_utils::share();
        std::os::unix::fs::symlink("/etc/passwd", s.share.join("link")).unwrap();
        s
    }

    fn raw(opcode: u32, nodeid: u64, body: Vec<u8>) -> Request {
        Request {
            opcode,
            nodeid,
            body,
        }
    }

    fn named(opcode: u32, nodeid: u64, prefix: &[u8], names: &[&str]) -> Request {
        let mut body = prefix.to_vec();
        for n in names {
            body.extend_from_slice(CString::new(*n).unwrap().as_bytes_with_nul());
        }
        raw(opcode, nodeid, body)
    }

    /// Runs `reqs` through fuse-backend-rs's Linux server (over the same
    /// `PosixFs` operations) and through [`LinuxFuseServer`], and checks the
    /// replies are the same bytes.
    #[test]
    fn macos_server_replies_match_fuse_backend_rs_byte_for_byte() {
        use crate::virtio::fs::macos::fuse::PosixShare;
        use fuse_backend_rs::api::server::Server;

        let tmp = share();
        let ours = server(&tmp.share, false);
        let theirs = Server::new(PosixShare {
            fs: posix_fs(&tmp.share, false),
            ttl: Duration::from_secs(1),
        });
        let (mem_a, mem_b) = (guest_memory(SESSION_MEM), guest_memory(SESSION_MEM));
        let (mut a, mut b) = (Session::new(&mem_a), Session::new(&mem_b));
        let mut ha = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&ours, &mem_a, c);
        let mut hb = |c: DescriptorChain<&GuestMemoryMmap>| {
            crate::virtio::fs::worker::handle_chain(&theirs, &mem_b, c)
        };
        let init_a = a.call(&fuse::init(), &mut ha);
        assert_eq!(
            (init_a.errno(), b.call(&fuse::init(), &mut hb).errno()),
            (0, 0)
        );
        let init = *InitOut::from_slice(&init_a.body[..std::mem::size_of::<InitOut>()]).unwrap();
        assert_eq!((init.major, init.minor), (7, 31));
        assert_eq!((init.max_write, init.max_pages), (MAX_WRITE, 256));

        let root = ROOT_INODE;
        // Node ids and handles are handed out in the same order by both.
        let (hello, src, link, fh, dh) = (2, 3, 5, 1, 2);
        let reqs = [
            fuse::lookup(root, "hello.txt"),
            fuse::lookup(root, "src"),
            fuse::lookup(src, "main.rs"),
            fuse::lookup(root, "link"),
            fuse::lookup(root, "nope"),
            fuse::lookup(root, ".."),
            fuse::getattr(hello),
            fuse::getattr(src),
            fuse::getattr(99),
            named(op::READLINK, link, &[], &[]),
            fuse::open(hello, 0),
            fuse::read(hello, fh, 0, 100),
            fuse::read(hello, fh, 6, 4),
            fuse::read(hello, fh, 1000, 4),
            fuse::release(hello, fh),
            fuse::open(link, 0),
            fuse::open(src, 0),
            fuse::opendir(root),
            fuse::readdir(root, dh, 0, 4096),
            fuse::readdir(root, dh, 2, 4096),
            fuse::readdir(root, dh, 0, 64),
            fuse::getattr(hello),
        ];
        for (i, req) in reqs.iter().enumerate() {
            let (ra, rb) = (a.call(req, &mut ha), b.call(req, &mut hb));
            assert_eq!(ra.header.error, rb.header.error, "request {i}: {req:?}");
            assert_eq!(ra.body, rb.body, "request {i}: {req:?}");
        }
        // The listing is really there (not two empty replies).
        let names = a.call(&fuse::readdir(root, dh, 0, 4096), &mut ha).dirents();
        assert_eq!(names.len(), 5, "{names:?}");
    }

    #[test]
    fn macos_server_changes_reach_the_host() {
        let tmp = share();
        let root_dir = tmp.share.as_path();
        let srv = server(root_dir, false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&srv, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let root = ROOT_INODE;

        let r = s.call(&fuse::create(root, "new.txt", 0o1 | 0o100, 0o666), &mut h);
        let (node, fh) = (r.entry().nodeid, r.create_open().fh);
        assert_eq!(r.entry().attr.mode, 0o100644, "umask 022 applied");
        let w = s.call(&fuse::write(node, fh, 0, b"written by the guest"), &mut h);
        assert_eq!(w.write().size, 20);
        assert_eq!(s.call(&fuse::fsync(node, fh), &mut h).errno(), 0);
        assert_eq!(s.call(&fuse::release(node, fh), &mut h).errno(), 0);
        assert_eq!(
            fs::read(root_dir.join("new.txt")).unwrap(),
            b"written by the guest"
        );

        let d = s.call(&fuse::mkdir(root, "dir", 0o777), &mut h).entry();
        assert_eq!(d.attr.mode, 0o040755);
        let mv = fuse::rename(root, "new.txt", d.nodeid, "moved.txt");
        assert_eq!(s.call(&mv, &mut h).errno(), 0);
        assert!(root_dir.join("dir/moved.txt").exists());
        assert_eq!(s.call(&fuse::getattr(node), &mut h).attr().attr.size, 20);

        // SETATTR: truncate to 7 and set the mtime.
        let mut set = vec![0u8; 88];
        set[0..4].copy_from_slice(&(fattr::SIZE | fattr::MTIME | fattr::MODE).to_le_bytes());
        set[16..24].copy_from_slice(&7u64.to_le_bytes());
        set[40..48].copy_from_slice(&1_000_000_000u64.to_le_bytes());
        set[68..72].copy_from_slice(&0o600u32.to_le_bytes());
        let a = s.call(&raw(op::SETATTR, node, set), &mut h).attr();
        assert_eq!(
            (a.attr.size, a.attr.mtime, a.attr.mode),
            (7, 1_000_000_000, 0o100600)
        );
        assert_eq!(
            fs::read(root_dir.join("dir/moved.txt")).unwrap(),
            b"written"
        );

        // SYMLINK (name, then target) and LINK.
        let l = s.call(&named(op::SYMLINK, root, &[], &["sl", "../x"]), &mut h);
        assert_eq!(l.entry().attr.mode & 0o170000, 0o120000);
        assert_eq!(
            fs::read_link(root_dir.join("sl")).unwrap(),
            Path::new("../x")
        );
        let link = named(op::LINK, root, &node.to_le_bytes(), &["hard"]);
        assert_eq!(s.call(&link, &mut h).entry().attr.nlink, 2);

        // RENAME2 with RENAME_NOREPLACE onto an existing name.
        let mut r2 = root.to_le_bytes().to_vec();
        r2.extend_from_slice(&1u32.to_le_bytes());
        r2.extend_from_slice(&0u32.to_le_bytes());
        let noreplace = named(op::RENAME2, root, &r2, &["hard", "hello.txt"]);
        assert_eq!(s.call(&noreplace, &mut h).errno(), 17);

        assert_eq!(s.call(&fuse::unlink(root, "hard"), &mut h).errno(), 0);
        let rmdir = named(op::RMDIR, root, &[], &["dir"]);
        assert_eq!(s.call(&rmdir, &mut h).errno(), linux::ENOTEMPTY);
        let stat = s.call(&raw(op::STATFS, root, vec![]), &mut h);
        assert_eq!(stat.body.len(), 80);

        // A device node is refused; a FIFO is not served.
        let mut mknod = (0o020644u32).to_le_bytes().to_vec();
        mknod.extend_from_slice(&[0u8; 12]);
        let dev = named(op::MKNOD, root, &mknod, &["tty"]);
        assert_eq!(s.call(&dev, &mut h).errno(), linux::EPERM);
        assert!(!root_dir.join("tty").exists());
    }

    #[test]
    fn macos_server_refuses_escapes_and_read_only_changes() {
        let tmp = share();
        let srv = server(&tmp.share, true);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&srv, &mem, c);
        let root = ROOT_INODE;
        let link = s.call(&fuse::lookup(root, "link"), &mut h).entry().nodeid;
        assert_eq!(
            s.call(&fuse::lookup(link, "x"), &mut h).errno(),
            linux::ENOENT + 18,
            "ENOTDIR: a link is not a directory"
        );
        assert_eq!(
            s.call(&fuse::lookup(root, "a/b"), &mut h).errno(),
            linux::EINVAL
        );
        assert_eq!(
            s.call(&fuse::lookup(root, ".."), &mut h).entry().nodeid,
            root
        );
        let hello = s
            .call(&fuse::lookup(root, "hello.txt"), &mut h)
            .entry()
            .nodeid;
        assert_eq!(s.call(&fuse::open(hello, 1), &mut h).errno(), libc::EROFS);
        assert_eq!(
            s.call(&fuse::mkdir(root, "d", 0o755), &mut h).errno(),
            libc::EROFS
        );
        assert_eq!(
            s.call(&fuse::unlink(root, "hello.txt"), &mut h).errno(),
            libc::EROFS
        );
    }

    #[test]
    fn macos_server_survives_malformed_requests() {
        let tmp = share();
        let srv = server(&tmp.share, false);
        // Too short for a header: no reply at all.
        assert_eq!(srv.handle(&[0u8; 12]), None);
        // A header whose length exceeds the request: EINVAL.
        let mut req = fuse::getattr(ROOT_INODE).encode(9, (0, 0));
        req[0..4].copy_from_slice(&1000u32.to_le_bytes());
        let r = srv.handle(&req).unwrap();
        assert_eq!(
            i32::from_le_bytes(r[4..8].try_into().unwrap()),
            -linux::EINVAL
        );
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 9);
        // Unknown opcodes and xattrs: ENOSYS.
        for opcode in [Opcode::Getxattr as u32, 200] {
            let r = srv
                .handle(&raw(opcode, 1, vec![0; 16]).encode(1, (0, 0)))
                .unwrap();
            assert_eq!(
                i32::from_le_bytes(r[4..8].try_into().unwrap()),
                -linux::ENOSYS
            );
        }
        // A name without its NUL, a truncated body, a WRITE longer than its data.
        for req in [
            raw(op::LOOKUP, 1, b"hello.txt".to_vec()),
            raw(op::MKDIR, 1, vec![0; 3]),
            raw(op::WRITE, 1, {
                let mut b = vec![0u8; 40];
                b[16..20].copy_from_slice(&100u32.to_le_bytes());
                b
            }),
        ] {
            let r = srv.handle(&req.encode(2, (0, 0))).unwrap();
            assert_eq!(
                i32::from_le_bytes(r[4..8].try_into().unwrap()),
                -linux::EINVAL
            );
        }
        // An old protocol version is refused.
        let mut init = vec![0u8; 16];
        init[0..4].copy_from_slice(&7u32.to_le_bytes());
        init[4..8].copy_from_slice(&20u32.to_le_bytes());
        let r = srv
            .handle(&raw(op::INIT, 0, init).encode(3, (0, 0)))
            .unwrap();
        assert_eq!(
            i32::from_le_bytes(r[4..8].try_into().unwrap()),
            -linux::EPROTO
        );
        // FORGET and BATCH_FORGET get no reply, and drop the inode.
        let (node, _) = srv.fs().lookup(ROOT_INODE, c"hello.txt").unwrap();
        assert_eq!(srv.fs().inode_count(), 2);
        let forget = raw(op::FORGET, node, 1u64.to_le_bytes().to_vec());
        assert_eq!(srv.handle(&forget.encode(4, (0, 0))), None);
        assert_eq!(srv.fs().inode_count(), 1);
        let (node, _) = srv.fs().lookup(ROOT_INODE, c"src").unwrap();
        let mut batch = 1u32.to_le_bytes().to_vec();
        batch.extend_from_slice(&[0; 4]);
        batch.extend_from_slice(&node.to_le_bytes());
        batch.extend_from_slice(&1u64.to_le_bytes());
        let batch = raw(op::BATCH_FORGET, 0, batch);
        assert_eq!(srv.handle(&batch.encode(5, (0, 0))), None);
        assert_eq!(srv.fs().inode_count(), 1);
    }

    /// Random requests (any opcode, small node ids and handles, random bodies
    /// with plausible names) never panic, always echo the request ID in a
    /// well-formed reply, and never touch anything outside the share.
    #[test]
    fn macos_server_survives_random_requests() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        let Share {
            tmp: _tmp,
            share,
            outside,
        } = test_utils::share();
        fs::write(share.join("f"), b"data").unwrap();
        fs::create_dir(share.join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, share.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), share.join("s")).unwrap();
        let srv = server(&share, false);
        let names = ["f", "d", "out", "s", "..", ".", "n", "out/secret", ""];
        let fields = prop::collection::vec(0u64..8, 0..12);
        let pick = 0usize..names.len();
        let strategy = (1u32..50, 0u64..8, fields, pick.clone(), pick, any::<bool>());
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        let unique = std::sync::atomic::AtomicU64::new(0);
        runner
            .run(&strategy, |(opcode, node, fields, n1, n2, names_first)| {
                let fixed: Vec<u8> = fields.iter().flat_map(|v| v.to_le_bytes()).collect();
                let mut named = Vec::new();
                for n in [names[n1], names[n2]] {
                    named.extend_from_slice(n.as_bytes());
                    named.push(0);
                }
                let body = if names_first {
                    [named, fixed].concat()
                } else {
                    [fixed, named].concat()
                };
                let id = unique.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let req = raw(opcode, node, body).encode(id, (0, 0));
                if let Some(r) = srv.handle(&req) {
                    prop_assert!(r.len() >= OUT_HEADER_SIZE);
                    let len = u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize;
                    prop_assert_eq!(len, r.len());
                    let error = i32::from_le_bytes(r[4..8].try_into().unwrap());
                    prop_assert!(error <= 0 && error > -4096, "error {}", error);
                    prop_assert!(error == 0 || r.len() == OUT_HEADER_SIZE);
                    prop_assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), id);
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"host secret");
        let entries = fs::read_dir(&outside).unwrap().count();
        assert_eq!(entries, 1, "nothing was created outside the share");
    }

    #[test]
    fn macos_server_chain_io_is_bounded() {
        let tmp = share();
        let srv = server(&tmp.share, false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&srv, &mem, c);
        let req = fuse::getattr(ROOT_INODE).encode(1, (0, 0));
        let len = req.len() as u32;
        // A reply buffer too small for the reply: nothing is written.
        let used = s.call_raw(
            &req,
            &[Buf::read(REQ_ADDR, len), Buf::write(fuse::REPLY_ADDR, 20)],
            &mut h,
        );
        assert_eq!(used, 0);
        // A readable descriptor after a writable one is malformed.
        let used = s.call_raw(
            &req,
            &[
                Buf::read(REQ_ADDR, 20),
                Buf::write(fuse::REPLY_ADDR, 4096),
                Buf::read(REQ_ADDR + 20, len - 20),
            ],
            &mut h,
        );
        assert_eq!(used, 0);
        // A request split over two descriptors, a reply over two buffers.
        let used = s.call_raw(
            &req,
            &[
                Buf::read(REQ_ADDR, 20),
                Buf::read(REQ_ADDR + 20, len - 20),
                Buf::write(fuse::REPLY_ADDR, 50),
                Buf::write(fuse::REPLY_ADDR + 0x1000, 4096),
            ],
            &mut h,
        );
        assert_eq!(used, 16 + 104);
    }
}
