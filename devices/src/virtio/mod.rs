//! Virtio: the device trait, the MMIO transport, and one folder per device.
//!
//! The transport owns the queues' guest-visible state and the device status
//! machine. When the driver sets DRIVER_OK, the transport hands the device its
//! queues, their notification `EventFd`s and the interrupt; from then on the device
//! does its work on guest memory from its own event handling.

pub mod balloon;
pub mod block;
pub mod common;
pub mod event_loop;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue_thread;
#[cfg(test)]
mod proptests;
pub mod rng;
pub mod vsock;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

pub use common::{Spawner, VirtioCommon, WorkerHandle, Workers};

use crate::sys::EventFd;

/// Errors of the virtio layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device could not be activated: every device's activation fails with
    /// this, its own error inside.
    #[error("activating {device} failed: {source}")]
    Activate {
        /// The device's name ("virtio-net").
        device: &'static str,
        /// Why, in the device's own terms.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` of virtio operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Device `device` could not be activated, for `source`.
    pub fn activation(device: &'static str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Activate {
            device,
            source: Box::new(source),
        }
    }
}

/// The interrupt status bit for a used-buffer notification.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// The interrupt status bit for a configuration change.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// What the transport gives a device on activation.
pub struct ActivateArgs {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One queue per entry of `queue_max_sizes`, in order. The ones the driver
    /// enabled are `ready()` and lie in guest memory; the others are not ready
    /// (a driver may leave queues it does not use unset).
    pub queues: Vec<virtio_queue::Queue>,
    /// One `EventFd` per queue, written when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// Raises the device's interrupt, with its status bits set.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Where the device starts its worker threads.
    pub spawner: Spawner,
}

/// The interrupt as a virtio device sees it: it sets INTERRUPT_STATUS bits, then
/// raises the line.
pub trait VirtioInterrupt: Send + Sync {
    /// Sets `status` bits (`VIRTIO_MMIO_INT_*`) and raises the interrupt.
    fn signal(&self, status: u32) -> std::io::Result<()>;
}

/// A virtio device, independent of its transport. A device keeps its identity,
/// features and configuration space in a [`VirtioCommon`], which the provided
/// methods read; it implements activation and stopping, and overrides what it
/// does differently (a configuration space that changes, or writable fields).
pub trait VirtioDevice: Send {
    /// The device's identity, queues, features and configuration space.
    fn common(&self) -> &VirtioCommon;
    /// The same, to change.
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Starts the device with its queues.
    fn activate(&mut self, args: ActivateArgs) -> Result<()>;
    /// Stops the device's workers and takes back what activation gave them, so it
    /// can be activated again. Does nothing when it is not running.
    fn stop(&mut self);

    /// The virtio device type (4 for entropy, 2 for block, ...).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }
    /// The feature bits the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64 {
        self.common().avail_features()
    }
    /// Records the features the driver accepted (cut to those offered).
    fn ack_features(&mut self, features: u64) {
        self.common_mut().ack_features(features);
    }
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.common().read_config(offset, data);
    }
    /// Writes the device-specific configuration space: read-only unless the
    /// device says otherwise.
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("{}: config write at {offset:#x} ignored", self.common().name());
    }
    /// Stops the device and forgets the driver's features, so it can be activated
    /// again. Returns false if the device cannot be reset.
    fn reset(&mut self) -> bool {
        self.stop();
        self.common_mut().reset_features();
        true
    }
}
