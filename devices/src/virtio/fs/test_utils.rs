//! FUSE requests built by hand, and a session that sends them through a mock
//! virtqueue in real guest memory, for virtio-fs tests and benches.
//!
//! Built for `cfg(test)` and with the `test-utils` feature. Helpers panic on setup
//! errors and on replies too short to parse: they only see what a test chose.
#![allow(clippy::unwrap_used)]

use std::mem::size_of;

pub use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, FsyncIn, GetattrIn, InHeader, InitIn, LinkIn, MkdirIn,
    MknodIn,
    Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, SetxattrIn,
    WriteIn, WriteOut, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::test_utils::{add_chain, mock_queue, Buf, MockSplitQueue, DATA_ADDR};

/// `INIT` flags a Linux guest typically offers (`fuse_abi` FsOptions bits).
pub const GUEST_INIT_FLAGS: u32 =
    0x1 | 0x8 | 0x20 | 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x4_0000 | 0x40_0000;

/// One FUSE request: the header fields and the body after the header.
#[derive(Clone, Debug)]
pub struct Request {
    /// The opcode.
    pub opcode: u32,
    /// The inode the request is about.
    pub nodeid: u64,
    /// The body after `fuse_in_header`.
    pub body: Vec<u8>,
}

impl Request {
    fn new(opcode: Opcode, nodeid: u64) -> Self {
        Self {
            opcode: opcode as u32,
            nodeid,
            body: Vec::new(),
        }
    }

    fn obj<T: ByteValued>(mut self, v: T) -> Self {
        self.body.extend_from_slice(v.as_slice());
        self
    }

    fn name(mut self, name: &str) -> Self {
        self.body.extend_from_slice(name.as_bytes());
        self.body.push(0);
        self
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.body.extend_from_slice(b);
        self
    }

    /// The request on the wire, with `unique` and a uid/gid of `ids`.
    pub fn encode(&self, unique: u64, ids: (u32, u32)) -> Vec<u8> {
        let len = size_of::<InHeader>() + self.body.len();
        let h = InHeader {
            len: u32::try_from(len).unwrap(),
            opcode: self.opcode,
            unique,
            nodeid: self.nodeid,
            uid: ids.0,
            gid: ids.1,
            pid: 1,
            padding: 0,
        };
        let mut v = h.as_slice().to_vec();
        v.extend_from_slice(&self.body);
        v
    }
}

/// `FUSE_INIT` at the server's protocol version, offering what a Linux guest does.
pub fn init() -> Request {
    init_offering(GUEST_INIT_FLAGS)
}

/// `FUSE_INIT` offering `flags` (the low 32 bits of the kernel's INIT flags).
pub fn init_offering(flags: u32) -> Request {
    Request::new(Opcode::Init, 0).obj(InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 128 * 1024,
        flags,
    })
}

/// `FUSE_DESTROY`: the guest unmounted; an `INIT` may follow.
pub fn destroy() -> Request {
    Request::new(Opcode::Destroy, 0)
}

/// `FUSE_SETATTR` of `ino` changing only the mode (chmod).
pub fn chmod(ino: u64, mode: u32) -> Request {
    Request::new(Opcode::Setattr, ino).obj(SetattrIn {
        valid: 0x1, // FATTR_MODE
        mode,
        ..SetattrIn::default()
    })
}

/// `FUSE_SETATTR` of `ino` changing only the owner and group (chown).
pub fn chown(ino: u64, uid: u32, gid: u32) -> Request {
    Request::new(Opcode::Setattr, ino).obj(SetattrIn {
        valid: 0x2 | 0x4, // FATTR_UID | FATTR_GID
        uid,
        gid,
        ..SetattrIn::default()
    })
}

/// `FUSE_SETATTR` of `ino` changing only the size (truncate).
pub fn truncate(ino: u64, size: u64) -> Request {
    Request::new(Opcode::Setattr, ino).obj(SetattrIn {
        valid: 0x8, // FATTR_SIZE
        size,
        ..SetattrIn::default()
    })
}

/// `FUSE_RMDIR` of `name` in `parent`.
pub fn rmdir(parent: u64, name: &str) -> Request {
    Request::new(Opcode::Rmdir, parent).name(name)
}

/// `FUSE_LINK` of `ino` as `name` in `parent`.
pub fn link(ino: u64, parent: u64, name: &str) -> Request {
    Request::new(Opcode::Link, parent)
        .obj(LinkIn { oldnodeid: ino })
        .name(name)
}

/// `FUSE_SYMLINK` of `name` in `parent`, pointing at `target`.
pub fn symlink(parent: u64, name: &str, target: &str) -> Request {
    Request::new(Opcode::Symlink, parent).name(name).name(target)
}

/// `FUSE_MKNOD` of `name` in `parent` with `mode` (type bits included).
pub fn mknod(parent: u64, name: &str, mode: u32) -> Request {
    Request::new(Opcode::Mknod, parent)
        .obj(MknodIn {
            mode,
            rdev: 0,
            umask: 0o022,
            padding: 0,
        })
        .name(name)
}

/// `FUSE_SETXATTR` of `name` to `value` on `ino`.
pub fn setxattr(ino: u64, name: &str, value: &[u8]) -> Request {
    Request::new(Opcode::Setxattr, ino)
        .obj(SetxattrIn {
            size: u32::try_from(value.len()).unwrap(),
            flags: 0,
        })
        .name(name)
        .bytes(value)
}

/// `FUSE_REMOVEXATTR` of `name` on `ino`.
pub fn removexattr(ino: u64, name: &str) -> Request {
    Request::new(Opcode::Removexattr, ino).name(name)
}

/// `FUSE_LOOKUP` of `name` in `parent`.
pub fn lookup(parent: u64, name: &str) -> Request {
    Request::new(Opcode::Lookup, parent).name(name)
}

/// `FUSE_GETATTR` of `ino`.
pub fn getattr(ino: u64) -> Request {
    Request::new(Opcode::Getattr, ino).obj(GetattrIn::default())
}

/// `FUSE_CREATE` of `name` in `parent` with open `flags` and `mode`.
pub fn create(parent: u64, name: &str, flags: u32, mode: u32) -> Request {
    Request::new(Opcode::Create, parent)
        .obj(CreateIn {
            flags,
            mode,
            umask: 0o022,
            fuse_flags: 0,
        })
        .name(name)
}

/// `FUSE_MKDIR` of `name` in `parent`.
pub fn mkdir(parent: u64, name: &str, mode: u32) -> Request {
    Request::new(Opcode::Mkdir, parent)
        .obj(MkdirIn { mode, umask: 0o022 })
        .name(name)
}

/// `FUSE_OPEN` of `ino` with `flags`.
pub fn open(ino: u64, flags: u32) -> Request {
    Request::new(Opcode::Open, ino).obj(OpenIn {
        flags,
        ..Default::default()
    })
}

/// `FUSE_OPENDIR` of `ino`.
pub fn opendir(ino: u64) -> Request {
    Request::new(Opcode::Opendir, ino).obj(OpenIn {
        flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
        ..Default::default()
    })
}

/// `FUSE_WRITE` of `data` at `offset` through handle `fh`.
pub fn write(ino: u64, fh: u64, offset: u64, data: &[u8]) -> Request {
    write_in(ino, data, WriteIn {
        fh,
        offset,
        ..Default::default()
    })
}

/// `FUSE_WRITE` of `data` with `arg`'s fields (its size is set to the data's).
fn write_in(ino: u64, data: &[u8], arg: WriteIn) -> Request {
    Request::new(Opcode::Write, ino)
        .obj(WriteIn {
            size: u32::try_from(data.len()).unwrap(),
            ..arg
        })
        .bytes(data)
}

/// `FUSE_READ` of `size` bytes at `offset` through handle `fh`.
pub fn read(ino: u64, fh: u64, offset: u64, size: u32) -> Request {
    Request::new(Opcode::Read, ino).obj(ReadIn {
        fh,
        offset,
        size,
        ..Default::default()
    })
}

/// `FUSE_WRITE` of `data` at `offset` through handle `fh`, with the per-request
/// file `flags` a driver may put there.
pub fn write_with_flags(ino: u64, fh: u64, offset: u64, data: &[u8], flags: u32) -> Request {
    write_in(ino, data, WriteIn {
        fh,
        offset,
        flags,
        ..Default::default()
    })
}

/// `FUSE_WRITE` with the kernel's `write_flags` (e.g. `WRITE_KILL_PRIV`).
pub fn write_marked(ino: u64, fh: u64, offset: u64, data: &[u8], write_flags: u32) -> Request {
    write_in(ino, data, WriteIn {
        fh,
        offset,
        fuse_flags: write_flags,
        ..Default::default()
    })
}

/// `FUSE_READ` with the per-request file `flags`.
pub fn read_with_flags(ino: u64, fh: u64, offset: u64, size: u32, flags: u32) -> Request {
    Request::new(Opcode::Read, ino).obj(ReadIn {
        fh,
        offset,
        size,
        flags,
        ..Default::default()
    })
}

/// `FUSE_READDIR` of `size` bytes from `offset` through handle `fh`.
pub fn readdir(ino: u64, fh: u64, offset: u64, size: u32) -> Request {
    Request::new(Opcode::Readdir, ino).obj(ReadIn {
        fh,
        offset,
        size,
        ..Default::default()
    })
}

/// `FUSE_RENAME` of `olddir/oldname` to `newdir/newname`.
pub fn rename(olddir: u64, oldname: &str, newdir: u64, newname: &str) -> Request {
    Request::new(Opcode::Rename, olddir)
        .obj(RenameIn { newdir })
        .name(oldname)
        .name(newname)
}

/// `FUSE_UNLINK` of `name` in `parent`.
pub fn unlink(parent: u64, name: &str) -> Request {
    Request::new(Opcode::Unlink, parent).name(name)
}

/// `FUSE_FSYNC` of handle `fh`.
pub fn fsync(ino: u64, fh: u64) -> Request {
    Request::new(Opcode::Fsync, ino).obj(FsyncIn {
        fh,
        ..Default::default()
    })
}

/// `FUSE_RELEASE` of handle `fh`.
pub fn release(ino: u64, fh: u64) -> Request {
    Request::new(Opcode::Release, ino).obj(ReleaseIn {
        fh,
        ..Default::default()
    })
}

/// A parsed reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The bytes the device said it wrote (the used length).
    pub used_len: u32,
    /// The reply header.
    pub header: OutHeader,
    /// The body after the header.
    pub body: Vec<u8>,
}

impl Reply {
    /// The error as a positive errno (0 for success).
    pub fn errno(&self) -> i32 {
        -self.header.error
    }

    fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.errno(), 0, "reply is an error: {:?}", self.header);
        *T::from_slice(&self.body[..size_of::<T>()]).unwrap()
    }

    /// The body as `fuse_entry_out`.
    pub fn entry(&self) -> EntryOut {
        self.obj()
    }

    /// The body as `fuse_attr_out`.
    pub fn attr(&self) -> AttrOut {
        self.obj()
    }

    /// The body as `fuse_open_out` (also after the entry of a CREATE reply).
    pub fn open(&self) -> OpenOut {
        self.obj()
    }

    /// The `fuse_open_out` of a CREATE reply.
    pub fn create_open(&self) -> OpenOut {
        let off = size_of::<EntryOut>();
        *OpenOut::from_slice(&self.body[off..off + size_of::<OpenOut>()]).unwrap()
    }

    /// The body as `fuse_write_out`.
    pub fn write(&self) -> WriteOut {
        self.obj()
    }

    /// The names in a READDIR reply, with their inode numbers.
    pub fn dirents(&self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        while rest.len() >= size_of::<Dirent>() {
            let d = *Dirent::from_slice(&rest[..size_of::<Dirent>()]).unwrap();
            let name_end = size_of::<Dirent>() + d.namelen as usize;
            let name = String::from_utf8_lossy(&rest[size_of::<Dirent>()..name_end]).into_owned();
            out.push((d.ino, name));
            let rec = (name_end + 7) & !7;
            rest = &rest[rec.min(rest.len())..];
        }
        out
    }
}

/// Where a session writes requests, and where the device writes replies.
pub const REQ_ADDR: u64 = DATA_ADDR;
/// The reply buffer (1 MiB + a page, enough for the largest READ).
pub const REPLY_ADDR: u64 = DATA_ADDR + 0x20_0000;
/// The reply buffer's size.
pub const REPLY_LEN: u32 = 0x10_1000;
/// Guest memory a session needs.
pub const SESSION_MEM: usize = 0x80_0000;

/// A driver's view of one request queue: each call writes a request, posts it as
/// a two-descriptor chain (request readable, reply buffer writable), and runs the
/// device's handler on what the device side pops.
pub struct Session<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The driver side of the queue.
    pub mq: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The device side of the queue.
    pub queue: Queue,
    /// The uid/gid put in request headers: 0:0 unless a test sets them. A share
    /// made by root acts as that caller, so 0:0 is the owner of the files a test
    /// made; a share made by a normal user ignores them.
    pub ids: (u32, u32),
    unique: u64,
}

impl<'a> Session<'a> {
    /// A session on a 16-entry queue in `mem` (at least [`SESSION_MEM`] bytes).
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mq = mock_queue(mem, 16);
        let queue = mq.create_queue::<Queue>().unwrap();
        Self {
            mem,
            mq,
            queue,
            ids: (0, 0),
            unique: 0,
        }
    }

    /// Sends raw `bytes` with `bufs` describing the chain, and runs `handle` on it;
    /// returns the used length.
    pub fn call_raw(
        &mut self,
        bytes: &[u8],
        bufs: &[Buf],
        handle: &mut dyn FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> u32 {
        self.mem.write_slice(bytes, GuestAddress(REQ_ADDR)).unwrap();
        add_chain(&self.mq, 0, bufs);
        let chain = self.queue.pop_descriptor_chain(self.mem).unwrap();
        let head = chain.head_index();
        let len = handle(chain);
        self.queue.add_used(self.mem, head, len).unwrap();
        len
    }

    /// Sends `req` and returns the used length, without parsing a reply (the
    /// server answers `DESTROY` but reports 0 bytes used).
    pub fn send(
        &mut self,
        req: &Request,
        handle: &mut dyn FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> u32 {
        self.unique += 1;
        let bytes = req.encode(self.unique, self.ids);
        let bufs = [
            Buf::read(REQ_ADDR, u32::try_from(bytes.len()).unwrap()),
            Buf::write(REPLY_ADDR, REPLY_LEN),
        ];
        self.call_raw(&bytes, &bufs, handle)
    }

    /// Sends `req` and returns the parsed reply.
    pub fn call(
        &mut self,
        req: &Request,
        handle: &mut dyn FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> Reply {
        self.unique += 1;
        let bytes = req.encode(self.unique, self.ids);
        let bufs = [
            Buf::read(REQ_ADDR, u32::try_from(bytes.len()).unwrap()),
            Buf::write(REPLY_ADDR, REPLY_LEN),
        ];
        let used_len = self.call_raw(&bytes, &bufs, handle);
        let mut hdr = [0u8; size_of::<OutHeader>()];
        self.mem
            .read_slice(&mut hdr, GuestAddress(REPLY_ADDR))
            .unwrap();
        let header = *OutHeader::from_slice(&hdr).unwrap();
        assert_eq!(header.unique, self.unique, "reply to another request");
        assert_eq!(header.len, used_len, "header length != used length");
        let body_len = (header.len as usize).saturating_sub(size_of::<OutHeader>());
        let mut body = vec![0u8; body_len];
        self.mem
            .read_slice(
                &mut body,
                GuestAddress(REPLY_ADDR + size_of::<OutHeader>() as u64),
            )
            .unwrap();
        Reply {
            used_len,
            header,
            body,
        }
    }
}
