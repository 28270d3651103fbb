//! virtio-blk's worker: what one wake does to the request queue.
//!
//! It drains the available ring: each chain is parsed ([`request::parse`]),
//! executed synchronously against the disk, its status byte written, and it goes
//! on the used ring with the number of bytes written to the guest. After a batch
//! the interrupt is raised if the driver wants it (EVENT_IDX aware).

use std::io;
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::Disk;
use super::request::{self, Invalid, Request, RequestType, Segment};
use super::{DISCARD_RANGE_LEN, ID_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX};
use crate::virtio::queue_thread::drain_queue;
use crate::virtio::VirtioInterrupt;

/// The queue and what serving it needs.
pub(super) struct RequestHandler {
    queue: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
    exec: Executor,
    /// Data segments of the request being served (reused; at most SEG_MAX).
    segs: Vec<Segment>,
}

/// Executes requests: guest memory, the disk and the negotiated features.
struct Executor {
    mem: GuestMemoryMmap,
    disk: Arc<Disk>,
    acked_features: u64,
}

impl RequestHandler {
    /// The handler a worker runs on `queue`, against `disk`, with the features
    /// the driver accepted.
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<dyn VirtioInterrupt>,
        disk: Arc<Disk>,
        acked_features: u64,
    ) -> Self {
        Self {
            queue,
            interrupt,
            exec: Executor {
                mem,
                disk,
                acked_features,
            },
            segs: Vec::with_capacity(SEG_MAX as usize),
        }
    }

    /// Serves every available chain, then raises the interrupt if the driver wants it.
    pub(super) fn process_queue(&mut self) {
        let (exec, segs) = (&self.exec, &mut self.segs);
        drain_queue(&mut self.queue, &exec.mem, &*self.interrupt, "virtio-blk", |chain| {
            exec.serve(chain, segs)
        });
    }
}

impl Executor {
    /// Parses and executes one chain; returns the bytes written to the guest.
    fn serve<I>(&self, chain: I, segs: &mut Vec<Segment>) -> u32
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let (status_addr, status, written) = match request::parse(chain, &self.mem, segs) {
            Ok(req) => {
                let (status, written) = self.execute(&req, segs);
                (req.status, status, written)
            }
            Err(Invalid::Status { addr, status, why }) => {
                debug!("virtio-blk: bad request: {why}");
                (addr, status, 0)
            }
            Err(Invalid::Drop(why)) => {
                debug!("virtio-blk: request dropped: {why}");
                return 0;
            }
        };
        if let Err(e) = self.mem.write_obj(status, status_addr) {
            // parse checked the address; memory cannot shrink under us.
            debug!("virtio-blk: writing the status byte failed: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Runs a checked request: (VIRTIO_BLK_S_* status, data bytes written to the guest).
    fn execute(&self, req: &Request, segs: &[Segment]) -> (u8, u32) {
        let ok = VIRTIO_BLK_S_OK as u8;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
        let writes = matches!(
            req.ty,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.read_only() {
            debug!("virtio-blk: {:?} on a read-only disk", req.ty);
            return (ioerr, 0);
        }
        match req.ty {
            RequestType::In | RequestType::Out => {
                if req.data_len % SECTOR_SIZE != 0
                    || !self
                        .disk
                        .sectors_in_range(req.sector, req.data_len >> SECTOR_SHIFT)
                {
                    debug!(
                        "virtio-blk: {:?} of {} bytes at sector {} is out of range",
                        req.ty, req.data_len, req.sector
                    );
                    return (ioerr, 0);
                }
                match self.transfer(req, segs) {
                    // data_len is at most MAX_REQUEST_BYTES, which fits a u32.
                    Ok(()) if req.ty == RequestType::In => {
                        (ok, u32::try_from(req.data_len).unwrap_or(u32::MAX - 1))
                    }
                    Ok(()) => (ok, 0),
                    Err(e) => {
                        warn!(
                            "virtio-blk: {}: {:?} failed: {e}",
                            self.disk.path().display(),
                            req.ty
                        );
                        (ioerr, 0)
                    }
                }
            }
            RequestType::Flush => match self.disk.flush() {
                Ok(()) => (ok, 0),
                Err(e) => {
                    error!(
                        "virtio-blk: {}: flush failed: {e}",
                        self.disk.path().display()
                    );
                    (ioerr, 0)
                }
            },
            RequestType::GetId => {
                let mut done = 0usize;
                for seg in segs {
                    let id = &self.disk.id()[done..];
                    let n = id.len().min(seg.len as usize);
                    if self.mem.write_slice(&id[..n], seg.addr).is_err() {
                        return (ioerr, 0);
                    }
                    done += n;
                    if done == ID_LEN {
                        break;
                    }
                }
                // done <= ID_LEN.
                (ok, done as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let offered = if req.ty == RequestType::Discard {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if self.acked_features & (1 << offered) == 0 {
                    return (unsupp, 0);
                }
                (self.discard_or_zero(req, segs), 0)
            }
            RequestType::Unsupported(t) => {
                debug!("virtio-blk: unsupported request type {t}");
                (unsupp, 0)
            }
        }
    }

    /// Moves the data of an IN or OUT request between the disk and guest memory.
    fn transfer(&self, req: &Request, segs: &[Segment]) -> io::Result<()> {
        // sectors_in_range checked sector + length <= capacity < 2^55.
        let mut offset = req.sector << SECTOR_SHIFT;
        for seg in segs {
            let len = seg.len as usize;
            if req.ty == RequestType::In {
                self.disk.read_to_guest(&self.mem, seg.addr, len, offset)?;
            } else {
                self.disk
                    .write_from_guest(&self.mem, seg.addr, len, offset)?;
            }
            offset += u64::from(seg.len);
        }
        Ok(())
    }

    /// Executes DISCARD or WRITE_ZEROES: checks every range first, then applies them.
    fn discard_or_zero(&self, req: &Request, segs: &[Segment]) -> u8 {
        const PAYLOAD_MAX: usize = MAX_DISCARD_SEG as usize * DISCARD_RANGE_LEN as usize;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        if req.data_len == 0
            || req.data_len % DISCARD_RANGE_LEN != 0
            || req.data_len > PAYLOAD_MAX as u64
        {
            debug!("virtio-blk: {:?} payload of {} bytes", req.ty, req.data_len);
            return ioerr;
        }
        // Gather the ranges, which may straddle descriptors.
        let mut payload = [0u8; PAYLOAD_MAX];
        let mut at = 0usize;
        for seg in segs {
            let n = seg.len as usize;
            let Some(dst) = payload.get_mut(at..at + n) else {
                return ioerr;
            };
            if self.mem.read_slice(dst, seg.addr).is_err() {
                return ioerr;
            }
            at += n;
        }
        let ranges: Vec<(u64, u32, u32)> = payload[..at]
            .chunks_exact(DISCARD_RANGE_LEN as usize)
            .map(|r| {
                let mut s = [0u8; 8];
                let mut n = [0u8; 4];
                let mut f = [0u8; 4];
                s.copy_from_slice(&r[..8]);
                n.copy_from_slice(&r[8..12]);
                f.copy_from_slice(&r[12..]);
                (
                    u64::from_le_bytes(s),
                    u32::from_le_bytes(n),
                    u32::from_le_bytes(f),
                )
            })
            .collect();
        let discard = req.ty == RequestType::Discard;
        for &(sector, num, flags) in &ranges {
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return VIRTIO_BLK_S_UNSUPP as u8;
            }
            if num > MAX_DISCARD_SECTORS || !self.disk.sectors_in_range(sector, u64::from(num)) {
                debug!(
                    "virtio-blk: {:?} of {num} sectors at {sector} out of range",
                    req.ty
                );
                return ioerr;
            }
        }
        for &(sector, num, flags) in &ranges {
            if num == 0 {
                continue;
            }
            let offset = sector << SECTOR_SHIFT;
            let len = u64::from(num) << SECTOR_SHIFT;
            let r = if discard {
                self.disk.punch_hole(offset, len)
            } else {
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                self.disk.write_zeroes(offset, len, unmap)
            };
            if let Err(e) = r {
                warn!(
                    "virtio-blk: {}: {:?} failed: {e}",
                    self.disk.path().display(),
                    req.ty
                );
                return ioerr;
            }
        }
        VIRTIO_BLK_S_OK as u8
    }
}

/// The worker's request path without its thread, so benches and tests can drive
/// the queue synchronously: [`SyncHandler::process_queue`] is what one worker wake
/// does.
#[cfg(any(test, feature = "test-utils"))]
pub struct SyncHandler(RequestHandler);

#[cfg(any(test, feature = "test-utils"))]
impl SyncHandler {
    /// Wraps the handler a worker would run.
    pub(super) fn new(handler: RequestHandler) -> Self {
        Self(handler)
    }

    /// Serves every available chain, then raises the interrupt if the driver wants it.
    pub fn process_queue(&mut self) {
        self.0.process_queue();
    }

    /// The queue, to see where the device will look next.
    pub fn queue(&self) -> &Queue {
        &self.0.queue
    }
}
