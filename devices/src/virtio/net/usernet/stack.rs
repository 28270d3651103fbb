//! The gateway's event loop: guest frames in and out over one stream socket,
//! smoltcp for TCP, and host sockets on the other side.
//!
//! One thread, one [`Epoll`] (epoll on Linux, kqueue on macOS), level-triggered:
//! - the frame socket to the virtio-net worker (QEMU's stream framing);
//! - every host socket: a TCP connection per guest connection, a UDP socket per
//!   guest UDP source port, the `--forward` listeners;
//! - the DNS resolver's wake-up fd.
//!
//! A guest frame is routed by its protocol: ARP and TCP go to smoltcp's
//! `Interface` (in AnyIP mode, so it answers for every address); DHCP, DNS to the
//! gateway and all other UDP are handled here on the wire, with frames built by
//! [`frames`]. A new TCP connection is held at its SYN: the host connection is
//! made first, and only when it succeeds does a smoltcp socket listen for that
//! exact endpoint and take the SYN. A refused or failed connection gets a RST.
//!
//! Flow control is end to end: a connection reads its host socket only while its
//! smoltcp send buffer has room, and takes the guest's data only as fast as the
//! host socket accepts it (smoltcp's receive window closes meanwhile).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{
    Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use log::{debug, warn};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, Icmpv4Packet, Icmpv4Repr,
    IpCidr, IpListenEndpoint, IpProtocol, TcpPacket,
};
use smoltcp::phy::ChecksumCapabilities;

use super::dhcp;
use super::dns::{self, Outcome, Resolver};
use super::frames::{self, Ipv4Info};
use super::policy::{EgressPolicy, Verdict};
use super::{Limits, UserNetConfig, DNS_TTL, GATEWAY, GATEWAY_MAC, GUEST, MTU, PREFIX_LEN};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventSet};
use crate::virtio::net::backend::{is_would_block, Backend, Stream};
use crate::virtio::event_loop;
use crate::virtio::net::{mark_partial_tcp_csum, VNET_HDR_LEN};
use crate::virtio::net::MAX_FRAME_LEN;

const TOKEN_GUEST: u64 = 0;
const TOKEN_RESOLVER: u64 = 1;
const TOKEN_PING: u64 = 2;
/// Pings awaiting a reply (the oldest is forgotten past this).
const PINGS_IN_FLIGHT: usize = 64;
const KIND_SHIFT: u32 = 56;
const KIND_TCP: u64 = 1;
const KIND_UDP: u64 = 2;
const KIND_LISTEN: u64 = 3;
const KIND_UDP_FORWARD: u64 = 4;

/// Guest frames taken per wake-up, so host sockets get their turn.
const GUEST_BUDGET: usize = 256;
/// Host reads per socket per wake-up.
const HOST_BUDGET: usize = 16;
/// How old the policy's list of the host's own addresses may get.
const HOST_ADDRS_MAX_AGE: Duration = Duration::from_secs(2);
/// A host connect that takes longer is given up (the guest gets a RST).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// UDP flows idle this long are closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Destinations one UDP flow may talk to (replies from others are dropped).
const UDP_PEERS: usize = 64;
/// Refusals logged one by one; after that only every power of two.
const REFUSALS_LOGGED: u64 = 32;

fn token(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | id
}

fn now_smol(start: Instant) -> SmolInstant {
    SmolInstant::from_micros(i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX))
}

/// smoltcp's view of the link: frames from the guest waiting to be processed, and
/// frames for the guest waiting to be written (bounded in bytes).
struct Phy {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
    tx_bytes: usize,
    tx_limit: usize,
}

impl Phy {
    fn tx_room(&self) -> bool {
        self.tx_bytes < self.tx_limit
    }

    /// Queues a frame for the guest (behind a zeroed vnet header: complete
    /// checksums), or drops it when the queue is full (the guest is not reading;
    /// TCP resends, UDP and ICMP are lossy anyway).
    fn push_tx(&mut self, frame: Vec<u8>) {
        if self.tx_room() {
            let mut pkt = Vec::with_capacity(VNET_HDR_LEN + frame.len());
            pkt.extend_from_slice(&[0; VNET_HDR_LEN]);
            pkt.extend_from_slice(&frame);
            self.push_pkt(pkt);
        }
    }

    /// Queues a vnet header and frame for the guest (see [`Phy::push_tx`]).
    fn push_pkt(&mut self, pkt: Vec<u8>) {
        if self.tx_room() {
            self.tx_bytes += pkt.len();
            self.tx.push_back(pkt);
        }
    }
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a mut Phy);

impl phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut pkt = vec![0u8; VNET_HDR_LEN + len];
        let r = f(&mut pkt[VNET_HDR_LEN..]);
        // smoltcp leaves TCP checksums to the guest's side (see `capabilities`).
        mark_partial_tcp_csum(&mut pkt);
        self.0.push_pkt(pkt);
        r
    }
}

impl Device for Phy {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(RxTok, TxTok<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxTok(frame), TxTok(self)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<TxTok<'_>> {
        self.tx_room().then_some(TxTok(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = usize::from(MTU) + 14;
        // Checksums are never verified on what the guest sends: its frames come
        // through memory, not a wire, and a wrong one can only hurt its own
        // connection (a guest with VIRTIO_NET_F_CSUM leaves them partial). TCP
        // checksums towards the guest are not computed either: each segment
        // goes out marked NEEDS_CSUM with its pseudo-header sum, which the
        // guest trusts as it trusts its own loopback (or the worker finishes
        // for a guest without GUEST_CSUM). Summing 64 KiB segments byte by byte
        // was most of the work per frame on both sides.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::None;
        caps
    }
}

/// (guest address, destination address as the guest wrote it)
type Tuple = (SocketAddrV4, SocketAddrV4);

enum Phase {
    /// Waiting for the host connect; the guest's SYN waits with it.
    Connecting { syn: Vec<u8>, since: Instant },
    /// A smoltcp socket carries the guest side.
    Open(SocketHandle),
}

struct TcpConn {
    tuple: Tuple,
    host: TcpStream,
    phase: Phase,
    host_eof: bool,
    /// The host socket may have data: set by its readiness, cleared when a read
    /// finds nothing. An idle connection then costs no system call per wake.
    host_readable: bool,
    host_write_shut: bool,
    /// Registered interest (empty: not registered).
    interest: EventSet,
    /// Its smoltcp buffer in each direction (0 before it has a socket).
    buffer: usize,
}

struct UdpFlow {
    guest_port: u16,
    sock: UdpSocket,
    peers: Vec<SocketAddrV4>,
    last: Instant,
}

struct UdpForward {
    sock: UdpSocket,
    guest_port: u16,
    /// Host peers seen, by port on 127.0.0.1 (the guest sees them on the gateway).
    peers: Vec<(u16, Instant)>,
}

struct DnsQuery {
    guest_port: u16,
    query: Vec<u8>,
    name: String,
}

/// The gateway's state.
pub struct Stack {
    guest: Stream,
    guest_open: bool,
    guest_out_interest: bool,
    guest_mac: Option<EthernetAddress>,
    epoll: Epoll,
    start: Instant,
    iface: Interface,
    sockets: SocketSet<'static>,
    phy: Phy,
    limits: Limits,
    policy: EgressPolicy,
    /// When the policy last learned the host's own addresses.
    host_addrs_at: Option<Instant>,
    /// Started by `run`, on the gateway thread (whose seccomp filter its threads inherit).
    resolver: Option<Resolver>,
    dns_pending: HashMap<u64, DnsQuery>,
    dhcp: dhcp::DhcpConfig,
    tcp: HashMap<u64, TcpConn>,
    tcp_by_tuple: HashMap<Tuple, u64>,
    udp: HashMap<u64, UdpFlow>,
    udp_by_port: HashMap<u16, u64>,
    listeners: Vec<(TcpListener, u16)>,
    /// Bytes of smoltcp buffers the open connections hold (both directions).
    buffers_in_use: usize,
    /// `--forward` listeners taken off the poll after an accept error, and since when.
    paused_listeners: Vec<(usize, Instant)>,
    /// The host's unprivileged ICMP socket, made at the first ping.
    ping: Option<socket2::Socket>,
    ping_unavailable: bool,
    /// (destination, sequence number, the guest's identifier) of pings in flight.
    pings: VecDeque<(Ipv4Addr, u16, u16)>,
    udp_forwards: Vec<UdpForward>,
    next_id: u64,
    next_local_port: u16,
    refusals: u64,
    buf: Vec<u8>,
}

impl Stack {
    /// Sets the gateway up: binds the `--forward` ports and starts the resolver.
    pub fn new(guest: Stream, config: &UserNetConfig, policy: EgressPolicy) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut phy = Phy {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            tx_bytes: 0,
            tx_limit: config.limits.guest_queue_bytes,
        };
        let mut seed = [0u8; 8];
        crate::sys::random::fill(&mut seed)?;
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        iface_config.random_seed = u64::from_ne_bytes(seed);
        let start = Instant::now();
        let mut iface = Interface::new(iface_config, &mut phy, now_smol(start));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(GATEWAY.into(), PREFIX_LEN));
        });
        // AnyIP: the gateway answers for every address routed through itself.
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY)
            .map_err(|_| io::Error::other("smoltcp's route table is full"))?;

        epoll.ctl(
            ControlOperation::Add,
            guest.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_GUEST),
        )?;
        let mut listeners = Vec::new();
        let mut udp_forwards = Vec::new();
        for f in &config.forwards {
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, f.host_port);
            if f.udp {
                let sock = UdpSocket::bind(addr).map_err(|e| {
                    io::Error::new(e.kind(), format!("--forward {}:{}/udp: binding {addr}: {e}", f.host_port, f.guest_port))
                })?;
                sock.set_nonblocking(true)?;
                let id = udp_forwards.len() as u64;
                epoll.ctl(
                    ControlOperation::Add,
                    sock.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(KIND_UDP_FORWARD, id)),
                )?;
                udp_forwards.push(UdpForward {
                    sock,
                    guest_port: f.guest_port,
                    peers: Vec::new(),
                });
            } else {
                let l = TcpListener::bind(addr).map_err(|e| {
                    io::Error::new(e.kind(), format!("--forward {}:{}: binding {addr}: {e}", f.host_port, f.guest_port))
                })?;
                l.set_nonblocking(true)?;
                let id = listeners.len() as u64;
                epoll.ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(KIND_LISTEN, id)),
                )?;
                listeners.push((l, f.guest_port));
            }
        }
        let dhcp = dhcp::DhcpConfig {
            guest_ip: GUEST,
            gateway: GATEWAY,
            prefix_len: PREFIX_LEN,
            dns: GATEWAY,
            mtu: MTU,
            lease_secs: 86400,
        };
        Ok(Self {
            guest,
            guest_open: true,
            guest_out_interest: false,
            guest_mac: None,
            epoll,
            start,
            iface,
            sockets: SocketSet::new(Vec::new()),
            phy,
            limits: config.limits,
            policy,
            host_addrs_at: None,
            resolver: None,
            dns_pending: HashMap::new(),
            dhcp,
            tcp: HashMap::new(),
            tcp_by_tuple: HashMap::new(),
            udp: HashMap::new(),
            udp_by_port: HashMap::new(),
            listeners,
            buffers_in_use: 0,
            paused_listeners: Vec::new(),
            ping: None,
            ping_unavailable: false,
            pings: VecDeque::new(),
            udp_forwards,
            next_id: 0,
            next_local_port: 49152,
            refusals: 0,
            buf: vec![0u8; MAX_FRAME_LEN],
        })
    }

    /// Runs on the devices' event loop until the frame socket closes (the device
    /// is gone).
    pub fn run(&mut self) -> io::Result<()> {
        self.start_resolver()?;
        event_loop::run(self, 256)
    }

    fn start_resolver(&mut self) -> io::Result<()> {
        let resolver = Resolver::new()?;
        self.epoll.ctl(
            ControlOperation::Add,
            resolver.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_RESOLVER),
        )?;
        self.resolver = Some(resolver);
        Ok(())
    }

    /// For property tests and fuzzing: starts the resolver without a thread loop.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn start_for_test(&mut self) -> io::Result<()> {
        self.start_resolver()
    }

    /// For property tests and fuzzing: one turn of the event loop that does not wait.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn step(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); 64];
        event_loop::turn(self, &mut events, Some(Duration::ZERO)).map(drop)
    }

    /// For tests: how many TCP connections the gateway holds.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn connection_count(&self) -> usize {
        self.tcp.len()
    }

    /// For property tests and fuzzing: what the gateway holds, checked against
    /// its limits. `Err` names the first one exceeded.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn check_bounds(&self) -> Result<(), String> {
        let l = &self.limits;
        let checks = [
            ("TCP connections", self.tcp.len(), l.tcp_connections),
            ("TCP tuples", self.tcp_by_tuple.len(), l.tcp_connections),
            ("UDP flows", self.udp.len(), l.udp_flows),
            ("DNS lookups", self.dns_pending.len(), l.dns_pending),
            ("queued bytes", self.phy.tx_bytes, l.guest_queue_bytes + crate::virtio::net::MAX_FRAME_LEN),
            ("pings", self.pings.len(), PINGS_IN_FLIGHT),
            (
                "TCP buffers",
                self.buffers_in_use,
                l.tcp_buffer_budget + 2 * l.tcp_buffer_min * l.tcp_connections,
            ),
        ];
        for (what, have, max) in checks {
            if have > max {
                return Err(format!("{what}: {have} > {max}"));
            }
        }
        if self.tcp.len() != self.tcp_by_tuple.len() {
            return Err(format!("{} connections but {} tuples", self.tcp.len(), self.tcp_by_tuple.len()));
        }
        Ok(())
    }

    /// How long the loop may sleep, in ms.
    fn wait_ms(&mut self) -> i32 {
        if !self.phy.rx.is_empty() {
            return 0;
        }
        if !self.phy.tx_room() {
            // smoltcp wants to send but the guest takes nothing: wait for the frame
            // socket to drain (its OUT interest is set), not for smoltcp's timer.
            return 1000;
        }
        let now = now_smol(self.start);
        let mut ms: i64 = 1000;
        if let Some(d) = self.iface.poll_delay(now, &self.sockets) {
            ms = ms.min(i64::try_from(d.total_millis()).unwrap_or(ms));
        }
        ms as i32
    }

    fn poll_iface(&mut self) {
        let now = now_smol(self.start);
        self.iface.poll(now, &mut self.phy, &mut self.sockets);
    }

    fn refused(&mut self, what: &str, reason: &str) {
        self.refusals += 1;
        if self.refusals <= REFUSALS_LOGGED || self.refusals.is_power_of_two() {
            warn!("usernet: refused {what}: {reason} ({} refusals so far)", self.refusals);
        }
    }

    /// The policy's verdict on `dst:port`, with the host's own addresses re-read
    /// when the last reading is [`HOST_ADDRS_MAX_AGE`] old (an address added
    /// since, a VPN's say, is closed within that time).
    fn check(&mut self, dst: Ipv4Addr, port: u16) -> Verdict {
        if self.host_addrs_at.is_none_or(|t| t.elapsed() >= HOST_ADDRS_MAX_AGE) {
            match super::host_addresses() {
                Ok(addrs) => self.policy.set_host_addresses(&addrs),
                // The last list stays; the check below still closes every range.
                Err(e) => warn!("usernet: reading the host's addresses failed: {e}"),
            }
            self.host_addrs_at = Some(Instant::now());
        }
        self.policy.check(dst, port)
    }

    /// The host address a guest destination means: the gateway is the host's loopback.
    fn host_addr(dst: Ipv4Addr) -> Ipv4Addr {
        if dst == GATEWAY {
            Ipv4Addr::LOCALHOST
        } else {
            dst
        }
    }

    // ---- guest side ----

    fn read_guest(&mut self) {
        for _ in 0..GUEST_BUDGET {
            let mut frame = std::mem::take(&mut self.buf);
            let got = self.guest.recv(&mut frame);
            match got {
                Ok(Some(n)) => {
                    // Behind its vnet header, whose offload flags do not matter here.
                    let f = frame.get(VNET_HDR_LEN..n).map(<[u8]>::to_vec);
                    self.buf = frame;
                    if let Some(f) = f {
                        self.guest_frame(f);
                    }
                }
                Ok(None) => {
                    self.buf = frame;
                    break;
                }
                Err(e) => {
                    self.buf = frame;
                    debug!("usernet: the device side closed: {e}");
                    self.guest_open = false;
                    break;
                }
            }
        }
    }

    fn write_guest(&mut self) -> io::Result<()> {
        let mut busy = false;
        if self.guest.has_pending_output() {
            match self.guest.flush() {
                Ok(true) => {}
                Ok(false) => busy = true,
                Err(e) => {
                    debug!("usernet: the device side closed: {e}");
                    self.guest_open = false;
                    return Ok(());
                }
            }
        }
        while !busy {
            let Some(frame) = self.phy.tx.pop_front() else { break };
            self.phy.tx_bytes -= frame.len();
            match self.guest.send(&frame) {
                Ok(true) => {}
                Ok(false) => {
                    // Not taken: it goes first next time.
                    self.phy.tx_bytes += frame.len();
                    self.phy.tx.push_front(frame);
                    busy = true;
                }
                Err(e) => {
                    debug!("usernet: the device side closed: {e}");
                    self.guest_open = false;
                    return Ok(());
                }
            }
        }
        if busy != self.guest_out_interest {
            let set = if busy { EventSet::IN | EventSet::OUT } else { EventSet::IN };
            self.epoll.ctl(
                ControlOperation::Modify,
                self.guest.as_raw_fd(),
                EpollEvent::new(set, TOKEN_GUEST),
            )?;
            self.guest_out_interest = busy;
        }
        Ok(())
    }

    fn guest_frame(&mut self, frame: Vec<u8>) {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else { return };
        let src_mac = eth.src_addr();
        if !src_mac.is_unicast() {
            return;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                self.phy.rx.push_back(frame);
                return;
            }
            EthernetProtocol::Ipv4 => {}
            _ => return, // no IPv6 on this network
        }
        let Some(info) = frames::parse_ipv4(&frame) else { return };
        self.guest_mac = Some(src_mac);
        match info.protocol {
            IpProtocol::Udp => self.guest_udp(&frame, &info),
            // Only the guest's own address may talk through the gateway.
            IpProtocol::Tcp if info.src == GUEST => self.guest_tcp(frame, &info),
            IpProtocol::Icmp if info.src == GUEST => self.guest_icmp(frame, &info),
            _ => {}
        }
    }

    fn guest_icmp(&mut self, frame: Vec<u8>, info: &Ipv4Info) {
        if info.dst == GATEWAY {
            // smoltcp answers pings to the gateway itself.
            self.phy.rx.push_back(frame);
            return;
        }
        let gw_mac = EthernetAddress(GATEWAY_MAC);
        let Some(bytes) = frame.get(info.payload_at..info.payload_at + info.payload_len) else { return };
        let Ok(packet) = Icmpv4Packet::new_checked(bytes) else { return };
        let Ok(Icmpv4Repr::EchoRequest { ident, seq_no, data }) =
            Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default())
        else {
            return; // only echo requests are carried
        };
        let refuse = |stack: &mut Self, reason: &str| {
            stack.refused(&format!("ping {} -> {}", info.src, info.dst), reason);
            if let Some(reply) = frames::prohibited(GATEWAY, gw_mac, &frame, info) {
                stack.phy.push_tx(reply);
            }
        };
        if let Verdict::Deny(reason) = self.check(info.dst, 0) {
            refuse(self, &reason);
            return;
        }
        if self.ping.is_none() && !self.ping_unavailable {
            match ping_socket() {
                Ok(s) => {
                    let r = self.epoll.ctl(
                        ControlOperation::Add,
                        s.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, TOKEN_PING),
                    );
                    if r.is_ok() {
                        self.ping = Some(s);
                    }
                }
                Err(e) => {
                    // Linux: net.ipv4.ping_group_range does not hold our group.
                    debug!("usernet: no unprivileged ICMP socket ({e}): pings are refused");
                    self.ping_unavailable = true;
                }
            }
        }
        let Some(sock) = &self.ping else {
            refuse(self, "this host allows no unprivileged ICMP sockets");
            return;
        };
        // The host's kernel picks the identifier; replies are matched by
        // destination and sequence number.
        let mut msg = vec![0u8; 8 + data.len()];
        let repr = Icmpv4Repr::EchoRequest { ident: 0, seq_no, data };
        repr.emit(&mut Icmpv4Packet::new_unchecked(&mut msg[..]), &ChecksumCapabilities::default());
        if let Err(e) = sock.send_to(&msg, &SocketAddr::V4(SocketAddrV4::new(info.dst, 0)).into()) {
            debug!("usernet: ping {}: {e}", info.dst);
            return;
        }
        if self.pings.len() >= PINGS_IN_FLIGHT {
            self.pings.pop_front();
        }
        self.pings.push_back((info.dst, seq_no, ident));
    }

    fn ping_replies(&mut self) {
        let Some(mac) = self.guest_mac else { return };
        for _ in 0..HOST_BUDGET {
            let Some(sock) = &self.ping else { return };
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let (n, from) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if is_would_block(&e) => return,
                Err(_) => return,
            };
            // SAFETY: recv_from initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let Some(SocketAddr::V4(from)) = from.as_socket() else { continue };
            // macOS hands over the IP header too; Linux only the ICMP message.
            let icmp = match bytes.first() {
                Some(b) if b >> 4 == 4 && bytes.len() >= 20 => &bytes[usize::from(b & 0xf) * 4..],
                _ => &bytes[..],
            };
            let Ok(packet) = Icmpv4Packet::new_checked(icmp) else { continue };
            let Ok(Icmpv4Repr::EchoReply { seq_no, data, .. }) =
                Icmpv4Repr::parse(&packet, &ChecksumCapabilities::ignored())
            else {
                continue;
            };
            let Some(i) = self.pings.iter().position(|(d, s, _)| *d == *from.ip() && *s == seq_no) else {
                continue;
            };
            let Some((dst, seq_no, ident)) = self.pings.remove(i) else { continue };
            let repr = Icmpv4Repr::EchoReply { ident, seq_no, data };
            let f = frames::icmp(EthernetAddress(GATEWAY_MAC), mac, dst, GUEST, &repr);
            self.phy.push_tx(f);
        }
    }

    // ---- TCP ----

    fn guest_tcp(&mut self, frame: Vec<u8>, info: &Ipv4Info) {
        let Some(bytes) = frame.get(info.payload_at..info.payload_at + info.payload_len) else { return };
        let Ok(tcp) = TcpPacket::new_checked(bytes) else { return };
        let tuple = (
            SocketAddrV4::new(info.src, tcp.src_port()),
            SocketAddrV4::new(info.dst, tcp.dst_port()),
        );
        let new_syn = tcp.syn() && !tcp.ack() && !tcp.rst();
        if let Some(&id) = self.tcp_by_tuple.get(&tuple) {
            match self.tcp.get(&id).map(|c| &c.phase) {
                Some(Phase::Open(_)) => self.phy.rx.push_back(frame),
                // The guest gave up on the connection while the host connect was
                // under way: drop it (and its slot) without an answer.
                Some(Phase::Connecting { .. }) if tcp.rst() => self.close_conn(id, false),
                // A SYN resent while the host connect is under way waits with the first.
                _ => {}
            }
            return;
        }
        if !new_syn {
            // smoltcp answers strays (no socket) with a RST.
            self.phy.rx.push_back(frame);
            return;
        }
        let host = SocketAddrV4::new(Self::host_addr(info.dst), tuple.1.port());
        if let Verdict::Deny(reason) = self.check(*host.ip(), host.port()) {
            self.refused(&format!("TCP {} -> {}", tuple.0, tuple.1), &reason);
            self.phy.rx.push_back(frame); // no listener: a RST
            return;
        }
        if self.tcp.len() >= self.limits.tcp_connections {
            self.refused(
                &format!("TCP {} -> {}", tuple.0, tuple.1),
                &format!("{} connections are open (the limit)", self.tcp.len()),
            );
            self.phy.rx.push_back(frame);
            return;
        }
        let stream = match connect_nonblocking(host) {
            Ok(s) => s,
            Err(e) => {
                debug!("usernet: TCP {} -> {host}: {e}", tuple.0);
                self.phy.rx.push_back(frame);
                return;
            }
        };
        let id = self.next_id();
        let conn = TcpConn {
            tuple,
            host: stream,
            phase: Phase::Connecting {
                syn: frame,
                since: Instant::now(),
            },
            host_eof: false,
            host_readable: true,
            host_write_shut: false,
            interest: EventSet::empty(),
            buffer: 0,
        };
        self.tcp.insert(id, conn);
        self.tcp_by_tuple.insert(tuple, id);
        self.set_tcp_interest(id, EventSet::OUT);
        // A local peer often has the connection up already: answer the SYN in this
        // wake-up rather than the next.
        self.tcp_host_event(id, EventSet::OUT);
    }

    fn next_id(&mut self) -> u64 {
        self.next_id = (self.next_id + 1) & ((1 << KIND_SHIFT) - 1);
        self.next_id
    }

    fn set_tcp_interest(&mut self, id: u64, want: EventSet) {
        let Some(conn) = self.tcp.get_mut(&id) else { return };
        if conn.interest == want {
            return;
        }
        let fd = conn.host.as_raw_fd();
        let r = if want.is_empty() {
            self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
        } else if conn.interest.is_empty() {
            self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, token(KIND_TCP, id)))
        } else {
            self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(want, token(KIND_TCP, id)))
        };
        match r {
            Ok(()) => conn.interest = want,
            Err(e) => warn!("usernet: epoll for TCP {} -> {}: {e}", conn.tuple.0, conn.tuple.1),
        }
    }

    fn tcp_host_event(&mut self, id: u64, events: EventSet) {
        let Some(conn) = self.tcp.get_mut(&id) else { return };
        let Phase::Connecting { .. } = conn.phase else {
            // Open: the next pump reads what arrived (or the EOF, or the error).
            conn.host_readable |= events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
            return;
        };
        // The connect finished, one way or the other.
        match conn.host.take_error() {
            Ok(None) if conn.host.peer_addr().is_ok() => self.tcp_connected(id),
            Ok(None) => {} // spurious wake-up
            Ok(Some(e)) | Err(e) => {
                debug!("usernet: TCP {} -> {}: {e}", conn.tuple.0, conn.tuple.1);
                self.tcp_fail(id);
            }
        }
    }

    /// The host refused or the connect failed: the held SYN goes to smoltcp with no
    /// socket listening, so the guest gets a RST.
    fn tcp_fail(&mut self, id: u64) {
        self.set_tcp_interest(id, EventSet::empty());
        if let Some(conn) = self.tcp.remove(&id) {
            self.tcp_by_tuple.remove(&conn.tuple);
            if let Phase::Connecting { syn, .. } = conn.phase {
                self.phy.rx.push_back(syn);
            }
        }
    }

    fn tcp_connected(&mut self, id: u64) {
        let Some(conn) = self.tcp.get_mut(&id) else { return };
        let Phase::Connecting { syn, .. } = std::mem::replace(&mut conn.phase, Phase::Connecting { syn: Vec::new(), since: Instant::now() }) else {
            return;
        };
        let _ = conn.host.set_nodelay(true);
        let dst = conn.tuple.1;
        let size = buffer_size(&self.limits, self.buffers_in_use);
        conn.buffer = size;
        self.buffers_in_use += 2 * size;
        let mut sock = new_tcp_socket(size);
        if sock
            .listen(IpListenEndpoint {
                addr: Some((*dst.ip()).into()),
                port: dst.port(),
            })
            .is_err()
        {
            self.phy.rx.push_back(syn);
            self.close_conn(id, true);
            return;
        }
        let handle = self.sockets.add(sock);
        conn.phase = Phase::Open(handle);
        // Only this SYN is queued for smoltcp now, so this listener takes it.
        self.phy.rx.push_back(syn);
        self.poll_iface();
        self.pump(id);
    }

    fn accept(&mut self, idx: usize) {
        loop {
            let Some((listener, guest_port)) = self.listeners.get(idx) else { return };
            let guest_port = *guest_port;
            let (stream, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if is_would_block(&e) => return,
                Err(e) => {
                    warn!("usernet: accepting on a --forward port: {e}");
                    // Out of descriptors: the listener stays readable, so it rests
                    // (unpolled) for a second rather than spin.
                    let fd = listener.as_raw_fd();
                    let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.paused_listeners.push((idx, Instant::now()));
                    return;
                }
            };
            if self.tcp.len() >= self.limits.tcp_connections {
                self.refused(&format!("forward from {peer}"), "the connection limit is reached");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let local = SocketAddrV4::new(GATEWAY, self.local_port());
            let remote = SocketAddrV4::new(GUEST, guest_port);
            let size = buffer_size(&self.limits, self.buffers_in_use);
            let mut sock = new_tcp_socket(size);
            if let Err(e) = sock.connect(self.iface.context(), remote, local) {
                warn!("usernet: forward to guest port {guest_port}: {e}");
                continue;
            }
            let handle = self.sockets.add(sock);
            self.buffers_in_use += 2 * size;
            let id = self.next_id();
            let tuple = (remote, local);
            self.tcp.insert(
                id,
                TcpConn {
                    tuple,
                    host: stream,
                    phase: Phase::Open(handle),
                    host_eof: false,
                    host_readable: true,
                    host_write_shut: false,
                    interest: EventSet::empty(),
                    buffer: size,
                },
            );
            self.tcp_by_tuple.insert(tuple, id);
        }
    }

    /// An unused local port for a connection into the guest.
    fn local_port(&mut self) -> u16 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p == u16::MAX { 49152 } else { p + 1 };
            if !self
                .tcp_by_tuple
                .keys()
                .any(|(_, dst)| *dst.ip() == GATEWAY && dst.port() == p)
            {
                return p;
            }
        }
    }

    fn pump_all(&mut self) {
        let ids: Vec<u64> = self.tcp.keys().copied().collect();
        let now = Instant::now();
        for id in ids {
            match self.tcp.get(&id).map(|c| &c.phase) {
                Some(Phase::Open(_)) => self.pump(id),
                Some(Phase::Connecting { since, .. }) if now.duration_since(*since) > CONNECT_TIMEOUT => {
                    debug!("usernet: TCP connect timed out");
                    self.tcp_fail(id);
                }
                _ => {}
            }
        }
    }

    /// Moves data both ways on one open connection and follows its closes.
    fn pump(&mut self, id: u64) {
        let Some(conn) = self.tcp.get_mut(&id) else { return };
        let Phase::Open(handle) = conn.phase else { return };
        let sock = self.sockets.get_mut::<tcp::Socket>(handle);
        let mut want = EventSet::empty();
        let mut reset = false;

        // guest -> host
        while sock.can_recv() {
            let r = sock.recv(|b| match conn.host.write(b) {
                Ok(n) => (n, Ok(n)),
                Err(e) => (0, Err(e)),
            });
            match r {
                Ok(Ok(0)) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if is_would_block(&e) => {
                    want |= EventSet::OUT;
                    break;
                }
                Ok(Err(e)) => {
                    debug!("usernet: TCP {} -> {}: host write: {e}", conn.tuple.0, conn.tuple.1);
                    reset = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // The guest's FIN, once its data is out: half-close the host side.
        if !reset && !sock.may_recv() && sock.recv_queue() == 0 && !conn.host_write_shut && sock.state() != tcp::State::SynReceived && sock.state() != tcp::State::SynSent && sock.state() != tcp::State::Listen {
            let _ = conn.host.shutdown(Shutdown::Write);
            conn.host_write_shut = true;
        }
        // host -> guest
        if !reset && !conn.host_eof && conn.host_readable && sock.may_send() {
            for _ in 0..HOST_BUDGET {
                if !sock.can_send() {
                    break;
                }
                let r = sock.send(|b| match conn.host.read(b) {
                    Ok(0) => (0, Ok(0)),
                    Ok(n) => (n, Ok(n)),
                    Err(e) => (0, Err(e)),
                });
                match r {
                    Ok(Ok(0)) => {
                        conn.host_eof = true;
                        sock.close(); // FIN after what is queued
                        break;
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if is_would_block(&e) => {
                        conn.host_readable = false;
                        break;
                    }
                    Ok(Err(e)) => {
                        debug!("usernet: TCP {} -> {}: host read: {e}", conn.tuple.0, conn.tuple.1);
                        reset = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if !reset && !conn.host_eof && sock.may_send() && sock.can_send() {
            want |= EventSet::IN;
        }
        let state = sock.state();
        if reset {
            sock.abort();
            // Let smoltcp send the guest its RST before the socket goes.
            self.poll_iface();
            self.close_conn(id, true);
            return;
        }
        match state {
            // What the guest sent before it closed still goes to the host first.
            tcp::State::Closed | tcp::State::TimeWait if sock.recv_queue() > 0 => {
                self.set_tcp_interest(id, EventSet::OUT);
            }
            // The guest reset it, or both sides are done.
            tcp::State::Closed => {
                let graceful = conn.host_eof && conn.host_write_shut;
                self.close_conn(id, !graceful);
            }
            tcp::State::TimeWait => self.close_conn(id, false),
            // Back to LISTEN: the guest reset its half-open connection (or smoltcp
            // refused its SYN); nothing will use this socket again.
            tcp::State::Listen => self.close_conn(id, true),
            _ => self.set_tcp_interest(id, want),
        }
    }

    fn close_conn(&mut self, id: u64, reset_host: bool) {
        self.set_tcp_interest(id, EventSet::empty());
        let Some(conn) = self.tcp.remove(&id) else { return };
        self.tcp_by_tuple.remove(&conn.tuple);
        self.buffers_in_use -= 2 * conn.buffer;
        if let Phase::Open(h) = conn.phase {
            self.sockets.remove(h);
        }
        if reset_host {
            // SO_LINGER 0: the host peer sees a RST, as the guest's peer would.
            let s = socket2::SockRef::from(&conn.host);
            let _ = s.set_linger(Some(Duration::ZERO));
        }
    }

    // ---- UDP ----

    fn guest_udp(&mut self, frame: &[u8], info: &Ipv4Info) {
        let Some((sport, dport, payload)) = frames::parse_udp(frame, info) else { return };
        let gw_mac = EthernetAddress(GATEWAY_MAC);
        if dport == 67 {
            if let Some(reply) = dhcp::answer(&self.dhcp, payload) {
                let (dst_ip, dst_mac) = if reply.broadcast {
                    (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST)
                } else {
                    (GUEST, info.src_mac)
                };
                let f = frames::udp(
                    gw_mac,
                    dst_mac,
                    SocketAddrV4::new(GATEWAY, 67),
                    SocketAddrV4::new(dst_ip, 68),
                    &reply.payload,
                );
                self.phy.push_tx(f);
            }
            return;
        }
        if info.src != GUEST {
            return;
        }
        if info.dst == GATEWAY && dport == 53 {
            self.dns_query(sport, payload);
            return;
        }
        // A reply to a host peer of a UDP --forward.
        if info.dst == GATEWAY {
            if let Some(fwd) = self
                .udp_forwards
                .iter()
                .find(|f| f.guest_port == sport && f.peers.iter().any(|(p, _)| *p == dport))
            {
                let _ = fwd.sock.send_to(payload, SocketAddrV4::new(Ipv4Addr::LOCALHOST, dport));
                return;
            }
        }
        let host = SocketAddrV4::new(Self::host_addr(info.dst), dport);
        if let Verdict::Deny(reason) = self.check(*host.ip(), dport) {
            self.refused(&format!("UDP {}:{sport} -> {}:{dport}", info.src, info.dst), &reason);
            if let Some(reply) = frames::prohibited(GATEWAY, gw_mac, frame, info) {
                self.phy.push_tx(reply);
            }
            return;
        }
        let id = match self.udp_by_port.get(&sport) {
            Some(id) => *id,
            None => match self.new_udp_flow(sport) {
                Some(id) => id,
                None => return,
            },
        };
        let Some(flow) = self.udp.get_mut(&id) else { return };
        flow.last = Instant::now();
        let peer = SocketAddrV4::new(info.dst, dport);
        if !flow.peers.contains(&peer) {
            if flow.peers.len() >= UDP_PEERS {
                flow.peers.remove(0);
            }
            flow.peers.push(peer);
        }
        if let Err(e) = flow.sock.send_to(payload, host) {
            debug!("usernet: UDP to {host}: {e}");
        }
    }

    fn new_udp_flow(&mut self, guest_port: u16) -> Option<u64> {
        if self.udp.len() >= self.limits.udp_flows {
            // Make room: the flow idle longest goes.
            let oldest = self.udp.iter().min_by_key(|(_, f)| f.last).map(|(id, _)| *id)?;
            self.close_udp(oldest);
        }
        let sock = match UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)) {
            Ok(s) => s,
            Err(e) => {
                warn!("usernet: a UDP socket for guest port {guest_port}: {e}");
                return None;
            }
        };
        sock.set_nonblocking(true).ok()?;
        let id = self.next_id();
        self.epoll
            .ctl(
                ControlOperation::Add,
                sock.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token(KIND_UDP, id)),
            )
            .ok()?;
        self.udp.insert(
            id,
            UdpFlow {
                guest_port,
                sock,
                peers: Vec::new(),
                last: Instant::now(),
            },
        );
        self.udp_by_port.insert(guest_port, id);
        Some(id)
    }

    fn close_udp(&mut self, id: u64) {
        if let Some(flow) = self.udp.remove(&id) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, flow.sock.as_raw_fd(), EpollEvent::default());
            self.udp_by_port.remove(&flow.guest_port);
        }
    }

    fn udp_host_event(&mut self, id: u64) {
        let Some(mac) = self.guest_mac else { return };
        for _ in 0..HOST_BUDGET {
            let Some(flow) = self.udp.get_mut(&id) else { return };
            let (n, from) = match flow.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if is_would_block(&e) => return,
                Err(e) => {
                    debug!("usernet: UDP flow of guest port {}: {e}", flow.guest_port);
                    return;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            // The host's loopback is the gateway, as the guest addressed it.
            let seen = if from.ip().is_loopback() {
                SocketAddrV4::new(GATEWAY, from.port())
            } else {
                from
            };
            if !flow.peers.contains(&seen) {
                continue; // only those the guest wrote to may answer
            }
            flow.last = Instant::now();
            if n + 28 > usize::from(MTU) {
                continue;
            }
            let f = frames::udp(
                EthernetAddress(GATEWAY_MAC),
                mac,
                seen,
                SocketAddrV4::new(GUEST, flow.guest_port),
                &self.buf[..n],
            );
            self.phy.push_tx(f);
        }
    }

    fn udp_forward_event(&mut self, idx: usize) {
        for _ in 0..HOST_BUDGET {
            let Some(fwd) = self.udp_forwards.get_mut(idx) else { return };
            let (n, from) = match fwd.sock.recv_from(&mut self.buf) {
                Ok(x) => x,
                Err(e) if is_would_block(&e) => return,
                Err(e) => {
                    debug!("usernet: UDP forward to guest port {}: {e}", fwd.guest_port);
                    return;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            // A host peer stays reachable for UDP_IDLE after it last wrote: after
            // that its port may belong to another program.
            fwd.peers.retain(|(p, _)| *p != from.port());
            if fwd.peers.len() >= UDP_PEERS {
                fwd.peers.remove(0);
            }
            fwd.peers.push((from.port(), Instant::now()));
            let Some(mac) = self.guest_mac else { continue };
            if n + 28 > usize::from(MTU) {
                continue;
            }
            let f = frames::udp(
                EthernetAddress(GATEWAY_MAC),
                mac,
                SocketAddrV4::new(GATEWAY, from.port()),
                SocketAddrV4::new(GUEST, fwd.guest_port),
                &self.buf[..n],
            );
            self.phy.push_tx(f);
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let (ready, resting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.paused_listeners)
            .into_iter()
            .partition(|(_, since)| now.duration_since(*since) >= Duration::from_secs(1));
        self.paused_listeners = resting;
        for (idx, _) in ready {
            if let Some((l, _)) = self.listeners.get(idx) {
                let _ = self.epoll.ctl(
                    ControlOperation::Add,
                    l.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token(KIND_LISTEN, idx as u64)),
                );
            }
        }
        let idle: Vec<u64> = self
            .udp
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) > UDP_IDLE)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.close_udp(id);
        }
        for f in &mut self.udp_forwards {
            f.peers.retain(|(_, seen)| now.duration_since(*seen) <= UDP_IDLE);
        }
    }

    // ---- DNS ----

    fn dns_query(&mut self, guest_port: u16, payload: &[u8]) {
        let Some(q) = dns::parse_query(payload) else { return };
        let outcome = if !self.policy.name_allowed(&q.name) {
            self.refused(&format!("DNS {}", q.name), "the name is not in --net-allow-only");
            Some(Outcome::Refused)
        } else if q.qtype != 1 && q.qtype != 28 {
            Some(Outcome::NotImp)
        } else if self.dns_pending.len() >= self.limits.dns_pending {
            Some(Outcome::ServFail)
        } else {
            let id = self.next_id();
            let submitted = self.resolver.as_ref().is_some_and(|r| r.submit(id, q.name.clone()));
            if submitted {
                self.dns_pending.insert(
                    id,
                    DnsQuery {
                        guest_port,
                        query: payload.to_vec(),
                        name: q.name,
                    },
                );
                None
            } else {
                Some(Outcome::ServFail)
            }
        };
        if let Some(o) = outcome {
            self.dns_reply(guest_port, payload, &o);
        }
    }

    fn dns_results(&mut self) {
        let results = self.resolver.as_ref().map(|r| r.take_results()).unwrap_or_default();
        for (id, outcome) in results {
            let Some(q) = self.dns_pending.remove(&id) else { continue };
            let qtype = dns::parse_query(&q.query).map(|p| p.qtype);
            let outcome = match (outcome, qtype) {
                (Outcome::Addresses(a), Some(1)) => {
                    self.policy.learn(&q.name, &a);
                    Outcome::Addresses(a)
                }
                // AAAA: the name exists, but this network has no IPv6.
                (Outcome::Addresses(_), _) => Outcome::NoData,
                (o, _) => o,
            };
            self.dns_reply(q.guest_port, &q.query, &outcome);
        }
    }

    fn dns_reply(&mut self, guest_port: u16, query: &[u8], outcome: &Outcome) {
        let Some(mac) = self.guest_mac else { return };
        let Some(answer) = dns::answer(query, outcome, DNS_TTL) else { return };
        let f = frames::udp(
            EthernetAddress(GATEWAY_MAC),
            mac,
            SocketAddrV4::new(GATEWAY, 53),
            SocketAddrV4::new(GUEST, guest_port),
            &answer,
        );
        self.phy.push_tx(f);
    }
}

/// The gateway as the devices' event loop drives it: each wake handles the host
/// sockets that are ready, takes the guest's frames, runs smoltcp and the
/// connections, and writes frames out.
impl event_loop::EventHandler for Stack {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle(&mut self, token: u64, events: EventSet) {
        let (kind, id) = (token >> KIND_SHIFT, token & ((1 << KIND_SHIFT) - 1));
        match (kind, token) {
            // The guest's frames are read after every wake.
            (0, TOKEN_GUEST) => {}
            (0, TOKEN_RESOLVER) => self.dns_results(),
            (0, TOKEN_PING) => self.ping_replies(),
            (KIND_TCP, _) => self.tcp_host_event(id, events),
            (KIND_UDP, _) => self.udp_host_event(id),
            (KIND_LISTEN, _) => self.accept(id as usize),
            (KIND_UDP_FORWARD, _) => self.udp_forward_event(id as usize),
            _ => {}
        }
    }

    fn after_wake(&mut self) {
        self.read_guest();
        self.poll_iface();
        self.pump_all();
        self.poll_iface();
        self.expire();
        if let Err(e) = self.write_guest() {
            log::error!("usernet: the network stops: {e}");
            self.guest_open = false;
        }
    }

    fn timeout(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(u64::try_from(self.wait_ms()).unwrap_or(0)))
    }

    fn finished(&self) -> bool {
        !self.guest_open
    }
}

/// The buffer (each way) for a new connection when `in_use` bytes of buffers exist.
fn buffer_size(limits: &Limits, in_use: usize) -> usize {
    if in_use + 2 * limits.tcp_buffer <= limits.tcp_buffer_budget {
        limits.tcp_buffer
    } else {
        limits.tcp_buffer_min
    }
}

fn new_tcp_socket(size: usize) -> tcp::Socket<'static> {
    let rx = tcp::SocketBuffer::new(vec![0u8; size]);
    let tx = tcp::SocketBuffer::new(vec![0u8; size]);
    let mut s = tcp::Socket::new(rx, tx);
    s.set_nagle_enabled(false);
    // ACK at once: the link is a local queue, and a delayed ACK (smoltcp's
    // default is 10 ms) caps what the guest may send per window.
    s.set_ack_delay(None);
    // A handshake, or data the guest never acknowledges, ends the connection
    // after a minute instead of holding its slot for ever.
    s.set_timeout(Some(smoltcp::time::Duration::from_secs(60)));
    s
}

/// An unprivileged ICMP ("ping") socket: Linux allows it to the groups in
/// `net.ipv4.ping_group_range`, macOS to everyone.
fn ping_socket() -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::ICMPV4))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Starts a non-blocking connect; the socket becomes writable when it is done.
fn connect_nonblocking(addr: SocketAddrV4) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_nonblocking(true)?;
    match s.connect(&SocketAddr::V4(addr).into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || is_would_block(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}
