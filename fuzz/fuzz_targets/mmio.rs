//! The virtio-mmio register window, driven by accesses decoded from the input,
//! with virtio-rng behind it.
#![no_main]

use std::sync::Arc;

use aivmm_devices::bus::BusDevice;
use aivmm_devices::test_utils::*;
use aivmm_devices::virtio::mmio::MmioTransport;
use aivmm_devices::virtio::rng::Rng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mem = hostile_memory();
    let irq = Arc::new(RecordingInterrupt::default());
    let mut t = MmioTransport::new(Box::new(Rng::new()), mem, irq, Default::default()).unwrap();
    let mut src = ByteSource::new(data);
    for _ in 0..256 {
        if src.is_empty() {
            break;
        }
        let off = match src.below(4) {
            0 | 1 => u64::from(src.below(0x40)) * 4,
            2 => u64::from(src.u16()),
            _ => 0x70,
        };
        let width = [4usize, 4, 1, 2, 8, 0][src.below(6) as usize];
        if src.one_in(3) {
            let mut b = vec![0u8; width];
            t.read(off, &mut b);
        } else {
            let mut b = u64::from(src.u32()).to_le_bytes().to_vec();
            b.truncate(width);
            t.write(off, &b);
        }
    }
    // Reset stops any worker the accesses started.
    write32(&mut t, 0x70, 0);
});
