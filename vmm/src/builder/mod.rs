//! `aivmm builder`: a Linux Nix remote builder in a VM that runs only while it
//! is used, reached by SSH on 127.0.0.1 and nowhere else.
//!
//! The data path of one SSH connection:
//! ```text
//! nix-daemon/ssh ─TCP─▶ 127.0.0.1:PORT ─(serve: accept)─▶ vsock.sock "CONNECT 22"
//!     ─virtio-vsock─▶ guest socat VSOCK-LISTEN:22 ─TCP─▶ guest sshd on its 127.0.0.1:22
//! ```
//! No network device is needed for this; `--net user` (the default) only gives
//! builds their outbound network (fixed-output derivations fetch sources).
//!
//! The pieces:
//! - [`cli`]: the `builder serve|status|install|uninstall` arguments;
//! - [`listen`]: the listening socket, handed over by systemd (`LISTEN_FDS`) or
//!   launchd, or bound here; anything but a loopback address is refused;
//! - [`keys`]: ED25519 host and client keys, made at first start (0600);
//! - [`vm`]: the VM's life: an `aivmm run --kernel` child process per boot, its
//!   control channel (the guest connects to vsock port [`CONTROL_PORT`], says
//!   `ready` once sshd answers, and powers off on `poweroff`), idle stop;
//! - [`serve`]: the accept loop and the byte proxy;
//! - [`state`]: the state directory (lock, status file, log);
//! - [`install`]: systemd units or a launchd plist, and the Nix `machines`
//!   entry, `builders` line and ssh_config snippet.
//!
//! The guest side is `guest-image/builder/` (Debian, `aivmm image build --builder`)
//! or `guest-image/nixos/builder.nix`.

pub mod cli;
pub mod install;
pub mod keys;
pub mod listen;
pub mod serve;
pub mod state;
pub mod vm;

use std::path::PathBuf;

pub use cli::Command;

/// The TCP port on 127.0.0.1 where the builder's SSH is reached.
pub const DEFAULT_PORT: u16 = 31022;
/// The guest's vsock port bridged to its sshd.
pub const SSH_VSOCK_PORT: u32 = 22;
/// The host vsock port the guest's control channel connects to (`vsock.sock_10022`).
pub const CONTROL_PORT: u32 = 10022;
/// The virtio-fs tag of the read-only share holding the guest's keys.
pub const KEY_TAG: &str = "aivmm-builder";
/// The ssh_config host alias and the user the builder is reached as.
pub const HOST_ALIAS: &str = "aivmm-builder";
/// The login user in the guest.
pub const USER: &str = "builder";

/// Errors of `aivmm builder`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being worked on.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Another `aivmm builder serve` holds the state directory.
    #[error("another `aivmm builder serve`{pid} is running on {dir}; stop it first or use another --state-dir")]
    Busy {
        /// The state directory.
        dir: PathBuf,
        /// " (pid N)" when known.
        pid: String,
    },
    /// The listening socket is not on a loopback address.
    #[error(
        "refusing to serve on {0}: the builder listens on loopback addresses only (127.0.0.1, ::1)"
    )]
    NotLoopback(String),
    /// A socket handed over by the service manager is unusable.
    #[error("the socket handed over by the service manager is unusable: {0}")]
    BadActivation(String),
    /// The port could not be bound.
    #[error("cannot listen on 127.0.0.1:{port}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// Why.
        source: std::io::Error,
    },
    /// Key generation or encoding failed.
    #[error("ssh key {path}: {detail}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A bad duration on the command line.
    #[error("bad duration '{0}' (use e.g. 90s, 30m, 3h, 1h30m or plain seconds)")]
    Duration(String),
    /// A bad argument.
    #[error("{0}")]
    Arg(String),
    /// The guest image could not be found or built.
    #[error("builder image: {0}")]
    Image(#[from] crate::image::Error),
    /// The VM did not come up.
    #[error("the builder VM did not start: {0}")]
    Boot(String),
    /// The guest's sshd could not be reached over vsock.
    #[error("cannot reach the guest's sshd over vsock: {0}")]
    Guest(String),
    /// The server is shutting down.
    #[error("the builder is shutting down")]
    ShuttingDown,
    /// No state directory can be named.
    #[error("no state directory: set --state-dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
}

/// `Result` of `aivmm builder`.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

/// Runs one `aivmm builder` subcommand; returns the exit status.
pub fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Serve(a) => serve::serve(&a).map(|()| 0),
        Command::Status(a) => state::print_status(&a.state_dir()?).map(|()| 0),
        Command::Install(a) => install::install(&a).map(|()| 0),
        Command::Uninstall(a) => install::uninstall(&a).map(|()| 0),
    }
}
