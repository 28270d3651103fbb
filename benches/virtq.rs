//! Descriptors per second through virtio-queue and through virtio-rng's request
//! path, on split queues in real guest memory, with no guest and no threads.
//!
//! - `virtq/pop_add_used/*`: the raw device-side loop every aivmm device runs:
//!   pop each published chain, walk its descriptors, return it on the used ring.
//! - `virtq/rng/*`: virtio-rng's worker body (`SyncHandler::process_queue`): pop,
//!   fill the writable buffer from getrandom(2), add_used, notification check.
//!   A batch of chains per wake, and one chain per wake.
//!
//! Throughput is in descriptors (elements) per second for the raw loop and in
//! requests per second for rng.
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use aivmm_devices::virtio::rng::SyncHandler;
use common::{guest_memory, null_interrupt, Buf, Driver, DATA_ADDR, QUEUE_ADDR};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::QueueT;

const QUEUE_SIZE: u16 = 256;

/// Pops every published chain, walks it and returns it used; returns the
/// number of descriptors seen.
fn drain(q: &mut virtio_queue::Queue, mem: &vm_memory::GuestMemoryMmap) -> usize {
    let mut descs = 0;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut len = 0u32;
        for d in chain {
            len = len.wrapping_add(d.len());
            descs += 1;
        }
        q.add_used(mem, head, len).unwrap();
    }
    descs
}

fn pop_add_used(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtq/pop_add_used");
    // Chains of 1 and 3 descriptors filling the ring; the descriptors are written
    // once, each round only republishes the heads.
    for chain_len in [1u16, 3] {
        let mem = guest_memory(0x40_0000);
        let mut drv = Driver::new(&mem, QUEUE_ADDR, QUEUE_SIZE);
        let chains = QUEUE_SIZE / chain_len;
        for k in 0..chains {
            let first = k * chain_len;
            let bufs: Vec<Buf> = (0..chain_len)
                .map(|j| Buf::write(DATA_ADDR + u64::from(first + j) * 0x100, 64))
                .collect();
            drv.set_chain(first, &bufs);
        }
        let mut q = drv.queue();
        let per_round = usize::from(chains * chain_len);
        // One checked round.
        for k in 0..chains {
            drv.publish(k * chain_len);
        }
        assert_eq!(drain(&mut q, &mem), per_round);
        assert_eq!(drv.used_idx(), chains);
        g.throughput(Throughput::Elements(per_round as u64));
        g.bench_function(BenchmarkId::new("descs_per_chain", chain_len), |b| {
            b.iter(|| {
                for k in 0..chains {
                    drv.publish(k * chain_len);
                }
                black_box(drain(&mut q, &mem))
            })
        });
    }
    g.finish();
}

fn rng(c: &mut Criterion) {
    let mut g = c.benchmark_group("virtq/rng");
    for (batch, size) in [(64u16, 16u32), (64, 64), (64, 512), (64, 4096), (1, 64)] {
        let mem = guest_memory(0x80_0000);
        let mut drv = Driver::new(&mem, QUEUE_ADDR, QUEUE_SIZE);
        for i in 0..batch {
            drv.set_chain(i, &[Buf::write(DATA_ADDR + u64::from(i) * 0x1000, size)]);
        }
        let mut dev = SyncHandler::new(mem.clone(), drv.queue(), null_interrupt());
        // One checked round: every request got all its bytes.
        for i in 0..batch {
            drv.publish(i);
        }
        dev.process_queue();
        assert_eq!(drv.used_idx(), batch);
        for i in 0..batch {
            assert_eq!(drv.used_elem(i), (u32::from(i), size));
        }
        g.throughput(Throughput::Elements(u64::from(batch)));
        let id = BenchmarkId::new(format!("batch{batch}"), format!("{size}B"));
        g.bench_function(id, |b| {
            b.iter(|| {
                for i in 0..batch {
                    drv.publish(i);
                }
                dev.process_queue();
            })
        });
        assert_eq!(drv.used_idx(), drv.avail_idx(), "rng left requests behind");
    }
    g.finish();
}

criterion_group!(benches, pop_add_used, rng);
criterion_main!(benches);
