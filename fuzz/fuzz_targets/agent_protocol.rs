//! The agent protocol as the host reads it: the input is a hostile agent's byte
//! stream, fed to the `Decoder` in pieces whose sizes come from the input too.
//! Every whole message is taken before the next piece, as the session does; the
//! decoder must never hold more than one frame and the last piece, and the
//! blocking reader must agree with the incremental one.
#![no_main]

use aivmm_protocol::{read_message, Decoder, ToGuest, ToHost, HEADER_LEN, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(split) + 1;
    let mut d = Decoder::new();
    let mut incremental = Vec::new();
    'feed: for p in stream.chunks(piece) {
        d.feed(p);
        assert!(d.held() < HEADER_LEN + MAX_FRAME + p.len());
        loop {
            match d.next_message::<ToHost>() {
                Ok(Some(m)) => incremental.push(m),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    let mut r = stream;
    let mut blocking = Vec::new();
    while let Ok(Some(m)) = read_message::<ToHost>(&mut r) {
        blocking.push(m);
    }
    assert_eq!(incremental, blocking);
    // The guest's side parses the other direction from the same bytes.
    let mut r = stream;
    while let Ok(Some(_)) = read_message::<ToGuest>(&mut r) {}
});
