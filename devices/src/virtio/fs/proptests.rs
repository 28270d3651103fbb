//! A malicious guest against virtio-fs: random queues, descriptors and FUSE
//! requests in real guest memory, served synchronously by a queue worker on a
//! scratch share. Each case checks that the worker returns promptly, writes
//! nothing outside the device-writable buffers and the used ring, and still
//! answers a good GETATTR afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::api::server::Server;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::device::fuse_server;
use super::filesystem::ShareFs;
use super::test_utils::{self as fuse, ROOT_ID};
use super::worker::QueueWorker;
use super::FsConfig;
use crate::test_utils::*;
use crate::virtio::rng::proptests::{hostile_input, to_bytes};

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;

/// FUSE requests a driver would send, for the decoder to start from.
pub(crate) fn payloads() -> Vec<Vec<u8>> {
    let rw = libc::O_RDWR as u32;
    let reqs = [
        fuse::init(),
        fuse::lookup(ROOT_ID, "f"),
        fuse::lookup(ROOT_ID, ".."),
        fuse::lookup(2, "d"),
        fuse::getattr(ROOT_ID),
        fuse::getattr(2),
        fuse::open(2, rw),
        fuse::opendir(ROOT_ID),
        fuse::read(2, 0, 0, 4096),
        fuse::write(2, 0, 0, b"data"),
        fuse::readdir(ROOT_ID, 0, 0, 4096),
        fuse::mkdir(ROOT_ID, "d", 0o755),
        fuse::create(ROOT_ID, "f", rw | libc::O_CREAT as u32, 0o644),
        fuse::unlink(ROOT_ID, "f"),
        fuse::rename(ROOT_ID, "f", 2, "g"),
        fuse::fsync(2, 0),
        fuse::release(2, 0),
    ];
    reqs.iter()
        .enumerate()
        .map(|(i, r)| r.encode(i as u64 + 1, (1000, 1000)))
        .collect()
}

/// Sends one good request and returns its reply header, or why there is none.
fn call(
    w: &mut QueueWorker,
    hq: &HostileQueue,
    req: &fuse::Request,
    unique: u64,
) -> Result<OutHeader, String> {
    let mem = w.mem.clone();
    let (next, used) = (w.queue.next_avail(), w.queue.next_used());
    let bytes = req.encode(unique, (1000, 1000));
    mem.write_slice(&bytes, GuestAddress(GOOD_ADDR)).unwrap();
    let heads = hq.post(
        &mem,
        next,
        &[&[
            Buf::read(GOOD_ADDR, bytes.len() as u32),
            Buf::write(GOOD_ADDR + 0x1000, 0x1000),
        ]],
    );
    bounded("process_queue", || w.process_queue())?;
    let (id, len) = hq.used_elem(&mem, used);
    let mut hb = [0u8; std::mem::size_of::<OutHeader>()];
    mem.read_slice(&mut hb, GuestAddress(GOOD_ADDR + 0x1000))
        .unwrap();
    let h = *OutHeader::from_slice(&hb).unwrap();
    if hq.used_idx(&mem) != used.wrapping_add(1)
        || id != u32::from(heads[0])
        || h.unique != unique
        || h.len != len
    {
        return Err(format!(
            "good request not answered: used idx {} (want {}), elem ({id}, {len}), header {h:?}",
            hq.used_idx(&mem),
            used.wrapping_add(1)
        ));
    }
    Ok(h)
}

fn case(server: &Arc<Server<ShareFs>>, input: &[u8], payloads: &[Vec<u8>]) -> Result<(), String> {
    let mem = hostile_memory();
    let mut src = ByteSource::new(input);
    let spec = QueueSpec {
        min_size: 2,
        shape: Shape::Request,
        payloads,
    };
    let hq = HostileQueue::write(&mem, &mut src, 0, &spec);
    let check = WriteCheck::new(&mem, &[&hq]);
    let mut w = QueueWorker {
        index: 1,
        mem: mem.clone(),
        queue: hq.queue(),
        server: server.clone(),
        interrupt: Arc::new(RecordingVirtioInterrupt::default()),
    };
    bounded("process_queue", || w.process_queue())?;
    check.check(&mem)?;
    // A good GETATTR is answered; after a DESTROY it is an error, and a new
    // INIT brings the share back.
    let h = call(&mut w, &hq, &fuse::getattr(ROOT_ID), 0xfeed)?;
    if h.error != 0 {
        let i = call(&mut w, &hq, &fuse::init(), 0xfeee)?;
        if i.error != 0 {
            return Err(format!("INIT after a hostile case failed: {i:?}"));
        }
    }
    Ok(())
}

#[test]
fn hostile_queues() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"hello").unwrap();
    let server = fuse_server(&FsConfig::new(dir.path(), "work")).unwrap();
    let payloads = payloads();
    let dog = Watchdog::new("fs::hostile_queues", Duration::from_secs(30));
    let mut runner = TestRunner::new(Config {
        cases: hostile_cases(CASES),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&hostile_input(), |words| {
            let input = to_bytes(&words);
            dog.start(&input);
            let r = case(&server, &input, &payloads).map_err(TestCaseError::fail);
            dog.done();
            r
        })
        .unwrap();
}
