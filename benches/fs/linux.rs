// The fs bench (benches/fs.rs) on Linux, where fuse-backend-rs builds (included
// there, beside its `mod common`).

use std::hint::black_box;
use std::mem::size_of;
use std::time::{Duration, Instant};

use aivmm_devices::virtio::fs::device::fuse_server;
use aivmm_devices::virtio::fs::test_utils::{self as fuse, Request, ROOT_ID};
use aivmm_devices::virtio::fs::worker::QueueWorker;
use aivmm_devices::virtio::fs::FsConfig;
use common::{guest_memory, null_interrupt, Driver, DATA_ADDR, F_NEXT, F_WRITE, QUEUE_ADDR};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fuse_backend_rs::abi::fuse_abi::{
    Dirent, EntryOut, ForgetIn, InitOut, Opcode, OpenOut, OutHeader, ReleaseIn, WriteOut,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

/// Where requests go (up to 1 MiB + headers, for WRITE).
const REQ_ADDR: u64 = DATA_ADDR;
/// Where replies go.
const REPLY_ADDR: u64 = DATA_ADDR + 0x20_0000;
/// The reply buffer: the largest READ plus its header.
const REPLY_LEN: u32 = (1 << 20) + 0x1000;
/// Guest memory for one session.
const MEM_SIZE: usize = 0x80_0000;
/// Entries in the directory READDIR lists.
const DIR_ENTRIES: usize = 1000;
/// The READDIR buffer size Linux uses (one page).
const READDIR_SIZE: u32 = 4096;
/// The size of the file READ benches read.
const FILE_SIZE: usize = 1 << 20;

/// A driver talking to one request queue of the device, served on this thread.
struct Session {
    mem: GuestMemoryMmap,
    drv: Driver<'static>,
    worker: QueueWorker,
    unique: u64,
    ids: (u32, u32),
}

impl Session {
    fn new(root: &std::path::Path) -> Self {
        // The driver borrows the memory for the session's lifetime; the bench
        // process keeps a handful of sessions, so leaking the handle is fine.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_memory(MEM_SIZE)));
        let drv = Driver::new(mem, QUEUE_ADDR, 16);
        let server = fuse_server(&FsConfig::new(root, "bench")).unwrap();
        let worker = QueueWorker {
            index: 1,
            mem: mem.clone(),
            queue: drv.queue(),
            server,
            interrupt: null_interrupt(),
        };
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let ids = unsafe { (libc::getuid(), libc::getgid()) };
        let mut s = Self {
            mem: mem.clone(),
            drv,
            worker,
            unique: 0,
            ids,
        };
        let h = s.call(&fuse::init(), size_of::<OutHeader>() as u32 + 256);
        assert_eq!(h.error, 0, "INIT failed");
        let out: InitOut = s.body(0);
        assert!(out.max_write >= 1 << 20, "max_write {}", out.max_write);
        s
    }

    /// Sends `req` with a reply buffer of `reply_len` bytes, serves it, and
    /// returns the reply header.
    fn call(&mut self, req: &Request, reply_len: u32) -> OutHeader {
        self.serve(req, reply_len);
        let used = self.drv.used_idx();
        let h: OutHeader = self.mem.read_obj(GuestAddress(REPLY_ADDR)).unwrap();
        debug_assert_eq!(h.unique, self.unique);
        debug_assert_eq!(self.drv.used_elem(used.wrapping_sub(1)).1, h.len);
        h
    }

    /// Puts `req` on the queue with a reply buffer of `reply_len` bytes and lets
    /// the device serve it; the chain must come back used.
    fn serve(&mut self, req: &Request, reply_len: u32) {
        self.unique += 1;
        let bytes = req.encode(self.unique, self.ids);
        self.mem
            .write_slice(&bytes, GuestAddress(REQ_ADDR))
            .unwrap();
        self.drv
            .set_desc(0, REQ_ADDR, bytes.len() as u32, F_NEXT, 1);
        self.drv.set_desc(1, REPLY_ADDR, reply_len, F_WRITE, 0);
        self.drv.publish(0);
        self.worker.process_queue();
        debug_assert_eq!(self.drv.used_idx(), self.drv.avail_idx());
    }

    /// Sends a request that has no reply (FORGET): the device returns the chain
    /// with nothing written.
    fn send_no_reply(&mut self, req: &Request) {
        let before = self.drv.used_idx();
        self.serve(req, 0x100);
        assert_eq!(self.drv.used_idx(), before.wrapping_add(1));
        assert_eq!(self.drv.used_elem(before).1, 0, "a reply to FORGET");
    }

    /// The object at `off` in the reply body.
    fn body<T: ByteValued>(&self, off: usize) -> T {
        let at = REPLY_ADDR + (size_of::<OutHeader>() + off) as u64;
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn lookup(&mut self, parent: u64, name: &str) -> u64 {
        let h = self.call(&fuse::lookup(parent, name), 0x1000);
        assert_eq!(h.error, 0, "LOOKUP {name}");
        self.body::<EntryOut>(0).nodeid
    }

    fn open(&mut self, ino: u64, dir: bool) -> u64 {
        let req = if dir {
            fuse::opendir(ino)
        } else {
            fuse::open(ino, libc::O_RDONLY as u32)
        };
        let h = self.call(&req, 0x1000);
        assert_eq!(h.error, 0, "OPEN {ino}");
        self.body::<OpenOut>(0).fh
    }
}

fn raw(opcode: Opcode, nodeid: u64, body: &[u8]) -> Request {
    Request {
        opcode: opcode as u32,
        nodeid,
        body: body.to_vec(),
    }
}

fn forget(ino: u64) -> Request {
    raw(Opcode::Forget, ino, ForgetIn { nlookup: 1 }.as_slice())
}

fn releasedir(ino: u64, fh: u64) -> Request {
    let r = ReleaseIn {
        fh,
        ..Default::default()
    };
    raw(Opcode::Releasedir, ino, r.as_slice())
}

/// The shared directory: `file` (1 MiB) and `dir/` with [`DIR_ENTRIES`] files.
fn fixture() -> TempDir {
    let tmp = TempDir::new().unwrap();
    let data: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(tmp.as_path().join("file"), data).unwrap();
    let dir = tmp.as_path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..DIR_ENTRIES {
        std::fs::write(dir.join(format!("entry-{i:04}")), b"x").unwrap();
    }
    tmp
}

/// Lists a whole directory as Linux does (OPENDIR, READDIR a page at a time
/// until an empty reply, RELEASEDIR); returns the number of names seen.
fn list_dir(s: &mut Session, ino: u64) -> usize {
    let fh = s.open(ino, true);
    let mut off = 0u64;
    let mut names = 0usize;
    loop {
        let h = s.call(
            &fuse::readdir(ino, fh, off, READDIR_SIZE),
            READDIR_SIZE + 0x100,
        );
        assert_eq!(h.error, 0, "READDIR");
        let body_len = h.len as usize - size_of::<OutHeader>();
        if body_len == 0 {
            break;
        }
        let mut at = 0usize;
        while at + size_of::<Dirent>() <= body_len {
            let d: Dirent = s.body(at);
            names += 1;
            off = d.off;
            at += (size_of::<Dirent>() + d.namelen as usize + 7) & !7;
        }
    }
    let h = s.call(&releasedir(ino, fh), 0x100);
    assert_eq!(h.error, 0, "RELEASEDIR");
    names
}

fn metadata(c: &mut Criterion) {
    let tmp = fixture();
    let mut s = Session::new(tmp.as_path());
    let ino = s.lookup(ROOT_ID, "file");
    let mut g = c.benchmark_group("fs");
    g.throughput(Throughput::Elements(1));
    g.bench_function("lookup", |b| {
        let req = fuse::lookup(ROOT_ID, "file");
        b.iter(|| black_box(s.call(&req, 0x1000)))
    });
    // Each LOOKUP takes a reference on the inode (a counter); nothing grows.
    g.bench_function("getattr", |b| {
        let req = fuse::getattr(ino);
        b.iter(|| black_box(s.call(&req, 0x1000)))
    });
    g.finish();
}

fn create_write_release(c: &mut Criterion) {
    let tmp = fixture();
    let mut s = Session::new(tmp.as_path());
    let data = vec![0x5au8; 4096];
    let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
    let mut g = c.benchmark_group("fs");
    g.throughput(Throughput::Elements(1));
    let mut n = 0u64;
    g.bench_function("create_write4k_release", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let name = format!("new-{n}");
                let t = Instant::now();
                let h = s.call(&fuse::create(ROOT_ID, &name, flags, 0o100644), 0x1000);
                assert_eq!(h.error, 0, "CREATE {name}");
                let ino = s.body::<EntryOut>(0).nodeid;
                let fh = s.body::<OpenOut>(size_of::<EntryOut>()).fh;
                let h = s.call(&fuse::write(ino, fh, 0, &data), 0x100);
                assert_eq!(h.error, 0, "WRITE");
                assert_eq!(s.body::<WriteOut>(0).size, 4096);
                let h = s.call(&fuse::release(ino, fh), 0x100);
                assert_eq!(h.error, 0, "RELEASE");
                spent += t.elapsed();
                // Untimed: keep the directory and the inode table from growing.
                let h = s.call(&fuse::unlink(ROOT_ID, &name), 0x100);
                assert_eq!(h.error, 0, "UNLINK");
                s.send_no_reply(&forget(ino));
            }
            spent
        })
    });
    g.finish();
}

fn read(c: &mut Criterion) {
    let tmp = fixture();
    let mut s = Session::new(tmp.as_path());
    let ino = s.lookup(ROOT_ID, "file");
    let fh = s.open(ino, false);
    let mut g = c.benchmark_group("fs/read");
    for size in [4096u32, 1 << 20] {
        let h = s.call(&fuse::read(ino, fh, 0, size), REPLY_LEN);
        assert_eq!(
            (h.error, h.len as usize),
            (0, size_of::<OutHeader>() + size as usize)
        );
        g.throughput(Throughput::Elements(1));
        let mut rand = common::Rand::new(7);
        let blocks = (FILE_SIZE / size as usize) as u64;
        g.bench_function(
            BenchmarkId::from_parameter(format!("{}K", size / 1024)),
            |b| {
                b.iter(|| {
                    let off = rand.below(blocks) * u64::from(size);
                    black_box(s.call(&fuse::read(ino, fh, off, size), REPLY_LEN))
                })
            },
        );
    }
    g.finish();
}

fn readdir(c: &mut Criterion) {
    let tmp = fixture();
    let mut s = Session::new(tmp.as_path());
    let dir = s.lookup(ROOT_ID, "dir");
    // PassthroughFs leaves out "." and "..".
    assert_eq!(list_dir(&mut s, dir), DIR_ENTRIES);
    let mut g = c.benchmark_group("fs/readdir");
    // One element is one whole listing: OPENDIR, the READDIRs, RELEASEDIR.
    g.throughput(Throughput::Elements(1));
    g.bench_function(format!("{DIR_ENTRIES}_entries"), |b| {
        b.iter(|| black_box(list_dir(&mut s, dir)))
    });
    g.finish();
}

criterion_group!(benches, metadata, create_write_release, read, readdir);
criterion_main!(benches);
