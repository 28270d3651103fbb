//! virtio-blk (device type 2): a raw disk image as the guest's block device.
//!
//! [`disk`] owns the host side: it opens and locks the image, checks its size,
//! finds out whether its filesystem can punch holes and zero ranges, and moves
//! bytes between the file and guest memory with `pread`/`pwrite` (no bounce
//! buffer). [`request`] turns a descriptor chain into a checked [`request::Request`]
//! (header, data segments, status byte) or says why it cannot. [`device`] holds the
//! [`Block`] device: its features and configuration space, and the worker thread
//! it starts on activation, which (`worker`) pops chains, executes them against
//! the disk and returns them on the used ring.
//!
//! aivmm caches nothing: a write is acknowledged once `pwrite` has put it in the
//! host's page cache (it survives the VMM being killed), and FLUSH is `fdatasync`.

pub mod device;
pub mod disk;
#[cfg(test)]
mod proptests;
pub mod request;
mod worker;

use std::path::PathBuf;

pub use device::{Block, BlockConfig};
#[cfg(any(test, feature = "test-utils"))]
pub use worker::SyncHandler;

/// The virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// The maximum size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// log2 of the virtio sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio sector size: capacity and request offsets count in these.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// The length of the request header (type, reserved, sector).
pub const REQUEST_HEADER_LEN: u32 = 16;
/// The length of the id GET_ID returns.
pub const ID_LEN: usize = 20;
/// The most data segments a request may carry (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// The longest data segment the driver may use (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// The most data bytes one request may carry, so a hostile chain cannot make the
/// worker do unbounded work for one request.
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// The most sectors one discard or write-zeroes range may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The most ranges one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;
/// The length of one discard / write-zeroes range (sector, num_sectors, flags).
pub const DISCARD_RANGE_LEN: u64 = 16;
/// The length of the configuration space we expose (through
/// `write_zeroes_may_unmap` and its padding).
pub const CONFIG_LEN: usize = 60;

/// Errors of virtio-blk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file does not exist.
    #[error("disk image {} does not exist", .path.display())]
    NotFound {
        /// The image path.
        path: PathBuf,
    },
    /// The image is a directory.
    #[error("disk image {} is a directory", .path.display())]
    IsDirectory {
        /// The image path.
        path: PathBuf,
    },
    /// The image is neither a regular file nor a block device.
    #[error("disk image {} is {kind}, not a regular file or a block device", .path.display())]
    NotAFile {
        /// The image path.
        path: PathBuf,
        /// What it is ("a FIFO", "a socket", …).
        kind: &'static str,
    },
    /// Opening or inspecting the image failed.
    #[error("opening disk image {} failed: {source}", .path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process (another VM) holds a conflicting lock on the image.
    #[error(
        "disk image {} is locked by another process (is another VM using it{}?)",
        .path.display(),
        if *.read_only { " read-write" } else { "" }
    )]
    Locked {
        /// The image path.
        path: PathBuf,
        /// Whether we asked for a shared (read-only) lock.
        read_only: bool,
    },
    /// flock(2) failed for another reason.
    #[error("locking disk image {} failed: {source}", .path.display())]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image is empty.
    #[error("disk image {} is empty (0 bytes)", .path.display())]
    Empty {
        /// The image path.
        path: PathBuf,
    },
    /// The image size is not a whole number of 512-byte sectors.
    #[error(
        "disk image {} is {size} bytes, which is not a multiple of 512 (the sector size)",
        .path.display()
    )]
    SizeNotSectorMultiple {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The configured id does not fit the 20 bytes of GET_ID.
    #[error("disk id {id:?} is {} bytes; at most 20 are allowed", .id.len())]
    IdTooLong {
        /// The configured id.
        id: String,
    },
    /// The transport gave no queue, or a queue that is not ready.
    #[error("the request queue is missing or not ready")]
    NoQueue,
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// The worker could not start (its events or its thread).
    #[error(transparent)]
    Worker(#[from] crate::virtio::queue_thread::Error),
}

/// `Result` of virtio-blk.
pub type Result<T> = std::result::Result<T, Error>;
