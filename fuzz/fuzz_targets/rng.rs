//! virtio-rng serving a hostile queue built from the input.
#![no_main]

use std::sync::Arc;

use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::rng::SyncHandler;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mem = hostile_memory();
    let mut src = ByteSource::new(data);
    let spec = QueueSpec {
        min_size: 1,
        shape: Shape::Writable,
        payloads: &[],
    };
    let hq = HostileQueue::write(&mem, &mut src, 0, &spec);
    let check = WriteCheck::new(&mem, &[&hq]);
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut h = SyncHandler::new(mem.clone(), hq.queue(), irq);
    h.process_queue();
    check.check(&mem).unwrap();
});
