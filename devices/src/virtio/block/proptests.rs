//! A malicious guest against virtio-blk: random queues, descriptors and request
//! headers in real guest memory, served synchronously against a small image.
//! Each case checks that the device returns promptly, writes nothing outside
//! the device-writable buffers and the used ring, and still serves a good read
//! afterwards.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{Block, BlockConfig};
use crate::test_utils::*;
use crate::virtio::rng::proptests::{hostile_input, to_bytes};
use crate::virtio::VirtioDevice;

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;
/// The image: 64 KiB, 128 sectors.
const SECTORS: u64 = 128;

/// Request headers and discard ranges a driver would send, for the decoder to
/// start from.
pub(crate) fn payloads() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for ty in [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        99,
    ] {
        for sector in [0, 1, SECTORS - 1, SECTORS, u64::MAX >> 9] {
            let mut h = ty.to_le_bytes().to_vec();
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&sector.to_le_bytes());
            v.push(h);
        }
    }
    for (sector, num, flags) in [(0u64, 8u32, 0u32), (SECTORS - 1, 1, 1), (1, u32::MAX, 0)] {
        let mut r = sector.to_le_bytes().to_vec();
        r.extend_from_slice(&num.to_le_bytes());
        r.extend_from_slice(&flags.to_le_bytes());
        v.push(r);
    }
    v
}

/// A directory whose fsync is cheap: tmpfs if there is one.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

fn case(blk: &Block, input: &[u8], payloads: &[Vec<u8>]) -> Result<(), String> {
    let mem = hostile_memory();
    let mut src = ByteSource::new(input);
    let spec = QueueSpec {
        min_size: 4,
        shape: Shape::Request,
        payloads,
    };
    let hq = HostileQueue::write(&mem, &mut src, 0, &spec);
    let check = WriteCheck::new(&mem, &[&hq]);
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut h = blk.sync_handler(mem.clone(), hq.queue(), irq);
    bounded("process_queue", || h.process_queue())?;
    check.check(&mem)?;
    // A good read of sector 0 at the place the device looks next is served.
    let (next, used) = (h.queue().next_avail(), h.queue().next_used());
    let mut hdr = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
    hdr.resize(16, 0);
    mem.write_slice(&hdr, GuestAddress(GOOD_ADDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(GOOD_ADDR + 0x400))
        .unwrap();
    let heads = hq.post(
        &mem,
        next,
        &[&[
            Buf::read(GOOD_ADDR, 16),
            Buf::write(GOOD_ADDR + 0x100, 512),
            Buf::write(GOOD_ADDR + 0x400, 1),
        ]],
    );
    bounded("process_queue", || h.process_queue())?;
    let want = (u32::from(heads[0]), 513);
    let status: u8 = mem.read_obj(GuestAddress(GOOD_ADDR + 0x400)).unwrap();
    if hq.used_idx(&mem) != used.wrapping_add(1) || hq.used_elem(&mem, used) != want || status != 0
    {
        return Err(format!(
            "good read not served: used idx {} (want {}), elem {:?} (want {want:?}), status {status}",
            hq.used_idx(&mem),
            used.wrapping_add(1),
            hq.used_elem(&mem, used)
        ));
    }
    Ok(())
}

#[test]
fn hostile_queues() {
    let dir = scratch_dir();
    let path = dir.path().join("disk.img");
    File::create(&path).unwrap().set_len(SECTORS * 512).unwrap();
    let mut blk = Block::new(BlockConfig {
        path,
        read_only: false,
        id: None,
    })
    .unwrap();
    blk.ack_features(blk.features());
    let payloads = payloads();
    let dog = Watchdog::new("block::hostile_queues", Duration::from_secs(30));
    let mut runner = TestRunner::new(Config {
        cases: hostile_cases(CASES),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&hostile_input(), |words| {
            let input = to_bytes(&words);
            dog.start(&input);
            let r = case(&blk, &input, &payloads).map_err(TestCaseError::fail);
            dog.done();
            r
        })
        .unwrap();
}
