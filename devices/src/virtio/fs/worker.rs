//! The queue workers: one thread per ready queue, each running the shared worker
//! loop (`queue_thread::run_worker`) on its queue's notification `EventFd` and the
//! device's kill `EventFd`.
//!
//! On each wake a worker drains its available ring: [`handle_chain`] turns a chain
//! into a FUSE `Reader` (the readable descriptors) and `Writer` (the writable
//! ones), lets the server answer, and the chain goes on the used ring with the
//! reply's length. A chain the transport layer cannot map (outside guest memory,
//! overflowing lengths) or that does not decode goes back with length 0.

use std::sync::Arc;

#[cfg(target_os = "linux")]
use fuse_backend_rs::api::filesystem::FileSystem;
#[cfg(target_os = "linux")]
use fuse_backend_rs::api::server::Server;
#[cfg(target_os = "linux")]
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
#[cfg(target_os = "linux")]
use log::debug;
#[cfg(target_os = "linux")]
use virtio_queue::DescriptorChain;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

#[cfg(all(test, target_os = "linux"))]
use super::filesystem::ShareFs;
use super::FsServer;
use crate::virtio::queue_thread::drain_queue;
use crate::virtio::VirtioInterrupt;

/// Serves one chain and returns the number of bytes written into it.
#[cfg(target_os = "linux")]
pub fn handle_chain(
    server: &Server<impl FileSystem + Sync>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let head = chain.head_index();
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            debug!("virtio-fs: chain {head}: bad readable part: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            debug!("virtio-fs: chain {head}: bad writable part: {e}");
            return 0;
        }
    };
    match server.handle_message(reader, Writer::VirtioFs(writer), None, None) {
        // The reply fits the chain's writable buffers; saturate rather than trust it.
        Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Err(e) => {
            debug!("virtio-fs: chain {head}: request failed: {e}");
            0
        }
    }
}

/// One queue and what serving it needs.
pub struct QueueWorker {
    /// The queue's index (0 is the high-priority queue).
    pub index: usize,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queue.
    pub queue: Queue,
    /// The FUSE server, shared by all queues of the device.
    pub server: Arc<dyn FsServer>,
    /// Raises the device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl QueueWorker {
    /// Serves every available chain, then raises the interrupt if the driver wants it.
    pub fn process_queue(&mut self) {
        let (mem, server) = (&self.mem, &self.server);
        let what = format!("virtio-fs: queue {}", self.index);
        drain_queue(&mut self.queue, mem, &*self.interrupt, &what, |chain| {
            server.handle_chain(mem, chain)
        });
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::MetadataExt;

    use fuse_backend_rs::abi::fuse_abi::{InHeader, InitOut, Opcode};
    use vm_memory::ByteValued;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::test_utils::{guest_memory, Buf};
    use crate::virtio::fs::device::fuse_server;
    use crate::virtio::fs::test_utils::{self as fuse, Session, REQ_ADDR, ROOT_ID, SESSION_MEM};
    use crate::virtio::fs::FsConfig;

    fn setup(read_only: bool) -> (TempDir, Arc<Server<ShareFs>>) {
        let tmp = TempDir::new().unwrap();
        fs::write(tmp.as_path().join("hello.txt"), b"hello from the host").unwrap();
        let mut cfg = FsConfig::new(tmp.as_path(), "work");
        cfg.read_only = read_only;
        let server = fuse_server(&cfg).unwrap();
        (tmp, server)
    }

    /// A READ or WRITE whose per-request flags the host cannot set on the handle's
    /// fd (here O_NOATIME from a caller who does not own the file) must fail or be
    /// ignored without closing that fd: fuse-backend-rs closes it on that path,
    /// and the handle then reads and writes whatever file takes the number next.
    #[test]
    fn per_request_flags_never_close_a_handles_fd() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (a share made by root acts as its caller)");
            return;
        }
        let (tmp, server) = setup(false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
        let r = s.call(&fuse::create(ROOT_ID, "mine.txt", flags, 0o666), &mut h);
        let (ino, fh) = (r.entry().nodeid, r.create_open().fh);
        assert_eq!(s.call(&fuse::write(ino, fh, 0, b"root's data"), &mut h).write().size, 11);

        // Another guest user, through the same open handle, with O_NOATIME.
        s.ids = (1000, 1000);
        let noatime = (libc::O_RDWR | libc::O_NOATIME) as u32;
        for _ in 0..3 {
            let _ = s.call(&fuse::write_with_flags(ino, fh, 0, b"ROOT", noatime), &mut h);
            let _ = s.call(&fuse::read_with_flags(ino, fh, 0, 4, noatime), &mut h);
        }
        s.ids = (0, 0);
        let r = s.call(&fuse::read(ino, fh, 0, 64), &mut h);
        assert_eq!(r.errno(), 0, "the handle's fd was closed under it");
        assert!(r.body.ends_with(b"'s data"), "read {:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(s.call(&fuse::release(ino, fh), &mut h).errno(), 0);
        drop(tmp);
    }

    /// INIT takes HANDLE_KILLPRIV_V2 when the guest offers it (so the guest does
    /// not ask for security.capability before every write), and the promise holds:
    /// a write the guest marks KILL_SUIDGID clears a setuid bit on the host, even
    /// for root, whose CAP_FSETID would keep it; an unmarked one by root keeps it.
    #[test]
    fn a_kill_suidgid_write_clears_setuid_on_the_host() {
        use fuse_backend_rs::abi::fuse_abi::WRITE_KILL_PRIV;
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (only root's write keeps a setuid bit)");
            return;
        }
        let (tmp, server) = setup(false);
        let file = tmp.as_path().join("tool");
        fs::write(&file, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o4755)).unwrap();
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        let killpriv_v2 = 0x1000_0000;
        let r = s.call(&fuse::init_offering(fuse::GUEST_INIT_FLAGS | killpriv_v2), &mut h);
        assert_eq!(r.errno(), 0);
        let init = *InitOut::from_slice(&r.body[..std::mem::size_of::<InitOut>()]).unwrap();
        assert_ne!(init.flags & killpriv_v2, 0, "INIT flags {:#x}", init.flags);

        let ino = s.call(&fuse::lookup(ROOT_ID, "tool"), &mut h).entry().nodeid;
        let fh = s.call(&fuse::open(ino, libc::O_RDWR as u32), &mut h).open().fh;
        let mode = || fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
        assert_eq!(s.call(&fuse::write(ino, fh, 0, b"#"), &mut h).write().size, 1);
        assert_eq!(mode(), 0o4755, "root's unmarked write keeps setuid, as on the host");
        let r = s.call(&fuse::write_marked(ino, fh, 0, b"#", WRITE_KILL_PRIV), &mut h);
        assert_eq!(r.write().size, 1);
        assert_eq!(mode(), 0o755, "a KILL_SUIDGID write clears setuid");
        assert_eq!(s.call(&fuse::release(ino, fh), &mut h).errno(), 0);
    }

    #[test]
    fn fuse_round_trip_reaches_the_host() {
        let (tmp, server) = setup(false);
        let root = tmp.as_path();
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);

        let r = s.call(&fuse::init(), &mut h);
        assert_eq!(r.errno(), 0);
        let init = *InitOut::from_slice(&r.body[..std::mem::size_of::<InitOut>()]).unwrap();
        assert_eq!(init.max_write, 1 << 20, "MAX_PAGES gives 1 MiB writes");

        let hello = s.call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h).entry();
        assert_eq!(hello.attr.size, 19);
        assert_eq!(
            s.call(&fuse::lookup(ROOT_ID, "nope"), &mut h).errno(),
            libc::ENOENT
        );
        let attr = s.call(&fuse::getattr(ROOT_ID), &mut h).attr();
        assert_eq!(attr.attr.ino, fs::metadata(root).unwrap().ino());

        // CREATE + WRITE + FSYNC: the bytes are on the host, owned by the host user
        // even though the request came from guest uid 1000.
        let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
        let r = s.call(&fuse::create(ROOT_ID, "new.txt", flags, 0o644), &mut h);
        let (ino, fh) = (r.entry().nodeid, r.create_open().fh);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(
            s.call(&fuse::write(ino, fh, 0, &data), &mut h).write().size,
            100_000
        );
        assert_eq!(
            s.call(&fuse::write(ino, fh, 100_000, b"tail"), &mut h)
                .write()
                .size,
            4
        );
        assert_eq!(s.call(&fuse::fsync(ino, fh), &mut h).errno(), 0);
        let on_host = fs::read(root.join("new.txt")).unwrap();
        assert_eq!(&on_host[..100_000], &data[..]);
        assert_eq!(&on_host[100_000..], b"tail");
        let meta = fs::metadata(root.join("new.txt")).unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(meta.uid(), unsafe { libc::geteuid() });

        // READ back a slice, and READ the host's file.
        let r = s.call(&fuse::read(ino, fh, 99_990, 64), &mut h);
        assert_eq!(r.body, [&data[99_990..], b"tail"].concat());
        let fh2 = s
            .call(&fuse::open(hello.nodeid, libc::O_RDONLY as u32), &mut h)
            .open()
            .fh;
        let r = s.call(&fuse::read(hello.nodeid, fh2, 11, 100), &mut h);
        assert_eq!(r.body, b"the host");
        assert_eq!(s.call(&fuse::release(ino, fh), &mut h).errno(), 0);

        // MKDIR + RENAME into it.
        let sub = s
            .call(&fuse::mkdir(ROOT_ID, "sub", 0o755), &mut h)
            .entry()
            .nodeid;
        assert!(root.join("sub").is_dir());
        let r = s.call(&fuse::rename(ROOT_ID, "new.txt", sub, "moved.txt"), &mut h);
        assert_eq!(r.errno(), 0);
        assert!(!root.join("new.txt").exists());
        assert_eq!(fs::read(root.join("sub/moved.txt")).unwrap(), on_host);

        // READDIR of the root.
        let dfh = s.call(&fuse::opendir(ROOT_ID), &mut h).open().fh;
        let mut names: Vec<String> = s
            .call(&fuse::readdir(ROOT_ID, dfh, 0, 4096), &mut h)
            .dirents()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        names.sort();
        assert_eq!(names, ["hello.txt", "sub"]);

        // UNLINK.
        assert_eq!(s.call(&fuse::unlink(sub, "moved.txt"), &mut h).errno(), 0);
        assert!(!root.join("sub/moved.txt").exists());
    }

    #[test]
    fn read_only_share_over_fuse() {
        let (tmp, server) = setup(true);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let hello = s
            .call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h)
            .entry()
            .nodeid;
        let wr = s.call(&fuse::open(hello, libc::O_WRONLY as u32), &mut h);
        assert_eq!(wr.errno(), libc::EROFS);
        assert_eq!(
            s.call(&fuse::mkdir(ROOT_ID, "d", 0o755), &mut h).errno(),
            libc::EROFS
        );
        let cr = fuse::create(ROOT_ID, "c", (libc::O_RDWR | libc::O_CREAT) as u32, 0o644);
        assert_eq!(s.call(&cr, &mut h).errno(), libc::EROFS);
        assert_eq!(
            s.call(&fuse::unlink(ROOT_ID, "hello.txt"), &mut h).errno(),
            libc::EROFS
        );
        let fh = s
            .call(&fuse::open(hello, libc::O_RDONLY as u32), &mut h)
            .open()
            .fh;
        assert_eq!(s.call(&fuse::read(hello, fh, 0, 5), &mut h).body, b"hello");
        assert_eq!(
            s.call(&fuse::write(hello, fh, 0, b"x"), &mut h).errno(),
            libc::EROFS
        );
        assert_eq!(fs::read_dir(tmp.as_path()).unwrap().count(), 1);
        assert_eq!(
            fs::read(tmp.as_path().join("hello.txt")).unwrap(),
            b"hello from the host"
        );
    }

    #[test]
    fn session_can_be_initialised_again() {
        let (_tmp, server) = setup(false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let a = s.call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h).entry();
        let destroy = fuse::Request {
            opcode: Opcode::Destroy as u32,
            nodeid: 0,
            body: vec![],
        };
        s.call_raw(
            &destroy.encode(99, (0, 0)),
            &[Buf::read(REQ_ADDR, 40), Buf::write(fuse::REPLY_ADDR, 64)],
            &mut h,
        );
        // The old inode is gone; a new INIT serves the tree again.
        assert_eq!(
            s.call(&fuse::getattr(a.nodeid), &mut h).errno(),
            libc::EBADF
        );
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        assert_eq!(
            s.call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h).errno(),
            0
        );
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let (_tmp, server) = setup(false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let good = fuse::lookup(ROOT_ID, "hello.txt").encode(7, (0, 0));
        let glen = good.len() as u32;
        let reply = Buf::write(fuse::REPLY_ADDR, 4096);
        let cases: Vec<(Vec<u8>, Vec<Buf>)> = vec![
            // Request buffer outside guest memory; straddling its end.
            (good.clone(), vec![Buf::read(0x1000_0000, glen), reply]),
            (
                good.clone(),
                vec![Buf::read(SESSION_MEM as u64 - 8, glen), reply],
            ),
            // Reply buffer outside guest memory.
            (
                good.clone(),
                vec![Buf::read(REQ_ADDR, glen), Buf::write(u64::MAX - 16, 64)],
            ),
            // No reply buffer; a reply buffer too small for the reply.
            (good.clone(), vec![Buf::read(REQ_ADDR, glen)]),
            (
                good.clone(),
                vec![Buf::read(REQ_ADDR, glen), Buf::write(fuse::REPLY_ADDR, 8)],
            ),
            // Truncated header; header only; lengths that lie.
            (good[..10].to_vec(), vec![Buf::read(REQ_ADDR, 10), reply]),
            (good[..40].to_vec(), vec![Buf::read(REQ_ADDR, 40), reply]),
            (good.clone(), vec![Buf::read(REQ_ADDR, glen - 3), reply]),
            // Only writable buffers.
            (good.clone(), vec![Buf::write(REQ_ADDR, glen), reply]),
        ];
        for (i, (bytes, bufs)) in cases.iter().enumerate() {
            let len = s.call_raw(bytes, bufs, &mut h);
            assert!(len <= 4096, "case {i}: {len}");
        }
        // Header lengths: zero, huge; an unknown opcode gets ENOSYS.
        for (len, opcode) in [
            (0u32, Opcode::Lookup as u32),
            (u32::MAX, Opcode::Lookup as u32),
            (40, 9999),
        ] {
            let hdr = InHeader {
                len,
                opcode,
                unique: 5,
                nodeid: ROOT_ID,
                ..Default::default()
            };
            s.call_raw(hdr.as_slice(), &[Buf::read(REQ_ADDR, 40), reply], &mut h);
        }
        let unknown = fuse::Request {
            opcode: 9999,
            nodeid: ROOT_ID,
            body: vec![],
        };
        assert_eq!(s.call(&unknown, &mut h).errno(), libc::ENOSYS);
        // The server still works.
        assert_eq!(
            s.call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h).errno(),
            0
        );
    }

    /// Set for the child process of `a_host_write_limit_is_an_error_for_the_guest`.
    const LIMIT_CHILD_ENV: &str = "AIVMM_FS_LIMIT_CHILD";

    /// In a child process (the limit is per process): the share's file system
    /// cannot grow past 64 KiB, like a full disk. Writes past it are errors for the
    /// guest; the worker carries on.
    #[test]
    #[ignore = "run by a_host_write_limit_is_an_error_for_the_guest in a child process"]
    fn limit_child() {
        if std::env::var_os(LIMIT_CHILD_ENV).is_none() {
            return;
        }
        // SAFETY: SIG_IGN and a plain rlimit; aivmm's main does the same for SIGXFSZ.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 65536,
                rlim_max: 65536,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
        }
        let (tmp, server) = setup(false);
        let mem = guest_memory(SESSION_MEM);
        let mut s = Session::new(&mem);
        let mut h = |c: DescriptorChain<&GuestMemoryMmap>| handle_chain(&server, &mem, c);
        assert_eq!(s.call(&fuse::init(), &mut h).errno(), 0);
        let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
        let r = s.call(&fuse::create(ROOT_ID, "big", flags, 0o644), &mut h);
        let (ino, fh) = (r.entry().nodeid, r.create_open().fh);
        let data = vec![7u8; 100_000];
        // The write stops at the limit (a short write), the next one fails.
        let r = s.call(&fuse::write(ino, fh, 0, &data), &mut h);
        assert_eq!(r.errno(), 0);
        assert_eq!(r.write().size, 65536);
        let r = s.call(&fuse::write(ino, fh, 65536, &data[..1000]), &mut h);
        assert_eq!(r.errno(), libc::EFBIG);
        assert_eq!(s.call(&fuse::fsync(ino, fh), &mut h).errno(), 0);
        // The worker still serves requests.
        assert_eq!(
            s.call(&fuse::lookup(ROOT_ID, "hello.txt"), &mut h).errno(),
            0
        );
        assert_eq!(
            fs::metadata(tmp.as_path().join("big")).unwrap().len(),
            65536
        );
        eprintln!("limit-child-ok");
    }

    #[test]
    fn a_host_write_limit_is_an_error_for_the_guest() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "virtio::fs::worker::tests::limit_child",
                "--nocapture",
            ])
            .env(LIMIT_CHILD_ENV, "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{:?}: {err}", out.status);
        assert!(err.contains("limit-child-ok"), "{err}");
    }
}
