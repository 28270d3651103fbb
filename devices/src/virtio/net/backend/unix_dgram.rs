//! A unix datagram socket: one datagram is one frame, with no header. This is
//! how gvproxy (`--listen-vfkit unixgram://`) and vmnet-helper talk to a VMM.
//!
//! The peer answers to our address, so the socket is bound to a fresh path in
//! the temporary directory (removed on drop) and connected to the peer's.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use log::debug;

use super::{is_would_block, Backend};
use crate::virtio::net::{Error, Result};

/// Makes local socket names unique within the process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A connected unix datagram socket.
pub struct UnixDgram {
    sock: UnixDatagram,
    local: PathBuf,
}

impl UnixDgram {
    /// Binds a local socket and connects it to `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        let local = std::env::temp_dir().join(format!(
            "aivmm-net-{}-{}.sock",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        // A stale socket from a crashed run with our pid would block the bind.
        let _ = std::fs::remove_file(&local);
        let sock = UnixDatagram::bind(&local).map_err(Error::Socket)?;
        let this = Self { sock, local };
        this.sock
            .connect(path)
            .map_err(|source| Error::UnixConnect {
                path: path.to_path_buf(),
                source,
            })?;
        this.sock.set_nonblocking(true).map_err(Error::Socket)?;
        Ok(this)
    }

    /// The path we are bound to (where the peer sends).
    pub fn local_path(&self) -> &Path {
        &self.local
    }
}

impl Drop for UnixDgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.local);
    }
}

impl Backend for UnixDgram {
    fn name(&self) -> &'static str {
        "unix datagram"
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match self.sock.send(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_would_block(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, a live,
            // exclusively borrowed slice. MSG_TRUNC makes it return the real length.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if is_would_block(&e) {
                    return Ok(None);
                }
                return Err(e);
            }
            let n = n as usize;
            if n > buf.len() {
                debug!("virtio-net: dropping a {n}-byte datagram (too long)");
                continue;
            }
            return Ok(Some(n));
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}
