//! virtio-rng (device type 4): the guest's entropy source.
//!
//! The device has one queue. The driver posts device-writable buffers; a worker
//! thread started on activation fills them from the host's `getrandom(2)` and
//! returns them on the used ring. [`device`] holds the device, `worker` what its
//! worker thread does.

pub mod device;
#[cfg(test)]
pub(crate) mod proptests;
mod worker;

pub use device::Rng;
#[cfg(any(test, feature = "test-utils"))]
pub use worker::SyncHandler;

/// The virtio device type of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// The maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request is given, so a hostile chain cannot make the worker
/// do unbounded work.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// Errors of virtio-rng.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport gave no queue, or a queue that is not ready.
    #[error("the request queue is missing or not ready")]
    NoQueue,
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// The worker could not start (its events or its thread).
    #[error(transparent)]
    Worker(#[from] crate::virtio::queue_thread::Error),
    /// getrandom(2) failed.
    #[error("getrandom failed: {0}")]
    GetRandom(#[source] std::io::Error),
}

/// `Result` of virtio-rng.
pub type Result<T> = std::result::Result<T, Error>;
