//! A malicious guest against the virtio-mmio transport: random sequences of
//! register reads and writes (any offset, width and value), with a mock device
//! behind it. Each case checks that no access panics, that the transport never
//! hands the device a ready queue outside guest memory, and that a driver can
//! still reset the device and bring it up afterwards.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::test_runner::{Config, TestCaseError, TestRunner};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::mmio::MmioTransport;
use super::rng::proptests::{hostile_input, to_bytes};
use super::{ActivateArgs, VirtioCommon, VirtioDevice};
use crate::bus::BusDevice;
use crate::test_utils::*;

/// Cases per run (debug build, CI).
const CASES: u32 = 100_000;
const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;

#[derive(Default)]
struct State {
    mem: Option<GuestMemoryMmap>,
    activations: usize,
    bad_queue: Option<String>,
    fail_activate: bool,
    refuse_reset: bool,
    config: [u8; 12],
}

struct Mock(Arc<Mutex<State>>, VirtioCommon);

impl VirtioDevice for Mock {
    fn common(&self) -> &VirtioCommon {
        &self.1
    }
    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.1
    }
    fn stop(&mut self) {}
    fn ack_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = self.0.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|a| s.config.get(a)).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut s = self.0.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(c) = at.and_then(|a| s.config.get_mut(a)) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, args: ActivateArgs) -> super::Result<()> {
        let mut s = self.0.lock().unwrap();
        let mem = s.mem.clone().unwrap();
        for (i, q) in args.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&mem) {
                s.bad_queue = Some(format!("queue {i} is ready but invalid"));
            }
        }
        if args.queue_evts.len() != args.queues.len() {
            s.bad_queue = Some("queue and EventFd counts differ".into());
        }
        if s.fail_activate {
            return Err(super::Error::activation("mock", std::io::Error::other("mock")));
        }
        s.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        !self.0.lock().unwrap().refuse_reset
    }
}

/// A register offset a hostile driver might use.
fn offset(src: &mut ByteSource<'_>) -> u64 {
    match src.below(16) {
        0..=9 => u64::from(src.below(0x40)) * 4,
        10 => u64::from(src.below(0x100)),
        11 => 0x100 + u64::from(src.below(32)),
        12 => u64::from(src.u16()),
        13 => u64::MAX - u64::from(src.below(16)),
        _ => 0x70,
    }
}

/// A value a hostile driver might write.
fn value(src: &mut ByteSource<'_>) -> u32 {
    match src.below(16) {
        0 => 0,
        1 => 1,
        2..=6 => src.below(0x100),
        7 => HOSTILE_QUEUE_BASE as u32 + src.below(0x4000),
        8 => u32::MAX - src.below(4),
        9 => 1 << src.below(32),
        _ => src.u32(),
    }
}

fn case(input: &[u8]) -> Result<(), String> {
    let mem = hostile_memory();
    let state = Arc::new(Mutex::new(State {
        mem: Some(mem.clone()),
        ..Default::default()
    }));
    let irq = Arc::new(RecordingInterrupt::default());
    let mut t = MmioTransport::new(Box::new(Mock(state.clone(), VirtioCommon::new("mock", 4, vec![16, 256, 1], FEATURES, Vec::new()))), mem.clone(), irq, Default::default()).unwrap();
    let mut src = ByteSource::new(input);
    {
        let mut s = state.lock().unwrap();
        s.fail_activate = src.one_in(8);
        s.refuse_reset = src.one_in(16);
    }
    // A driver that mostly walks the init sequence, with hostile steps mixed in.
    let mut step = 0u32;
    while !src.is_empty() {
        let off = offset(&mut src);
        let width = [4usize, 4, 4, 4, 1, 2, 8, 0][src.below(8) as usize];
        if src.one_in(3) {
            let mut b = vec![0u8; width];
            t.read(off, &mut b);
        } else {
            let v = if off == 0x70 && src.one_in(2) {
                // A status the init sequence would write next, or a reset.
                [0u32, 1, 3, 0xb, 0xf, 0x80, 0x40][src.below(7) as usize]
            } else {
                value(&mut src)
            };
            let mut b = u64::from(v).to_le_bytes().to_vec();
            b.truncate(width);
            t.write(off, &b);
        }
        step += 1;
        if step > 256 {
            break;
        }
    }
    if let Some(why) = state.lock().unwrap().bad_queue.take() {
        return Err(why);
    }
    // Reset, then a driver's full init brings the device up.
    {
        let mut s = state.lock().unwrap();
        s.fail_activate = false;
        if s.refuse_reset {
            // A device that refuses reset stays broken by design.
            return Ok(());
        }
    }
    let before = state.lock().unwrap().activations;
    let q0 = mock_queue_at(&mem, HOSTILE_QUEUE_BASE, 16);
    let q1 = mock_queue_at(&mem, HOSTILE_QUEUE_BASE + HOSTILE_QUEUE_STRIDE, 256);
    let q2 = mock_queue_at(&mem, HOSTILE_QUEUE_BASE + 2 * HOSTILE_QUEUE_STRIDE, 1);
    let status = mmio_init(&mut t, FEATURES, &[&q0, &q1, &q2]);
    let s = state.lock().unwrap();
    if status != 0xf || !t.is_activated() || s.activations != before + 1 {
        return Err(format!(
            "init after a hostile sequence: status {status:#x}, activated {}",
            t.is_activated()
        ));
    }
    if let Some(why) = &s.bad_queue {
        return Err(why.clone());
    }
    Ok(())
}

#[test]
fn hostile_register_accesses() {
    let dog = Watchdog::new("mmio::hostile_register_accesses", Duration::from_secs(30));
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
