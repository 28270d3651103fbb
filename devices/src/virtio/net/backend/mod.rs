//! Where the device's frames go on the host.
//!
//! A [`Backend`] moves whole Ethernet frames: one `send` is one frame, one `recv`
//! is one frame. Backends are non-blocking; the worker polls [`Backend::as_raw_fd`]
//! for readability when it has guest buffers to fill, and for writability when a
//! `send` said the backend was busy. Only a backend that carries a
//! `virtio_net_hdr_v1` in front of each frame ([`Backend::vnet_hdr_len`] is 12)
//! can take checksum and segmentation offloads; the others get plain, complete,
//! checksummed frames.

// passt and TAP are Linux-only (passt runs only there; TAP needs /dev/net/tun).
// Elsewhere the unix datagram socket (gvproxy, vmnet-helper) is the route.
#[cfg(target_os = "linux")]
pub mod passt;
pub mod stream;
#[cfg(target_os = "linux")]
pub mod tap;
pub mod unix_dgram;

use std::io;
use std::os::fd::RawFd;

#[cfg(target_os = "linux")]
pub use passt::Passt;
pub use stream::Stream;
#[cfg(target_os = "linux")]
pub use tap::Tap;
pub use unix_dgram::UnixDgram;


/// One host-to-guest port forward, bound on 127.0.0.1 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortForward {
    /// The port on the host's 127.0.0.1.
    pub host_port: u16,
    /// The port in the guest.
    pub guest_port: u16,
    /// UDP rather than TCP.
    pub udp: bool,
}

/// A host-side frame transport.
pub trait Backend: Send {
    /// A short name for logs ("passt", "tap", ...).
    fn name(&self) -> &'static str;

    /// How many bytes of `virtio_net_hdr_v1` precede each frame: 0, or
    /// [`VNET_HDR_LEN`](super::VNET_HDR_LEN) for backends that take offloads.
    fn vnet_hdr_len(&self) -> usize {
        0
    }

    /// The virtio-net offload feature bits this backend can honour.
    fn offload_features(&self) -> u64 {
        0
    }

    /// Tells the backend which features the driver accepted, so it only hands
    /// the guest frames (partial checksums, GSO) the guest agreed to.
    fn set_offloads(&mut self, _acked_features: u64) -> io::Result<()> {
        Ok(())
    }

    /// Sends one frame (with its header if `vnet_hdr_len() > 0`). `Ok(true)`: the
    /// frame was taken. `Ok(false)`: the backend is busy; retry the same frame once
    /// the fd is writable. An error means the frame was lost.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;

    /// Whether the backend holds part of a frame it could not write yet.
    fn has_pending_output(&self) -> bool {
        false
    }

    /// Writes out what [`Backend::send`] kept; `Ok(true)` when nothing is left.
    fn flush(&mut self) -> io::Result<bool> {
        Ok(true)
    }

    /// Receives one frame into `buf`. `Ok(None)`: nothing is ready. An error means
    /// the backend is gone (peer closed, device removed).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// The fd to poll.
    fn as_raw_fd(&self) -> RawFd;

    /// The pid of a helper process the backend runs, if any (passt).
    fn process_id(&self) -> Option<u32> {
        None
    }
}

/// Whether an I/O error means "try again later".
pub(crate) fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}
