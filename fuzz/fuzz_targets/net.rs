//! virtio-net serving hostile rx and tx queues built from the input, against an
//! in-memory backend that always has a frame.
#![no_main]

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::net::{Backend, SyncWorker};
use libfuzzer_sys::fuzz_target;
/// Frames in memory; the socket is only there to be polled.
struct Loop {
    sock: UnixDatagram,
    _peer: UnixDatagram,
}

impl Backend for Loop {
    fn name(&self) -> &'static str {
        "loop"
    }
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<bool> {
        Ok(true)
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let n = 60.min(buf.len());
        buf[..n].fill(0x5a);
        Ok(Some(n))
    }
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = hostile_memory();
    let mut src = ByteSource::new(data);
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xab; 60]);
    let payloads = [frame];
    let rx_spec = QueueSpec {
        min_size: 1,
        shape: Shape::Writable,
        payloads: &[],
    };
    let tx_spec = QueueSpec {
        min_size: 1,
        shape: Shape::Readable,
        payloads: &payloads,
    };
    let rx = HostileQueue::write(&mem, &mut src, 0, &rx_spec);
    let tx = HostileQueue::write(&mem, &mut src, 1, &tx_spec);
    let mrg = src.one_in(2);
    let check = WriteCheck::new(&mem, &[&rx, &tx]);
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut w = SyncWorker::new(
        mem.clone(),
        rx.queue(),
        tx.queue(),
        irq,
        Box::new({
            let (a, b) = UnixDatagram::pair().unwrap();
            Loop { sock: a, _peer: b }
        }),
        if mrg { 1 << 15 } else { 0 }, // VIRTIO_NET_F_MRG_RXBUF
    )
    .unwrap();
    w.process();
    check.check(&mem).unwrap();
});
