//! virtio-net (device type 1): the guest's network card.
//!
//! The device has a receive queue (0) and a transmit queue (1). Every frame on
//! either queue starts with the 12-byte `virtio_net_hdr_v1`. [`device`] holds the
//! [`Net`] device: its features, its configuration space (MAC and link status) and
//! the [`backend::Backend`] frames go to on the host. On activation it starts
//! [`worker`], one thread that epolls both queues' `EventFd`s, the backend's fd and
//! a kill `EventFd`:
//!
//! - TX: each chain is gathered into a bounded buffer, the header is stripped if
//!   the backend carries none, and the frame is sent. A busy backend holds the
//!   chain until its fd is writable (backpressure to the guest).
//! - RX: a frame is read from the backend only when there is somewhere to put it;
//!   it is written across one chain, or several with `VIRTIO_NET_F_MRG_RXBUF`
//!   (`num_buffers` in the header says how many). With no buffers the frame waits
//!   and the backend fd is not polled until the driver adds some.
//!
//! Backends ([`backend`]): passt (user-mode networking, the default), a TAP device,
//! or a unix datagram socket (gvproxy / vmnet-helper style). Only TAP carries a
//! vnet header, so only TAP gets checksum and segmentation offloads.
//!
//! The backend outlives a device reset: the worker hands it back when it stops.

pub mod backend;
pub mod usernet;
pub mod device;
#[cfg(test)]
mod proptests;
mod worker;

use std::path::PathBuf;

pub use backend::{Backend, BackendConfig, PortForward};
pub use device::{Net, NetConfig};
#[cfg(any(test, feature = "test-utils"))]
pub use worker::SyncWorker;

/// The virtio device type of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// The number of queues: receive and transmit.
pub const NUM_QUEUES: usize = 2;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue.
pub const TX_INDEX: usize = 1;
/// The length of `virtio_net_hdr_v1` (with `num_buffers`, always present in virtio 1.x).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// The longest Ethernet frame (without the vnet header) the device moves: a
/// 64 KiB GSO packet plus link-layer headers.
pub const MAX_FRAME_LEN: usize = 65550;
/// The length of the configuration space we expose: `mac` and `status`.
pub const CONFIG_LEN: usize = 8;

/// Errors of virtio-net.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The passt binary is not on PATH.
    #[error("passt is not installed: apt install passt, or use --net none/tap")]
    PasstNotInstalled,
    /// Starting passt failed for another reason.
    #[error("starting passt ({}) failed: {source}", .binary.display())]
    PasstSpawn {
        /// The binary we tried to run.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A forwarded host port is taken by another process.
    #[error("port {port} ({}) is already in use on 127.0.0.1", if *.udp { "udp" } else { "tcp" })]
    PortInUse {
        /// The host port.
        port: u16,
        /// Whether it is a UDP forward.
        udp: bool,
    },
    /// A port forward names port 0.
    #[error("port forward {host}:{guest} is invalid: ports must be 1-65535")]
    InvalidPort {
        /// The host port.
        host: u16,
        /// The guest port.
        guest: u16,
    },
    /// Checking whether a host port is free failed for another reason.
    #[error("checking host port {port} failed: {source}")]
    PortCheck {
        /// The host port.
        port: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// /dev/net/tun does not exist.
    #[error("/dev/net/tun does not exist (load the tun module, or use --net passt)")]
    TunMissing,
    /// The TAP device could not be opened or created for lack of rights.
    #[error(
        "opening tap device {name:?} was refused: it needs CAP_NET_ADMIN or a pre-created tap owned by you \
         (ip tuntap add {name} mode tap user $USER vnet_hdr)"
    )]
    TapPermission {
        /// The interface name.
        name: String,
    },
    /// The TAP device is attached to another process.
    #[error("tap device {name:?} is busy (another process has it open)")]
    TapBusy {
        /// The interface name.
        name: String,
    },
    /// The TAP interface name is empty, too long or has a NUL byte.
    #[error("tap device name {name:?} is invalid (1-15 bytes, no NUL)")]
    TapName {
        /// The interface name.
        name: String,
    },
    /// Another TAP setup step failed.
    #[error("setting up tap device {name:?} failed ({what}): {source}")]
    Tap {
        /// The interface name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting the unix datagram socket failed.
    #[error("connecting to the network socket {} failed: {source}", .path.display())]
    UnixConnect {
        /// The peer's socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A socket operation failed.
    #[error("network socket setup failed: {0}")]
    Socket(#[source] std::io::Error),
    /// The configured MAC address is a multicast address.
    #[error("MAC address {0} is a multicast address")]
    MulticastMac(String),
    /// Generating a random MAC address failed.
    #[error("generating a MAC address failed: {0}")]
    Random(#[source] std::io::Error),
    /// The transport gave fewer than two queues, or one not ready.
    #[error("the rx and tx queues are missing or not ready")]
    NoQueue,
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// The backend was lost (its worker thread panicked).
    #[error("the network backend is gone")]
    NoBackend,
    /// An EventFd or epoll operation failed.
    #[error("event setup failed: {0}")]
    Event(#[source] std::io::Error),
    /// The worker thread could not be started.
    #[error("spawning the worker thread failed: {0}")]
    Spawn(#[source] std::io::Error),
    /// The backend exists only on Linux.
    #[error("{0} is Linux-only; use a unix datagram socket (gvproxy, vmnet-helper)")]
    Unsupported(&'static str),
    /// The user-mode network could not start (a `--forward` port is taken, a
    /// `--net-allow` name does not resolve, ...).
    #[error("the user-mode network: {0}")]
    UserNet(std::io::Error),
}

/// `Result` of virtio-net.
pub type Result<T> = std::result::Result<T, Error>;

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
