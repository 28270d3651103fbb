//! Fixtures shared by the macOS passthrough's tests: a share next to a secret
//! that must stay out of the guest's reach, and the file system and server
//! over it.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
#[cfg(target_os = "linux")]
use std::time::Duration;

use vmm_sys_util::tempdir::TempDir;

use super::passthrough::{Options, PosixFs};
#[cfg(target_os = "linux")]
use super::server::LinuxFuseServer;

/// A temp dir holding the share and, beside it, what must stay unreachable.
pub struct Share {
    /// The temp dir (removed on drop).
    pub tmp: TempDir,
    /// `<tmp>/share`: `hello.txt` ("hello from the host") and `src/main.rs`.
    pub share: PathBuf,
    /// `<tmp>/outside`: `secret` ("host secret").
    pub outside: PathBuf,
}

/// A fresh [`Share`].
pub fn share() -> Share {
    let tmp = TempDir::new().unwrap();
    let share = tmp.as_path().join("share");
    let outside = tmp.as_path().join("outside");
    fs::create_dir(&share).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host secret").unwrap();
    fs::write(share.join("hello.txt"), b"hello from the host").unwrap();
    fs::create_dir(share.join("src")).unwrap();
    fs::write(share.join("src/main.rs"), b"fn main() {}\n").unwrap();
    Share {
        tmp,
        share,
        outside,
    }
}

/// [`PosixFs`] on `root`.
pub fn posix_fs(root: &Path, read_only: bool) -> PosixFs {
    PosixFs::new(root, Options { read_only }).unwrap()
}

/// [`LinuxFuseServer`] on `root`, with one-second timeouts.
#[cfg(target_os = "linux")]
pub fn posix_server(root: &Path, read_only: bool) -> LinuxFuseServer {
    LinuxFuseServer::new(posix_fs(root, read_only), Duration::from_secs(1))
}
