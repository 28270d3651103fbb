//! virtio-vsock (device type 19) in "hybrid" mode: guest sockets meet host unix sockets.
//!
//! The guest has a context ID (CID, at least 3) and talks to the host's CID 2. There
//! is no host vsock driver involved: aivmm terminates the virtio-vsock stream
//! protocol itself and relays each connection to a unix stream socket.
//!
//! - **Host to guest.** aivmm listens on [`VsockConfig::uds_path`]. A host program
//!   connects, writes `CONNECT <port>\n`, and aivmm sends the guest a REQUEST from
//!   CID 2 and a fresh host port. When the guest answers RESPONSE, aivmm writes
//!   `OK <host_port>\n` on the unix stream and relays bytes both ways. A refusal
//!   (RST), a timeout or a bad line closes the unix stream.
//! - **Guest to host.** A guest connect to CID 2, port P, makes aivmm connect to the
//!   unix socket `<uds_path>_<P>`: RESPONSE if that works, RST if not.
//!
//! Data flow: [`device`] owns the worker thread and the three queues. Guest packets
//! from the tx queue are parsed by [`packet`] and handed to the [`muxer`], which keeps
//! every [`connection`] keyed by (host port, guest port) and the epoll set of all
//! unix sockets. Whenever the rx queue has buffers, the device asks the muxer for the
//! next packet (a control packet, or data read from a unix stream within the guest's
//! credit) and writes it to the guest.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
mod unix;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

pub use device::{Vsock, VsockConfig};
#[cfg(any(test, feature = "test-utils"))]
pub use worker::SyncWorker;

/// The virtio device type of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The rx queue (device to driver) index.
pub const RXQ_INDEX: usize = 0;
/// The tx queue (driver to device) index.
pub const TXQ_INDEX: usize = 1;
/// The event queue index.
pub const EVQ_INDEX: usize = 2;
/// The number of queues.
pub const NUM_QUEUES: usize = 3;

/// The well-known CID of the host.
pub const HOST_CID: u64 = 2;
/// The smallest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Length of the configuration space (`le64 guest_cid`).
pub const CONFIG_LEN: usize = 8;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The most payload one packet may carry, either way.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// The buffer each connection advertises to the guest (`buf_alloc`): the most
/// guest data aivmm holds for a unix stream that is not being read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// The most connections (and host handshakes in progress) at once. With
/// [`CONN_BUF_SIZE`] each, a guest that fills every one while no host program
/// reads holds at most 64 MiB of aivmm's memory (the user-mode network's bound
/// too). An agent session, `aivmm exec`s, ssh sessions and a builder's
/// connections are a few dozen.
pub const MAX_CONNECTIONS: usize = 256;
/// The most RSTs for unknown connections queued for the guest; past this, tx
/// processing waits for the guest to give rx buffers.
pub const MAX_PENDING_RST: usize = 256;
/// The longest `CONNECT <port>\n` line accepted from a host program.
pub const MAX_HANDSHAKE_LINE: usize = 32;
/// How long a host program has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to answer a REQUEST from the host.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the guest closed may take to flush its data to the host.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Host ports for host-initiated connections start here.
pub const EPHEMERAL_PORT_BASE: u32 = 1 << 30;

/// `type`: a stream socket.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// `op`: invalid.
pub const VSOCK_OP_INVALID: u16 = 0;
/// `op`: connect.
pub const VSOCK_OP_REQUEST: u16 = 1;
/// `op`: connection accepted.
pub const VSOCK_OP_RESPONSE: u16 = 2;
/// `op`: connection refused or torn down.
pub const VSOCK_OP_RST: u16 = 3;
/// `op`: the sender stops receiving and/or sending (see the `SHUTDOWN_F_*` flags).
pub const VSOCK_OP_SHUTDOWN: u16 = 4;
/// `op`: data.
pub const VSOCK_OP_RW: u16 = 5;
/// `op`: the sender's `buf_alloc`/`fwd_cnt` changed.
pub const VSOCK_OP_CREDIT_UPDATE: u16 = 6;
/// `op`: the sender asks for a CREDIT_UPDATE.
pub const VSOCK_OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_SHUTDOWN_F_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_SHUTDOWN_F_SEND: u32 = 2;

/// Errors of virtio-vsock.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved; use 3 or more")]
    ReservedCid(u64),
    /// Another program is listening on the socket path.
    #[error("{0} is in use: something is listening on it")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a unix socket")]
    NotASocket(PathBuf),
    /// The socket path is too long for a unix socket address.
    #[error("{0} is too long for a unix socket path")]
    PathTooLong(PathBuf),
    /// Removing a stale socket file failed.
    #[error("removing the stale socket {path} failed: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Binding or listening on the socket path failed.
    #[error("listening on {path} failed: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The transport gave fewer than three queues, or the rx or tx queue is not ready.
    #[error("the rx and tx queues are missing or not ready")]
    NoQueue,
    /// The device is already running.
    #[error("the device is already active")]
    AlreadyActive,
    /// An EventFd, epoll or socket operation failed during setup.
    #[error("event setup failed: {0}")]
    Event(#[source] std::io::Error),
    /// The worker thread could not be started.
    #[error("spawning the worker thread failed: {0}")]
    Spawn(#[source] std::io::Error),
}

/// `Result` of virtio-vsock.
pub type Result<T> = std::result::Result<T, Error>;
