//! One vsock stream connection between a guest socket and a host unix stream:
//! its state machine and the credit accounting of both directions.
//!
//! Guest to host: RW payloads are written to the unix stream at once; what the
//! stream does not take waits in `to_host`, which is never larger than the
//! `buf_alloc` ([`CONN_BUF_SIZE`]) advertised to the guest. `fwd_cnt` counts the
//! bytes that reached the stream, so a host that stops reading stops the guest's
//! credit instead of making aivmm buffer more. A CREDIT_UPDATE goes out when the
//! guest's view of the free space falls below half and some has been freed.
//!
//! Host to guest: the stream is read only when the guest has credit
//! (`buf_alloc - (tx_cnt - fwd_cnt)` from its latest header) and an rx buffer is
//! being filled, at most that credit at a time.
//!
//! The muxer owns the epoll set; a connection only says which events it wants
//! ([`Connection::interest`]) and whether it has a packet for the guest
//! ([`Connection::wants_rx`]).

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::{debug, warn};

use super::packet::Header;
use super::unix;
use super::{
    CLOSE_TIMEOUT, CONNECT_TIMEOUT, CONN_BUF_SIZE, HOST_CID, MAX_PKT_PAYLOAD,
    VSOCK_OP_CREDIT_REQUEST, VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_REQUEST, VSOCK_OP_RESPONSE,
    VSOCK_OP_RST, VSOCK_OP_RW, VSOCK_OP_SHUTDOWN, VSOCK_SHUTDOWN_F_RCV, VSOCK_SHUTDOWN_F_SEND,
    VSOCK_TYPE_STREAM,
};
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventSet};

/// A connection's identity: the port on CID 2 and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The host-side port (a guest's destination port, or an ephemeral port).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: a REQUEST is owed or sent; waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows (possibly in one direction only after a SHUTDOWN).
    Established,
    /// Over: the unix stream is closed; an RST may still be owed to the guest.
    Killed,
}

/// One connection.
pub struct Connection {
    key: ConnKey,
    guest_cid: u64,
    state: State,
    stream: Option<UnixStream>,
    token: u64,
    /// What is registered in epoll for the stream (`None`: not registered).
    registered: Option<EventSet>,
    deadline: Option<Instant>,
    /// Set by the muxer while the key sits in its rx queue.
    pub(super) in_rx_queue: bool,
    /// The deadline last handed to the muxer's timer heap.
    pub(super) timer_armed: Option<Instant>,

    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    need_rst: bool,
    /// SHUTDOWN flags owed to the guest.
    shutdown_pending: u32,

    // Host to guest.
    /// The stream reported readable and was not yet read dry.
    readable: bool,
    /// The host side sent EOF.
    host_eof: bool,
    /// The guest said it receives no more.
    guest_rcv_shut: bool,
    /// Payload bytes sent to the guest, ever.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,

    // Guest to host.
    to_host: VecDeque<u8>,
    /// Payload bytes received from the guest, ever.
    rx_cnt: u32,
    /// Of those, the bytes written to the unix stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as of the last header sent to the guest.
    last_fwd_cnt_sent: u32,
    /// The guest said it sends no more.
    guest_send_shut: bool,
    /// The unix stream's write side is shut down.
    host_write_shut: bool,
}

impl Connection {
    fn new(key: ConnKey, guest_cid: u64, stream: UnixStream, token: u64, state: State) -> Self {
        Self {
            key,
            guest_cid,
            state,
            stream: Some(stream),
            token,
            registered: None,
            deadline: None,
            in_rx_queue: false,
            timer_armed: None,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            need_rst: false,
            shutdown_pending: 0,
            readable: false,
            host_eof: false,
            guest_rcv_shut: false,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_host: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            guest_send_shut: false,
            host_write_shut: false,
        }
    }

    /// A guest-initiated connection whose unix stream is connected: it answers
    /// RESPONSE. `hdr` is the guest's REQUEST.
    pub fn guest_init(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        token: u64,
        hdr: &Header,
    ) -> Self {
        let mut c = Self::new(key, guest_cid, stream, token, State::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c.need_response = true;
        c
    }

    /// A host-initiated connection: it sends REQUEST and waits for RESPONSE.
    /// `registered` is what the handshake left registered in epoll for `stream`.
    pub fn host_init(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        token: u64,
        registered: Option<EventSet>,
        now: Instant,
    ) -> Self {
        let mut c = Self::new(key, guest_cid, stream, token, State::LocalInit);
        c.registered = registered;
        c.need_request = true;
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// The connection's key.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// Its epoll token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Its state.
    pub fn state(&self) -> State {
        self.state
    }

    /// When it times out, if it can.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Bytes of guest data waiting for the unix stream.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// How much payload the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest claiming to have consumed more than was sent gets no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.stream.is_some()
            && !self.host_eof
            && !self.guest_rcv_shut
    }

    /// Whether the connection has a packet for the guest.
    pub fn wants_rx(&self) -> bool {
        if self.need_rst {
            return true;
        }
        if self.state == State::Killed {
            return false;
        }
        self.need_request
            || self.need_response
            || self.shutdown_pending != 0
            || self.need_credit_update
            || (self.readable && self.can_send_data() && self.peer_credit() > 0)
    }

    /// Whether the connection is over and owes the guest nothing.
    pub fn is_finished(&self) -> bool {
        self.state == State::Killed && !self.need_rst
    }

    /// The epoll events the connection wants for its stream.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.stream.is_none() {
            return ev;
        }
        if self.can_send_data() && !self.readable && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Brings the epoll registration in line with [`Self::interest`]. Nothing stays
    /// registered that is not wanted: a level-triggered HUP on an idle stream would
    /// otherwise wake the worker forever.
    pub fn sync_interest(&mut self, epoll: &Epoll) {
        let want = self.interest();
        let Some(stream) = &self.stream else {
            self.registered = None;
            return;
        };
        let fd = stream.as_raw_fd();
        let r = match (self.registered, want.is_empty()) {
            (None, true) => return,
            (Some(cur), false) if cur == want => return,
            (Some(_), true) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, false) => {
                epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(want, self.token))
            }
            (Some(_), false) => epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, self.token),
            ),
        };
        match r {
            Ok(()) => self.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                warn!(
                    "virtio-vsock: epoll update for port {} failed: {e}",
                    self.key.local_port
                );
                self.kill(true);
            }
        }
    }

    /// Ends the connection now: closes the stream (which also drops it from the
    /// epoll set) and, if `rst`, owes the guest an RST.
    pub fn kill(&mut self, rst: bool) {
        if self.state == State::Killed {
            return;
        }
        self.state = State::Killed;
        self.stream = None;
        self.registered = None;
        self.deadline = None;
        self.need_rst = rst;
        self.need_request = false;
        self.need_response = false;
        self.need_credit_update = false;
        self.shutdown_pending = 0;
        self.to_host = VecDeque::new();
    }

    /// A header for the guest. Every packet carries our credit, so it counts as a
    /// credit update.
    fn header(&mut self, op: u16, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Handles a packet from the guest for this connection.
    pub fn recv(&mut self, hdr: &Header, payload: &[u8], now: Instant) {
        if self.state == State::Killed {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match (self.state, hdr.op) {
            (_, VSOCK_OP_RST) => self.kill(false),
            (State::LocalInit, VSOCK_OP_RESPONSE) => self.established(),
            (State::Established, VSOCK_OP_RW) => self.data_from_guest(payload),
            (State::Established, VSOCK_OP_CREDIT_UPDATE) => {}
            (State::Established, VSOCK_OP_CREDIT_REQUEST) => self.need_credit_update = true,
            (State::Established, VSOCK_OP_SHUTDOWN) => self.guest_shutdown(hdr.flags, now),
            (state, op) => {
                debug!(
                    "virtio-vsock: op {op} in state {state:?} on port {}; reset",
                    self.key.local_port
                );
                self.kill(true);
            }
        }
    }

    /// The guest accepted a host-initiated connection: tell the host program.
    fn established(&mut self) {
        self.state = State::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        let Some(stream) = &self.stream else {
            return self.kill(true);
        };
        // A fresh stream's send buffer is empty, so the short line goes in whole.
        match unix::send(stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(_) | Err(_) => {
                debug!(
                    "virtio-vsock: host program on port {} went away",
                    self.key.local_port
                );
                self.kill(true);
            }
        }
    }

    fn data_from_guest(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        if self.guest_send_shut {
            debug!(
                "virtio-vsock: data after SHUTDOWN on port {}",
                self.key.local_port
            );
            return self.kill(true);
        }
        if self.to_host.len() + payload.len() > CONN_BUF_SIZE as usize {
            debug!(
                "virtio-vsock: guest overran its credit on port {}",
                self.key.local_port
            );
            return self.kill(true);
        }
        // payload.len() <= MAX_PKT_PAYLOAD.
        self.rx_cnt = self.rx_cnt.wrapping_add(payload.len() as u32);
        let mut rest = payload;
        if self.to_host.is_empty() {
            let Some(stream) = &self.stream else {
                return self.kill(true);
            };
            match unix::send(stream, payload) {
                Ok(n) => {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    rest = &payload[n.min(payload.len())..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(
                        "virtio-vsock: write to port {} failed: {e}",
                        self.key.local_port
                    );
                    return self.kill(true);
                }
            }
        }
        self.to_host.extend(rest);
        self.after_forward();
    }

    /// Writes what waits for the host, as far as the stream takes it.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let Some(stream) = &self.stream else {
                return;
            };
            let (front, _) = self.to_host.as_slices();
            match unix::send(stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(front.len());
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!(
                        "virtio-vsock: write to port {} failed: {e}",
                        self.key.local_port
                    );
                    return self.kill(true);
                }
            }
        }
        self.after_forward();
    }

    /// Credit, half-close and teardown bookkeeping after bytes went to the host.
    fn after_forward(&mut self) {
        if self.state == State::Killed {
            return;
        }
        let seen = self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_view_free = CONN_BUF_SIZE.saturating_sub(seen);
        if self.fwd_cnt != self.last_fwd_cnt_sent
            && guest_view_free < CONN_BUF_SIZE / 2
            && !self.guest_send_shut
        {
            self.need_credit_update = true;
        }
        if self.guest_send_shut && self.to_host.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            if let Some(s) = &self.stream {
                // The peer may be gone already; then there is nobody to tell.
                let _ = s.shutdown(Shutdown::Write);
            }
        }
        self.check_done();
    }

    fn guest_shutdown(&mut self, flags: u32, now: Instant) {
        if flags & VSOCK_SHUTDOWN_F_RCV != 0 && !self.guest_rcv_shut {
            self.guest_rcv_shut = true;
            self.readable = false;
            if let Some(s) = &self.stream {
                let _ = s.shutdown(Shutdown::Read);
            }
        }
        if flags & VSOCK_SHUTDOWN_F_SEND != 0 {
            self.guest_send_shut = true;
        }
        if self.guest_rcv_shut && self.guest_send_shut && self.deadline.is_none() {
            // Closed by the guest: give the host a while to take the rest.
            self.deadline = Some(now + CLOSE_TIMEOUT);
        }
        self.after_forward();
    }

    /// Both directions are over: reset, which tells the guest to free its socket.
    fn check_done(&mut self) {
        let from_host_done = self.host_eof || self.guest_rcv_shut;
        let to_host_done = self.guest_send_shut && self.to_host.is_empty();
        if self.state == State::Established
            && from_host_done
            && to_host_done
            && self.shutdown_pending == 0
        {
            self.kill(true);
        }
    }

    /// Epoll reported `events` on the stream.
    pub fn on_event(&mut self, events: EventSet) {
        if self.state == State::Killed {
            return;
        }
        let hangup = EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP;
        if events.intersects(EventSet::IN | hangup) {
            self.readable = true;
        }
        if events.intersects(EventSet::OUT | hangup) && !self.to_host.is_empty() {
            self.flush_to_host();
        }
    }

    /// The deadline passed: give up on the guest (or on the host taking the rest).
    pub fn expire(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            debug!(
                "virtio-vsock: port {} timed out in {:?}",
                self.key.local_port, self.state
            );
            self.kill(true);
        }
    }

    /// The next packet for the guest, its payload (if any) read into
    /// `buf[..len]`: (header, len). `max_payload` is what the rx buffer takes.
    pub fn next_rx(&mut self, max_payload: usize, buf: &mut [u8]) -> Option<(Header, usize)> {
        if self.need_rst {
            self.need_rst = false;
            return Some((self.header(VSOCK_OP_RST, 0), 0));
        }
        if self.state == State::Killed {
            return None;
        }
        if self.need_request {
            self.need_request = false;
            return Some((self.header(VSOCK_OP_REQUEST, 0), 0));
        }
        if self.need_response {
            self.need_response = false;
            return Some((self.header(VSOCK_OP_RESPONSE, 0), 0));
        }
        if self.readable && self.can_send_data() {
            let want = (self.peer_credit() as usize)
                .min(max_payload)
                .min(MAX_PKT_PAYLOAD)
                .min(buf.len());
            if want > 0 {
                if let Some(r) = self.read_from_host(&mut buf[..want]) {
                    return Some(r);
                }
            }
        }
        if self.state == State::Killed {
            return self.next_rx(0, buf);
        }
        if self.shutdown_pending != 0 {
            let flags = std::mem::take(&mut self.shutdown_pending);
            let h = self.header(VSOCK_OP_SHUTDOWN, flags);
            self.check_done();
            return Some((h, 0));
        }
        if self.need_credit_update {
            return Some((self.header(VSOCK_OP_CREDIT_UPDATE, 0), 0));
        }
        None
    }

    /// Reads host data for one RW packet; `None` if there was none (EOF or dry).
    fn read_from_host(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        let stream = self.stream.as_ref()?;
        match unix::recv(stream, buf, false) {
            Ok(0) => {
                self.readable = false;
                self.host_eof = true;
                self.shutdown_pending |= VSOCK_SHUTDOWN_F_SEND;
                None
            }
            Ok(n) => {
                // n <= buf.len() <= MAX_PKT_PAYLOAD.
                self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                Some((self.header(VSOCK_OP_RW, 0), n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                None
            }
            Err(e) => {
                debug!(
                    "virtio-vsock: read from port {} failed: {e}",
                    self.key.local_port
                );
                self.kill(true);
                None
            }
        }
    }
}
