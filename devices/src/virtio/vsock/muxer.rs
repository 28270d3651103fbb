//! The muxer: every connection, the listening socket, host handshakes in progress,
//! and the epoll set they share with the device's queue `EventFd`s.
//!
//! The device's worker hands it each guest packet ([`Muxer::handle_guest_packet`])
//! and each epoll event on a socket ([`Muxer::handle_event`]); whenever it has an rx
//! buffer it asks for the next packet ([`Muxer::next_rx`]). Connections with
//! something for the guest wait in a round-robin queue, so one busy stream cannot
//! starve the others. RSTs for packets that match no connection wait in a bounded
//! queue of their own; when it is full the worker stops reading the tx queue until
//! the guest gives rx buffers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::connection::{ConnKey, Connection};
use super::packet::{Header, Malformed};
use super::unix;
use super::{
    EPHEMERAL_PORT_BASE, HANDSHAKE_TIMEOUT, HOST_CID, MAX_CONNECTIONS, MAX_HANDSHAKE_LINE,
    MAX_PENDING_RST, MAX_PKT_PAYLOAD, VSOCK_OP_REQUEST, VSOCK_OP_RST, VSOCK_TYPE_STREAM,
};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Epoll token of the listening socket.
pub const PROCESS_LISTENER: u64 = 8;
/// Epoll tokens from here on name unix streams; they are never reused.
pub const FIRST_STREAM_TOKEN: u64 = 16;
/// How long accepting pauses after an error such as EMFILE, which would otherwise
/// leave the listener readable and the worker spinning.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A host program that connected to the listening socket and has not yet sent its
/// `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The unix socket path a guest connect to `port` goes to: `<uds_path>_<port>`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Parses `CONNECT <port>` (the newline already removed).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Every connection of one activation of the device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    listener_registered: bool,
    accept_paused_until: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    by_token: HashMap<u64, ConnKey>,
    handshakes: HashMap<u64, Handshake>,
    rst_queue: VecDeque<Header>,
    rx_queue: VecDeque<ConnKey>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_token: u64,
    next_port: u32,
    buf: Vec<u8>,
}

impl Muxer {
    /// A muxer for `guest_cid` that accepts host programs on `listener` (bound at
    /// `uds_path`, non-blocking) and registers sockets in `epoll`.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
        epoll: Epoll,
    ) -> io::Result<Self> {
        let mut m = Self {
            guest_cid,
            uds_path,
            epoll,
            listener,
            listener_registered: false,
            accept_paused_until: None,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            rst_queue: VecDeque::new(),
            rx_queue: VecDeque::new(),
            timers: BinaryHeap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_port: EPHEMERAL_PORT_BASE,
            buf: vec![0; MAX_PKT_PAYLOAD],
        };
        m.listen(true)?;
        Ok(m)
    }

    /// The epoll set, for the worker to add its own `EventFd`s and wait on.
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// The number of connections (including ones owing the guest a final RST).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn listen(&mut self, on: bool) -> io::Result<()> {
        if on == self.listener_registered {
            return Ok(());
        }
        let fd = self.listener.as_raw_fd();
        if on {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, PROCESS_LISTENER),
            )?;
        } else {
            self.epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
        }
        self.listener_registered = on;
        Ok(())
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS
    }

    /// Whether the tx queue should wait: the queue of RSTs for the guest is full.
    pub fn tx_stalled(&self) -> bool {
        self.rst_queue.len() >= MAX_PENDING_RST
    }

    /// Whether some packet may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rx_queue.is_empty()
    }

    /// Queues an RST answering `hdr` (never one answering an RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == VSOCK_OP_RST {
            return;
        }
        if self.rst_queue.len() >= MAX_PENDING_RST {
            debug!("virtio-vsock: RST queue full; RST dropped");
            return;
        }
        self.rst_queue.push_back(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: hdr.type_,
            op: VSOCK_OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// After anything happened to a connection: its epoll interest, its place in
    /// the rx queue, its timer, and its removal once over.
    fn update(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        c.sync_interest(&self.epoll);
        if c.wants_rx() && !c.in_rx_queue {
            c.in_rx_queue = true;
            self.rx_queue.push_back(key);
        }
        if let Some(d) = c.deadline() {
            if c.timer_armed != Some(d) {
                c.timer_armed = Some(d);
                self.timers.push(Reverse((d, c.token())));
            }
        }
        if c.is_finished() {
            let token = c.token();
            self.conns.remove(&key);
            self.by_token.remove(&token);
        }
    }

    /// Handles one well-formed packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8], now: Instant) {
        if hdr.src_cid != self.guest_cid {
            debug!("virtio-vsock: packet from CID {} dropped", hdr.src_cid);
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != VSOCK_TYPE_STREAM {
            debug!(
                "virtio-vsock: packet to CID {} of type {}: reset",
                hdr.dst_cid, hdr.type_
            );
            return self.reply_rst(hdr);
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            c.recv(hdr, payload, now);
            return self.update(key);
        }
        match hdr.op {
            VSOCK_OP_REQUEST => self.guest_connect(key, hdr),
            VSOCK_OP_RST => {}
            op => {
                debug!("virtio-vsock: op {op} for unknown port {}", key.local_port);
                self.reply_rst(hdr);
            }
        }
    }

    /// Handles a tx chain that was not a packet: if its header could be read, the
    /// connection it names is reset.
    pub fn handle_malformed(&mut self, m: &Malformed) {
        debug!("virtio-vsock: bad tx packet: {}", m.why);
        let Some(hdr) = m.header else {
            return;
        };
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(c) = self.conns.get_mut(&key) {
            c.kill(true);
            return self.update(key);
        }
        self.reply_rst(&hdr);
    }

    /// A guest connects to CID 2: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.at_capacity() {
            debug!("virtio-vsock: too many connections; REQUEST refused");
            return self.reply_rst(hdr);
        }
        let path = port_path(&self.uds_path, key.local_port);
        let stream = match unix::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                debug!("virtio-vsock: connecting to {} failed: {e}", path.display());
                return self.reply_rst(hdr);
            }
        };
        let token = self.token();
        let conn = Connection::guest_init(key, self.guest_cid, stream, token, hdr);
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.update(key);
    }

    /// Epoll reported `events` for `token` (a socket of this muxer).
    pub fn handle_event(&mut self, token: u64, events: EventSet, now: Instant) {
        if token == PROCESS_LISTENER {
            return self.accept(now);
        }
        if self.handshakes.contains_key(&token) {
            return self.handshake(token, now);
        }
        if let Some(&key) = self.by_token.get(&token) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.on_event(events);
            }
            self.update(key);
        }
        // Otherwise the socket was closed earlier in this batch of events.
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    warn!("virtio-vsock: accept failed, pausing: {e}");
                    if self.listen(false).is_ok() {
                        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    }
                    return;
                }
            };
            if self.at_capacity() {
                debug!("virtio-vsock: too many connections; host program refused");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("virtio-vsock: accepted stream: {e}");
                continue;
            }
            let token = self.token();
            let ev = EpollEvent::new(EventSet::IN, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                warn!("virtio-vsock: registering an accepted stream failed: {e}");
                continue;
            }
            let deadline = now + HANDSHAKE_TIMEOUT;
            self.timers.push(Reverse((deadline, token)));
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    line: Vec::with_capacity(MAX_HANDSHAKE_LINE),
                    deadline,
                },
            );
        }
    }

    /// Reads what there is of a `CONNECT` line, never past its newline: bytes after
    /// it belong to the connection.
    fn handshake(&mut self, token: u64, now: Instant) {
        let Some(h) = self.handshakes.get_mut(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_HANDSHAKE_LINE];
        let room = MAX_HANDSHAKE_LINE - h.line.len();
        let n = match unix::recv(&h.stream, &mut peek[..room], true) {
            Ok(0) => {
                debug!("virtio-vsock: host program left during the handshake");
                self.handshakes.remove(&token);
                return;
            }
            Ok(n) => n.min(room),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("virtio-vsock: handshake read failed: {e}");
                self.handshakes.remove(&token);
                return;
            }
        };
        let newline = peek[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |p| p + 1);
        let mut sink = [0u8; MAX_HANDSHAKE_LINE];
        // The bytes were peeked, so this read returns them at once.
        match unix::recv(&h.stream, &mut sink[..take], false) {
            Ok(got) if got == take => {}
            _ => {
                self.handshakes.remove(&token);
                return;
            }
        }
        h.line.extend_from_slice(&peek[..newline.unwrap_or(n)]);
        let Some(_) = newline else {
            if h.line.len() >= MAX_HANDSHAKE_LINE {
                debug!("virtio-vsock: handshake line too long");
                self.handshakes.remove(&token);
            }
            return;
        };
        let Some(h) = self.handshakes.remove(&token) else {
            return;
        };
        let Some(port) = parse_connect(&h.line) else {
            debug!(
                "virtio-vsock: bad handshake line {:?}",
                String::from_utf8_lossy(&h.line)
            );
            return;
        };
        let Some(local_port) = self.free_port(port) else {
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let conn = Connection::host_init(
            key,
            self.guest_cid,
            h.stream,
            token,
            Some(EventSet::IN),
            now,
        );
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.update(key);
    }

    /// A host port for a new connection to guest `peer_port`.
    fn free_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(EPHEMERAL_PORT_BASE);
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    /// The next packet for the guest, with at most `max_payload` bytes of payload,
    /// which [`Self::rx_payload`] then holds.
    pub fn next_rx(&mut self, max_payload: usize) -> Option<(Header, usize)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, 0));
        }
        // Each connection gets one turn, so a connection with nothing that fits
        // cannot keep this loop going.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if !c.in_rx_queue {
                // A stale entry: the key was removed and reused.
                continue;
            }
            c.in_rx_queue = false;
            let out = c.next_rx(max_payload, &mut self.buf);
            self.update(key);
            if out.is_some() {
                return out;
            }
        }
        None
    }

    /// The payload of the packet [`Self::next_rx`] returned.
    pub fn rx_payload(&self, len: usize) -> &[u8] {
        &self.buf[..len.min(self.buf.len())]
    }

    /// When [`Self::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.timers.peek().map(|Reverse((d, _))| *d);
        match (t, self.accept_paused_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Times out handshakes and connections whose deadline passed.
    pub fn expire(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| t <= now) && self.listen(true).is_ok() {
            self.accept_paused_until = None;
        }
        while let Some(&Reverse((d, token))) = self.timers.peek() {
            if d > now {
                break;
            }
            self.timers.pop();
            if self
                .handshakes
                .get(&token)
                .is_some_and(|h| h.deadline <= now)
            {
                debug!("virtio-vsock: handshake timed out");
                self.handshakes.remove(&token);
                continue;
            }
            if let Some(&key) = self.by_token.get(&token) {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.timer_armed = None;
                    c.expire(now);
                }
                self.update(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT ",
            b"CONNECT +5",
            b"CONNECT -5",
            b"CONNECT 5 ",
            b"connect 5",
            b"CONNECT x",
            b"",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/tmp/v.sock"), 1234),
            PathBuf::from("/tmp/v.sock_1234")
        );
    }
}
