//! Device-level tests: a guest driver written against mock queues in real guest
//! memory on one side, host programs on real unix sockets on the other.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::muxer::port_path;
use super::packet::Header;
use super::*;
use crate::sys::{EventFd, EFD_NONBLOCK};
use crate::test_utils::*;
use crate::virtio::{ActivateArgs, VirtioDevice};

const CID: u64 = 3;
const MEM_SIZE: usize = 64 << 20;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x200_0000;
const SCRATCH: u64 = 0x300_0000;
const SLOT: u64 = 0x1_1000;
const TX_SLOTS: u16 = QUEUE_SIZE / 2;
const WAIT: Duration = Duration::from_secs(10);
/// The guest's receive buffer per connection in these tests.
const GUEST_BUF: u32 = 256 * 1024;

/// One split ring as the driver sees it, laid out as the spec says (the mock
/// queue's layout overlaps its avail and used rings past 128 entries), with
/// wrapping avail and used indexes.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    desc: u64,
    avail_addr: u64,
    used_addr: u64,
    avail: u16,
    used: u16,
}

impl<'a> Ring<'a> {
    fn new(mem: &'a GuestMemoryMmap, addr: u64) -> Self {
        let size = u64::from(QUEUE_SIZE);
        let avail_addr = addr + 16 * size;
        let used_addr = (avail_addr + 6 + 2 * size + 3) & !3;
        let r = Self {
            mem,
            desc: addr,
            avail_addr,
            used_addr,
            avail: 0,
            used: 0,
        };
        let zeros = vec![0u8; (used_addr + 6 + 8 * size - addr) as usize];
        mem.write_slice(&zeros, GuestAddress(addr)).unwrap();
        r
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_addr))
            .unwrap();
        q.set_event_idx(true);
        q.set_ready(true);
        q
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
        self.mem
            .write_obj(d, GuestAddress(self.desc + 16 * u64::from(i)))
            .unwrap();
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail_addr + 2))
            .unwrap();
    }

    fn publish(&mut self, head: u16) {
        let pos = u64::from(self.avail % QUEUE_SIZE);
        self.mem
            .write_obj(head, GuestAddress(self.avail_addr + 4 + 2 * pos))
            .unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.set_avail_idx(self.avail);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap()
    }

    fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.used {
            return None;
        }
        let at = self.used_addr + 4 + 8 * u64::from(self.used % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used = self.used.wrapping_add(1);
        Some((id, len))
    }
}

/// A guest driver: rx buffers always posted, tx packets in two-descriptor chains
/// (header, then payload) as Linux sends them.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: Ring<'a>,
    tx: Ring<'a>,
    _ev: Ring<'a>,
    evts: Vec<EventFd>,
    irq: Arc<RecordingVirtioInterrupt>,
    rx_len: u32,
    tx_free: Vec<u16>,
    pending: VecDeque<(Header, Vec<u8>)>,
}

impl<'a> Guest<'a> {
    fn new(dev: &mut Vsock, mem: &'a GuestMemoryMmap, rx_len: u32) -> Self {
        let rx = Ring::new(mem, QUEUE_ADDR);
        let tx = Ring::new(mem, QUEUE_ADDR + 0x1_0000);
        let ev = Ring::new(mem, QUEUE_ADDR + 0x2_0000);
        let evts: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = Arc::new(RecordingVirtioInterrupt::default());
        dev.ack_features(dev.features());
        dev.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![rx.queue(), tx.queue(), ev.queue()],
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: irq.clone(),
            spawner: Default::default(),
        })
        .unwrap();
        let mut g = Self {
            mem,
            rx,
            tx,
            _ev: ev,
            evts,
            irq,
            rx_len,
            tx_free: (0..TX_SLOTS).rev().collect(),
            pending: VecDeque::new(),
        };
        for i in 0..QUEUE_SIZE {
            g.post_rx(i);
        }
        g.kick(RXQ_INDEX);
        g
    }

    fn kick(&self, q: usize) {
        self.evts[q].write(1).unwrap();
    }

    fn post_rx(&mut self, i: u16) {
        let w = VRING_DESC_F_WRITE as u16;
        self.rx
            .desc(i, RX_BASE + u64::from(i) * SLOT, self.rx_len, w, 0);
        self.rx.publish(i);
    }

    /// Sends raw bytes as one packet: header descriptor, then payload descriptor.
    fn send_raw(&mut self, hdr: &[u8], payload: &[u8]) {
        let deadline = Instant::now() + WAIT;
        let slot = loop {
            while let Some((id, _)) = self.tx.next_used() {
                self.tx_free.push(id as u16 / 2);
            }
            if let Some(s) = self.tx_free.pop() {
                break s;
            }
            assert!(Instant::now() < deadline, "tx queue never drained");
            thread::sleep(Duration::from_micros(50));
        };
        let base = TX_BASE + u64::from(slot) * SLOT;
        let (d0, d1) = (slot * 2, slot * 2 + 1);
        self.mem.write_slice(hdr, GuestAddress(base)).unwrap();
        if payload.is_empty() {
            self.tx.desc(d0, base, hdr.len() as u32, 0, 0);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(base + 64))
                .unwrap();
            self.tx
                .desc(d0, base, hdr.len() as u32, VRING_DESC_F_NEXT as u16, d1);
            self.tx.desc(d1, base + 64, payload.len() as u32, 0, 0);
        }
        self.tx.publish(d0);
        self.kick(TXQ_INDEX);
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut h = h;
        h.len = payload.len() as u32;
        self.send_raw(&h.to_bytes(), payload);
    }

    /// Takes what the device put on the rx ring and re-posts the buffers.
    fn poll_rx(&mut self) {
        let mut any = false;
        while let Some((id, len)) = self.rx.next_used() {
            any = true;
            let id = id as u16;
            if len as usize >= HDR_SIZE {
                let mut b = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut b, GuestAddress(RX_BASE + u64::from(id) * SLOT))
                    .unwrap();
                let mut hb = [0u8; HDR_SIZE];
                hb.copy_from_slice(&b[..HDR_SIZE]);
                let h = Header::from_bytes(&hb);
                assert_eq!(h.len as usize + HDR_SIZE, len as usize, "{h:?}");
                self.pending.push_back((h, b.split_off(HDR_SIZE)));
            }
            self.post_rx(id);
        }
        if any {
            self.kick(RXQ_INDEX);
        }
    }

    fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        self.poll_rx();
        self.pending.pop_front()
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(p) = self.try_recv() {
                return p;
            }
            assert!(Instant::now() < deadline, "no packet from the device");
            thread::sleep(Duration::from_micros(50));
        }
    }

    fn expect_nothing(&mut self, d: Duration) {
        thread::sleep(d);
        if let Some((h, _)) = self.try_recv() {
            panic!("unexpected packet {h:?}");
        }
    }
}

fn gh(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
    }
}

fn setup() -> (tempfile::TempDir, PathBuf, Vsock, GuestMemoryMmap) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let dev = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
    })
    .unwrap();
    (dir, uds, dev, guest_memory(MEM_SIZE))
}

fn assert_reply(h: &Header, op: u16, src_port: u32, dst_port: u32) {
    assert_eq!(
        (h.op, h.src_port, h.dst_port, h.src_cid, h.dst_cid, h.type_),
        (op, src_port, dst_port, HOST_CID, CID, VSOCK_TYPE_STREAM),
        "{h:?}"
    );
}

/// A guest connect to host port `port` from guest port `src`, answered RESPONSE,
/// and the host side accepted.
fn guest_connect(g: &mut Guest<'_>, l: &UnixListener, port: u32, src: u32) -> UnixStream {
    g.send(gh(VSOCK_OP_REQUEST, src, port), &[]);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_RESPONSE, port, src);
    assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// A host program connects and the guest accepts; returns the stream and the host port.
fn host_connect(g: &mut Guest<'_>, uds: &Path, port: u32, gport_buf: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (h, _) = g.recv();
    assert_eq!(
        (h.op, h.dst_port, h.src_cid, h.dst_cid),
        (VSOCK_OP_REQUEST, port, HOST_CID, CID)
    );
    assert!(h.src_port >= EPHEMERAL_PORT_BASE);
    let mut r = gh(VSOCK_OP_RESPONSE, port, h.src_port);
    r.buf_alloc = gport_buf;
    g.send(r, &[]);
    let line = read_line(&mut s);
    assert_eq!(line, format!("OK {}\n", h.src_port));
    (s, h.src_port)
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut b).unwrap(), 1, "stream closed mid-line");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Receives RW packets until `n` payload bytes came.
fn recv_data(g: &mut Guest<'_>, n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while v.len() < n {
        let (h, p) = g.recv();
        assert_eq!(h.op, VSOCK_OP_RW, "{h:?}");
        v.extend_from_slice(&p);
    }
    assert_eq!(v.len(), n);
    v
}

#[test]
fn features_config_and_socket_checks() {
    let (dir, uds, dev, _mem) = setup();
    assert_eq!(dev.device_type(), VIRTIO_ID_VSOCK);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(
        dev.features(),
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    );
    let mut b = [0xffu8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), CID);
    let mut b4 = [0u8; 4];
    dev.read_config(4, &mut b4);
    assert_eq!(b4, [0; 4]);
    let mut b = [0xffu8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);

    // Something listens on the path: refused, and the socket stays.
    let e = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::SocketInUse(_)), "{e}");
    assert!(e.to_string().contains("v.sock"), "{e}");
    UnixStream::connect(&uds).unwrap();
    // Dropping the device removes its socket.
    drop(dev);
    assert!(!uds.exists());
    // A stale socket file is replaced.
    drop(UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    let dev = Vsock::new(VsockConfig {
        guest_cid: 7,
        uds_path: uds.clone(),
    })
    .unwrap();
    assert_eq!(dev.guest_cid(), 7);
    UnixStream::connect(&uds).unwrap();
    drop(dev);
    // Not a socket; reserved CIDs; a path too long.
    let f = dir.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    let e = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: f.clone(),
    })
    .err()
    .unwrap();
    assert!(matches!(e, Error::NotASocket(_)), "{e}");
    assert!(f.exists());
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: uds.clone(),
        })
        .err()
        .unwrap();
        assert!(matches!(e, Error::ReservedCid(_)), "{e}");
    }
    let long = dir.path().join("x".repeat(100));
    assert!(matches!(
        Vsock::new(VsockConfig {
            guest_cid: CID,
            uds_path: long
        }),
        Err(Error::PathTooLong(_))
    ));
}

#[test]
fn guest_to_host_data_shutdown_and_rst() {
    let (_dir, uds, mut dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 1234)).unwrap();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let mut s = guest_connect(&mut g, &l, 1234, 5000);
    assert!(g.irq.count() >= 1);

    g.send(gh(VSOCK_OP_RW, 5000, 1234), b"hello from the guest");
    assert_eq!(read_exact_n(&mut s, 20), b"hello from the guest");
    s.write_all(b"hello from the host").unwrap();
    assert_eq!(recv_data(&mut g, 19), b"hello from the host");

    // Guest half-closes: the host reads EOF and can still send.
    let mut sh = gh(VSOCK_OP_SHUTDOWN, 5000, 1234);
    sh.flags = VSOCK_SHUTDOWN_F_SEND;
    g.send(sh, &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    s.write_all(b"still here").unwrap();
    assert_eq!(recv_data(&mut g, 10), b"still here");

    // Host closes: SHUTDOWN(SEND), then (both directions done) RST.
    drop(s);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_SHUTDOWN, 1234, 5000);
    assert_eq!(h.flags, VSOCK_SHUTDOWN_F_SEND);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_RST, 1234, 5000);

    // A second connection torn down by the guest's RST: the host sees EOF.
    let mut s = guest_connect(&mut g, &l, 1234, 5001);
    g.send(gh(VSOCK_OP_RST, 5001, 1234), &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    g.expect_nothing(Duration::from_millis(30));

    // A third closed by the guest (SHUTDOWN with both flags) after sending data:
    // the data reaches the host, then EOF, and the guest gets its RST.
    let mut s = guest_connect(&mut g, &l, 1234, 5002);
    g.send(gh(VSOCK_OP_RW, 5002, 1234), b"last words");
    let mut sh = gh(VSOCK_OP_SHUTDOWN, 5002, 1234);
    sh.flags = VSOCK_SHUTDOWN_F_SEND | VSOCK_SHUTDOWN_F_RCV;
    g.send(sh, &[]);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_RST, 1234, 5002);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"last words");
    assert!(dev.reset());
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let (_dir, _uds, mut dev, mem) = setup();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    g.send(gh(VSOCK_OP_REQUEST, 6000, 77), &[]);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_RST, 77, 6000);
    // Data for a connection that does not exist: RST too; an RST gets no answer.
    g.send(gh(VSOCK_OP_RW, 6000, 77), b"x");
    let (h, _) = g.recv();
    assert_eq!(h.op, VSOCK_OP_RST);
    g.send(gh(VSOCK_OP_RST, 6000, 77), &[]);
    g.expect_nothing(Duration::from_millis(30));
    assert!(dev.reset());
}

#[test]
fn host_to_guest_connect_and_data() {
    let (_dir, uds, mut dev, mem) = setup();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let (mut s, hport) = host_connect(&mut g, &uds, 52, GUEST_BUF);
    s.write_all(b"ping").unwrap();
    assert_eq!(recv_data(&mut g, 4), b"ping");
    g.send(gh(VSOCK_OP_RW, 52, hport), b"pong");
    assert_eq!(read_exact_n(&mut s, 4), b"pong");

    // Bytes a host program sends right after its CONNECT line are not lost.
    let mut s2 = UnixStream::connect(&uds).unwrap();
    s2.set_read_timeout(Some(WAIT)).unwrap();
    s2.write_all(b"CONNECT 53\nearly bytes").unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (VSOCK_OP_REQUEST, 53));
    assert_ne!(h.src_port, hport);
    g.send(gh(VSOCK_OP_RESPONSE, 53, h.src_port), &[]);
    assert_eq!(read_line(&mut s2), format!("OK {}\n", h.src_port));
    assert_eq!(recv_data(&mut g, 11), b"early bytes");

    // The guest refuses: the host stream closes.
    let mut s3 = UnixStream::connect(&uds).unwrap();
    s3.set_read_timeout(Some(WAIT)).unwrap();
    s3.write_all(b"CONNECT 54\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (VSOCK_OP_REQUEST, 54));
    g.send(gh(VSOCK_OP_RST, 54, h.src_port), &[]);
    let mut rest = Vec::new();
    s3.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(dev.reset());
}

#[test]
fn host_connect_times_out() {
    let (_dir, uds, mut dev, mem) = setup();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"CONNECT 99\n").unwrap();
    let start = Instant::now();
    let (h, _) = g.recv();
    assert_eq!(h.op, VSOCK_OP_REQUEST);
    // No answer from the guest: after CONNECT_TIMEOUT the stream closes, and the
    // guest is told with an RST.
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let waited = start.elapsed();
    assert!(
        waited >= CONNECT_TIMEOUT - Duration::from_millis(50),
        "{waited:?}"
    );
    let (r, _) = g.recv();
    assert_reply(&r, VSOCK_OP_RST, h.src_port, 99);
    // A late RESPONSE gets an RST.
    g.send(gh(VSOCK_OP_RESPONSE, 99, h.src_port), &[]);
    let (r, _) = g.recv();
    assert_eq!(r.op, VSOCK_OP_RST);
    assert!(dev.reset());
}

#[test]
fn bad_handshake_lines_close_the_stream() {
    let (_dir, uds, mut dev, mem) = setup();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let long = "CONNECT 1".to_string() + &"0".repeat(40);
    for line in [
        "CONNECT x\n",
        "HELLO\n",
        "CONNECT 99999999999\n",
        "CONNECT \n",
        long.as_str(),
    ] {
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut rest = Vec::new();
        // EOF, or a reset if our unread bytes were still queued when it closed.
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{line:?}");
    }
    // Nothing reached the guest, and good lines still work.
    g.expect_nothing(Duration::from_millis(30));
    let (_s, _) = host_connect(&mut g, &uds, 5, GUEST_BUF);
    // A host program that closes mid-line is forgotten.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONN").unwrap();
    drop(s);
    g.expect_nothing(Duration::from_millis(30));
    assert!(dev.reset());
}

#[test]
fn credit_is_respected_both_ways() {
    let (_dir, uds, mut dev, mem) = setup();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    // The guest offers 1000 bytes of buffer; the host sends 5000.
    let (mut s, hport) = host_connect(&mut g, &uds, 7, 1000);
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
    s.write_all(&data).unwrap();
    let mut got = recv_data(&mut g, 1000);
    g.expect_nothing(Duration::from_millis(50));
    // Each CREDIT_UPDATE frees room for exactly 1000 more.
    for _ in 0..4 {
        let mut cu = gh(VSOCK_OP_CREDIT_UPDATE, 7, hport);
        cu.buf_alloc = 1000;
        cu.fwd_cnt = got.len() as u32;
        g.send(cu, &[]);
        got.extend(recv_data(&mut g, 1000));
        g.expect_nothing(Duration::from_millis(20));
    }
    assert_eq!(got, data);

    // The device advertises CONN_BUF_SIZE; a host that does not read makes it
    // buffer up to that and then stop giving credit.
    let mut sent = 0u32;
    let chunk = vec![0x5au8; 32 * 1024];
    let mut saw_update = false;
    while sent < CONN_BUF_SIZE {
        let mut rw = gh(VSOCK_OP_RW, 7, hport);
        rw.buf_alloc = 1000;
        rw.fwd_cnt = 5000;
        g.send(rw, &chunk);
        sent += chunk.len() as u32;
    }
    // The unix socket took some, the device holds the rest; nobody freed room
    // beyond what the socket absorbed. Exceeding the credit the device advertised
    // (buf_alloc - (sent - fwd_cnt)) resets the connection.
    let mut last_fwd = 0;
    let deadline = Instant::now() + Duration::from_millis(200);
    while Instant::now() < deadline {
        if let Some((h, _)) = g.try_recv() {
            assert_eq!(h.op, VSOCK_OP_CREDIT_UPDATE, "{h:?}");
            last_fwd = h.fwd_cnt;
            saw_update = true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let credit = CONN_BUF_SIZE - (sent - last_fwd);
    let mut rw = gh(VSOCK_OP_RW, 7, hport);
    rw.buf_alloc = 1000;
    rw.fwd_cnt = 5000;
    let over = vec![1u8; credit as usize + 1];
    if over.len() <= MAX_PKT_PAYLOAD {
        g.send(rw, &over);
        let (h, _) = g.recv();
        assert_reply(&h, VSOCK_OP_RST, hport, 7);
    }
    let _ = saw_update;

    // CREDIT_REQUEST is answered with a CREDIT_UPDATE.
    let (mut s2, hport2) = host_connect(&mut g, &uds, 8, GUEST_BUF);
    g.send(gh(VSOCK_OP_RW, 8, hport2), b"abc");
    assert_eq!(read_exact_n(&mut s2, 3), b"abc");
    g.send(gh(VSOCK_OP_CREDIT_REQUEST, 8, hport2), &[]);
    let (h, _) = g.recv();
    assert_reply(&h, VSOCK_OP_CREDIT_UPDATE, hport2, 8);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (CONN_BUF_SIZE, 3));
    assert!(dev.reset());
}

#[test]
fn a_slow_host_gets_credit_updates() {
    let (_dir, uds, mut dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 1)).unwrap();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let mut s = guest_connect(&mut g, &l, 1, 2);
    // The host reads 4 MiB slowly; the guest sends only within the credit it was
    // told about. It must never be left without credit for good.
    const TOTAL: usize = 4 << 20;
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 50_000];
        let mut n = 0;
        while n < TOTAL {
            thread::sleep(Duration::from_micros(300));
            n += s.read(&mut buf).unwrap();
        }
        n
    });
    let chunk = vec![7u8; 64 * 1024];
    let (mut sent, mut fwd, mut updates) = (0usize, 0u32, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < TOTAL {
        assert!(Instant::now() < deadline, "stalled at {sent}");
        while let Some((h, _)) = g.try_recv() {
            assert_eq!(h.op, VSOCK_OP_CREDIT_UPDATE, "{h:?}");
            assert_eq!(h.buf_alloc, CONN_BUF_SIZE);
            fwd = h.fwd_cnt;
            updates += 1;
        }
        let credit = CONN_BUF_SIZE as usize - (sent - fwd as usize);
        let n = credit.min(chunk.len()).min(TOTAL - sent);
        if n == 0 {
            thread::sleep(Duration::from_micros(100));
            continue;
        }
        g.send(gh(VSOCK_OP_RW, 2, 1), &chunk[..n]);
        sent += n;
    }
    assert_eq!(reader.join().unwrap(), TOTAL);
    assert!(updates > 0);
    assert!(dev.reset());
}

/// A fast, deterministic byte stream.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let b = self.0.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
    }
}

/// FNV-1a, folded over a stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

#[test]
fn sixteen_mib_each_way_at_once() {
    const TOTAL: usize = 16 << 20;
    let (_dir, uds, mut dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 9000)).unwrap();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let s = guest_connect(&mut g, &l, 9000, 40000);

    // The host: one thread writes 16 MiB then half-closes, another reads to EOF.
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let mut rng = XorShift(0x1234_5678);
        let mut sum = Fnv::new();
        let mut buf = vec![0u8; 100_000];
        let mut left = TOTAL;
        while left > 0 {
            let n = left.min(buf.len());
            rng.fill(&mut buf[..n]);
            sum.update(&buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        w.shutdown(Shutdown::Write).unwrap();
        sum
    });
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let reader = thread::spawn(move || {
        let mut sum = Fnv::new();
        let mut buf = vec![0u8; 70_000];
        let mut n = 0;
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                return (n, sum);
            }
            sum.update(&buf[..k]);
            n += k;
        }
    });

    // The guest: sends 16 MiB within the device's credit, receives 16 MiB and
    // returns credit as it consumes, never receiving more than it offered.
    let mut rng = XorShift(0x9abc_def0);
    let mut sent_sum = Fnv::new();
    let mut recv_sum = Fnv::new();
    let (mut sent, mut received, mut reported) = (0usize, 0u32, 0u32);
    let (mut dev_buf, mut dev_fwd) = (0u32, 0u32);
    let mut shut_sent = false;
    let mut host_shut = false;
    let mut reset = false;
    let mut chunk = vec![0u8; 24 * 1024];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            Instant::now() < deadline,
            "stalled: sent {sent}, received {received}"
        );
        let mut idle = true;
        while let Some((h, p)) = g.try_recv() {
            idle = false;
            assert_eq!((h.src_port, h.dst_port), (9000, 40000), "{h:?}");
            dev_buf = h.buf_alloc;
            dev_fwd = h.fwd_cnt;
            match h.op {
                VSOCK_OP_RW => {
                    assert!(!host_shut);
                    recv_sum.update(&p);
                    received += p.len() as u32;
                    assert!(
                        received - reported <= GUEST_BUF,
                        "device overran the guest's credit"
                    );
                }
                VSOCK_OP_CREDIT_UPDATE => {}
                VSOCK_OP_SHUTDOWN => {
                    assert_eq!(h.flags, VSOCK_SHUTDOWN_F_SEND);
                    host_shut = true;
                }
                VSOCK_OP_RST => reset = true,
                op => panic!("unexpected op {op}"),
            }
        }
        if reset {
            // Both directions done: the device resets the connection.
            assert!(host_shut && shut_sent && received as usize == TOTAL);
            break;
        }
        let mut hdr = gh(VSOCK_OP_RW, 40000, 9000);
        if received - reported >= GUEST_BUF / 4 {
            reported = received;
            hdr.fwd_cnt = reported;
            g.send(
                Header {
                    op: VSOCK_OP_CREDIT_UPDATE,
                    ..hdr
                },
                &[],
            );
            idle = false;
        }
        hdr.fwd_cnt = reported;
        let credit = dev_buf.saturating_sub((sent as u32).wrapping_sub(dev_fwd)) as usize;
        let n = credit.min(chunk.len()).min(TOTAL - sent);
        if n > 0 {
            rng.fill(&mut chunk[..n]);
            sent_sum.update(&chunk[..n]);
            g.send(hdr, &chunk[..n]);
            sent += n;
            idle = false;
        } else if sent == TOTAL && !shut_sent {
            g.send(
                Header {
                    op: VSOCK_OP_SHUTDOWN,
                    flags: VSOCK_SHUTDOWN_F_SEND,
                    ..hdr
                },
                &[],
            );
            shut_sent = true;
        }
        if idle {
            thread::sleep(Duration::from_micros(100));
        }
    }
    let host_sent = writer.join().unwrap();
    let (host_n, host_got) = reader.join().unwrap();
    assert_eq!(received as usize, TOTAL);
    assert_eq!(recv_sum, host_sent);
    assert_eq!(host_n, TOTAL);
    assert_eq!(host_got, sent_sum);
    assert!(dev.reset());
}

#[test]
fn hostile_packets_do_not_panic_or_hang() {
    let (_dir, uds, mut dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 80)).unwrap();
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);

    // Wrong source CID: dropped without a word.
    let mut h = gh(VSOCK_OP_REQUEST, 1, 80);
    h.src_cid = 9;
    g.send(h, &[]);
    g.expect_nothing(Duration::from_millis(20));
    // Wrong destination CID: RST from that CID.
    let mut h = gh(VSOCK_OP_REQUEST, 1, 80);
    h.dst_cid = 42;
    g.send(h, &[]);
    let (r, _) = g.recv();
    assert_eq!(
        (r.op, r.src_cid, r.dst_cid, r.src_port, r.dst_port),
        (VSOCK_OP_RST, 42, CID, 80, 1)
    );
    // SEQPACKET, and unknown ops: RST.
    let mut h = gh(VSOCK_OP_REQUEST, 1, 80);
    h.type_ = 2;
    g.send(h, &[]);
    assert_eq!(g.recv().0.op, VSOCK_OP_RST);
    for op in [
        0,
        8,
        0xffff,
        VSOCK_OP_RESPONSE,
        VSOCK_OP_SHUTDOWN,
        VSOCK_OP_CREDIT_UPDATE,
    ] {
        g.send(gh(op, 1, 80), &[]);
        assert_eq!(g.recv().0.op, VSOCK_OP_RST, "op {op}");
    }
    // An unknown op on a live connection resets it and closes the host stream.
    let mut s = guest_connect(&mut g, &l, 80, 2);
    g.send(gh(99, 2, 80), &[]);
    assert_reply(&g.recv().0, VSOCK_OP_RST, 80, 2);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    // A duplicate REQUEST on a live connection resets it too.
    let _s = guest_connect(&mut g, &l, 80, 3);
    g.send(gh(VSOCK_OP_REQUEST, 3, 80), &[]);
    assert_reply(&g.recv().0, VSOCK_OP_RST, 80, 3);

    // A huge len field, and a len longer than the chain: RST.
    let _s = guest_connect(&mut g, &l, 80, 4);
    let mut h = gh(VSOCK_OP_RW, 4, 80);
    h.len = u32::MAX;
    g.send_raw(&h.to_bytes(), b"abc");
    assert_reply(&g.recv().0, VSOCK_OP_RST, 80, 4);
    let mut h = gh(VSOCK_OP_RW, 5, 80);
    h.len = 100;
    g.send_raw(&h.to_bytes(), b"abc");
    assert_reply(&g.recv().0, VSOCK_OP_RST, 80, 5);
    // A short header: dropped.
    g.send_raw(&gh(VSOCK_OP_REQUEST, 6, 80).to_bytes()[..20], &[]);
    g.expect_nothing(Duration::from_millis(20));

    // Raw chains the tx ring would never hold from a sane driver. Use the upper
    // half of the descriptor table, which the tx slots below 128 never touch...
    // the slots do use all of it, so wait for the tx ring to be idle first.
    let deadline = Instant::now() + WAIT;
    while g.tx.used_idx() != g.tx.avail {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(1));
    }
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    // The header the raw chains point at comes from a foreign CID, so whatever
    // the device makes of a chain, it answers nothing.
    let mut foreign = gh(VSOCK_OP_REQUEST, 7, 80);
    foreign.src_cid = 9;
    mem.write_slice(&foreign.to_bytes(), GuestAddress(SCRATCH))
        .unwrap();
    let bad: [&[(u64, u32, u16, u16)]; 6] = [
        // Outside guest memory; wrapping the address space.
        &[(MEM_SIZE as u64 + 0x1000, 44, 0, 0)],
        &[(u64::MAX - 10, 44, 0, 0)],
        // Straddling the end of memory.
        &[(MEM_SIZE as u64 - 20, 44, 0, 0)],
        // A device-writable buffer.
        &[(SCRATCH, 44, w, 0)],
        // A loop, and a next index past the table.
        &[(SCRATCH, 44, next, 1), (SCRATCH, 8, next, 0)],
        &[(SCRATCH, 44, next, 1), (SCRATCH, 8, next, 4000)],
    ];
    let base = 200u16;
    for chain in bad {
        for (i, &(addr, len, flags, nxt)) in chain.iter().enumerate() {
            g.tx.desc(base + i as u16, addr, len, flags, base + nxt);
        }
        g.tx.publish(base);
        g.kick(TXQ_INDEX);
    }
    // An avail entry naming a descriptor past the table.
    g.tx.publish(QUEUE_SIZE + 5);
    g.kick(TXQ_INDEX);
    g.expect_nothing(Duration::from_millis(30));

    // Bad rx buffers: read-only, outside memory, too small for a header. Rewrite
    // the next three buffers the device will take; each comes back empty and the
    // packet lands in the buffer after them.
    let rw = VRING_DESC_F_WRITE as u16;
    let next_heads: Vec<u16> = (0..3u16)
        .map(|k| {
            let pos = u64::from(g.rx.used.wrapping_add(k) % QUEUE_SIZE);
            mem.read_obj(GuestAddress(g.rx.avail_addr + 4 + 2 * pos))
                .unwrap()
        })
        .collect();
    g.rx.desc(next_heads[0], RX_BASE, 4096, 0, 0);
    g.rx.desc(next_heads[1], MEM_SIZE as u64, 4096, rw, 0);
    g.rx.desc(next_heads[2], RX_BASE + SLOT * 2, 10, rw, 0);
    let used_before = g.rx.used;
    g.send(gh(VSOCK_OP_RW, 11, 12), b"?");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (VSOCK_OP_RST, 11));
    assert_eq!(
        g.rx.used.wrapping_sub(used_before),
        4,
        "three empty, one RST"
    );

    // A bogus avail index on tx.
    let saved = g.tx.avail;
    g.tx.set_avail_idx(saved.wrapping_add(1000));
    g.kick(TXQ_INDEX);
    thread::sleep(Duration::from_millis(20));
    g.tx.set_avail_idx(saved);

    // The device still serves a good connection.
    let mut s = guest_connect_lenient(&mut g, &l, 80, 8);
    g.send(gh(VSOCK_OP_RW, 8, 80), b"alive");
    assert_eq!(read_exact_n(&mut s, 5), b"alive");
    assert!(dev.reset(), "the worker joins: it is not stuck");
}

/// Like [`guest_connect`], but skips packets that earlier hostile traffic left
/// (empty buffers, RSTs).
fn guest_connect_lenient(g: &mut Guest<'_>, l: &UnixListener, port: u32, src: u32) -> UnixStream {
    g.send(gh(VSOCK_OP_REQUEST, src, port), &[]);
    loop {
        let (h, _) = g.recv();
        if h.op == VSOCK_OP_RESPONSE && h.dst_port == src {
            break;
        }
    }
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

#[test]
fn reset_closes_connections_and_activates_again() {
    let (_dir, uds, mut dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 3)).unwrap();
    {
        let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
        let mut a = guest_connect(&mut g, &l, 3, 10);
        let (mut b, _) = host_connect(&mut g, &uds, 11, GUEST_BUF);
        // A host program mid-handshake.
        let mut c = UnixStream::connect(&uds).unwrap();
        c.set_read_timeout(Some(WAIT)).unwrap();
        c.write_all(b"CONN").unwrap();
        thread::sleep(Duration::from_millis(20));
        let used_before = g.rx.used_idx();
        assert!(dev.reset());
        for s in [&mut a, &mut b, &mut c] {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty());
        }
        // Nothing was sent to the guest on reset.
        assert_eq!(g.rx.used_idx(), used_before);
        assert!(dev.reset(), "reset of an idle device");
    }
    // Fresh queues, and everything works again, including the listener.
    for i in 0..MEM_SIZE / 0x10_0000 {
        mem.write_slice(&[0u8; 0x10_0000], GuestAddress((i * 0x10_0000) as u64))
            .unwrap();
    }
    let mut g = Guest::new(&mut dev, &mem, 4096 + 44);
    let mut a = guest_connect(&mut g, &l, 3, 10);
    g.send(gh(VSOCK_OP_RW, 10, 3), b"again");
    assert_eq!(read_exact_n(&mut a, 5), b"again");
    let (_b, _) = host_connect(&mut g, &uds, 11, GUEST_BUF);
    let second = dev.activate(ActivateArgs {
        mem: mem.clone(),
        queues: vec![],
        queue_evts: vec![],
        interrupt: Arc::new(RecordingVirtioInterrupt::default()),
        spawner: Default::default(),
    });
    assert!(second.is_err(), "already active");
    assert!(dev.reset());
}

#[test]
fn missing_queues_are_an_error() {
    let (_dir, _uds, mut dev, mem) = setup();
    let r = dev.activate(ActivateArgs {
        mem,
        queues: vec![],
        queue_evts: vec![],
        interrupt: Arc::new(RecordingVirtioInterrupt::default()),
        spawner: Default::default(),
    });
    assert!(r.is_err());
}

#[test]
fn through_the_mmio_transport() {
    use crate::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};

    let (_dir, uds, dev, mem) = setup();
    let l = UnixListener::bind(port_path(&uds, 21)).unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let features = dev.features();
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone(), Default::default()).unwrap();
    assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_VSOCK);
    assert_eq!(read32(&mut t, CONFIG_SPACE_OFFSET), CID as u32);
    assert_eq!(read32(&mut t, CONFIG_SPACE_OFFSET + 4), 0);
    let mut rx = Ring::new(&mem, QUEUE_ADDR);
    let mut tx = Ring::new(&mem, QUEUE_ADDR + 0x1_0000);
    let ev = Ring::new(&mem, QUEUE_ADDR + 0x2_0000);
    write32(&mut t, 0x70, 0);
    write32(&mut t, 0x70, 1);
    write32(&mut t, 0x70, 3);
    write32(&mut t, 0x24, 0);
    write32(&mut t, 0x20, features as u32);
    write32(&mut t, 0x24, 1);
    write32(&mut t, 0x20, (features >> 32) as u32);
    write32(&mut t, 0x70, 0xb);
    for (i, r) in [&rx, &tx, &ev].iter().enumerate() {
        write32(&mut t, 0x30, i as u32);
        assert_eq!(read32(&mut t, 0x34), u32::from(QUEUE_SIZE));
        write32(&mut t, 0x38, u32::from(QUEUE_SIZE));
        for (lo, addr) in [(0x80, r.desc), (0x90, r.avail_addr), (0xa0, r.used_addr)] {
            write32(&mut t, lo, addr as u32);
            write32(&mut t, lo + 4, (addr >> 32) as u32);
        }
        write32(&mut t, 0x44, 1);
    }
    write32(&mut t, 0x70, 0xf);
    assert_eq!(read32(&mut t, 0x70), 0xf);
    rx.desc(0, RX_BASE, 4096, VRING_DESC_F_WRITE as u16, 0);
    rx.publish(0);
    write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    mem.write_slice(
        &gh(VSOCK_OP_REQUEST, 1, 21).to_bytes(),
        GuestAddress(TX_BASE),
    )
    .unwrap();
    tx.desc(0, TX_BASE, 44, 0, 0);
    tx.publish(0);
    write32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    assert!(wait_until(WAIT, || rx.used_idx() == 1));
    let mut hb = [0u8; HDR_SIZE];
    mem.read_slice(&mut hb, GuestAddress(RX_BASE)).unwrap();
    assert_eq!(Header::from_bytes(&hb).op, VSOCK_OP_RESPONSE);
    assert!(irq.count() >= 1);
    l.accept().unwrap();
    // A reset through the transport stops the worker.
    write32(&mut t, 0x70, 0);
    assert_eq!(read32(&mut t, 0x70), 0);
}
