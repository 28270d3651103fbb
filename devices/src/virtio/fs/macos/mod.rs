//! The portable core of a macOS passthrough for virtio-fs: what a host
//! `FileSystem` on macOS must translate so that a Linux guest, which speaks the
//! Linux FUSE ABI, sees Linux values.
//!
//! fuse-backend-rs's passthrough is Linux-only, and its macOS build speaks
//! macFUSE's ABI, not the guest's. The numbers that differ between the two
//! kernels are translated here, with both sides spelled out as constants so the
//! tables are tested on any host:
//! - [`errno`]: macOS errno values (as `std::io::Error::raw_os_error` gives them
//!   on a Mac) to the Linux values a FUSE reply carries;
//! - [`flags`]: the guest's open(2) flags (Linux arm64 values) to macOS flags,
//!   and renameat2 flags to `renamex_np` flags;
//! - [`attr`]: a macOS `stat` as the Linux `fuse_attr`, device numbers, the
//!   `fuse_dirent` records of READDIR, and `statfs` as `fuse_kstatfs`;
//! - [`xattr`]: Linux extended attribute namespaces on a host without them.
//!
//!
//! On top of them:
//! - [`passthrough`]: [`passthrough::PosixFs`], the host side: inodes, handles
//!   and every operation, from portable POSIX calls only (so it runs, and is
//!   tested, on Linux too), answering with Linux errno values;
//! - [`server`]: [`server::LinuxFuseServer`], the request loop in the Linux FUSE
//!   ABI over `PosixFs`, for any host (on macOS fuse-backend-rs encodes macFUSE's
//!   ABI, which the guest does not speak), and the chain I/O around it;
//! - `fuse` (Linux hosts): `PosixFs` as a fuse-backend-rs `FileSystem`, so the
//!   two request loops can be compared reply for reply in tests.
//! - [`backend`]: which server a virtio-fs device uses ([`backend::FsBackend`]:
//!   fuse-backend-rs on Linux, this portable one on macOS) behind the one
//!   interface its queue workers call ([`backend::FsServer`]).

pub mod attr;
pub mod backend;
pub mod errno;
pub mod flags;
#[cfg(target_os = "linux")]
pub mod fuse;
pub mod passthrough;
pub mod server;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod xattr;

/// Errors of the translation layer: a value the guest's kernel cannot be given,
/// or a request the host cannot honour. Each carries the Linux errno to reply with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The guest asked for something macOS cannot do (Linux errno inside).
    #[error("not supported on a macOS host (errno {0})")]
    Unsupported(i32),
    /// The guest's request is malformed (Linux errno inside).
    #[error("invalid request (errno {0})")]
    Invalid(i32),
}

impl Error {
    /// The Linux errno for the FUSE reply.
    pub fn linux_errno(self) -> i32 {
        match self {
            Error::Unsupported(e) | Error::Invalid(e) => e,
        }
    }
}

/// `Result` of the translation layer.
pub type Result<T> = std::result::Result<T, Error>;
