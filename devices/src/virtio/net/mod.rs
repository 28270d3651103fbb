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
//! Backends ([`backend`]): aivmm's own user-mode network ([`usernet`], the
//! default), passt, a TAP device, or a unix datagram socket (gvproxy /
//! vmnet-helper style). TAP and the user-mode network carry a vnet header, so
//! they get checksum offloads (TAP segmentation offloads too); the others get
//! plain frames.
//!
//! The backend outlives a device reset: the worker hands it back when it stops.

pub mod backend;
pub mod usernet;
pub mod device;
#[cfg(test)]
mod proptests;
mod worker;

use std::path::PathBuf;

pub use backend::{Backend, PortForward};
pub use device::{BackendConfig, Net, NetConfig};
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
/// `virtio_net_hdr` flag: the checksum at `csum_start + csum_offset` is only the
/// pseudo-header's; the rest of the packet from `csum_start` must be added.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Offset of `csum_start` in the header.
const CSUM_START_OFFSET: usize = 6;
/// Offset of `csum_offset` in the header.
const CSUM_OFFSET_OFFSET: usize = 8;

/// Finishes the partial checksum of `pkt`, a frame behind its `virtio_net_hdr_v1`,
/// if its header says `NEEDS_CSUM`: for a driver that did not accept
/// `VIRTIO_NET_F_GUEST_CSUM`. Returns false (and leaves `pkt` alone) if the
/// header points outside the frame.
pub fn complete_partial_csum(pkt: &mut [u8]) -> bool {
    if pkt.len() < VNET_HDR_LEN || pkt[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return true;
    }
    let field = |o: usize| usize::from(u16::from_le_bytes([pkt[o], pkt[o + 1]]));
    let start = VNET_HDR_LEN + field(CSUM_START_OFFSET);
    let at = start + field(CSUM_OFFSET_OFFSET);
    if at + 2 > pkt.len() {
        return false;
    }
    let sum = !fold(sum16(&pkt[start..]));
    pkt[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    pkt[0] &= !VIRTIO_NET_HDR_F_NEEDS_CSUM;
    true
}

/// Marks the IPv4 TCP segment in `pkt` (a frame behind a zeroed
/// `virtio_net_hdr_v1`) as carrying a partial checksum: writes the
/// pseudo-header sum into its checksum field and sets `NEEDS_CSUM`, so whoever
/// delivers it (the guest's stack, or [`complete_partial_csum`]) adds the rest.
/// Anything else is left alone. Returns whether it was marked.
pub fn mark_partial_tcp_csum(pkt: &mut [u8]) -> bool {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet};
    let Some(frame) = pkt.get(VNET_HDR_LEN..) else { return false };
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return false };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return false };
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return false;
    }
    let ihl = usize::from(ip.header_len());
    let tcp_len = usize::from(ip.total_len()).saturating_sub(ihl);
    if tcp_len < 20 {
        return false;
    }
    let Ok(len16) = u16::try_from(tcp_len) else { return false };
    let mut sum = sum16(&ip.src_addr().octets()) + sum16(&ip.dst_addr().octets());
    sum += u64::from(u8::from(IpProtocol::Tcp)) + u64::from(len16);
    let pseudo = fold(sum);
    let start = ETHERNET_HEADER_LEN + ihl;
    let at = VNET_HDR_LEN + start + TCP_CSUM_OFFSET;
    pkt[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
    pkt[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    // `start` is below 14 + 60 and the offset is 16: both fit.
    pkt[CSUM_START_OFFSET..CSUM_START_OFFSET + 2].copy_from_slice(&(start as u16).to_le_bytes());
    pkt[CSUM_OFFSET_OFFSET..CSUM_OFFSET_OFFSET + 2]
        .copy_from_slice(&(TCP_CSUM_OFFSET as u16).to_le_bytes());
    true
}

/// The sum of `data` as big-endian 16-bit words (an odd last byte padded with
/// zero), not yet folded: the Internet checksum's accumulator (RFC 1071).
fn sum16(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    let mut sum = 0u64;
    for c in &mut chunks {
        let w = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        sum += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds an accumulator from [`sum16`] into 16 bits (ones' complement addition).
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet header's length.
const ETHERNET_HEADER_LEN: usize = 14;
/// Where the checksum is in a TCP header.
const TCP_CSUM_OFFSET: usize = 16;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet,
        Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    };

    use super::*;

    /// An Ethernet + IPv4 + TCP frame behind a zeroed vnet header, its checksums complete.
    fn segment(payload: &[u8]) -> Vec<u8> {
        let (src, dst) = (Ipv4Address::new(10, 0, 2, 2), Ipv4Address::new(10, 0, 2, 15));
        let tcp = TcpRepr {
            src_port: 443,
            dst_port: 40000,
            control: TcpControl::Psh,
            seq_number: TcpSeqNumber(7),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Tcp,
            payload_len: tcp.buffer_len(),
            hop_limit: 64,
        };
        let mut pkt = vec![0u8; VNET_HDR_LEN + ETHERNET_HEADER_LEN + ip.buffer_len() + tcp.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut pkt[VNET_HDR_LEN..]);
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let caps = ChecksumCapabilities::default();
        let mut ipp = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut ipp, &caps);
        tcp.emit(
            &mut TcpPacket::new_unchecked(ipp.payload_mut()),
            &src.into(),
            &dst.into(),
            &caps,
        );
        pkt
    }

    fn tcp_csum(pkt: &[u8]) -> [u8; 2] {
        let at = VNET_HDR_LEN + ETHERNET_HEADER_LEN + 20 + TCP_CSUM_OFFSET;
        [pkt[at], pkt[at + 1]]
    }

    #[test]
    fn a_marked_segment_completes_to_the_real_checksum() {
        for len in [0usize, 1, 7, 8, 9, 1459, 65000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let good = segment(&payload);
            let mut pkt = good.clone();
            let at = VNET_HDR_LEN + ETHERNET_HEADER_LEN + 20 + TCP_CSUM_OFFSET;
            pkt[at..at + 2].fill(0); // as smoltcp leaves it with Checksum::None
            assert!(mark_partial_tcp_csum(&mut pkt));
            assert_eq!(pkt[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
            assert_eq!(u16::from_le_bytes([pkt[6], pkt[7]]), 34, "csum_start: 14 + 20");
            assert_eq!(u16::from_le_bytes([pkt[8], pkt[9]]), 16, "csum_offset");
            assert!(complete_partial_csum(&mut pkt));
            assert_eq!(tcp_csum(&pkt), tcp_csum(&good), "payload of {len} bytes");
            assert_eq!(pkt[0], 0, "NEEDS_CSUM is cleared once done");
            assert_eq!(pkt[VNET_HDR_LEN..], good[VNET_HDR_LEN..]);
        }
    }

    #[test]
    fn only_ipv4_tcp_is_marked() {
        let mut arp = vec![0u8; VNET_HDR_LEN + 42];
        arp[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x08, 0x06]);
        assert!(!mark_partial_tcp_csum(&mut arp));
        let mut udp = segment(b"x");
        udp[VNET_HDR_LEN + ETHERNET_HEADER_LEN + 9] = 17; // protocol: UDP
        assert!(!mark_partial_tcp_csum(&mut udp));
        for n in 0..VNET_HDR_LEN + 54 {
            let mut cut = segment(b"")[..n].to_vec();
            assert!(!mark_partial_tcp_csum(&mut cut), "a {n}-byte packet");
            assert_eq!(cut[..n.min(1)].iter().sum::<u8>(), 0);
        }
    }

    #[test]
    fn a_checksum_offset_outside_the_frame_is_refused() {
        let mut pkt = segment(b"abc");
        pkt[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        let len = (pkt.len() - VNET_HDR_LEN) as u16;
        pkt[6..8].copy_from_slice(&len.to_le_bytes());
        pkt[8..10].copy_from_slice(&0u16.to_le_bytes());
        let before = pkt.clone();
        assert!(!complete_partial_csum(&mut pkt));
        assert_eq!(pkt, before);
        pkt[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        pkt[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(!complete_partial_csum(&mut pkt));
        // Without the flag nothing is looked at.
        pkt[0] = 0;
        assert!(complete_partial_csum(&mut pkt));
        assert_eq!(pkt[VNET_HDR_LEN..], before[VNET_HDR_LEN..]);
    }
}
