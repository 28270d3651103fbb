//! A malicious guest against virtio-net: random rx and tx queues in real guest
//! memory, served synchronously against an in-memory backend that always has a
//! frame to deliver. Each case checks that the worker returns promptly, writes
//! nothing outside the device-writable buffers and the used rings, and still
//! sends and receives a good frame afterwards.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{Backend, SyncWorker, VNET_HDR_LEN};
use crate::sys::EventFd;
use crate::test_utils::*;
use crate::virtio::rng::proptests::{hostile_input, to_bytes};

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;
/// The frame the backend delivers, and the good frame the guest sends.
const FRAME_LEN: usize = 60;

/// A backend in memory: every `recv` gets a frame; `send` keeps the last frame.
struct Loop {
    fd: EventFd,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Backend for Loop {
    fn name(&self) -> &'static str {
        "loop"
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
        let mut s = self.sent.lock().unwrap();
        s.clear();
        s.extend_from_slice(frame);
        Ok(true)
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let n = FRAME_LEN.min(buf.len());
        buf[..n].fill(0x5a);
        Ok(Some(n))
    }
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn case(input: &[u8], payloads: &[Vec<u8>]) -> Result<(), String> {
    let mem = hostile_memory();
    let mut src = ByteSource::new(input);
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
    let mrg_rxbuf = src.one_in(2);
    let check = WriteCheck::new(&mem, &[&rx, &tx]);
    let sent = Arc::new(Mutex::new(Vec::new()));
    let backend = Loop {
        fd: EventFd::new(0).unwrap(),
        sent: sent.clone(),
    };
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut w = SyncWorker::new(
        mem.clone(),
        rx.queue(),
        tx.queue(),
        irq,
        Box::new(backend),
        if mrg_rxbuf { 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF } else { 0 },
    )
    .unwrap();
    bounded("process", || w.process())?;
    check.check(&mem)?;
    if !check.rings_untouched() {
        return Ok(());
    }
    // A good frame goes out, and a received one lands in a good buffer.
    let (tx_next, tx_used) = (w.tx_queue().next_avail(), w.tx_queue().next_used());
    let (rx_next, rx_used) = (w.rx_queue().next_avail(), w.rx_queue().next_used());
    let frame: Vec<u8> = (0..FRAME_LEN as u8).collect();
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend_from_slice(&frame);
    mem.write_slice(&pkt, GuestAddress(GOOD_ADDR)).unwrap();
    let txh = tx.post(&mem, tx_next, &[&[Buf::read(GOOD_ADDR, pkt.len() as u32)]]);
    let rxh = rx.post(&mem, rx_next, &[&[Buf::write(GOOD_ADDR + 0x1000, 2048)]]);
    bounded("process", || w.process())?;
    if tx.used_idx(&mem) != tx_used.wrapping_add(1)
        || tx.used_elem(&mem, tx_used) != (u32::from(txh[0]), 0)
        || *sent.lock().unwrap() != frame
    {
        return Err(format!(
            "good frame not sent: tx used idx {} (want {})",
            tx.used_idx(&mem),
            tx_used.wrapping_add(1)
        ));
    }
    // Rx chains the worker popped and holds for a frame that does not fit them
    // stay held (without MRG_RXBUF, a chain smaller than every frame is held for
    // good, and the frames are dropped). A driver may not post past a full ring,
    // and the spec asks for big enough buffers, so only a ring with nothing held
    // is checked.
    if rx_next != rx_used {
        return Ok(());
    }
    let done = rx.used_idx(&mem).wrapping_sub(rx_used);
    let ours = (0..done)
        .map(|k| rx.used_elem(&mem, rx_used.wrapping_add(k)))
        .find(|&(id, _)| id == u32::from(rxh[0]));
    match ours {
        Some((_, len)) if len > 0 && len as usize <= VNET_HDR_LEN + FRAME_LEN => Ok(()),
        other => Err(format!(
            "good rx buffer not filled: {other:?} in {done} used entries"
        )),
    }
}

#[test]
fn hostile_queues() {
    let mut hdr = vec![0u8; VNET_HDR_LEN];
    hdr.extend_from_slice(&[0xab; FRAME_LEN]);
    let mut gso = hdr.clone();
    gso[0] = 1; // NEEDS_CSUM
    gso[1] = 4; // GSO_TCPV6
    let payloads = vec![hdr, gso, vec![0; VNET_HDR_LEN]];
    let dog = Watchdog::new("net::hostile_queues", Duration::from_secs(30));
    let mut runner = TestRunner::new(Config {
        cases: hostile_cases(CASES),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&hostile_input(), |words| {
            let input = to_bytes(&words);
            dog.start(&input);
            let r = case(&input, &payloads).map_err(TestCaseError::fail);
            dog.done();
            r
        })
        .unwrap();
}
