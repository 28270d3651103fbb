//! aivmm's user-mode network (`--net user`) fed a hostile guest's frames: the
//! input is cut into chunks (a 2-byte length each); a chunk whose first byte is
//! even is a raw frame, an odd one picks a well-formed template (ARP, TCP, DNS,
//! DHCP, ICMP, UDP, a fragment, IPv6) that the rest of the chunk damages. After
//! every frame the gateway's tables must be within their limits.
#![no_main]

use aivmm_devices::virtio::net::usernet::fuzz::{mutate, template, FuzzGateway};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static GATEWAY: std::cell::RefCell<FuzzGateway> = std::cell::RefCell::new(FuzzGateway::new());
}

fuzz_target!(|data: &[u8]| {
    GATEWAY.with(|g| {
        let mut g = g.borrow_mut();
        let port = g.port();
        let mut rest = data;
        while rest.len() >= 2 {
            let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
            let chunk = &rest[2..2 + n];
            rest = &rest[2 + n..];
            let frame = match chunk.split_first() {
                Some((k, raw)) if k % 2 == 0 => raw.to_vec(),
                Some((k, body)) => {
                    let seed = body.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    let flips: Vec<(usize, u8)> =
                        body.get(4..).unwrap_or(&[]).chunks(2).map(|p| (usize::from(p[0]), *p.last().unwrap_or(&0))).collect();
                    mutate(template(usize::from(*k >> 1), seed, port), &flips, None, &[])
                }
                None => continue,
            };
            g.frame(&frame);
            if let Err(e) = g.check() {
                panic!("a limit was exceeded: {e}");
            }
        }
    });
});
