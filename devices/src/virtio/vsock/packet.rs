//! The 44-byte `virtio_vsock_hdr` and moving packets between descriptor chains and
//! host buffers.
//!
//! A tx chain (driver to device) is device-readable: the header, then `len` bytes of
//! payload, split across descriptors in any way. An rx chain (device to driver) is
//! device-writable and receives a header and payload the same way. Every length and
//! address here comes from the guest, so each is checked before use and the payload
//! is capped at [`MAX_PKT_PAYLOAD`].

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{HDR_SIZE, MAX_PKT_PAYLOAD};

/// `struct virtio_vsock_hdr`, decoded (on the wire: packed, little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`VSOCK_TYPE_*`).
    pub type_: u16,
    /// Operation (`VSOCK_OP_*`).
    pub op: u16,
    /// Operation flags (`VSOCK_SHUTDOWN_F_*` for SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Decodes the wire bytes.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        Self {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the wire bytes.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a tx chain was not a packet. `header` is set when the header itself was
/// read, so the device can still answer with an RST.
#[derive(Debug)]
pub struct Malformed {
    /// The header, if it was read whole.
    pub header: Option<Header>,
    /// What was wrong.
    pub why: &'static str,
}

impl Malformed {
    fn new(header: Option<Header>, why: &'static str) -> Self {
        Self { header, why }
    }
}

/// Copies `dst.len()` bytes from the readable descriptors of a chain, resuming at
/// (`idx`, `off`) of `descs`. Returns false if the chain ends first or a buffer
/// is outside guest memory.
fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    idx: &mut usize,
    off: &mut usize,
    dst: &mut [u8],
) -> bool {
    let mut done = 0;
    while done < dst.len() {
        let Some(d) = descs.get(*idx) else {
            return false;
        };
        let len = d.len() as usize;
        if *off >= len {
            *idx += 1;
            *off = 0;
            continue;
        }
        let n = (len - *off).min(dst.len() - done);
        // off < len <= u32::MAX, so the add cannot overflow a u64; the memory check
        // rejects wrapping addresses.
        let Some(addr) = d.addr().0.checked_add(*off as u64) else {
            return false;
        };
        if mem
            .read_slice(&mut dst[done..done + n], GuestAddress(addr))
            .is_err()
        {
            return false;
        }
        done += n;
        *off += n;
    }
    true
}

/// Reads one tx chain: returns its header and leaves its payload in `payload`.
/// `descs` is scratch space for the chain's descriptors.
pub fn read_tx<I>(
    chain: I,
    mem: &GuestMemoryMmap,
    descs: &mut Vec<Descriptor>,
    payload: &mut Vec<u8>,
) -> Result<Header, Malformed>
where
    I: Iterator<Item = Descriptor>,
{
    descs.clear();
    payload.clear();
    for d in chain {
        if d.is_write_only() {
            return Err(Malformed::new(None, "device-writable buffer in a tx chain"));
        }
        descs.push(d);
    }
    let (mut idx, mut off) = (0, 0);
    let mut hb = [0u8; HDR_SIZE];
    if !gather(mem, descs, &mut idx, &mut off, &mut hb) {
        return Err(Malformed::new(None, "header short or outside guest memory"));
    }
    let hdr = Header::from_bytes(&hb);
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD {
        return Err(Malformed::new(Some(hdr), "payload longer than 64 KiB"));
    }
    payload.resize(len, 0);
    if !gather(mem, descs, &mut idx, &mut off, payload) {
        payload.clear();
        return Err(Malformed::new(
            Some(hdr),
            "payload short or outside guest memory",
        ));
    }
    Ok(hdr)
}

/// The device-writable buffers of an rx chain that lie in guest memory, and their
/// total length (capped so it fits one packet).
#[derive(Default)]
pub struct RxBuffers {
    segs: Vec<(GuestAddress, usize)>,
    cap: usize,
}

impl RxBuffers {
    /// Collects the writable buffers of `chain`. Read-only buffers are skipped; the
    /// first buffer outside guest memory ends the list, so writes cannot fail later.
    pub fn collect<I>(&mut self, chain: I, mem: &GuestMemoryMmap)
    where
        I: Iterator<Item = Descriptor>,
    {
        const LIMIT: usize = HDR_SIZE + MAX_PKT_PAYLOAD;
        self.segs.clear();
        self.cap = 0;
        for d in chain {
            if !d.is_write_only() {
                continue;
            }
            let len = (d.len() as usize).min(LIMIT - self.cap);
            if len == 0 {
                if self.cap == LIMIT {
                    break;
                }
                continue;
            }
            if !mem.check_range(d.addr(), len) {
                break;
            }
            self.segs.push((d.addr(), len));
            self.cap += len;
        }
    }

    /// Total writable bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The most payload these buffers take after a header.
    pub fn max_payload(&self) -> usize {
        self.cap.saturating_sub(HDR_SIZE)
    }

    /// Writes `hdr` (with `len` set to the payload length) and `payload`; returns
    /// the bytes written, or `None` if they do not fit or memory refused them.
    pub fn write(&self, mem: &GuestMemoryMmap, hdr: &Header, payload: &[u8]) -> Option<u32> {
        if HDR_SIZE + payload.len() > self.cap {
            return None;
        }
        let mut hdr = *hdr;
        hdr.len = u32::try_from(payload.len()).ok()?;
        let hb = hdr.to_bytes();
        let mut parts = [&hb[..], payload];
        let mut part = 0;
        for &(addr, len) in &self.segs {
            let mut at = 0;
            while at < len && part < parts.len() {
                let src = parts[part];
                let n = src.len().min(len - at);
                // at < len and `collect` checked addr..addr+len.
                let a = GuestAddress(addr.0 + at as u64);
                mem.write_slice(&src[..n], a).ok()?;
                at += n;
                parts[part] = &src[n..];
                if parts[part].is_empty() {
                    part += 1;
                }
            }
            if part == parts.len() {
                break;
            }
        }
        // The total is at most HDR_SIZE + MAX_PKT_PAYLOAD.
        u32::try_from(HDR_SIZE + payload.len()).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::test_utils::guest_memory;

    fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
        let flags = if write {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        Descriptor::new(addr, len, flags, 0)
    }

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 0x5678_9abc,
            len: 5,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &0x5678_9abcu32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
    }

    #[test]
    fn tx_split_anywhere() {
        let mem = guest_memory(0x10_0000);
        let h = sample();
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        // Header split 10/34, payload sharing the second descriptor, then the rest.
        mem.write_slice(&bytes[..10], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&bytes[10..46], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&bytes[46..], GuestAddress(0x3000)).unwrap();
        let chain = vec![
            desc(0x1000, 10, false),
            desc(0x2000, 36, false),
            desc(0x3000, 3, false),
        ];
        let (mut d, mut p) = (Vec::new(), Vec::new());
        let got = read_tx(chain.into_iter(), &mem, &mut d, &mut p).unwrap();
        assert_eq!(got, h);
        assert_eq!(p, b"hello");
    }

    #[test]
    fn tx_malformed() {
        let mem = guest_memory(0x10_0000);
        let (mut d, mut p) = (Vec::new(), Vec::new());
        let mut h = sample();
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        // Short header.
        let e = read_tx([desc(0x1000, 43, false)].into_iter(), &mem, &mut d, &mut p);
        assert!(e.unwrap_err().header.is_none());
        // Writable descriptor.
        let e = read_tx([desc(0x1000, 44, true)].into_iter(), &mem, &mut d, &mut p);
        assert!(e.is_err());
        // Outside memory, and wrapping.
        let e = read_tx(
            [desc(0x10_0000 - 8, 44, false)].into_iter(),
            &mem,
            &mut d,
            &mut p,
        );
        assert!(e.is_err());
        let e = read_tx(
            [desc(u64::MAX - 3, 44, false)].into_iter(),
            &mem,
            &mut d,
            &mut p,
        );
        assert!(e.is_err());
        // Payload missing: the header comes back for an RST.
        let e = read_tx([desc(0x1000, 44, false)].into_iter(), &mem, &mut d, &mut p);
        assert_eq!(e.unwrap_err().header, Some(h));
        // A huge len field.
        h.len = u32::MAX;
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let chain = [desc(0x1000, 44, false), desc(0x2000, u32::MAX, false)];
        let e = read_tx(chain.into_iter(), &mem, &mut d, &mut p).unwrap_err();
        assert_eq!(e.header, Some(h));
        assert!(p.capacity() <= MAX_PKT_PAYLOAD);
    }

    #[test]
    fn rx_write_scatters() {
        let mem = guest_memory(0x10_0000);
        let mut rx = RxBuffers::default();
        rx.collect(
            [
                desc(0x1000, 20, true),
                desc(0x9000, 8, false),
                desc(0x2000, 30, true),
                desc(0x3000, 100, true),
            ]
            .into_iter(),
            &mem,
        );
        assert_eq!(rx.capacity(), 150);
        assert_eq!(rx.max_payload(), 106);
        let h = sample();
        assert_eq!(rx.write(&mem, &h, b"0123456789"), Some(54));
        let mut out = [0u8; 54];
        mem.read_slice(&mut out[..20], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut out[20..50], GuestAddress(0x2000))
            .unwrap();
        mem.read_slice(&mut out[50..], GuestAddress(0x3000))
            .unwrap();
        let mut hb = [0u8; HDR_SIZE];
        hb.copy_from_slice(&out[..HDR_SIZE]);
        assert_eq!(Header::from_bytes(&hb).len, 10);
        assert_eq!(&out[HDR_SIZE..], b"0123456789");
        assert_eq!(rx.write(&mem, &h, &[0u8; 107]), None);
        // Buffers outside memory end the list.
        rx.collect(
            [desc(0x1000, 50, true), desc(0x20_0000, 50, true)].into_iter(),
            &mem,
        );
        assert_eq!(rx.capacity(), 50);
        // Huge buffers are capped at one packet.
        rx.collect([desc(0xf_0000, u32::MAX, true)].into_iter(), &mem);
        assert_eq!(rx.capacity(), 0);
        rx.collect([desc(0x1000, 0x8_0000, true)].into_iter(), &mem);
        assert_eq!(rx.capacity(), HDR_SIZE + MAX_PKT_PAYLOAD);
    }
}
