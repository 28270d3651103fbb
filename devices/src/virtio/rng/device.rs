//! The virtio-rng device.
//!
//! `activate` moves the queue, its notification `EventFd` and the interrupt into
//! a worker thread (the devices' event loop over the queue `EventFd` and a stop
//! event), which serves the queue on each wake (see `worker`). `reset` stops and
//! joins the thread, so the device can be activated again.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

use super::worker::RequestHandler;
use super::{Error, Result, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::virtio::queue_thread::spawn_queue_worker;
use crate::virtio::{self, ActivateArgs, VirtioCommon, VirtioDevice, Workers};

/// The virtio-rng device.
pub struct Rng {
    common: VirtioCommon,
    worker: Option<Workers<()>>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, inactive entropy device.
    pub fn new() -> Self {
        Self {
            common: VirtioCommon::new(
                "virtio-rng",
                VIRTIO_ID_RNG,
                vec![QUEUE_SIZE],
                (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX),
                // virtio-rng has no configuration space.
                Vec::new(),
            ),
            worker: None,
        }
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    fn start(&mut self, args: ActivateArgs) -> Result<()> {
        if self.worker.is_some() {
            return Err(Error::AlreadyActive);
        }
        let ActivateArgs {
            mem,
            queues,
            queue_evts,
            interrupt,
            spawner,
        } = args;
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(Error::NoQueue);
        };
        if !queue.ready() {
            return Err(Error::NoQueue);
        }
        let mut handler = RequestHandler::new(mem, queue, interrupt);
        let worker = spawn_queue_worker(&spawner, "virtio-rng", "aivmm-rng", queue_evt, move || {
            handler.process_queue()
        })?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn activate(&mut self, args: ActivateArgs) -> virtio::Result<()> {
        self.start(args)
            .map_err(|e| virtio::Error::activation(self.common.name(), e))
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::rng::worker::getrandom;
    use crate::virtio::rng::MAX_BYTES_PER_REQUEST;
    use crate::virtio::VIRTIO_MMIO_INT_VRING;
    use crate::sys::{EventFd, EFD_NONBLOCK};
    use crate::test_utils::*;
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};

    const WAIT: Duration = Duration::from_secs(5);

    fn activate(
        rng: &mut Rng,
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
    ) -> (EventFd, Arc<RecordingVirtioInterrupt>) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(RecordingVirtioInterrupt::default());
        rng.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_evts: vec![evt.try_clone().unwrap()],
            interrupt: irq.clone(),
            spawner: Default::default(),
        })
        .unwrap();
        (evt, irq)
    }

    fn read_buf(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 16);
        let mut rng = Rng::new();
        let (evt, irq) = activate(&mut rng, &mem, &q);
        add_chain(
            &q,
            0,
            &[
                Buf::write(DATA_ADDR, 100),
                Buf::write(DATA_ADDR + 0x1000, 200),
            ],
        );
        evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
        assert_eq!(used_elem(&q, 0), (0, 300));
        assert!(wait_until(WAIT, || irq.count() >= 1));
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        // 300 random bytes are not all zero, and the byte after each buffer is untouched.
        let a = read_buf(&mem, DATA_ADDR, 101);
        let b = read_buf(&mem, DATA_ADDR + 0x1000, 201);
        assert!(a[..100].iter().chain(&b[..200]).any(|&x| x != 0));
        assert_eq!((a[100], b[200]), (0, 0));
        assert!(rng.reset());
    }

    #[test]
    fn malformed_chains_get_zero_bytes() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 16);
        let mut rng = Rng::new();
        let (evt, _irq) = activate(&mut rng, &mem, &q);
        // Past guest memory; read-only only; read-only then writable; straddling the end.
        add_chain(&q, 0, &[Buf::write(0x1000_0000, 64)]);
        add_chain(&q, 1, &[Buf::read(DATA_ADDR, 64)]);
        add_chain(
            &q,
            2,
            &[Buf::read(DATA_ADDR, 64), Buf::write(DATA_ADDR + 0x100, 16)],
        );
        add_chain(&q, 4, &[Buf::write(0x40_0000 - 8, 64)]);
        add_chain(&q, 5, &[Buf::write(u64::MAX - 4, 64)]);
        evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(&q) == 5));
        assert_eq!(used_elem(&q, 0), (0, 0));
        assert_eq!(used_elem(&q, 1), (1, 0));
        assert_eq!(used_elem(&q, 2), (2, 16));
        assert_eq!(used_elem(&q, 3), (4, 0));
        assert_eq!(used_elem(&q, 4), (5, 0));
        // The worker is still alive and serves a good chain.
        add_chain(&q, 6, &[Buf::write(DATA_ADDR, 8)]);
        evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(&q) == 6));
        assert_eq!(used_elem(&q, 5), (6, 8));
        assert!(rng.reset());
    }

    #[test]
    fn requests_are_capped() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 16);
        let mut rng = Rng::new();
        let (evt, _irq) = activate(&mut rng, &mem, &q);
        add_chain(
            &q,
            0,
            &[
                Buf::write(DATA_ADDR, 0x10_0000),
                Buf::write(0x30_0000, 0x1000),
            ],
        );
        evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
        assert_eq!(used_elem(&q, 0), (0, MAX_BYTES_PER_REQUEST as u32));
        assert!(rng.reset());
    }

    #[test]
    fn bogus_avail_index_does_not_hang() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 16);
        let mut rng = Rng::new();
        let (evt, _irq) = activate(&mut rng, &mem, &q);
        q.avail().idx().store(1000);
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // A worker stuck in a loop would never join.
        assert!(rng.reset());
        assert_eq!(used_idx(&q), 0);
    }

    #[test]
    fn reset_then_activate_again() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 16);
        let mut rng = Rng::new();
        let (_evt, _irq) = activate(&mut rng, &mem, &q);
        let second = rng.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![q.create_queue::<Queue>().unwrap()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: Arc::new(RecordingVirtioInterrupt::default()),
            spawner: Default::default(),
        });
        assert!(second.is_err(), "already active");
        assert!(rng.reset());
        assert!(rng.reset(), "reset of an idle device");
        let q = mock_queue(&mem, 16);
        let (evt, _irq) = activate(&mut rng, &mem, &q);
        add_chain(&q, 0, &[Buf::write(DATA_ADDR, 4)]);
        evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
    }

    #[test]
    fn no_queue_is_an_error() {
        let mem = guest_memory(0x10_0000);
        let mut rng = Rng::new();
        let r = rng.activate(ActivateArgs {
            mem,
            queues: vec![],
            queue_evts: vec![],
            interrupt: Arc::new(RecordingVirtioInterrupt::default()),
            spawner: Default::default(),
        });
        assert!(r.is_err());
    }

    #[test]
    fn through_the_mmio_transport() {
        let mem = guest_memory(0x40_0000);
        let q = mock_queue(&mem, 256);
        let irq = Arc::new(RecordingInterrupt::default());
        let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone(), irq.clone(), Default::default()).unwrap();
        assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_RNG);
        let features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(mmio_init(&mut t, features, &[&q]), 0xf);
        for i in 0..3u16 {
            add_chain(&q, i, &[Buf::write(DATA_ADDR + u64::from(i) * 0x100, 32)]);
        }
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(wait_until(WAIT, || used_idx(&q) == 3));
        assert!(wait_until(WAIT, || irq.count() >= 1));
        assert_eq!(read32(&mut t, 0x60), VIRTIO_MMIO_INT_VRING);
        assert_eq!(used_elem(&q, 2), (2, 32));
        // Reset through the transport stops the worker, and it comes back.
        write32(&mut t, 0x70, 0);
        let q = mock_queue(&mem, 256);
        assert_eq!(mmio_init(&mut t, features, &[&q]), 0xf);
        add_chain(&q, 0, &[Buf::write(DATA_ADDR, 32)]);
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert!(wait_until(WAIT, || used_idx(&q) == 1));
    }

    #[test]
    fn getrandom_fills_large_buffers() {
        let mut buf = vec![0u8; 1 << 20];
        getrandom(&mut buf).unwrap();
        assert!(buf[buf.len() - 64..].iter().any(|&b| b != 0));
    }
}
