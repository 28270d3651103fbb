//! virtio-vsock serving hostile rx and tx queues built from the input.
#![no_main]

use std::sync::Arc;

use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::vsock::packet::Header;
use aivmm_devices::virtio::vsock::{Vsock, VsockConfig, HOST_CID, VSOCK_TYPE_STREAM};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DEV: (tempfile::TempDir, Vsock, Vec<Vec<u8>>) = {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(VsockConfig { guest_cid: 3, uds_path: dir.path().join("v.sock") })
            .unwrap();
        let payloads = (0..=8u16)
            .map(|op| {
                Header {
                    src_cid: 3,
                    dst_cid: HOST_CID,
                    src_port: 1000,
                    dst_port: 5000,
                    len: 0,
                    type_: VSOCK_TYPE_STREAM,
                    op,
                    flags: 0,
                    buf_alloc: 1 << 16,
                    fwd_cnt: 0,
                }
                .to_bytes()
                .to_vec()
            })
            .collect();
        (dir, dev, payloads)
    };
}

fuzz_target!(|data: &[u8]| {
    DEV.with(|(_, dev, payloads)| {
        let mem = hostile_memory();
        let mut src = ByteSource::new(data);
        let rx_spec = QueueSpec {
            min_size: 1,
            shape: Shape::Writable,
            payloads: &[],
        };
        let tx_spec = QueueSpec {
            min_size: 1,
            shape: Shape::Readable,
            payloads,
        };
        let rx = HostileQueue::write(&mem, &mut src, 0, &rx_spec);
        let tx = HostileQueue::write(&mem, &mut src, 1, &tx_spec);
        let check = WriteCheck::new(&mem, &[&rx, &tx]);
        let irq = Arc::new(RecordingVirtioInterrupt::default());
        let mut w = dev
            .sync_worker(mem.clone(), rx.queue(), tx.queue(), irq)
            .unwrap();
        w.process_queues();
        check.check(&mem).unwrap();
    });
});
