//! virtio-rng's worker: what one wake does to the request queue.
//!
//! Every available chain's device-writable buffers get random bytes (at most
//! [`MAX_BYTES_PER_REQUEST`] per chain) and the chain goes on the used ring with
//! the count written; then the interrupt, if the driver wants it.

use std::sync::Arc;

use log::{debug, error};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemory, GuestMemoryMmap};

use super::{Error, Result, MAX_BYTES_PER_REQUEST};
use crate::virtio::queue_thread::drain_queue;
use crate::virtio::VirtioInterrupt;

/// The queue and what serving it needs.
pub(super) struct RequestHandler {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// Host-side staging buffer for random bytes.
    buf: Vec<u8>,
}

impl RequestHandler {
    /// The handler a worker runs on `queue`.
    pub(super) fn new(mem: GuestMemoryMmap, queue: Queue, interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        Self {
            mem,
            queue,
            interrupt,
            buf: vec![0; MAX_BYTES_PER_REQUEST],
        }
    }

    /// Serves every available chain, then raises the interrupt if the driver wants it.
    pub(super) fn process_queue(&mut self) {
        let (mem, buf) = (&self.mem, &mut self.buf);
        drain_queue(&mut self.queue, mem, &*self.interrupt, "virtio-rng", |chain| {
            fill_chain(chain, buf, mem)
        });
    }
}

/// Fills the writable buffers of `chain` with random bytes and returns how many
/// were written. Read-only buffers are skipped; the first buffer that is outside
/// guest memory ends the request.
fn fill_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    mem: &GuestMemoryMmap,
) -> u32 {
    let mut written = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            debug!("virtio-rng: read-only buffer skipped");
            continue;
        }
        let want = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
        if want == 0 {
            break;
        }
        let Some(bytes) = buf.get_mut(..want) else {
            break;
        };
        // Check first: a hostile chain must not cost a getrandom call per bad buffer.
        if !mem.check_range(desc.addr(), want) {
            debug!(
                "virtio-rng: buffer at {:#x} is outside guest memory",
                desc.addr().0
            );
            break;
        }
        if let Err(e) = getrandom(bytes) {
            error!("virtio-rng: {e}");
            break;
        }
        if let Err(e) = mem.write_slice(bytes, desc.addr()) {
            debug!(
                "virtio-rng: buffer at {:#x} not writable: {e}",
                desc.addr().0
            );
            break;
        }
        written += want;
    }
    // MAX_BYTES_PER_REQUEST fits in a u32.
    u32::try_from(written).unwrap_or(u32::MAX)
}

/// Fills `buf` from the kernel's CSPRNG.
pub(super) fn getrandom(buf: &mut [u8]) -> Result<()> {
    crate::sys::random::fill(buf).map_err(Error::GetRandom)
}

/// The worker's request path without its thread, so benches and tests can drive
/// the queue synchronously: [`SyncHandler::process_queue`] is what one worker wake
/// does.
#[cfg(any(test, feature = "test-utils"))]
pub struct SyncHandler(RequestHandler);

#[cfg(any(test, feature = "test-utils"))]
impl SyncHandler {
    /// The handler a worker would run on `queue`.
    pub fn new(mem: GuestMemoryMmap, queue: Queue, interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        Self(RequestHandler::new(mem, queue, interrupt))
    }

    /// Serves every available chain, then raises the interrupt if the driver wants it.
    pub fn process_queue(&mut self) {
        self.0.process_queue();
    }

    /// The queue, to see where the device will look next.
    pub fn queue(&self) -> &Queue {
        &self.0.queue
    }
}
