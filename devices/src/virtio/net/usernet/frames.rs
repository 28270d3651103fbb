//! Frames the gateway writes itself (DHCP, DNS, UDP replies, ICMP), and the parse
//! of a guest frame's IPv4 header that decides where the frame goes.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
    ETHERNET_HEADER_LEN, IPV4_HEADER_LEN, UDP_HEADER_LEN,
};

/// The IPv4 header fields of a guest frame that routing needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    /// The source MAC.
    pub src_mac: EthernetAddress,
    /// The source address.
    pub src: Ipv4Addr,
    /// The destination address.
    pub dst: Ipv4Addr,
    /// The transport protocol.
    pub protocol: IpProtocol,
    /// Where the transport header starts in the frame.
    pub payload_at: usize,
    /// The transport header and payload's length (from the IP header).
    pub payload_len: usize,
}

/// Parses `frame` as Ethernet + IPv4 with a valid header checksum and no
/// fragmentation. `None` for anything else (ARP and IPv6 are the caller's).
pub fn parse_ipv4(frame: &[u8]) -> Option<Ipv4Info> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if !ip.verify_checksum() || ip.more_frags() || ip.frag_offset() != 0 {
        return None;
    }
    let header_len = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    Some(Ipv4Info {
        src_mac: eth.src_addr(),
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        protocol: ip.next_header(),
        payload_at: ETHERNET_HEADER_LEN + header_len,
        payload_len: total - header_len,
    })
}

/// A UDP datagram in `frame` (parsed by [`parse_ipv4`]): (source port,
/// destination port, payload). Its checksum is not checked: a guest with
/// `VIRTIO_NET_F_CSUM` leaves it partial, and a wrong one hurts only the guest.
pub fn parse_udp<'a>(frame: &'a [u8], info: &Ipv4Info) -> Option<(u16, u16, &'a [u8])> {
    let bytes = frame.get(info.payload_at..info.payload_at + info.payload_len)?;
    let udp = UdpPacket::new_checked(bytes).ok()?;
    let repr = UdpRepr::parse(
        &udp,
        &info.src.into(),
        &info.dst.into(),
        &ChecksumCapabilities::ignored(),
    )
    .ok()?;
    Some((repr.src_port, repr.dst_port, udp.payload()))
}

fn ethernet(buf: &mut [u8], src: EthernetAddress, dst: EthernetAddress) {
    let mut eth = EthernetFrame::new_unchecked(buf);
    EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
}

/// An Ethernet frame carrying one UDP datagram from `src` to `dst`.
pub fn udp(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = UDP_HEADER_LEN + payload.len();
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + udp_len];
    ethernet(&mut buf, src_mac, dst_mac);
    let caps = ChecksumCapabilities::default();
    let ip_buf = &mut buf[ETHERNET_HEADER_LEN..];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut *ip_buf), &caps);
    let mut packet = UdpPacket::new_unchecked(&mut ip_buf[IPV4_HEADER_LEN..]);
    UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    }
    .emit(
        &mut packet,
        &(*src.ip()).into(),
        &(*dst.ip()).into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    buf
}

/// An ICMP message from `src` to `dst`.
pub fn icmp(
    src_mac: EthernetAddress,
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    repr: &Icmpv4Repr<'_>,
) -> Vec<u8> {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + repr.buffer_len()];
    ethernet(&mut buf, src_mac, dst_mac);
    let caps = ChecksumCapabilities::default();
    let ip_buf = &mut buf[ETHERNET_HEADER_LEN..];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut *ip_buf), &caps);
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut ip_buf[IPV4_HEADER_LEN..]),
        &caps,
    );
    buf
}

/// "Communication administratively prohibited" for the guest packet in `frame`,
/// sent from `gateway`: how a refused UDP flow or ping is answered.
pub fn prohibited(gateway: Ipv4Addr, gw_mac: EthernetAddress, frame: &[u8], info: &Ipv4Info) -> Option<Vec<u8>> {
    let header = Ipv4Repr {
        src_addr: info.src,
        dst_addr: info.dst,
        next_header: info.protocol,
        payload_len: info.payload_len,
        hop_limit: 64,
    };
    // The offending datagram's first 8 bytes, as RFC 792 asks.
    let data = frame.get(info.payload_at..info.payload_at + info.payload_len.min(8))?;
    let repr = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::CommProhibited,
        header,
        data,
    };
    Some(icmp(gw_mac, info.src_mac, gateway, info.src, &repr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 1]);
    const B: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0, 0, 2]);

    #[test]
    fn a_udp_frame_parses_back() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 4000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53);
        let f = udp(A, B, src, dst, b"hello");
        let info = parse_ipv4(&f).expect("ipv4");
        assert_eq!((info.src_mac, info.src, info.dst, info.protocol), (A, *src.ip(), *dst.ip(), IpProtocol::Udp));
        assert_eq!(parse_udp(&f, &info), Some((4000, 53, &b"hello"[..])));
    }

    #[test]
    fn only_the_ip_header_checksum_is_checked() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 4000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53);
        let mut f = udp(A, B, src, dst, b"hello");
        let last = f.len() - 1;
        f[last] = b'p'; // payload: the UDP checksum is now wrong (or partial)
        let info = parse_ipv4(&f).expect("the IP header is intact");
        assert_eq!(parse_udp(&f, &info), Some((4000, 53, &b"hellp"[..])));
        f[ETHERNET_HEADER_LEN + 8] ^= 1; // TTL: the IP header checksum fails
        assert_eq!(parse_ipv4(&f), None);
    }

    #[test]
    fn truncated_frames_never_panic() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 4000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(1, 1, 1, 1), 53);
        let f = udp(A, B, src, dst, b"hello world");
        for n in 0..f.len() {
            if let Some(info) = parse_ipv4(&f[..n]) {
                let _ = parse_udp(&f[..n], &info);
                let _ = prohibited(Ipv4Addr::new(10, 0, 2, 2), B, &f[..n], &info);
            }
        }
    }

    #[test]
    fn prohibited_quotes_the_datagram() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 15), 4000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 1), 53);
        let f = udp(A, B, src, dst, b"hello");
        let info = parse_ipv4(&f).expect("ipv4");
        let reply = prohibited(Ipv4Addr::new(10, 0, 2, 2), B, &f, &info).expect("reply");
        let r = parse_ipv4(&reply).expect("ipv4");
        assert_eq!((r.src, r.dst, r.protocol), (Ipv4Addr::new(10, 0, 2, 2), *src.ip(), IpProtocol::Icmp));
        let icmp = Icmpv4Packet::new_checked(&reply[r.payload_at..]).expect("icmp");
        assert!(icmp.verify_checksum());
        assert_eq!(icmp.msg_code(), 13);
    }
}
