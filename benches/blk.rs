//! Requests per second through virtio-blk's request path, with no guest.
//!
//! Each request is the three-descriptor chain a Linux guest sends (16-byte
//! header, data, status byte) in real guest memory on a split queue. The device
//! side is the worker body, `Block::sync_handler(..).process_queue()` (pop, parse,
//! pread/pwrite between the image and guest memory, status, add_used), run on this
//! thread against a temporary image file (in the host's page cache). One request
//! per wake, as a guest at queue depth 1 sends them.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;

use aivmm_devices::virtio::block::{Block, BlockConfig};
use aivmm_devices::virtio::VirtioDevice;
use common::{guest_memory, null_interrupt, Buf, Driver, Rand, DATA_ADDR, QUEUE_ADDR};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The image size.
const IMAGE_SIZE: u64 = 64 << 20;
/// Request header, data and status addresses.
const HDR_ADDR: u64 = DATA_ADDR;
const STATUS_ADDR: u64 = DATA_ADDR + 0x100;
const BUF_ADDR: u64 = DATA_ADDR + 0x1000;
/// VIRTIO_BLK_T_IN and VIRTIO_BLK_T_OUT.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// A temporary image filled with data, so reads do not take the hole fast path.
fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..IMAGE_SIZE >> 20 {
        f.write_all(&chunk).unwrap();
    }
    f.flush().unwrap();
    f
}

/// Writes the header of a `ty` request at `sector`.
fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&ty.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR_ADDR)).unwrap();
}

fn requests(c: &mut Criterion) {
    let img = image();
    let mut blk = Block::new(BlockConfig {
        path: img.path().to_path_buf(),
        read_only: false,
        id: None,
    })
    .unwrap();
    blk.ack_features(blk.features());
    let mut g = c.benchmark_group("blk");
    g.throughput(Throughput::Elements(1));
    // (name, type, data length, random offsets)
    let cases = [
        ("read_4k_random", T_IN, 4096u32, true),
        ("write_4k_random", T_OUT, 4096, true),
        ("read_1m_seq", T_IN, 1 << 20, false),
    ];
    for (name, ty, len, random) in cases {
        let mem = guest_memory(0x40_0000);
        let mut drv = Driver::new(&mem, QUEUE_ADDR, 256);
        drv.set_chain(
            0,
            &[
                Buf::read(HDR_ADDR, 16),
                Buf {
                    addr: BUF_ADDR,
                    len,
                    write: ty == T_IN,
                },
                Buf::write(STATUS_ADDR, 1),
            ],
        );
        let mut dev = blk.sync_handler(mem.clone(), drv.queue(), null_interrupt());
        let sectors_per_req = u64::from(len) >> 9;
        let slots = (IMAGE_SIZE >> 9) / sectors_per_req;
        let mut rand = Rand::new(42);
        let mut next = 0u64;
        let mut sector = move || {
            let slot = if random {
                rand.below(slots)
            } else {
                next = (next + 1) % slots;
                next
            };
            slot * sectors_per_req
        };
        // One checked request: status OK and the used length right.
        mem.write_obj(0xffu8, GuestAddress(STATUS_ADDR)).unwrap();
        header(&mem, ty, sector());
        drv.publish(0);
        dev.process_queue();
        assert_eq!(drv.used_idx(), 1);
        let status: u8 = mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap();
        assert_eq!(status, 0, "{name}: status");
        let want = if ty == T_IN { len + 1 } else { 1 };
        assert_eq!(drv.used_elem(0), (0, want), "{name}: used length");
        g.bench_function(name, |b| {
            b.iter(|| {
                header(&mem, ty, sector());
                drv.publish(0);
                dev.process_queue();
            })
        });
        assert_eq!(
            drv.used_idx(),
            drv.avail_idx(),
            "{name}: requests left behind"
        );
    }
    g.finish();
}

criterion_group!(benches, requests);
criterion_main!(benches);
