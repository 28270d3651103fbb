//! The e2e `fs-escape-hard` swap race, on the host: the whole device (MMIO
//! transport, both queue workers, the FUSE server) driven by a model of Linux's
//! virtio ring driver with EVENT_IDX, while a host thread flips a name in the
//! share between a directory and a symlink to outside.
//!
//! The driver model notifies only when the device's `avail_event` asks for it and
//! waits for used buffers through the interrupt after publishing `used_event`, as
//! `virtqueue_kick_prepare` and `virtqueue_enable_cb` do. A device that forgets a
//! notification, drops a chain or blocks a worker leaves the driver waiting: the
//! test fails with where it stood instead of hanging.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::mem::size_of;
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_backend_rs::abi::fuse_abi::{EntryOut, ForgetIn, Opcode, OpenOut, OutHeader};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::test_utils::{self as fuse, Request, ROOT_ID};
use super::{Fs, FsConfig};
use crate::test_utils::*;
use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};

/// How long the driver waits for one interrupt before it calls the device stalled.
const STALL: Duration = Duration::from_secs(10);
/// Bytes of guest memory each request slot has: the request, then at +0x1000 the reply.
const SLOT: u64 = 0x2_0000;
/// The reply buffer of a slot.
const REPLY_LEN: u32 = 0x1_0000;
/// Entries of each queue.
const QUEUE_LEN: u16 = 64;

/// The driver side of one split queue, as Linux's virtio_ring drives it with EVENT_IDX.
struct Driver<'a> {
    q: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    index: u32,
    /// `used_event`, at the end of the avail ring: where the driver wants an interrupt.
    used_event: GuestAddress,
    /// `avail_event`, at the end of the used ring: where the device wants a notify.
    avail_event: GuestAddress,
    /// How many used buffers the driver has consumed.
    last_used: u16,
    /// The first memory slot of this queue's requests.
    slot0: u64,
    kicks: usize,
    suppressed: usize,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, index: u32, slot0: u64) -> Self {
        let addr = QUEUE_ADDR + u64::from(index) * 0x1_0000;
        let (_, avail, used, _) = ring_layout(addr, QUEUE_LEN);
        Self {
            q: mock_queue_at(mem, addr, QUEUE_LEN),
            mem,
            index,
            used_event: GuestAddress(avail + 4 + 2 * u64::from(QUEUE_LEN)),
            avail_event: GuestAddress(used + 4 + 8 * u64::from(QUEUE_LEN)),
            last_used: 0,
            slot0,
            kicks: 0,
            suppressed: 0,
        }
    }

    fn slot_addr(&self, i: usize) -> u64 {
        DATA_ADDR + (self.slot0 + i as u64) * SLOT
    }

    /// Makes `reqs` available in slots `first_slot..` (one chain each: the request,
    /// then a reply buffer) and notifies the device if its `avail_event` asks for it.
    fn post(&mut self, t: &mut MmioTransport, reqs: &[Vec<u8>], first_slot: usize) {
        let old = self.q.avail().idx().load();
        for (i, r) in reqs.iter().enumerate() {
            let i = first_slot + i;
            let addr = self.slot_addr(i);
            self.mem.write_slice(r, GuestAddress(addr)).unwrap();
            // Clear the reply header, so a reply never written reads as length 0.
            self.mem
                .write_obj(OutHeader::default(), GuestAddress(addr + 0x1000))
                .unwrap();
            let bufs = [
                Buf::read(addr, r.len() as u32),
                Buf::write(addr + 0x1000, REPLY_LEN),
            ];
            add_chain(&self.q, (2 * i) as u16, &bufs);
        }
        fence(Ordering::SeqCst);
        let new = self.q.avail().idx().load();
        let event: u16 = self.mem.read_obj(self.avail_event).unwrap();
        // vring_need_event(event, new, old)
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            self.kicks += 1;
            write32(t, QUEUE_NOTIFY_OFFSET, self.index);
        } else {
            self.suppressed += 1;
        }
    }

    /// Waits until the device has used `n` more buffers, sleeping on the interrupt
    /// between looks.
    fn wait_used(&mut self, irq: &RecordingInterrupt, n: usize) -> Result<(), String> {
        let target = self.last_used.wrapping_add(n as u16);
        loop {
            let seen = irq.count();
            let used = used_idx(&self.q);
            if used == target {
                self.last_used = used;
                return Ok(());
            }
            // Ask for an interrupt as soon as the device passes what was seen, then
            // look again: a buffer used in between is seen here or notified.
            self.mem.write_obj(used, self.used_event).unwrap();
            fence(Ordering::SeqCst);
            if used_idx(&self.q) != used {
                continue;
            }
            if !wait_until(STALL, || irq.count() != seen) {
                let avail = self.q.avail().idx().load();
                let event: u16 = self.mem.read_obj(self.avail_event).unwrap();
                return Err(format!(
                    "queue {}: no interrupt for {STALL:?}: avail {avail}, used {used}, want {target}, \
                     avail_event {event}, {} interrupts so far",
                    self.index,
                    irq.count()
                ));
            }
        }
    }

    /// The reply in slot `i`: header and body.
    fn reply(&self, i: usize) -> (OutHeader, Vec<u8>) {
        let addr = self.slot_addr(i) + 0x1000;
        let h: OutHeader = self.mem.read_obj(GuestAddress(addr)).unwrap();
        let len = (h.len as usize).saturating_sub(size_of::<OutHeader>());
        let mut body = vec![0u8; len.min(REPLY_LEN as usize)];
        self.mem
            .read_slice(&mut body, GuestAddress(addr + size_of::<OutHeader>() as u64))
            .unwrap();
        (h, body)
    }
}

fn forget(nodeid: u64, n: u64) -> Request {
    Request {
        opcode: Opcode::Forget as u32,
        nodeid,
        body: ForgetIn { nlookup: n }.as_slice().to_vec(),
    }
}

fn entry_of(body: &[u8]) -> EntryOut {
    *EntryOut::from_slice(&body[..size_of::<EntryOut>()]).unwrap()
}

/// The host side of the race: `swap` flips between a directory and a link to outside.
fn swapper(root: &Path, outside: &Path, stop: &AtomicBool, swaps: &AtomicU32) {
    while !stop.load(Ordering::Relaxed) {
        let _ = fs::rename(root.join("swap"), root.join("swap.d"));
        let _ = std::os::unix::fs::symlink(outside, root.join("swap"));
        let _ = fs::remove_file(root.join("swap"));
        let _ = fs::rename(root.join("swap.d"), root.join("swap"));
        swaps.fetch_add(1, Ordering::Relaxed);
    }
}

/// Rounds of: lookups of `swap` (twice), a create, a `secret` lookup, a getattr and
/// a `..` lookup in the `swap` found last round, releases of last round's handles on
/// the request queue, while the forgets of last round's lookups go on the
/// high-priority queue (the other worker). Every reply must come, through the
/// interrupt, while the host swaps.
#[test]
fn the_swap_race_never_stalls_the_device_or_leaks() {
    let tmp = TempDir::new().unwrap();
    let root = tmp.as_path().join("share");
    let outside = tmp.as_path().join("outside");
    fs::create_dir_all(root.join("swap")).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();

    let mem = guest_memory(0x80_0000);
    let irq = Arc::new(RecordingInterrupt::default());
    let fs_dev = Fs::new(FsConfig::new(&root, "work")).unwrap();
    let mut t = MmioTransport::new(Box::new(fs_dev), mem.clone(), irq.clone(), Default::default()).unwrap();
    let mut hi = Driver::new(&mem, 0, 0);
    let mut rq = Driver::new(&mem, 1, u64::from(QUEUE_LEN / 2));
    let features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);
    assert_eq!(mmio_init(&mut t, features, &[&hi.q, &rq.q]), 0xf);
    rq.post(&mut t, &[fuse::init().encode(1, (0, 0))], 0);
    rq.wait_used(&irq, 1).unwrap();
    assert_eq!(rq.reply(0).0.error, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU32::new(0));
    let swap_thread = {
        let (root, outside, stop, swaps) = (root.clone(), outside.clone(), stop.clone(), swaps.clone());
        std::thread::spawn(move || swapper(&root, &outside, &stop, &swaps))
    };

    let (mut rounds, mut created, mut dirs, mut links, mut forgets) = (0u64, 0, 0, 0, 0);
    let mut swap_dir: Option<u64> = None;
    // (nodeid, lookups) to forget, and (nodeid, fh) to release, next round.
    let mut to_forget: Vec<(u64, u64)> = Vec::new();
    let mut to_release: Vec<(u64, u64)> = Vec::new();
    let started = Instant::now();
    let mut result = Ok(());
    while rounds < 200 || (started.elapsed() < Duration::from_secs(3) && rounds < 5000) {
        rounds += 1;
        let unique = rounds * 100;
        let mut reqs = vec![fuse::lookup(ROOT_ID, "swap"), fuse::lookup(ROOT_ID, "swap")];
        if let Some(d) = swap_dir {
            let flags = (libc::O_RDWR | libc::O_CREAT) as u32;
            reqs.push(fuse::create(d, &format!("p{rounds}"), flags, 0o644));
            reqs.push(fuse::lookup(d, "secret"));
            reqs.push(fuse::getattr(d));
            reqs.push(fuse::lookup(d, ".."));
        }
        let n_main = reqs.len();
        reqs.extend(to_release.drain(..).map(|(ino, fh)| fuse::release(ino, fh)));
        let encoded: Vec<Vec<u8>> = reqs
            .iter()
            .enumerate()
            .map(|(i, r)| r.encode(unique + i as u64, (1000, 1000)))
            .collect();
        let forgets_now: Vec<Vec<u8>> = to_forget
            .drain(..)
            .map(|(ino, n)| forget(ino, n).encode(0, (0, 0)))
            .collect();
        // In two parts, the second while the worker may be busy with the first: the
        // device's avail_event decides whether the second is notified.
        let half = encoded.len() / 2;
        rq.post(&mut t, &encoded[..half], 0);
        rq.post(&mut t, &encoded[half..], half);
        if !forgets_now.is_empty() {
            hi.post(&mut t, &forgets_now, 0);
            forgets += forgets_now.len();
        }
        if let Err(e) = rq.wait_used(&irq, encoded.len()) {
            result = Err(format!("round {rounds}: {e}"));
            break;
        }
        if !forgets_now.is_empty() {
            if let Err(e) = hi.wait_used(&irq, forgets_now.len()) {
                result = Err(format!("round {rounds}: {e}"));
                break;
            }
        }
        // The previous `swap` is forgotten next round, with this round's entries.
        if let Some(d) = swap_dir.take() {
            to_forget.push((d, 1));
        }
        for (i, req) in reqs.iter().enumerate().take(n_main) {
            let (h, body) = rq.reply(i);
            assert_eq!(h.unique, unique + i as u64, "round {rounds} slot {i}: no reply");
            let errno = -h.error;
            let op = req.opcode;
            let name_is = |n: &str| req.body.ends_with(format!("{n}\0").as_bytes());
            if op == Opcode::Lookup as u32 && name_is("secret") {
                assert_ne!(errno, 0, "round {rounds}: `secret` found through `swap`");
            }
            if errno != 0 {
                continue;
            }
            if op == Opcode::Lookup as u32 {
                let e = entry_of(&body);
                let kind = e.attr.mode & libc::S_IFMT;
                if name_is("swap") && kind == libc::S_IFDIR && swap_dir.is_none() {
                    dirs += 1;
                    swap_dir = Some(e.nodeid);
                    continue;
                }
                if name_is("swap") && kind == libc::S_IFLNK {
                    links += 1;
                }
                to_forget.push((e.nodeid, 1));
            } else if op == Opcode::Create as u32 {
                let e = entry_of(&body);
                let open = *OpenOut::from_slice(&body[size_of::<EntryOut>()..][..size_of::<OpenOut>()]).unwrap();
                created += 1;
                to_forget.push((e.nodeid, 1));
                to_release.push((e.nodeid, open.fh));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    swap_thread.join().unwrap();
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!(
        "swap race: {rounds} rounds in {:?}, {swaps} host swaps, swap seen as dir {dirs} / link {links}, \
         {created} creates, {forgets} forgets; kicks {} (+{} suppressed) on the request queue, \
         {} (+{}) on the high-priority queue, {} interrupts",
        started.elapsed(),
        rq.kicks,
        rq.suppressed,
        hi.kicks,
        hi.suppressed,
        irq.count()
    );
    result.unwrap();
    assert!(swaps > 0 && dirs > 0, "the race did not run: {swaps} swaps, {dirs} dirs");
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret");
    let names: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["secret"], "something landed outside the share");
    // The device still answers, and stops on reset.
    rq.post(&mut t, &[fuse::getattr(ROOT_ID).encode(7, (0, 0))], 0);
    rq.wait_used(&irq, 1).unwrap();
    assert_eq!(rq.reply(0).0.error, 0);
    write32(&mut t, 0x70, 0);
    assert_eq!(read32(&mut t, 0x70), 0);
}
