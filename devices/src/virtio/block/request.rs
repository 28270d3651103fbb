//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! A request is a chain of: one device-readable 16-byte header (type, reserved,
//! sector), zero or more data buffers (device-writable for IN and GET_ID,
//! device-readable for OUT, DISCARD and WRITE_ZEROES), and a device-writable
//! status buffer last, whose final byte the device sets. The guest controls every
//! field, so [`parse`] checks all of them: what it returns either is safe to
//! execute, or says how to complete the chain without doing anything.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{MAX_REQUEST_BYTES, REQUEST_HEADER_LEN, SEG_MAX};

/// What the driver asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device id.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges.
    WriteZeroes,
    /// Anything else: answered with VIRTIO_BLK_S_UNSUPP.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// The direction its data buffers must have: `Some(true)` device-writable,
    /// `Some(false)` device-readable, `None` no data (or not looked at).
    fn data_writable(self) -> Option<bool> {
        match self {
            Self::In | Self::GetId => Some(true),
            Self::Out | Self::Discard | Self::WriteZeroes => Some(false),
            Self::Flush | Self::Unsupported(_) => None,
        }
    }
}

/// One data buffer in guest memory, checked to lie within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A checked request. Its data segments are in the `Vec` given to [`parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub ty: RequestType,
    /// The first sector (IN and OUT).
    pub sector: u64,
    /// Total bytes of the data segments.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain cannot be executed, and how to complete it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The chain has a usable status byte: complete it with `status`.
    Status {
        /// Where the status byte goes.
        addr: GuestAddress,
        /// The VIRTIO_BLK_S_* value.
        status: u8,
        /// What was wrong, for the log.
        why: &'static str,
    },
    /// No usable status byte (or no definite end of the chain): return the chain
    /// with nothing written.
    Drop(&'static str),
}

/// Parses `chain` into a request, putting its data segments in `segs` (cleared
/// first; it holds at most [`SEG_MAX`] entries, so it can be reused without
/// growing).
pub fn parse<I>(
    chain: I,
    mem: &GuestMemoryMmap,
    segs: &mut Vec<Segment>,
) -> Result<Request, Invalid>
where
    I: Iterator<Item = Descriptor>,
{
    segs.clear();
    let mut chain = chain;
    let Some(header) = chain.next() else {
        return Err(Invalid::Drop("empty chain"));
    };
    // Walk the chain once, keeping the last descriptor aside: it is the status.
    let mut last: Option<Descriptor> = None;
    let mut data_count: u64 = 0;
    let mut data_len: u64 = 0;
    let mut bad_data: Option<&'static str> = None;
    let mut data_dirs = (false, false); // (some readable, some writable)
    for desc in chain {
        let Some(d) = last.replace(desc) else {
            continue;
        };
        data_count += 1;
        data_len = data_len.saturating_add(u64::from(d.len()));
        if d.is_write_only() {
            data_dirs.1 = true;
        } else {
            data_dirs.0 = true;
        }
        if d.len() == 0 {
            continue;
        }
        if segs.len() >= SEG_MAX as usize {
            bad_data.get_or_insert("too many data segments");
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            bad_data.get_or_insert("data buffer outside guest memory");
            continue;
        }
        segs.push(Segment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    // A chain that ends on a descriptor with NEXT set was cut short (a loop, an
    // index out of range, unreadable memory): there is no trustworthy status byte.
    let status_desc = match last {
        Some(d) if d.has_next() => return Err(Invalid::Drop("chain does not end")),
        Some(d) => d,
        None if header.has_next() => return Err(Invalid::Drop("chain does not end")),
        None => return Err(Invalid::Drop("no status descriptor")),
    };
    if !status_desc.is_write_only() || status_desc.len() == 0 {
        return Err(Invalid::Drop("status descriptor not writable"));
    }
    let Some(status) = status_desc
        .addr()
        .checked_add(u64::from(status_desc.len()) - 1)
        .filter(|a| mem.check_range(*a, 1))
    else {
        return Err(Invalid::Drop("status byte outside guest memory"));
    };
    let ioerr = |why| {
        Err(Invalid::Status {
            addr: status,
            status: VIRTIO_BLK_S_IOERR as u8,
            why,
        })
    };
    if header.is_write_only() {
        return ioerr("header is device-writable");
    }
    if header.len() != REQUEST_HEADER_LEN {
        return ioerr("header is not 16 bytes");
    }
    let mut raw = [0u8; REQUEST_HEADER_LEN as usize];
    if mem.read_slice(&mut raw, header.addr()).is_err() {
        return ioerr("header outside guest memory");
    }
    let mut ty_bytes = [0u8; 4];
    ty_bytes.copy_from_slice(&raw[..4]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&raw[8..]);
    let ty = RequestType::from(u32::from_le_bytes(ty_bytes));
    let sector = u64::from_le_bytes(sector_bytes);
    let Some(writable) = ty.data_writable() else {
        // FLUSH carries no data, and unknown types are refused whatever they carry.
        segs.clear();
        return Ok(Request {
            ty,
            sector,
            data_len: 0,
            status,
        });
    };
    if let Some(why) = bad_data {
        return ioerr(why);
    }
    if data_count > u64::from(SEG_MAX) {
        return ioerr("too many data segments");
    }
    if (writable && data_dirs.0) || (!writable && data_dirs.1) {
        return ioerr("data buffer has the wrong direction");
    }
    if data_len > MAX_REQUEST_BYTES {
        return ioerr("request too long");
    }
    Ok(Request {
        ty,
        sector,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use super::*;
    use crate::test_utils::guest_memory;

    const H: u64 = 0x1_0000;
    const D: u64 = 0x2_0000;
    const S: u64 = 0x3_0000;

    fn desc(addr: u64, len: u32, write: bool, next: bool) -> Descriptor {
        let mut flags = 0u16;
        if write {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        Descriptor::new(addr, len, flags, 0)
    }

    fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(H)).unwrap();
    }

    fn run(
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
    ) -> (Result<Request, Invalid>, Vec<Segment>) {
        let mut segs = Vec::new();
        let r = parse(descs.iter().copied(), mem, &mut segs);
        (r, segs)
    }

    fn is_ioerr(r: &Result<Request, Invalid>) -> bool {
        matches!(r, Err(Invalid::Status { status, .. }) if u32::from(*status) == VIRTIO_BLK_S_IOERR)
    }

    #[test]
    fn good_read() {
        let mem = guest_memory(0x10_0000);
        header(&mem, VIRTIO_BLK_T_IN, 7);
        let (r, segs) = run(
            &mem,
            &[
                desc(H, 16, false, true),
                desc(D, 512, true, true),
                desc(D + 512, 1024, true, true),
                desc(S, 1, true, false),
            ],
        );
        let r = r.unwrap();
        assert_eq!(r.ty, RequestType::In);
        assert_eq!((r.sector, r.data_len, r.status), (7, 1536, GuestAddress(S)));
        assert_eq!(segs.len(), 2);
        // The status is the last byte of the last descriptor.
        let (r, _) = run(&mem, &[desc(H, 16, false, true), desc(S, 4, true, false)]);
        assert_eq!(r.unwrap().status, GuestAddress(S + 3));
    }

    #[test]
    fn no_status_byte_drops() {
        let mem = guest_memory(0x10_0000);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        for descs in [
            vec![],
            vec![desc(H, 16, false, false)],
            vec![desc(H, 16, false, true)],
            vec![desc(H, 16, false, true), desc(S, 1, false, false)],
            vec![desc(H, 16, false, true), desc(S, 0, true, false)],
            vec![desc(H, 16, false, true), desc(0x10_0000, 1, true, false)],
            vec![desc(H, 16, false, true), desc(u64::MAX, 1, true, false)],
            vec![
                desc(H, 16, false, true),
                desc(u64::MAX, u32::MAX, true, false),
            ],
            vec![desc(H, 16, false, true), desc(S, 1, true, true)],
        ] {
            let (r, _) = run(&mem, &descs);
            assert!(matches!(r, Err(Invalid::Drop(_))), "{descs:?}: {r:?}");
        }
    }

    #[test]
    fn bad_layouts_are_ioerr() {
        let mem = guest_memory(0x10_0000);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let status = desc(S, 1, true, false);
        for descs in [
            // Header writable, too short, too long, outside memory.
            vec![desc(H, 16, true, true), status],
            vec![desc(H, 8, false, true), status],
            vec![desc(H, 32, false, true), status],
            vec![desc(0x10_0000 - 8, 16, false, true), status],
            // Read data into a device-readable buffer.
            vec![desc(H, 16, false, true), desc(D, 512, false, true), status],
            // Data past memory, or wrapping the address space.
            vec![
                desc(H, 16, false, true),
                desc(0xf_ff00, 512, true, true),
                status,
            ],
            vec![
                desc(H, 16, false, true),
                desc(u64::MAX - 8, 512, true, true),
                status,
            ],
        ] {
            let (r, _) = run(&mem, &descs);
            assert!(is_ioerr(&r), "{descs:?}: {r:?}");
        }
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let (r, _) = run(
            &mem,
            &[desc(H, 16, false, true), desc(D, 512, true, true), status],
        );
        assert!(is_ioerr(&r), "write from a writable buffer");
    }

    #[test]
    fn limits() {
        let mem = guest_memory(0x10_0000);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![desc(H, 16, false, true)];
        descs.extend((0..=SEG_MAX).map(|i| desc(D + u64::from(i) * 512, 512, true, true)));
        descs.push(desc(S, 1, true, false));
        let (r, segs) = run(&mem, &descs);
        assert!(is_ioerr(&r), "{r:?}");
        assert!(segs.len() <= SEG_MAX as usize);
        // Long buffers, all inside memory, adding up to more than the cap.
        let mem = guest_memory(0x1000_0000);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![desc(H, 16, false, true)];
        descs.extend((0..SEG_MAX).map(|_| desc(D, 0x0200_0000, true, true)));
        descs.push(desc(S, 1, true, false));
        let (r, _) = run(&mem, &descs);
        assert!(is_ioerr(&r), "{r:?}");
    }

    #[test]
    fn flush_and_unknown_ignore_data() {
        let mem = guest_memory(0x10_0000);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let (r, segs) = run(
            &mem,
            &[
                desc(H, 16, false, true),
                desc(D, 8, true, true),
                desc(S, 1, true, false),
            ],
        );
        assert_eq!(r.unwrap().ty, RequestType::Flush);
        assert!(segs.is_empty());
        header(&mem, 99, 0);
        let (r, _) = run(&mem, &[desc(H, 16, false, true), desc(S, 1, true, false)]);
        assert_eq!(r.unwrap().ty, RequestType::Unsupported(99));
    }
}
