//! virtio-fs (device type 26): the user's project directory, shared into the guest.
//!
//! The device serves FUSE in-process: no separate virtiofsd. Requests arrive on
//! virtqueues (a high-priority queue for FORGET/INTERRUPT, then N request queues);
//! a worker thread per queue pops each chain, wraps its readable part in a
//! `fuse_backend_rs` `Reader` and its writable part in a `Writer`, and hands both to
//! the FUSE [`Server`](fuse_backend_rs::api::server::Server). The server decodes the
//! request and calls [`filesystem::ShareFs`], which checks it (read-only shares,
//! credentials, modes, xattr names, containment) and delegates to fuse-backend-rs's
//! `PassthroughFs` rooted at the shared directory, which was opened once when the
//! device was created. The reply bytes go back on the used ring.
//!
//! Files:
//! - [`device`]: [`Fs`], its config space and `impl VirtioDevice`;
//! - [`worker`]: the queue threads and the per-chain request handler;
//! - [`filesystem`]: the `FileSystem` wrapper around `PassthroughFs`;
//! - [`creds`]: acting as the guest caller (fsuid/fsgid) when aivmm runs as root;
//! - [`protect`]: the protected paths of a workdir, resolved to identities at creation;
//! - [`gitconfig`]: a git config parser and the stop-time report of risky configs;
//! - `test_utils`: FUSE request builders and a mock-queue session for tests and benches.
//!
//! # Cache mode
//! The default is [`CachePolicy::Auto`]: attributes and names are cached for one
//! second and file data is kept in the guest's page cache until the next `open`,
//! when it is revalidated (close-to-open consistency, plus `AUTO_INVAL_DATA` so a
//! changed mtime drops stale pages). The project directory is also the host user's
//! working tree: their editor, `git` and build tools change it while the guest runs.
//! `Always` would keep serving stale pages after such a change; `None` sends every
//! read and every path walk over the virtqueue, which is slow and breaks shared
//! writable `mmap`. Writeback caching stays off: with it the guest acknowledges
//! writes that the host has not seen, against the rule that anything written to
//! /work is on the host as soon as it is written.
//!
//! # Privileges
//! aivmm runs as a normal user. `PassthroughFs` is configured to need no
//! capability: inodes are kept as `O_PATH` fds, not file handles (no
//! `open_by_handle_at`, which needs `CAP_DAC_READ_SEARCH`), and it is always
//! handed uid/gid 0 so it never calls `setresuid`/`setresgid` (which needs
//! `CAP_SETUID`): files the guest creates belong to the host user running aivmm.
//! When aivmm runs as root, [`filesystem::ShareFs`] instead carries out each
//! request as its guest caller with a per-thread fsuid/fsgid switch ([`creds`]). `link` falls back to `linkat` through
//! `/proc/self/fd` when `AT_EMPTY_PATH` is refused (it needs `CAP_DAC_READ_SEARCH`).

#[cfg(target_os = "linux")]
pub mod creds;
pub mod device;
#[cfg(target_os = "linux")]
pub mod filesystem;
// The Linux-FUSE-ABI translations a macOS host passthrough needs (portable, tested here).
pub mod gitconfig;
pub mod macos;
pub mod protect;
#[cfg(all(test, target_os = "linux"))]
mod proptests;
#[cfg(all(test, target_os = "linux"))]
mod swap_race;
#[cfg(all(any(test, feature = "test-utils"), target_os = "linux"))]
pub mod test_utils;
pub mod worker;

use std::path::PathBuf;

pub use device::Fs;
pub use macos::backend::{FsBackend, FsServer};

/// The virtio device type of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// The maximum size of every queue.
pub const QUEUE_SIZE: u16 = 1024;
/// The size of the `tag` field of the configuration space.
pub const TAG_LEN: usize = 36;
/// The configuration space: the tag, then `num_request_queues` (le32).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// The number of high-priority queues (always one, at index 0).
pub const NUM_HIPRIO_QUEUES: usize = 1;
/// The most request queues a device may have (one worker thread each).
pub const MAX_REQUEST_QUEUES: usize = 16;

/// How much the guest may cache, mapped onto `PassthroughFs`'s policies and timeouts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No data cache and zero timeouts: every access reaches the host.
    None,
    /// Close-to-open consistency with one-second attribute and entry timeouts.
    #[default]
    Auto,
    /// Cache everything for a day: only for directories nothing else changes.
    Always,
}

/// What the VMM asks for: plain data, checked by [`Fs::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    /// The host directory to share. Symlinks in it are resolved once, at creation.
    pub root: PathBuf,
    /// The mount tag the guest uses (`mount -t virtiofs <tag> /work`), 1 to 36 bytes.
    pub tag: String,
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// How much the guest may cache.
    pub cache: CachePolicy,
    /// How many request queues (one worker thread each), 1 to [`MAX_REQUEST_QUEUES`].
    pub request_queues: usize,
    /// The file system serving the share (fuse-backend-rs on Linux, the portable
    /// passthrough on macOS by default).
    pub backend: FsBackend,
    /// Let the guest set POSIX ACLs (`system.posix_acl_access` and
    /// `system.posix_acl_default`) on host files. Off by default: an ACL can give
    /// other host users access that the file's mode does not show.
    pub posix_acls: bool,
    /// Extra paths, relative to the root, that the guest may read but never
    /// change, remove, rename or make (the trusted config's; see [`protect`]).
    /// A directory is protected with everything in it.
    pub protected: Vec<PathBuf>,
    /// Protect what the host runs or reads as config in a workdir:
    /// [`protect::workdir_rules`], resolved when the device is created.
    pub protect_workdir: bool,
}

impl FsConfig {
    /// A writable share of `root` under `tag`, with the default cache and one request queue.
    pub fn new(root: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        Self {
            root: root.into(),
            tag: tag.into(),
            read_only: false,
            cache: CachePolicy::default(),
            request_queues: 1,
            backend: FsBackend::default(),
            posix_acls: false,
            protected: Vec::new(),
            protect_workdir: false,
        }
    }

    /// The protection rules of this share, resolved against `root` (the host
    /// path of the share root) now: the workdir defaults if asked for, then
    /// [`FsConfig::protected`].
    pub fn protection_rules(&self, root: &std::path::Path) -> Vec<protect::Rule> {
        let mut rules = if self.protect_workdir {
            protect::workdir_rules(root)
        } else {
            Vec::new()
        };
        rules.extend(self.protected.iter().map(|p| protect::Rule {
            path: p.clone(),
            seal: true,
        }));
        rules
    }
}

/// Errors of virtio-fs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The shared directory cannot be resolved.
    #[error("the shared directory {0:?} cannot be opened: {1}")]
    RootMissing(PathBuf, #[source] std::io::Error),
    /// The shared path is not a directory.
    #[error("the shared path {0:?} is not a directory")]
    RootNotDir(PathBuf),
    /// The shared path cannot be passed to the passthrough file system.
    #[error("the shared path {0:?} is not valid UTF-8 or contains a NUL byte")]
    RootNotUtf8(PathBuf),
    /// The tag is empty.
    #[error("the virtio-fs tag is empty")]
    EmptyTag,
    /// The tag does not fit the configuration space.
    #[error("the virtio-fs tag is {0} bytes; at most {TAG_LEN} fit")]
    TagTooLong(usize),
    /// The tag contains a NUL byte.
    #[error("the virtio-fs tag contains a NUL byte")]
    TagHasNul,
    /// The number of request queues is out of range.
    #[error("{0} request queues asked for; 1 to {MAX_REQUEST_QUEUES} are supported")]
    RequestQueues(usize),
    /// The passthrough file system could not be set up.
    #[error("setting up the passthrough file system failed: {0}")]
    Passthrough(#[source] std::io::Error),
    /// The transport gave the wrong number of queues, or no request queue is ready.
    #[error("expected {expected} queues with a ready request queue, got {got}")]
    Queues {
        /// Queues the device has.
        expected: usize,
        /// Queues the transport gave.
        got: usize,
    },
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// An EventFd or epoll operation failed.
    #[error("event setup failed: {0}")]
    Event(#[source] std::io::Error),
    /// A worker thread could not be started.
    #[error("spawning a worker thread failed: {0}")]
    Spawn(#[source] std::io::Error),
}

/// `Result` of virtio-fs.
pub type Result<T> = std::result::Result<T, Error>;
