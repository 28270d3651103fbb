//! aivmm's own user-mode network: a NAT gateway for one guest, inside aivmm.
//!
//! `--net user` (the default) gives the guest this network, with no helper
//! process: a thread in aivmm runs [`stack::Stack`], which speaks Ethernet
//! frames to the virtio-net worker over a socket pair and re-originates the
//! guest's connections from host sockets. The guest sees:
//!
//! | what | address |
//! |---|---|
//! | the guest (DHCP) | 10.0.2.15/24 |
//! | gateway, DNS server | 10.0.2.2 |
//! | MTU | 65520 |
//!
//! TCP is smoltcp's (terminated in aivmm, re-originated from a host socket);
//! UDP is carried datagram by datagram from one host socket per guest source
//! port; DNS queries to the gateway are answered by the host's own resolver
//! (getaddrinfo: /etc/hosts and, on macOS, the system resolver apply); smoltcp
//! answers pings to the gateway, and other pings leave through the host's
//! unprivileged ICMP socket where it has one (refused at once where not). IPv4 only: there is no IPv6 on this network (AAAA
//! queries get an empty answer), so nothing waits for a v6 route that is not there.
//!
//! Every destination passes the [`policy::EgressPolicy`] first, on the host
//! side: by default the public internet is open and the host's loopback, its
//! own addresses (re-read every 2 s), link-local and private ranges are not. A refused TCP connection gets a RST,
//! a refused UDP datagram an ICMP "administratively prohibited", at once, and
//! aivmm's log names it. The gateway address is the host's loopback, reachable
//! only where `--net-allow 127.0.0.1:PORT` opens it.

pub mod dhcp;
pub mod dns;
mod frames;
pub mod policy;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
mod stack;
#[cfg(test)]
mod tests;

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex};

pub use super::backend::PortForward;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM};

use super::backend::{Backend, Stream};
use super::VNET_HDR_LEN;
pub use policy::PolicyConfig;

/// The gateway's address (also the DNS server, and the host's loopback).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The address DHCP gives the guest.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The network's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x56, 0x0a, 0x00, 0x02, 0x02];
/// The link MTU DHCP announces: large frames, few of them (passt does the same).
pub const MTU: u16 = 65520;
/// The TTL of DNS answers, in seconds.
pub const DNS_TTL: u32 = 60;

/// What the network may use of the host, at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open TCP connections (guest-initiated and forwarded together).
    pub tcp_connections: usize,
    /// A TCP connection's buffer in each direction, while the large buffers
    /// in use stay within `tcp_buffer_budget`: room for several of the guest's
    /// 64 KiB segments in flight (a buffer of one segment is stop-and-wait).
    pub tcp_buffer: usize,
    /// A TCP connection's buffer in each direction once that budget is spent.
    pub tcp_buffer_min: usize,
    /// The most bytes of large buffers (both directions) at once.
    pub tcp_buffer_budget: usize,
    /// UDP flows (one per guest source port); the one idle longest makes room.
    pub udp_flows: usize,
    /// DNS lookups in flight.
    pub dns_pending: usize,
    /// Frames waiting for the guest to take them, in bytes.
    pub guest_queue_bytes: usize,
}

impl Default for Limits {
    /// 512 TCP connections; 512 KiB each way for as many as fit in 48 MiB (48
    /// connections), 16 KiB each way for the rest: 64 MiB of TCP buffers at
    /// most, of which only what has carried data is touched. 256 UDP flows, 64
    /// DNS lookups, 4 MiB of frames queued for the guest.
    fn default() -> Self {
        Self {
            tcp_connections: 512,
            tcp_buffer: 512 * 1024,
            tcp_buffer_min: 16 * 1024,
            tcp_buffer_budget: 48 * 1024 * 1024,
            udp_flows: 256,
            dns_pending: 64,
            guest_queue_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The user-mode network's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserNetConfig {
    /// Host ports (on 127.0.0.1) forwarded into the guest.
    pub forwards: Vec<PortForward>,
    /// The egress policy.
    pub policy: PolicyConfig,
    /// Resource limits.
    pub limits: Limits,
}

/// A gateway thread held before its first system call beyond setup: see
/// [`release_gated`].
struct Gate {
    go: mpsc::Sender<(Prepare, mpsc::Sender<io::Result<()>>)>,
}

/// What a gated thread runs on itself before it starts (aivmm: install its
/// seccomp filter).
pub type Prepare = Arc<dyn Fn() -> io::Result<()> + Send + Sync>;

/// The host's own IPv4 addresses, on every interface (`getifaddrs`).
pub fn host_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores the head of a list that freeifaddrs frees below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs made, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        // SAFETY: a non-null ifa_addr points at a sockaddr of at least its family's
        // size; AF_INET ones are sockaddr_in.
        unsafe {
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Gated threads not yet released.
static GATED: Mutex<Vec<Gate>> = Mutex::new(Vec::new());

/// The device's end of the gateway's frame socket: QEMU's stream framing, each
/// frame behind a `virtio_net_hdr_v1`. The gateway sends TCP segments with only
/// the pseudo-header in their checksum (`NEEDS_CSUM`), so neither it nor a guest
/// that accepted `VIRTIO_NET_F_GUEST_CSUM` sums 64 KiB segments (the worker
/// finishes them for a guest that did not); it never checks the checksums of
/// what the guest sends, so the guest may leave them partial too
/// (`VIRTIO_NET_F_CSUM`).
pub struct Link(Stream);

impl Backend for Link {
    fn name(&self) -> &'static str {
        "user"
    }
    fn vnet_hdr_len(&self) -> usize {
        VNET_HDR_LEN
    }
    fn offload_features(&self) -> u64 {
        (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.0.send(frame)
    }
    fn has_pending_output(&self) -> bool {
        self.0.has_pending_output()
    }
    fn flush(&mut self) -> io::Result<bool> {
        self.0.flush()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.0.recv(buf)
    }
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Starts the gateway thread; returns the device's end of its frame socket. The
/// thread ends when that end is dropped. The `--forward` ports are bound here,
/// so a taken port is an error before the VM starts.
///
/// With `gated`, the thread waits, having made no thread and no socket of its
/// own, until [`release_gated`] hands it what to run on itself first: aivmm's
/// seccomp set-up installs the process filter on every thread at once, which a
/// thread with a filter of its own would break, and then gives this thread (and
/// so the resolver threads it starts) the network filter.
pub fn start(config: &UserNetConfig, gated: bool) -> io::Result<Link> {
    let policy = policy::EgressPolicy::new(&config.policy, |name| match dns::resolve(name) {
        dns::Outcome::Addresses(a) => a,
        _ => Vec::new(),
    })
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    log::info!("usernet: egress policy: {}", policy.describe());
    let (device_end, stack_end) = UnixStream::pair()?;
    let mut stack = stack::Stack::new(Stream::new(stack_end)?, config, policy)?;
    let gate = if gated {
        let (tx, rx) = mpsc::channel();
        GATED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Gate { go: tx });
        Some(rx)
    } else {
        None
    };
    std::thread::Builder::new()
        .name("aivmm-usernet".into())
        .spawn(move || {
            if let Some(rx) = gate {
                // The VM never ran: nothing to do.
                let Ok((prepare, done)) = rx.recv() else { return };
                let r = prepare();
                let failed = r.is_err();
                let _ = done.send(r);
                if failed {
                    return;
                }
            }
            if let Err(e) = stack.run() {
                log::error!("usernet: the network stopped: {e}");
            }
        })?;
    Ok(Link(Stream::new(device_end)?))
}

/// Releases every gated gateway thread: each runs `prepare` on itself and
/// starts. Returns once each has run it, with the first error; how many there were.
pub fn release_gated(prepare: Prepare) -> io::Result<usize> {
    let gates = std::mem::take(&mut *GATED.lock().unwrap_or_else(|p| p.into_inner()));
    let n = gates.len();
    for g in gates {
        let (tx, rx) = mpsc::channel();
        if g.go.send((prepare.clone(), tx)).is_err() {
            continue; // its device is gone
        }
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::other("the user-mode network thread did not start")),
        }
    }
    Ok(n)
}
