//! Bytes from the host's CSPRNG: `getrandom(2)` on Linux, `getentropy(2)` on
//! macOS (which has no `getrandom`, and gives at most 256 bytes a call).

use std::io;

/// Fills `buf` from the kernel's CSPRNG.
#[cfg(target_os = "linux")]
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is a
        // valid, exclusively borrowed buffer of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The most `getentropy` gives in one call.
#[cfg(not(target_os = "linux"))]
const GETENTROPY_MAX: usize = 256;

/// Fills `buf` from the kernel's CSPRNG.
#[cfg(not(target_os = "linux"))]
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    for chunk in buf.chunks_mut(GETENTROPY_MAX) {
        // SAFETY: `chunk` is a valid, exclusively borrowed buffer of at most 256
        // bytes, all of which getentropy writes.
        if unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sys_random_fills_large_buffers() {
        // Larger than one getentropy call: every 256-byte chunk gets filled.
        let mut buf = vec![0u8; 4096];
        fill(&mut buf).unwrap();
        for chunk in buf.chunks(256) {
            assert!(chunk.iter().any(|&b| b != 0), "an all-zero 256-byte chunk");
        }
        let mut empty = [];
        fill(&mut empty).unwrap();
    }
}
