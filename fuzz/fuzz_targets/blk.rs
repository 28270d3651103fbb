//! virtio-blk serving a hostile queue built from the input, on a 64 KiB image.
#![no_main]

use std::sync::Arc;

use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::block::{Block, BlockConfig};
use aivmm_devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DEV: (tempfile::TempDir, Block) = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(64 << 10).unwrap();
        let mut blk = Block::new(BlockConfig { path, read_only: false, id: None }).unwrap();
        blk.ack_features(blk.features());
        (dir, blk)
    };
}

fuzz_target!(|data: &[u8]| {
    // Request headers: type (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES), sector.
    let payloads: Vec<Vec<u8>> = [0u32, 1, 4, 8, 11, 13]
        .iter()
        .map(|t| {
            let mut h = t.to_le_bytes().to_vec();
            h.resize(16, 0);
            h
        })
        .collect();
    let mem = hostile_memory();
    let mut src = ByteSource::new(data);
    let spec = QueueSpec {
        min_size: 4,
        shape: Shape::Request,
        payloads: &payloads,
    };
    let hq = HostileQueue::write(&mem, &mut src, 0, &spec);
    let check = WriteCheck::new(&mem, &[&hq]);
    DEV.with(|(_, blk)| {
        let irq = Arc::new(RecordingVirtioInterrupt::default());
        blk.sync_handler(mem.clone(), hq.queue(), irq)
            .process_queue();
    });
    check.check(&mem).unwrap();
});
