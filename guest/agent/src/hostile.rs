//! `aivmm-agent --hostile MODE`: a hostile agent, for the e2e scenario
//! `agent-hostile` and for auditing the host by hand.
//!
//! It connects to the host the way the agent does and writes what a compromised
//! guest might: frames over the limit, unknown types, frames cut short, a flood of
//! output, messages out of turn or out of range. Then it waits (a few seconds at
//! most) to see whether the host closed the connection, and prints one line per
//! mode to stderr: `hostile MODE: sent N bytes, host closed` (or `host still
//! open`, or `connect failed: ...`). `all` runs every mode, each on a new
//! connection; once the host has its agent, those connections are refused, which
//! is itself what a second agent connection should see.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aivmm_protocol::{self as proto, ExitStatus, ToHost, MAX_CHUNK, MAX_FRAME, VERSION};

use crate::transport::{self, Address};

/// The modes, in the order `all` runs them.
pub const MODES: &[&str] = &[
    "oversized",
    "unknown",
    "truncated",
    "early-exit",
    "double-ready",
    "bad-exit",
    "bad-utf8",
    "flood",
];

/// How much the flood writes at most.
const FLOOD_BYTES: usize = 256 << 20;
/// How long to wait for the host to close the connection after the bad frame.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Runs `mode` (or every mode for `all`) against `addr`. Fails only on a mode
/// that does not exist.
pub fn run(mode: &str, addr: &Address, timeout: Duration) -> Result<(), String> {
    let modes: Vec<&str> = match mode {
        "all" => MODES.to_vec(),
        m if MODES.contains(&m) => vec![m],
        m => {
            return Err(format!(
                "unknown hostile mode '{m}' (all, {})",
                MODES.join(", ")
            ))
        }
    };
    for m in modes {
        let line = match transport::connect(addr, timeout) {
            Err(e) => format!("connect failed: {e}"),
            Ok(mut sock) => {
                let (sent, err) = send(m, &mut sock);
                let closed = if host_closed(&mut sock) {
                    "host closed"
                } else {
                    "host still open"
                };
                match err {
                    Some(e) => format!("sent {sent} bytes, then {e}; {closed}"),
                    None => format!("sent {sent} bytes; {closed}"),
                }
            }
        };
        eprintln!("aivmm-agent: hostile {m}: {line}");
    }
    Ok(())
}

fn frame(m: &ToHost) -> Vec<u8> {
    // Every message here fits a frame.
    proto::encode(m).unwrap_or_default()
}

/// The bytes of `mode`, then the flood's stream if that is the mode. Returns the
/// bytes written and the write error, if any.
fn send(mode: &str, sock: &mut File) -> (usize, Option<io::Error>) {
    let ready = frame(&ToHost::Ready { version: VERSION });
    let bytes: Vec<u8> = match mode {
        "oversized" => [&ready[..], &(MAX_FRAME as u32 + 1).to_le_bytes(), &[2; 64]].concat(),
        "unknown" => [&ready[..], &[1, 0, 0, 0, 0x42]].concat(),
        // The header promises 100 bytes; 10 come, then the stream ends.
        "truncated" => [&ready[..], &100u32.to_le_bytes(), &[2; 10]].concat(),
        "early-exit" => frame(&ToHost::Exited(ExitStatus::Code(0))),
        "double-ready" => [&ready[..], &ready].concat(),
        // Exited, kind code, value 1000: past any exit status.
        "bad-exit" => [&ready[..], &[6, 0, 0, 0, 4, 0], &1000i32.to_le_bytes()].concat(),
        // Error with a 2-byte string that is not UTF-8.
        "bad-utf8" => [&ready[..], &[7, 0, 0, 0, 5, 2, 0, 0, 0, 0xc3, 0x28]].concat(),
        _ => return flood(sock, &ready),
    };
    let r = sock.write_all(&bytes);
    if mode == "truncated" {
        // The end of the stream inside the frame.
        // SAFETY: shutdown on a socket this function borrows; no memory involved.
        unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) };
    }
    match r {
        Ok(()) => (bytes.len(), None),
        Err(e) => (0, Some(e)),
    }
}

/// Ready, then output as fast as the socket takes it, never reading the host's
/// frames (Start, input), then a proper Exited.
fn flood(sock: &mut File, ready: &[u8]) -> (usize, Option<io::Error>) {
    let chunk = frame(&ToHost::Output(vec![b'#'; MAX_CHUNK]));
    let mut sent = 0;
    let result = (|| {
        sock.write_all(ready)?;
        sent += ready.len();
        while sent < FLOOD_BYTES {
            sock.write_all(&chunk)?;
            sent += chunk.len();
        }
        sock.write_all(&frame(&ToHost::Exited(ExitStatus::Code(0))))
    })();
    (sent, result.err())
}

/// Whether the host closes the connection within [`CLOSE_WAIT`] (what it sends
/// meanwhile is read and dropped).
fn host_closed(sock: &mut File) -> bool {
    let deadline = Instant::now() + CLOSE_WAIT;
    let mut buf = [0u8; 4096];
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            continue;
        }
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn modes() {
        let addr = Address::Unix("/nonexistent/aivmm-hostile".into());
        assert!(run("nope", &addr, Duration::ZERO).is_err());
        // With no host, every mode reports a failed connect and returns.
        assert!(run("all", &addr, Duration::ZERO).is_ok());
    }
}
