//! virtio-balloon (device type 5): guest memory that comes back to the host.
//!
//! Anonymous guest RAM that the guest once touched stays in the host process for
//! as long as it runs, even after the guest frees it. The balloon gives it back
//! three ways, each ending in the host discarding the pages (`madvise`, see
//! [`discard`]), which makes them read as zero when the guest touches them again:
//! - **free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the driver hands
//!   over runs of free pages (2 MiB and up on x86) a couple of seconds after they
//!   were freed; the device discards them and hands the buffers back. A guest that
//!   drops its page cache shrinks aivmm by as much.
//! - **inflation**: the host sets a target (`num_pages` in the configuration
//!   space, [`BalloonHandle::set_size`]); the driver takes that many pages from
//!   its allocator and lists their frame numbers on the inflate queue, and the
//!   device discards them. Deflation lists pages the guest takes back; the driver
//!   deflates by itself when it runs out of memory (`DEFLATE_ON_OOM`), before its
//!   OOM killer would pick a victim.
//! - **statistics** (`VIRTIO_BALLOON_F_STATS_VQ`): the driver keeps one buffer of
//!   tagged counters on the stats queue; the device returns it when the host asks
//!   ([`BalloonHandle::guest_stats`]) and reads it when the driver posts it again.
//!
//! The queues the driver sets up depend on what it accepted: inflate and deflate,
//! then stats and reporting only if their features were negotiated, each taking
//! the next index. [`device`] holds the device and its handle, `worker` its one
//! worker thread (all queues and the host's stats requests on one event loop).

pub mod device;
#[cfg(test)]
pub(crate) mod proptests;
mod worker;

pub use device::{Balloon, BalloonHandle, BalloonStatus, GuestStats};
pub use worker::discard;
#[cfg(any(test, feature = "test-utils"))]
pub use worker::SyncHandler;

/// The virtio device type of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 128;
/// The stats queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The driver deflates the balloon when the guest runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The driver tells the value freed pages hold (`poison_val`).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// The reporting queue exists: free page reporting.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
/// The balloon's page: frame numbers on the inflate and deflate queues count
/// 4 KiB pages whatever the host's or the guest's page size.
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// The most frame numbers one inflate or deflate chain is read for (Linux sends
/// 256 at most), so a hostile chain cannot make the worker do unbounded work.
pub const MAX_PFNS_PER_CHAIN: usize = 1024;
/// The most ranges one free page report is read for (Linux sends 32 at most).
pub const MAX_REPORT_RANGES: usize = 256;
/// The most tagged counters read from one stats buffer (Linux has 16 tags).
pub const MAX_STATS: usize = 64;
/// The size of the configuration space: `num_pages`, `actual`,
/// `free_page_hint_cmd_id` and `poison_val`, each a little-endian u32.
pub const CONFIG_LEN: usize = 16;

/// Errors of virtio-balloon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The transport gave no queue, or a queue the driver did not make ready.
    #[error("the {0} queue is missing or not ready")]
    NoQueue(&'static str),
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// The worker's events or thread could not be set up.
    #[error("starting the worker: {0}")]
    Worker(#[source] std::io::Error),
    /// A balloon larger than the guest's memory was asked for.
    #[error("a balloon of {asked} bytes is larger than the guest's {memory} bytes of memory")]
    TooLarge {
        /// The size asked for.
        asked: u64,
        /// The guest's memory.
        memory: u64,
    },
}

/// `Result` of virtio-balloon.
pub type Result<T> = std::result::Result<T, Error>;
