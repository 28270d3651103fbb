//! A hostile guest's frames against the gateway, for the property test below and
//! the `usernet` cargo-fuzz target: frames built from well-formed templates (ARP,
//! TCP to an allowed host port and to closed addresses, DNS, DHCP, ICMP, UDP,
//! fragments, IPv6) and then damaged byte by byte, cut short or padded.
//!
//! The gateway allows only the host's loopback (through the gateway address), so
//! nothing a case does reaches beyond this machine; a listener there makes some
//! SYNs real connections whose later segments the mutations then attack.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, ETHERNET_HEADER_LEN, IPV4_HEADER_LEN,
};

use crate::virtio::net::backend::Stream;
use crate::virtio::net::VNET_HDR_LEN;
use super::stack::Stack;
use super::{frames, policy, Limits, UserNetConfig, GATEWAY, GATEWAY_MAC, GUEST};
use crate::virtio::net::backend::Backend;

/// The guest's MAC in the templates.
pub const GUEST_MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// How many templates [`template`] has.
pub const TEMPLATES: usize = 10;

/// A gateway fed frame by frame, on the calling thread.
pub struct FuzzGateway {
    stack: Stack,
    device: Stream,
    listener: TcpListener,
    buf: Vec<u8>,
}

impl FuzzGateway {
    /// A gateway with small limits (so that a run reaches them), allowing only the
    /// host's loopback, with a listener there.
    pub fn new() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        listener.set_nonblocking(true).expect("non-blocking");
        let config = UserNetConfig {
            policy: policy::PolicyConfig {
                allow: vec!["127.0.0.1".into()],
                allow_only: Some(Vec::new()),
            },
            limits: Limits {
                tcp_connections: 16,
                tcp_buffer: 4096,
                tcp_buffer_min: 1024,
                tcp_buffer_budget: 16 * 1024,
                udp_flows: 8,
                dns_pending: 4,
                guest_queue_bytes: 256 << 10,
            },
            ..Default::default()
        };
        let policy = policy::EgressPolicy::new(&config.policy, |_| Vec::new()).expect("policy");
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let mut stack = Stack::new(Stream::new(b).expect("stream"), &config, policy).expect("stack");
        stack.start_for_test().expect("resolver");
        Self {
            stack,
            device: Stream::new(a).expect("stream"),
            listener,
            buf: vec![0u8; crate::virtio::net::MAX_FRAME_LEN],
        }
    }

    /// The port of the host listener the allowed SYNs reach.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Hands `frame` to the gateway, runs it once, accepts (and drops at once)
    /// what reached the listener, and returns the frames it sent the guest.
    pub fn frame(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        if !frame.is_empty() && VNET_HDR_LEN + frame.len() <= crate::virtio::net::MAX_FRAME_LEN {
            // Behind a vnet header, as the device sends it; the gateway ignores its flags.
            let mut pkt = vec![0u8; VNET_HDR_LEN];
            pkt.extend_from_slice(frame);
            let _ = self.device.send(&pkt);
            let _ = self.device.flush();
        }
        let _ = self.stack.step();
        while self.listener.accept().is_ok() {}
        let _ = self.stack.step();
        let mut out = Vec::new();
        while let Ok(Some(n)) = self.device.recv(&mut self.buf) {
            out.push(self.buf.get(VNET_HDR_LEN..n).unwrap_or_default().to_vec());
        }
        out
    }

    /// How many TCP connections the gateway holds.
    pub fn connections(&self) -> usize {
        self.stack.connection_count()
    }

    /// Whether every table is within its limit.
    pub fn check(&self) -> Result<(), String> {
        self.stack.check_bounds()
    }
}

impl Default for FuzzGateway {
    fn default() -> Self {
        Self::new()
    }
}

fn eth(buf: &mut [u8], proto: EthernetProtocol) {
    EthernetRepr {
        src_addr: GUEST_MAC,
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype: proto,
    }
    .emit(&mut EthernetFrame::new_unchecked(buf));
}

/// A TCP segment from the guest (options on a SYN as Linux sends them).
pub fn tcp(dst: SocketAddrV4, src_port: u16, control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port,
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 65535,
        window_scale: if control == TcpControl::Syn { Some(7) } else { None },
        max_seg_size: if control == TcpControl::Syn { Some(1460) } else { None },
        sack_permitted: control == TcpControl::Syn,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST,
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: repr.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0u8; ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + repr.buffer_len()];
    eth(&mut buf, EthernetProtocol::Ipv4);
    let caps = ChecksumCapabilities::default();
    let ipb = &mut buf[ETHERNET_HEADER_LEN..];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut *ipb), &caps);
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut ipb[IPV4_HEADER_LEN..]),
        &GUEST.into(),
        &(*dst.ip()).into(),
        &caps,
    );
    buf
}

fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Template `i % TEMPLATES`, varied by `seed`; `port` is the allowed host port.
pub fn template(i: usize, seed: u32, port: u16) -> Vec<u8> {
    let gw = GATEWAY;
    let sport = 1024 + (seed % 60000) as u16;
    match i % TEMPLATES {
        0 => {
            let repr = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: GUEST_MAC,
                source_protocol_addr: GUEST,
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: Ipv4Addr::from(u32::from(gw) + seed % 3),
            };
            let mut buf = vec![0u8; ETHERNET_HEADER_LEN + repr.buffer_len()];
            eth(&mut buf, EthernetProtocol::Arp);
            repr.emit(&mut ArpPacket::new_unchecked(&mut buf[ETHERNET_HEADER_LEN..]));
            buf
        }
        1 => tcp(SocketAddrV4::new(gw, port), sport, TcpControl::Syn, seed, None, &[]),
        2 => tcp(SocketAddrV4::new(gw, port), sport, TcpControl::None, seed, Some(seed ^ 0x5555), b"data"),
        3 => frames::udp(
            GUEST_MAC,
            EthernetAddress(GATEWAY_MAC),
            SocketAddrV4::new(GUEST, sport),
            SocketAddrV4::new(gw, 53),
            &dns_query(seed as u16, if seed % 2 == 0 { "localhost" } else { "example.com" }),
        ),
        4 => {
            let mut dhcp = vec![0u8; 300];
            dhcp[0] = 1; // BOOTREQUEST
            dhcp[1] = 1;
            dhcp[2] = 6;
            dhcp[4..8].copy_from_slice(&seed.to_be_bytes());
            dhcp[28..34].copy_from_slice(&GUEST_MAC.0);
            dhcp[236..240].copy_from_slice(&[99, 130, 83, 99]);
            dhcp[240..243].copy_from_slice(&[53, 1, 1 + (seed % 8) as u8]);
            dhcp[243] = 255;
            frames::udp(
                GUEST_MAC,
                EthernetAddress::BROADCAST,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
                &dhcp,
            )
        }
        5 => frames::icmp(
            GUEST_MAC,
            EthernetAddress(GATEWAY_MAC),
            GUEST,
            if seed % 2 == 0 { gw } else { Ipv4Addr::new(10, 9, 8, 7) },
            &Icmpv4Repr::EchoRequest {
                ident: seed as u16,
                seq_no: (seed >> 16) as u16,
                data: b"fuzz",
            },
        ),
        6 => tcp(
            SocketAddrV4::new(Ipv4Addr::from(seed | 0x0100_0000), 443),
            sport,
            TcpControl::Syn,
            seed,
            None,
            &[],
        ),
        7 => frames::udp(
            GUEST_MAC,
            EthernetAddress(GATEWAY_MAC),
            SocketAddrV4::new(GUEST, sport),
            SocketAddrV4::new(if seed % 2 == 0 { gw } else { Ipv4Addr::from(seed) }, (seed >> 8) as u16),
            b"udp payload",
        ),
        8 => {
            // An IPv4 fragment (more-fragments set).
            let mut f = tcp(SocketAddrV4::new(gw, port), sport, TcpControl::None, seed, Some(0), b"frag");
            let mut ip = Ipv4Packet::new_unchecked(&mut f[ETHERNET_HEADER_LEN..]);
            ip.set_more_frags(true);
            ip.fill_checksum();
            f
        }
        _ => {
            let mut buf = vec![0u8; ETHERNET_HEADER_LEN + 40 + (seed % 64) as usize];
            eth(&mut buf, EthernetProtocol::Ipv6);
            buf[ETHERNET_HEADER_LEN] = 0x60;
            buf
        }
    }
}

/// Damages `frame`: each `(position, byte)` XORed in, then cut to `cut` bytes if
/// shorter, then `pad` bytes appended.
pub fn mutate(mut frame: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>, pad: &[u8]) -> Vec<u8> {
    if !frame.is_empty() {
        for &(pos, b) in flips {
            let i = pos % frame.len();
            frame[i] ^= b;
        }
    }
    if let Some(n) = cut {
        frame.truncate(n);
    }
    frame.extend_from_slice(pad);
    frame
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    /// Cases per run (debug build, CI), as for the other devices.
    const CASES: u32 = 100_000;

    /// A guest that resets its half-open connections (SYN, then RST: what a port
    /// scanner does) never runs the connection table full: each RST sends smoltcp's
    /// socket back to LISTEN, and such a connection is closed.
    #[test]
    fn syn_then_rst_gives_the_slot_back() {
        let mut gw = FuzzGateway::new();
        // A host server that keeps every connection open (its peer never sees EOF).
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = SocketAddrV4::new(GATEWAY, held.local_addr().unwrap().port());
        std::thread::spawn(move || {
            let mut keep = Vec::new();
            while let Ok((s, _)) = held.accept() {
                keep.push(s);
            }
        });
        gw.frame(&template(0, 0, 0)); // the guest's ARP for the gateway: smoltcp learns its MAC
        let synack_seq = |out: &[Vec<u8>], port: u16| {
            out.iter().find_map(|f| {
                let i = frames::parse_ipv4(f)?;
                let t = TcpPacket::new_checked(&f[i.payload_at..i.payload_at + i.payload_len]).ok()?;
                (t.syn() && t.ack() && t.dst_port() == port).then(|| t.seq_number())
            })
        };
        for i in 0..40u16 {
            let mut out = gw.frame(&tcp(dst, 2000 + i, TcpControl::Syn, 1000, None, &[]));
            for _ in 0..20 {
                if synack_seq(&out, 2000 + i).is_some() {
                    break;
                }
                out = gw.frame(&[]);
            }
            let isn = synack_seq(&out, 2000 + i).expect("a SYN-ACK");
            gw.frame(&tcp(dst, 2000 + i, TcpControl::Rst, 1001, Some((isn + 1).0 as u32), &[]));
            gw.check().unwrap();
            assert_eq!(gw.connections(), 0, "round {i}: the reset connection still holds its slot");
        }
        let mut out = gw.frame(&tcp(dst, 3000, TcpControl::Syn, 5000, None, &[]));
        for _ in 0..20 {
            if !out.is_empty() {
                break;
            }
            out = gw.frame(&[]);
        }
        let synack = out.iter().any(|f| {
            frames::parse_ipv4(f).is_some_and(|i| {
                i.protocol == IpProtocol::Tcp
                    && TcpPacket::new_checked(&f[i.payload_at..i.payload_at + i.payload_len])
                        .is_ok_and(|t| t.syn() && t.ack() && t.dst_port() == 3000)
            })
        });
        assert!(synack, "a new connection after 40 reset ones got no SYN-ACK");
    }

    #[test]
    fn hostile_frames_never_panic_or_outgrow_the_limits() {
        let gw = std::cell::RefCell::new(FuzzGateway::new());
        let port = gw.borrow().port();
        let mut runner = TestRunner::new(Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (
            0..TEMPLATES,
            any::<u32>(),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            proptest::option::weighted(0.2, 0usize..120),
            proptest::collection::vec(any::<u8>(), 0..8),
        );
        runner
            .run(&strategy, |(t, seed, flips, cut, pad)| {
                let f = mutate(template(t, seed, port), &flips, cut, &pad);
                let mut g = gw.borrow_mut();
                g.frame(&f);
                g.check().map_err(TestCaseError::fail)?;
                Ok(())
            })
            .unwrap();
        // Still serving: a clean DHCP DISCOVER gets an OFFER.
        let mut gw = gw.into_inner();
        let mut offered = false;
        for _ in 0..50 {
            let out = gw.frame(&template(4, 0, port)); // seed 0: a DISCOVER
            offered |= out.iter().any(|f| {
                frames::parse_ipv4(f)
                    .and_then(|i| frames::parse_udp(f, &i).map(|(s, d, _)| (s, d)))
                    == Some((67, 68))
            });
            if offered {
                break;
            }
        }
        assert!(offered, "no DHCP answer after the hostile frames");
    }
}
