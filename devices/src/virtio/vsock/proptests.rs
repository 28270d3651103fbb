//! A malicious guest against virtio-vsock: random rx and tx queues and packet
//! headers in real guest memory, served synchronously by a worker with its own
//! muxer. Each case checks that the worker returns promptly, writes nothing
//! outside the device-writable buffers and the used rings, and still answers a
//! good connection request (to a port nobody listens on: an RST) afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::packet::Header;
use super::*;
use crate::test_utils::*;
use crate::virtio::rng::proptests::{hostile_input, to_bytes};

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;
const CID: u64 = 3;

fn header(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 1 << 16,
        fwd_cnt: 0,
    }
}

/// Packet headers a driver would send, for the decoder to start from.
fn payloads() -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for op in 0..=8 {
        for (sp, dp, len) in [(1000, 5000, 0), (1000, 5000, 16), (1, u32::MAX, 0x1_0001)] {
            let mut b = header(op, sp, dp, len).to_bytes().to_vec();
            b.extend_from_slice(&[0x61; 16]);
            v.push(b);
        }
    }
    v
}

fn case(dev: &Vsock, input: &[u8], payloads: &[Vec<u8>]) -> std::result::Result<(), String> {
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
    let check = WriteCheck::new(&mem, &[&rx, &tx]);
    let irq = Arc::new(RecordingVirtioInterrupt::default());
    let mut w = dev
        .sync_worker(mem.clone(), rx.queue(), tx.queue(), irq)
        .unwrap();
    bounded("process_queues", || w.process_queues())?;
    check.check(&mem)?;
    if !check.rings_untouched() {
        return Ok(());
    }
    // A REQUEST to a port nobody listens on is answered with an RST. RSTs queued
    // by the hostile case come first, so rx buffers are posted until it shows.
    let (tx_next, tx_used) = (w.tx_queue().next_avail(), w.tx_queue().next_used());
    let req = header(VSOCK_OP_REQUEST, 0xbeef, 0xdead, 0).to_bytes();
    mem.write_slice(&req, GuestAddress(GOOD_ADDR)).unwrap();
    let txh = tx.post(&mem, tx_next, &[&[Buf::read(GOOD_ADDR, HDR_SIZE as u32)]]);
    let buf = GOOD_ADDR + 0x1000;
    for _ in 0..=MAX_PENDING_RST {
        let (rx_next, rx_used) = (w.rx_queue().next_avail(), w.rx_queue().next_used());
        if rx_next != rx_used {
            // The worker holds an rx buffer of the hostile case: the ring is not
            // the driver's to post in until it comes back.
            return Ok(());
        }
        mem.write_slice(&[0u8; HDR_SIZE], GuestAddress(buf))
            .unwrap();
        let rxh = rx.post(&mem, rx_next, &[&[Buf::write(buf, 0x400)]]);
        bounded("process_queues", || w.process_queues())?;
        if tx.used_idx(&mem) != tx_used.wrapping_add(1)
            || tx.used_elem(&mem, tx_used) != (u32::from(txh[0]), 0)
        {
            return Err(format!(
                "good REQUEST not consumed: tx used idx {}",
                tx.used_idx(&mem)
            ));
        }
        if rx.used_idx(&mem) == rx_used {
            return Err("no reply to a good REQUEST".into());
        }
        if rx.used_elem(&mem, rx_used).0 != u32::from(rxh[0]) {
            return Err(format!("rx used entry {:?}", rx.used_elem(&mem, rx_used)));
        }
        let mut b = [0u8; HDR_SIZE];
        mem.read_slice(&mut b, GuestAddress(buf)).unwrap();
        let h = Header::from_bytes(&b);
        if h.op == VSOCK_OP_RST && h.dst_port == 0xbeef && h.src_port == 0xdead {
            return Ok(());
        }
    }
    Err("no RST for a good REQUEST".into())
}

#[test]
fn hostile_queues() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: dir.path().join("v.sock"),
    })
    .unwrap();
    let payloads = payloads();
    let dog = Watchdog::new("vsock::hostile_queues", Duration::from_secs(30));
    let mut runner = TestRunner::new(Config {
        cases: hostile_cases(CASES),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&hostile_input(), |words| {
            let input = to_bytes(&words);
            dog.start(&input);
            let r = case(&dev, &input, &payloads).map_err(TestCaseError::fail);
            dog.done();
            r
        })
        .unwrap();
}
