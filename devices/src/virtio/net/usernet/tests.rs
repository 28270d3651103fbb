//! The gateway end to end, in-process: a second smoltcp stack plays the guest
//! on the device end of the frame socket (DHCP client, TCP, UDP), and real host
//! sockets sit on the other side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpEndpoint, IpProtocol,
};

use super::*;
use crate::virtio::net::backend::Backend;

/// The device end of the frame socket, as smoltcp's link. It does what the
/// virtio-net worker does for a guest without `VIRTIO_NET_F_GUEST_CSUM` (the
/// test guest checks every checksum): finishes the partial TCP checksums.
struct GuestLink {
    stream: super::Link,
    buf: Vec<u8>,
}

impl GuestLink {
    /// Sends one frame behind a zeroed vnet header.
    fn send(&mut self, frame: &[u8]) -> bool {
        send_frame(&mut self.stream, frame)
    }

    /// Receives one frame into `buf` (its vnet header dropped, its checksum finished).
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        let n = self.stream.recv(&mut self.buf).unwrap()?;
        assert!(n >= VNET_HDR_LEN, "a frame without its vnet header");
        assert!(crate::virtio::net::complete_partial_csum(&mut self.buf[..n]));
        let len = n - VNET_HDR_LEN;
        buf[..len].copy_from_slice(&self.buf[VNET_HDR_LEN..n]);
        Some(len)
    }
}

fn send_frame(stream: &mut super::Link, frame: &[u8]) -> bool {
    let mut pkt = vec![0u8; VNET_HDR_LEN];
    pkt.extend_from_slice(frame);
    stream.send(&pkt).unwrap()
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut super::Link);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0u8; len];
        let r = f(&mut b);
        // The gateway drains its socket on its own thread: wait out a full one.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !send_frame(self.0, &b) {
            assert!(Instant::now() < deadline, "the gateway stopped reading");
            std::thread::sleep(Duration::from_millis(1));
        }
        while !self.0.flush().unwrap() {
            std::thread::sleep(Duration::from_millis(1));
        }
        r
    }
}

impl Device for GuestLink {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let mut frame = vec![0u8; self.buf.len()];
        let n = self.recv(&mut frame)?;
        frame.truncate(n);
        Some((Rx(frame), Tx(&mut self.stream)))
    }
    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.stream))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Guest {
    link: GuestLink,
    iface: Interface,
    sockets: SocketSet<'static>,
    t0: Instant,
}

impl Guest {
    /// A guest on a fresh gateway, its address from the gateway's DHCP server.
    fn new(config: &UserNetConfig) -> Self {
        let stream = start(config, false).unwrap();
        let mut link = GuestLink {
            stream,
            buf: vec![0u8; crate::virtio::net::MAX_FRAME_LEN],
        };
        let mut c = Config::new(HardwareAddress::Ethernet(EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        c.random_seed = 7;
        let t0 = Instant::now();
        let iface = Interface::new(c, &mut link, SmolInstant::from_millis(0));
        let mut g = Self {
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            t0,
        };
        let dhcp = g.sockets.add(dhcpv4::Socket::new());
        let mut leased = None;
        g.run_until(Duration::from_secs(10), |g| {
            if let Some(dhcpv4::Event::Configured(cfg)) = g.sockets.get_mut::<dhcpv4::Socket>(dhcp).poll() {
                leased = Some((cfg.address, cfg.router, cfg.dns_servers.to_vec()));
            }
            leased.is_some()
        });
        let (address, router, dns) = leased.expect("a DHCP lease");
        assert_eq!(address, smoltcp::wire::Ipv4Cidr::new(GUEST, PREFIX_LEN));
        assert_eq!(router, Some(GATEWAY));
        assert_eq!(dns, vec![GATEWAY]);
        g.iface.update_ip_addrs(|a| {
            a.push(IpCidr::new(GUEST.into(), PREFIX_LEN)).unwrap();
        });
        g.iface.routes_mut().add_default_ipv4_route(GATEWAY).unwrap();
        g.sockets.remove(dhcp);
        g
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.t0.elapsed().as_micros() as i64)
    }

    fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.link, &mut self.sockets);
    }

    /// Polls until `done` or `limit`; returns whether `done` held.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            self.poll();
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        false
    }

    fn tcp(&mut self, to: (Ipv4Addr, u16), local_port: u16) -> SocketHandle {
        let s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
        );
        let h = self.sockets.add(s);
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, IpEndpoint::new(to.0.into(), to.1), local_port)
            .unwrap();
        h
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
}

#[test]
fn tcp_flows_both_ways_with_half_close_through_an_allowed_loopback_port() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = pattern(3 << 20, 1);
    let down = pattern(2 << 20, 2);
    let (up2, down2) = (up.clone(), down.clone());
    // The host side reads all the guest sends (until its FIN), then answers.
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert!(got == up2, "the guest's bytes arrived changed ({} of {})", got.len(), up2.len());
        s.write_all(&down2).unwrap();
    });
    let config = UserNetConfig {
        policy: PolicyConfig {
            allow: vec![format!("127.0.0.1:{port}")],
            allow_only: None,
        },
        ..Default::default()
    };
    let mut g = Guest::new(&config);
    let h = g.tcp((GATEWAY, port), 40000);
    let (mut sent, mut got) = (0usize, Vec::new());
    let ok = g.run_until(Duration::from_secs(60), |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(h);
        if s.can_send() && sent < up.len() {
            sent += s.send_slice(&up[sent..]).unwrap();
            if sent == up.len() {
                s.close(); // half-close: the host still answers
            }
        }
        while s.can_recv() {
            s.recv(|b| {
                got.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        !s.may_recv() && sent == up.len() && got.len() == down.len()
    });
    assert!(ok, "sent {sent} of {}, got {} of {}", up.len(), got.len(), down.len());
    assert!(got == down, "the host's bytes arrived changed");
    server.join().unwrap();
}

/// A host peer that resets its connection: the guest's socket is reset too, not
/// left waiting.
#[test]
fn a_host_reset_reaches_the_guest() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
        drop(s); // RST
    });
    let mut g = Guest::new(&UserNetConfig {
        policy: PolicyConfig {
            allow: vec![format!("127.0.0.1:{port}")],
            allow_only: None,
        },
        ..Default::default()
    });
    let h = g.tcp((GATEWAY, port), 43000);
    assert!(g.run_until(Duration::from_secs(5), |g| g.sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Established));
    assert!(
        g.run_until(Duration::from_secs(5), |g| g.sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Closed),
        "the guest's socket is still {}",
        g.sockets.get_mut::<tcp::Socket>(h).state()
    );
    server.join().unwrap();
}

#[test]
fn refused_destinations_get_a_reset_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut g = Guest::new(&UserNetConfig::default());
    for (i, to) in [(GATEWAY, port), (Ipv4Addr::new(192, 168, 1, 1), 80), (Ipv4Addr::new(169, 254, 169, 254), 80)]
        .into_iter()
        .enumerate()
    {
        let h = g.tcp(to, 41000 + i as u16);
        let t = Instant::now();
        let closed = g.run_until(Duration::from_secs(5), |g| {
            g.sockets.get_mut::<tcp::Socket>(h).state() == tcp::State::Closed
        });
        assert!(closed, "{to:?}: no RST");
        assert!(t.elapsed() < Duration::from_secs(2), "{to:?}: the RST took {:?}", t.elapsed());
    }
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "the host's loopback port was reached");
}

#[test]
fn dns_answers_from_the_hosts_resolver_and_udp_comes_back() {
    let mut g = Guest::new(&UserNetConfig::default());
    let s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<udp::Socket>(h).bind(5353).unwrap();
    let mut q = simple_dns::Packet::new_query(0x4242);
    q.set_flags(simple_dns::PacketFlag::RECURSION_DESIRED);
    q.questions.push(simple_dns::Question::new(
        simple_dns::Name::new_unchecked("localhost"),
        simple_dns::TYPE::A.into(),
        simple_dns::CLASS::IN.into(),
        false,
    ));
    let query = q.build_bytes_vec().unwrap();
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(&query, IpEndpoint::new(IpAddress::Ipv4(GATEWAY), 53))
        .unwrap();
    let mut answer = None;
    assert!(g.run_until(Duration::from_secs(10), |g| {
        if let Ok((data, meta)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
            answer = Some((data.to_vec(), meta.endpoint));
        }
        answer.is_some()
    }));
    let (data, from) = answer.unwrap();
    assert_eq!(from, IpEndpoint::new(IpAddress::Ipv4(GATEWAY), 53));
    let p = simple_dns::Packet::parse(&data).unwrap();
    assert_eq!(p.id(), 0x4242);
    let addrs: Vec<Ipv4Addr> = p
        .answers
        .iter()
        .filter_map(|r| match &r.rdata {
            simple_dns::rdata::RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect();
    assert_eq!(addrs, vec![Ipv4Addr::LOCALHOST]);

    // UDP to an allowed host port (the gateway is the host's loopback) and back.
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    drop(g);
    let mut g = Guest::new(&UserNetConfig {
        policy: PolicyConfig {
            allow: vec![format!("127.0.0.1:{port}")],
            allow_only: None,
        },
        ..Default::default()
    });
    let s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<udp::Socket>(h).bind(6000).unwrap();
    g.sockets
        .get_mut::<udp::Socket>(h)
        .send_slice(b"ping", IpEndpoint::new(IpAddress::Ipv4(GATEWAY), port))
        .unwrap();
    g.run_until(Duration::from_millis(200), |_| false);
    let mut b = [0u8; 16];
    echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, peer) = echo.recv_from(&mut b).unwrap();
    assert_eq!(&b[..n], b"ping");
    echo.send_to(b"pong", peer).unwrap();
    let mut got = None;
    assert!(g.run_until(Duration::from_secs(5), |g| {
        if let Ok((d, m)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
            got = Some((d.to_vec(), m.endpoint));
        }
        got.is_some()
    }));
    assert_eq!(got.unwrap(), (b"pong".to_vec(), IpEndpoint::new(IpAddress::Ipv4(GATEWAY), port)));
}

#[test]
fn a_forward_reaches_a_guest_server() {
    // A free host port.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = UserNetConfig {
        forwards: vec![PortForward {
            host_port: port,
            guest_port: 8080,
            udp: false,
        }],
        ..Default::default()
    };
    let mut g = Guest::new(&config);
    let s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 64 << 10]),
        tcp::SocketBuffer::new(vec![0; 64 << 10]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<tcp::Socket>(h).listen(8080).unwrap();
    let page = pattern(1 << 20, 3);
    let page2 = page.clone();
    let client = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"GET\n").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert!(got == page2, "got {} bytes", got.len());
    });
    let mut sent = 0;
    let mut asked = Vec::new();
    assert!(g.run_until(Duration::from_secs(30), |g| {
        let s = g.sockets.get_mut::<tcp::Socket>(h);
        while s.can_recv() {
            s.recv(|b| {
                asked.extend_from_slice(b);
                (b.len(), ())
            })
            .unwrap();
        }
        if asked == b"GET\n" && s.can_send() && sent < page.len() {
            sent += s.send_slice(&page[sent..]).unwrap();
            if sent == page.len() {
                s.close();
            }
        }
        sent == page.len() && matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait | tcp::State::FinWait2 | tcp::State::Closing | tcp::State::LastAck)
            && s.send_queue() == 0
    }));
    client.join().unwrap();
}

#[test]
fn the_connection_limit_refuses_instead_of_growing() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = UserNetConfig {
        policy: PolicyConfig {
            allow: vec![format!("127.0.0.1:{port}")],
            allow_only: None,
        },
        limits: Limits {
            tcp_connections: 4,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut g = Guest::new(&config);
    let hs: Vec<SocketHandle> = (0..6).map(|i| g.tcp((GATEWAY, port), 42000 + i)).collect();
    assert!(g.run_until(Duration::from_secs(10), |g| {
        hs.iter().all(|h| {
            matches!(g.sockets.get_mut::<tcp::Socket>(*h).state(), tcp::State::Established | tcp::State::Closed)
        })
    }));
    let states: Vec<tcp::State> = hs.iter().map(|h| g.sockets.get_mut::<tcp::Socket>(*h).state()).collect();
    let open = states.iter().filter(|s| **s == tcp::State::Established).count();
    assert_eq!(open, 4, "{states:?}");
}

#[test]
fn a_udp_forward_carries_datagrams_both_ways() {
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut g = Guest::new(&UserNetConfig {
        forwards: vec![PortForward {
            host_port: port,
            guest_port: 7000,
            udp: true,
        }],
        ..Default::default()
    });
    let s = udp::Socket::new(
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
        udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 4096]),
    );
    let h = g.sockets.add(s);
    g.sockets.get_mut::<udp::Socket>(h).bind(7000).unwrap();
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.send_to(b"hi guest", ("127.0.0.1", port)).unwrap();
    let mut got = None;
    assert!(g.run_until(Duration::from_secs(5), |g| {
        if let Ok((d, m)) = g.sockets.get_mut::<udp::Socket>(h).recv() {
            got = Some((d.to_vec(), m.endpoint));
        }
        got.is_some()
    }));
    let (data, from) = got.unwrap();
    assert_eq!(data, b"hi guest");
    // The host peer appears on the gateway, at its own port.
    assert_eq!(from, IpEndpoint::new(IpAddress::Ipv4(GATEWAY), host.local_addr().unwrap().port()));
    g.sockets.get_mut::<udp::Socket>(h).send_slice(b"hi host", from).unwrap();
    g.run_until(Duration::from_millis(200), |_| false);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 32];
    let (n, peer) = host.recv_from(&mut b).unwrap();
    assert_eq!((&b[..n], peer.port()), (&b"hi host"[..], port));
}

/// A ping leaves through the host's unprivileged ICMP socket and its reply comes
/// back to the guest; where the host allows no such socket (Linux's
/// net.ipv4.ping_group_range), the guest is told "prohibited" at once.
#[test]
fn pings_go_through_the_hosts_icmp_socket_or_are_refused_at_once() {
    let mut g = Guest::new(&UserNetConfig {
        policy: PolicyConfig {
            allow: vec!["127.0.0.1".into()],
            allow_only: None,
        },
        ..Default::default()
    });
    let guest_mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let request = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 7,
        data: b"aivmm ping",
    };
    let f = frames::icmp(guest_mac, EthernetAddress(GATEWAY_MAC), GUEST, Ipv4Addr::LOCALHOST, &request);
    assert!(g.link.send(&f));
    let host_can_ping = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::ICMPV4),
    )
    .is_ok();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 70000];
    let answer = loop {
        assert!(Instant::now() < deadline, "no answer to the ping");
        let Some(n) = g.link.recv(&mut buf) else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let Some(info) = frames::parse_ipv4(&buf[..n]) else { continue };
        if info.protocol != IpProtocol::Icmp {
            continue;
        }
        let p = Icmpv4Packet::new_checked(&buf[info.payload_at..info.payload_at + info.payload_len]).unwrap();
        assert!(p.verify_checksum());
        break (info.src, p.msg_type(), p.msg_code(), p.echo_ident(), p.echo_seq_no(), p.data().to_vec());
    };
    if host_can_ping {
        assert_eq!(answer.0, Ipv4Addr::LOCALHOST, "the reply comes from where the ping went");
        assert_eq!(answer.1, smoltcp::wire::Icmpv4Message::EchoReply);
        assert_eq!((answer.3, answer.4, &answer.5[..]), (0x1234, 7, &b"aivmm ping"[..]));
    } else {
        assert_eq!(answer.0, GATEWAY);
        assert_eq!((answer.1, answer.2), (smoltcp::wire::Icmpv4Message::DstUnreachable, 13));
        eprintln!("(this host allows no unprivileged ICMP socket: the refusal was checked)");
    }
}

#[test]
fn the_hosts_addresses_include_its_loopback() {
    // getifaddrs as the policy reads it: every host has 127.0.0.1 on lo (lo0).
    let addrs = host_addresses().unwrap();
    assert!(addrs.contains(&Ipv4Addr::LOCALHOST), "{addrs:?}");
}
