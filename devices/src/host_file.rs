//! Opening host files that the user names (kernel, initrd, disk images) without
//! hanging on what is not a file.
//!
//! A plain `open(O_RDONLY)` of a FIFO blocks until a writer appears, so a FIFO
//! given as `--kernel` or as a read-only `--disk` used to hang aivmm without a
//! word. [`open`] opens with `O_NONBLOCK` (which makes that open return at once),
//! checks the type on the open descriptor with `fstat` (so the check and the use
//! are on the same file), and then clears `O_NONBLOCK` for ordinary I/O.

use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// A file that is not of a kind the caller accepts (wrapped in an `io::Error`,
/// so callers keep their own errors that name the path and its role).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a regular file (nor a block device, where those are allowed).
    #[error("is {kind}, not a regular file{}", if *.block_ok { " or a block device" } else { "" })]
    WrongType {
        /// What it is instead ("a FIFO", "a directory", …).
        kind: &'static str,
        /// Whether a block device would have done.
        block_ok: bool,
    },
}

/// What a file of type `ft` is, with an article, for messages.
pub fn kind(ft: FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

/// Opens `path` for reading (and writing if `write`) when it is a regular file,
/// or a block device if `block_ok`; anything else is refused without blocking.
/// Returns the file (in blocking mode) and its metadata.
pub fn open(path: &Path, write: bool, block_ok: bool) -> io::Result<(File, Metadata)> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    if !(ft.is_file() || (block_ok && ft.is_block_device())) {
        return Err(io::Error::other(Error::WrongType {
            kind: kind(ft),
            block_ok,
        }));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((file, meta))
}

/// [`open`] for reading a regular file (a kernel, an initrd).
pub fn open_regular(path: &Path) -> io::Result<File> {
    open(path, false, false).map(|(f, _)| f)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn mkfifo(p: &Path) {
        let c = CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// A FIFO is refused at once (no writer ever comes), by name of its kind.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        mkfifo(&fifo);
        let (tx, rx) = std::sync::mpsc::channel();
        let p = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open_regular(&p).map(drop).map_err(|e| e.to_string()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("opening a FIFO blocked");
        assert_eq!(r.unwrap_err(), "is a FIFO, not a regular file");
        let e = open(&fifo, true, true).unwrap_err().to_string();
        assert_eq!(e, "is a FIFO, not a regular file or a block device");
        let e = open_regular(d.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
    }

    /// A regular file opens, and reads block as usual afterwards.
    #[test]
    fn a_regular_file_opens_in_blocking_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, b"kernel").unwrap();
        let f = open_regular(&p).unwrap();
        // SAFETY: fcntl on an open descriptor.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(std::io::read_to_string(f).unwrap(), "kernel");
    }
}
