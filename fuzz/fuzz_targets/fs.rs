//! virtio-fs serving a hostile request queue built from the input, on a scratch share.
#![no_main]

use std::sync::Arc;

use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::fs::device::fuse_server;
use aivmm_devices::virtio::fs::filesystem::ShareFs;
use aivmm_devices::virtio::fs::test_utils::{self as fuse, ROOT_ID};
use aivmm_devices::virtio::fs::worker::QueueWorker;
use aivmm_devices::virtio::fs::FsConfig;
use fuse_backend_rs::api::server::Server;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DEV: (tempfile::TempDir, Arc<Server<ShareFs>>, Vec<Vec<u8>>) = {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let server = fuse_server(&FsConfig::new(dir.path(), "work")).unwrap();
        let rw = libc_o_rdwr();
        let payloads = [
            fuse::init(),
            fuse::lookup(ROOT_ID, "f"),
            fuse::lookup(ROOT_ID, ".."),
            fuse::getattr(ROOT_ID),
            fuse::open(2, rw),
            fuse::read(2, 0, 0, 4096),
            fuse::write(2, 0, 0, b"data"),
            fuse::readdir(ROOT_ID, 0, 0, 4096),
            fuse::mkdir(ROOT_ID, "d", 0o755),
            fuse::create(ROOT_ID, "f", rw | 0o100, 0o644),
            fuse::unlink(ROOT_ID, "f"),
            fuse::rename(ROOT_ID, "f", 2, "g"),
        ]
        .iter()
        .enumerate()
        .map(|(i, r)| r.encode(i as u64 + 1, (1000, 1000)))
        .collect();
        (dir, server, payloads)
    };
}

/// O_RDWR on Linux.
fn libc_o_rdwr() -> u32 {
    2
}

fuzz_target!(|data: &[u8]| {
    DEV.with(|(_, server, payloads)| {
        let mem = hostile_memory();
        let mut src = ByteSource::new(data);
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
        w.process_queue();
        check.check(&mem).unwrap();
    });
});
