//! A malicious guest against virtio-rng: random queues and descriptors in real
//! guest memory, served synchronously. Each case checks that the device returns
//! promptly, writes nothing outside the device-writable buffers and the used
//! ring, and still serves a good request afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_queue::QueueT;

use super::SyncHandler;
use crate::test_utils::*;

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;

fn case(input: &[u8]) -> Result<(), String> {
    let mem = hostile_memory();
    let mut src = ByteSource::new(input);
    let spec = QueueSpec {
        min_size: 1,
        shape: Shape::Writable,
        payloads: &[],
    };
    let hq = HostileQueue::write(&mem, &mut src, 0, &spec);
    let check = WriteCheck::new(&mem, &[&hq]);
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut h = SyncHandler::new(mem.clone(), hq.queue(), irq);
    bounded("process_queue", || h.process_queue())?;
    check.check(&mem)?;
    // A good request at the place the device looks next is served.
    let (next, used) = (h.queue().next_avail(), h.queue().next_used());
    let heads = hq.post(&mem, next, &[&[Buf::write(GOOD_ADDR, 16)]]);
    bounded("process_queue", || h.process_queue())?;
    let want = (u32::from(heads[0]), 16);
    if hq.used_idx(&mem) != used.wrapping_add(1) || hq.used_elem(&mem, used) != want {
        return Err(format!(
            "good request not served: used idx {} (want {}), elem {:?} (want {want:?})",
            hq.used_idx(&mem),
            used.wrapping_add(1),
            hq.used_elem(&mem, used)
        ));
    }
    Ok(())
}

/// Inputs as 64-bit words: proptest builds a vector of words much faster than one
/// of bytes, and shrinks it as well.
pub(crate) fn hostile_input() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(any::<u64>(), 0..48)
}

/// The bytes the decoder reads.
pub(crate) fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[test]
fn hostile_queues() {
    let dog = Watchdog::new("rng::hostile_queues", Duration::from_secs(30));
    let mut runner = TestRunner::new(Config {
        cases: hostile_cases(CASES),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&hostile_input(), |words| {
            let input = to_bytes(&words);
            dog.start(&input);
            let r = case(&input).map_err(TestCaseError::fail);
            dog.done();
            r
        })
        .unwrap();
}
