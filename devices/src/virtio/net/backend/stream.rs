//! QEMU's stream socket protocol: each frame is preceded by its length as a
//! 4-byte big-endian integer. passt speaks it over a connected `SOCK_STREAM`.
//!
//! The socket is non-blocking, so both directions handle partial transfers:
//! - receive: bytes accumulate in a fixed buffer with room for the largest frame;
//!   a frame is handed out once complete. A frame longer than the caller's buffer
//!   or [`MAX_FRAME_LEN`] is skipped byte by byte without losing the framing.
//! - send: a frame is written straight from the caller's slice; if the socket takes
//!   only part of it, the rest is kept (one frame at most) and written before
//!   anything else. While it is kept, `send` reports busy.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use log::warn;

use super::Backend;
use crate::virtio::net::MAX_FRAME_LEN;

/// The length prefix of each frame.
const LEN_PREFIX: usize = 4;
/// The receive buffer: two of the largest frames, so reads stay large.
const IN_BUF_LEN: usize = 2 * (LEN_PREFIX + MAX_FRAME_LEN);

/// A connected stream socket carrying length-prefixed frames.
pub struct Stream {
    sock: UnixStream,
    inbuf: Box<[u8]>,
    /// Unconsumed input is `inbuf[start..end]`.
    start: usize,
    end: usize,
    /// Bytes of an oversized frame still to throw away.
    skip: usize,
    /// Output the socket has not taken yet: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
}

impl Stream {
    /// Wraps a connected stream socket and makes it non-blocking.
    pub fn new(sock: UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(Self {
            sock,
            inbuf: vec![0u8; IN_BUF_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
            skip: 0,
            out: Vec::new(),
            out_pos: 0,
        })
    }

    /// Reads more input; `Ok(false)` if the socket had nothing.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.inbuf.len() {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let Some(space) = self.inbuf.get_mut(self.end..).filter(|s| !s.is_empty()) else {
            // Cannot happen: a full buffer always holds a complete frame or one
            // being skipped. Say "nothing" rather than mistake it for EOF.
            return Ok(false);
        };
        loop {
            match (&self.sock).read(space) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the stream",
                    ))
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `bufs` in one `sendmsg` without raising SIGPIPE; returns bytes taken
    /// (0 if the socket is full).
    fn send_vectored(&self, bufs: &[&[u8]]) -> io::Result<usize> {
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: an all-zero msghdr is a valid "no address, no control data" header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        loop {
            // SAFETY: `msg` points at `iov`, whose entries describe live slices
            // borrowed for this call; the kernel only reads them.
            let n = unsafe {
                libc::sendmsg(
                    self.sock.as_raw_fd(),
                    &msg,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }
}

impl Backend for Stream {
    fn name(&self) -> &'static str {
        "stream"
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if !self.flush()? {
            return Ok(false);
        }
        let Ok(len) = u32::try_from(frame.len()) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame too long for the stream protocol",
            ));
        };
        let prefix = len.to_be_bytes();
        let n = self.send_vectored(&[&prefix, frame])?;
        let total = LEN_PREFIX + frame.len();
        if n < total {
            self.out.clear();
            self.out_pos = 0;
            if n < LEN_PREFIX {
                self.out.extend_from_slice(&prefix[n..]);
                self.out.extend_from_slice(frame);
            } else {
                self.out.extend_from_slice(&frame[n - LEN_PREFIX..]);
            }
        }
        Ok(true)
    }

    fn has_pending_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    fn flush(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            let n = self.send_vectored(&[&self.out[self.out_pos..]])?;
            if n == 0 {
                return Ok(false);
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.end - self.start);
                self.start += n;
                self.skip -= n;
            }
            if self.skip == 0 && self.end - self.start >= LEN_PREFIX {
                let mut prefix = [0u8; LEN_PREFIX];
                prefix.copy_from_slice(&self.inbuf[self.start..self.start + LEN_PREFIX]);
                let len = u32::from_be_bytes(prefix) as usize;
                if len == 0 {
                    self.start += LEN_PREFIX;
                    continue;
                }
                if len > MAX_FRAME_LEN || len > buf.len() {
                    warn!("virtio-net: dropping a {len}-byte frame from the stream (too long)");
                    self.start += LEN_PREFIX;
                    self.skip = len;
                    continue;
                }
                let body = self.start + LEN_PREFIX;
                if self.end - body >= len {
                    buf[..len].copy_from_slice(&self.inbuf[body..body + len]);
                    self.start = body + len;
                    return Ok(Some(len));
                }
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::new(a).unwrap(), b)
    }

    #[test]
    fn reassembles_frames_fed_in_pieces() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let prefix = (payload.len() as u32).to_be_bytes();
        // The length one byte at a time, then the payload in three pieces.
        for b in prefix {
            assert_eq!(s.recv(&mut buf).unwrap(), None);
            peer.write_all(&[b]).unwrap();
        }
        for chunk in payload.chunks(120) {
            assert_eq!(s.recv(&mut buf).unwrap(), None);
            peer.write_all(chunk).unwrap();
        }
        assert_eq!(s.recv(&mut buf).unwrap(), Some(300));
        assert_eq!(&buf[..300], &payload[..]);
        assert_eq!(s.recv(&mut buf).unwrap(), None);
        // Two frames and the start of a third in one write; an empty frame between.
        let mut wire = Vec::new();
        for f in [&b"first"[..], b"", b"second"] {
            wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
            wire.extend_from_slice(f);
        }
        wire.extend_from_slice(&5u32.to_be_bytes());
        wire.extend_from_slice(b"th");
        peer.write_all(&wire).unwrap();
        assert_eq!(s.recv(&mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"first");
        assert_eq!(s.recv(&mut buf).unwrap(), Some(6));
        assert_eq!(&buf[..6], b"second");
        assert_eq!(s.recv(&mut buf).unwrap(), None);
        peer.write_all(b"ird").unwrap();
        assert_eq!(s.recv(&mut buf).unwrap(), Some(5));
        assert_eq!(&buf[..5], b"third");
    }

    #[test]
    fn oversized_frames_are_skipped_without_losing_sync() {
        let (mut s, mut peer) = pair();
        let mut buf = vec![0u8; 100];
        let big = vec![0xaau8; 1000];
        // Too long for the caller's buffer, then one too long for the protocol
        // (announced, partly sent), then a good one.
        let mut wire = Vec::new();
        wire.extend_from_slice(&1000u32.to_be_bytes());
        wire.extend_from_slice(&big);
        wire.extend_from_slice(&((MAX_FRAME_LEN + 1) as u32).to_be_bytes());
        peer.write_all(&wire).unwrap();
        let writer = std::thread::spawn(move || {
            let junk = vec![0x55u8; MAX_FRAME_LEN + 1];
            peer.write_all(&junk).unwrap();
            peer.write_all(&3u32.to_be_bytes()).unwrap();
            peer.write_all(b"end").unwrap();
            peer
        });
        let mut got = None;
        for _ in 0..10_000 {
            if let Some(n) = s.recv(&mut buf).unwrap() {
                got = Some(n);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _peer = writer.join().unwrap();
        assert_eq!(got, Some(3));
        assert_eq!(&buf[..3], b"end");
    }

    #[test]
    fn eof_is_an_error() {
        let (mut s, peer) = pair();
        drop(peer);
        let mut buf = [0u8; 64];
        assert!(s.recv(&mut buf).is_err());
    }

    #[test]
    fn partial_sends_are_completed_in_order() {
        let (mut s, peer) = pair();
        // Fill the socket until the stream reports busy; each accepted frame must
        // arrive whole and in order on the other side.
        let mut sent = 0u32;
        loop {
            let frame = vec![sent as u8; 60_000 + sent as usize];
            if !s.send(&frame).unwrap() {
                break;
            }
            sent += 1;
            assert!(sent < 10_000, "the socket never filled up");
        }
        assert!(s.has_pending_output());
        let reader = std::thread::spawn(move || {
            let mut peer = peer;
            let mut frames = Vec::new();
            loop {
                let mut len = [0u8; 4];
                if peer.read_exact(&mut len).is_err() {
                    return frames;
                }
                let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                peer.read_exact(&mut f).unwrap();
                frames.push(f);
            }
        });
        while !s.flush().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!s.has_pending_output());
        drop(s);
        let frames = reader.join().unwrap();
        assert_eq!(frames.len(), sent as usize);
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.len(), 60_000 + i);
            assert!(f.iter().all(|&b| b == i as u8));
        }
    }
}
