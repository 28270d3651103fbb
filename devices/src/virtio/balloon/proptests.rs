//! A malicious guest against virtio-balloon: random queues and descriptors in
//! real guest memory on all four queues, served synchronously. Each case checks
//! that the device returns promptly, writes nothing outside the used rings (the
//! balloon writes no buffer; discarding is stubbed out here and tested on its
//! own), and still serves a good inflate request afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_queue::QueueT;

use super::SyncHandler;
use crate::test_utils::*;
use crate::virtio::rng::proptests::{hostile_input, to_bytes};

/// Cases per run (debug build, CI).
const CASES: u32 = 30_000;

fn case(input: &[u8]) -> Result<(), String> {
    let mem = hostile_memory();
    let mut src = ByteSource::new(input);
    let spec = QueueSpec {
        min_size: 1,
        shape: Shape::Request,
        payloads: &[],
    };
    let hqs: Vec<HostileQueue> = (0..4).map(|i| HostileQueue::write(&mem, &mut src, i, &spec)).collect();
    let check = WriteCheck::new(&mem, &hqs.iter().collect::<Vec<_>>());
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let queues = [hqs[0].queue(), hqs[1].queue(), hqs[2].queue(), hqs[3].queue()];
    let mut h = SyncHandler::new(mem.clone(), queues, irq).map_err(|e| e.to_string())?;
    bounded("process_all", || h.process_all())?;
    check.check(&mem)?;
    // A good inflate request at the place the device looks next is served.
    let q = h.queues()[0];
    let (next, used) = (q.next_avail(), q.next_used());
    let heads = hqs[0].post(&mem, next, &[&[Buf::read(GOOD_ADDR, 8)]]);
    bounded("process_all", || h.process_all())?;
    let want = (u32::from(heads[0]), 0);
    if hqs[0].used_idx(&mem) != used.wrapping_add(1) || hqs[0].used_elem(&mem, used) != want {
        return Err(format!(
            "good request not served: used idx {} (want {}), elem {:?} (want {want:?})",
            hqs[0].used_idx(&mem),
            used.wrapping_add(1),
            hqs[0].used_elem(&mem, used)
        ));
    }
    Ok(())
}

#[test]
fn hostile_queues() {
    let dog = Watchdog::new("balloon::hostile_queues", Duration::from_secs(30));
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
