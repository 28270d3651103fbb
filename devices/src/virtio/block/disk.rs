//! The host side of virtio-blk: the image file, its advisory lock, its size and
//! what its filesystem can do, and the copies between it and guest memory.
//!
//! Data goes straight between the file and guest memory: `pread`/`pwrite` on the
//! host addresses of each guest memory region a buffer touches, so no request
//! needs a host-side buffer of its size.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use log::debug;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::{Error, Result, ID_LEN, SECTOR_SHIFT, SECTOR_SIZE};

/// Zeros for filling guest buffers past EOF and for writing zeros to files that
/// cannot zero a range themselves.
static ZEROS: [u8; 4096] = [0; 4096];

/// An open, locked disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Size in 512-byte sectors.
    capacity: u64,
    /// The filesystem's block size (for the discard alignment we advertise).
    fs_block_size: u32,
    /// fallocate(PUNCH_HOLE) works on this file's filesystem.
    punch_hole: bool,
    /// fallocate(ZERO_RANGE) works on this file's filesystem.
    zero_range: bool,
    id: [u8; ID_LEN],
}

impl Disk {
    /// Opens `path` (read-write unless `read_only`), locks it and checks its size.
    /// `id` overrides the GET_ID answer, which otherwise derives from the file's
    /// device and inode numbers.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self> {
        let id = match id {
            Some(s) if s.len() > ID_LEN => return Err(Error::IdTooLong { id: s.to_string() }),
            Some(s) => Some(s.to_string()),
            None => None,
        };
        let open_err = |source: io::Error| match source.kind() {
            io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
            },
            _ if source.raw_os_error() == Some(libc::EISDIR) => Error::IsDirectory {
                path: path.to_path_buf(),
            },
            _ => Error::Open {
                path: path.to_path_buf(),
                source,
            },
        };
        // O_CLOEXEC (a child process must not inherit the image or its lock) and
        // no blocking open: a FIFO given as a read-only image would wait for a
        // writer forever. Only regular files and block devices get through.
        let (file, meta) = crate::host_file::open(path, !read_only, true).map_err(|e| {
            match e.get_ref().and_then(|i| i.downcast_ref::<crate::host_file::Error>()) {
                Some(crate::host_file::Error::WrongType { kind: "a directory", .. }) => {
                    Error::IsDirectory {
                        path: path.to_path_buf(),
                    }
                }
                Some(crate::host_file::Error::WrongType { kind, .. }) => Error::NotAFile {
                    path: path.to_path_buf(),
                    kind,
                },
                None => open_err(e),
            }
        })?;
        let ft = meta.file_type();
        lock(&file, path, read_only)?;
        // The end offset, not st_size, so a block device reports its size too.
        let size = (&file).seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(Error::Empty {
                path: path.to_path_buf(),
            });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(Error::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let fs_block_size = u32::try_from(meta.blksize())
            .ok()
            .filter(|b| b.is_power_of_two() && (512..=65536).contains(b))
            .unwrap_or(4096);
        let (punch_hole, zero_range) = if read_only || ft.is_block_device() {
            // Never probe a device: there is no scratch space to try on.
            (false, false)
        } else {
            probe_fallocate(&file, path, size)
        };
        let id = match id {
            Some(s) => pad_id(s.as_bytes()),
            None => default_id(meta.dev(), meta.ino()),
        };
        debug!(
            "virtio-blk: {}: {} sectors, ro={read_only}, punch_hole={punch_hole}, \
             zero_range={zero_range}",
            path.display(),
            size >> SECTOR_SHIFT
        );
        Ok(Self {
            file,
            path: path.to_path_buf(),
            read_only,
            capacity: size >> SECTOR_SHIFT,
            fs_block_size,
            punch_hole,
            zero_range,
            id,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The host filesystem's block size.
    pub fn fs_block_size(&self) -> u32 {
        self.fs_block_size
    }

    /// Whether discard (hole punching) is available.
    pub fn can_discard(&self) -> bool {
        self.punch_hole && !self.read_only
    }

    /// Whether write-zeroes is done by the filesystem (punch or zero range).
    pub fn can_write_zeroes(&self) -> bool {
        (self.punch_hole || self.zero_range) && !self.read_only
    }

    /// The 20-byte GET_ID answer, NUL-padded.
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.id
    }

    /// Whether `count` sectors from `sector` lie within the disk.
    pub fn sectors_in_range(&self, sector: u64, count: u64) -> bool {
        sector
            .checked_add(count)
            .is_some_and(|end| end <= self.capacity)
    }

    /// Reads `len` bytes at byte `offset` of the image into guest memory at `addr`.
    /// Bytes past the end of the file (it shrank, or a sparse tail) read as zeros.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            let guard = slice.ptr_guard_mut();
            let base = guard.as_ptr();
            let mut done = 0usize;
            let mut eof = false;
            while done < slice.len() {
                let off = to_off_t(offset)?;
                // SAFETY: `base..base + slice.len()` is mapped guest memory that stays
                // mapped while `guard` lives, and `done < slice.len()`, so the kernel
                // writes at most `slice.len() - done` bytes inside it. The guest may
                // change these bytes concurrently; that is its own race, and no Rust
                // reference to them exists.
                let n = unsafe { libc::pread(fd, base.add(done).cast(), slice.len() - done, off) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    slice.bitmap().mark_dirty(0, slice.len());
                    return Err(e);
                }
                if n == 0 {
                    eof = true;
                    break;
                }
                // n > 0 and at most slice.len() - done.
                let n = n as usize;
                done += n;
                offset += n as u64;
            }
            slice.bitmap().mark_dirty(0, done);
            if eof {
                // Past EOF: the rest of this slice reads as zeros.
                while done < slice.len() {
                    let n = (slice.len() - done).min(ZEROS.len());
                    slice
                        .write_slice(&ZEROS[..n], done)
                        .map_err(io::Error::other)?;
                    done += n;
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to byte `offset` of the image.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        mut offset: u64,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            let guard = slice.ptr_guard();
            let base = guard.as_ptr();
            let mut done = 0usize;
            while done < slice.len() {
                let off = to_off_t(offset)?;
                // SAFETY: `base..base + slice.len()` is mapped guest memory that stays
                // mapped while `guard` lives, and `done < slice.len()`, so the kernel
                // reads at most `slice.len() - done` bytes inside it.
                let n = unsafe { libc::pwrite(fd, base.add(done).cast(), slice.len() - done, off) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                let n = n as usize;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`; they read back as zeros.
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(&self.file, FallocMode::PunchHole, offset, len)
    }

    /// Makes `len` bytes at `offset` read as zeros: by punching a hole if `unmap`
    /// allows it, else by zeroing the range in the filesystem, else by writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let modes = [
            (unmap && self.punch_hole, FallocMode::PunchHole),
            (self.zero_range, FallocMode::ZeroRange),
            (self.punch_hole, FallocMode::PunchHole),
        ];
        for (usable, mode) in modes {
            if !usable {
                continue;
            }
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        self.write_zeros_slowly(offset, len)
    }

    fn write_zeros_slowly(&self, mut offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        while offset < end {
            let n = usize::try_from(end - offset).map_or(ZEROS.len(), |r| r.min(ZEROS.len()));
            self.file.write_all_at(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Takes the advisory lock: exclusive for read-write, shared for read-only, so a
/// disk is either written by one VM or read by many.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<()> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock only takes a file descriptor, which `file` keeps open.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::Locked {
                    path: path.to_path_buf(),
                    read_only,
                })
            }
            _ => {
                return Err(Error::Lock {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
    }
}

fn to_off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

#[derive(Clone, Copy, Debug)]
enum FallocMode {
    PunchHole,
    ZeroRange,
}

#[cfg(target_os = "linux")]
fn fallocate(file: &File, mode: FallocMode, offset: u64, len: u64) -> io::Result<()> {
    let flags = libc::FALLOC_FL_KEEP_SIZE
        | match mode {
            FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE,
            FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
        };
    let off = to_off_t(offset)?;
    let len = to_off_t(len)?;
    loop {
        // SAFETY: fallocate takes a file descriptor, which `file` keeps open, and
        // plain integers; it touches no memory of ours.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), flags, off, len) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn fallocate(_file: &File, _mode: FallocMode, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Finds out whether the image's filesystem can punch holes and zero ranges.
///
/// The test runs on an unnamed temporary file (O_TMPFILE) in the image's
/// directory, which is on the same filesystem and vanishes with its descriptor.
/// Where that cannot be made (no write access to the directory, no O_TMPFILE), a
/// hole is punched in the image past its end, which touches no data, and range
/// zeroing is taken as missing (write-zeroes then punches or writes zeros).
#[cfg(target_os = "linux")]
fn probe_fallocate(image: &File, path: &Path, size: u64) -> (bool, bool) {
    use std::fs::OpenOptions;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let scratch = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir);
    match scratch {
        Ok(mut f) => {
            let block = [0xa5u8; 8192];
            if f.write_all(&block).is_err() {
                return (false, false);
            }
            let punch = fallocate(&f, FallocMode::PunchHole, 0, 4096).is_ok();
            let zero = fallocate(&f, FallocMode::ZeroRange, 4096, 4096).is_ok();
            (punch, zero)
        }
        Err(e) => {
            debug!(
                "virtio-blk: no scratch file in {} ({e}); probing the image past its end",
                dir.display()
            );
            let punch = fallocate(image, FallocMode::PunchHole, size, 4096).is_ok();
            (punch, false)
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn probe_fallocate(_image: &File, _path: &Path, _size: u64) -> (bool, bool) {
    (false, false)
}

fn pad_id(s: &[u8]) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let n = s.len().min(ID_LEN);
    id[..n].copy_from_slice(&s[..n]);
    id
}

/// A stable id for the file: its device and inode in hex, or a hash of them if
/// that does not fit 20 bytes.
fn default_id(dev: u64, ino: u64) -> [u8; ID_LEN] {
    let s = format!("{dev:x}-{ino:x}");
    if s.len() <= ID_LEN {
        return pad_id(s.as_bytes());
    }
    // FNV-1a over both numbers.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in dev.to_le_bytes().iter().chain(&ino.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    pad_id(format!("aivmm-{h:016x}").as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::test_utils::guest_memory;

    fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn bad_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        assert!(matches!(
            Disk::open(&missing, false, None),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            Disk::open(dir.path(), false, None),
            Err(Error::IsDirectory { .. })
        ));
        assert!(matches!(
            Disk::open(dir.path(), true, None),
            Err(Error::IsDirectory { .. })
        ));
        // A FIFO is refused at once, read-only (which used to block in open) and
        // read-write alike, with its kind and its path in the message.
        let fifo = dir.path().join("fifo.img");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for ro in [true, false] {
            let e = Disk::open(&fifo, ro, None).unwrap_err();
            assert!(matches!(e, Error::NotAFile { kind: "a FIFO", .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains("fifo.img is a FIFO, not a regular file"), "{msg}");
        }
        let empty = image(dir.path(), "empty.img", 0);
        assert!(matches!(
            Disk::open(&empty, false, None),
            Err(Error::Empty { .. })
        ));
        let odd = image(dir.path(), "odd.img", 1000);
        let e = Disk::open(&odd, false, None).unwrap_err();
        assert!(matches!(e, Error::SizeNotSectorMultiple { size: 1000, .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("odd.img") && msg.contains("multiple of 512"),
            "{msg}"
        );
        let good = image(dir.path(), "good.img", 4096);
        assert!(matches!(
            Disk::open(&good, false, Some("x".repeat(21).as_str())),
            Err(Error::IdTooLong { .. })
        ));
        assert_eq!(Disk::open(&good, false, None).unwrap().capacity(), 8);
    }

    #[test]
    fn locks_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "disk.img", 1 << 20);
        let rw = Disk::open(&p, false, None).unwrap();
        let e = Disk::open(&p, false, None).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }));
        assert!(e.to_string().contains("disk.img"), "{e}");
        assert!(matches!(
            Disk::open(&p, true, None),
            Err(Error::Locked { .. })
        ));
        drop(rw);
        let ro1 = Disk::open(&p, true, None).unwrap();
        let _ro2 = Disk::open(&p, true, None).unwrap();
        assert!(matches!(
            Disk::open(&p, false, None),
            Err(Error::Locked { .. })
        ));
        drop(ro1);
    }

    #[test]
    fn ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "disk.img", 4096);
        let d = Disk::open(&p, true, Some("serial-1")).unwrap();
        assert_eq!(&d.id()[..9], b"serial-1\0");
        drop(d);
        let a = Disk::open(&p, true, None).unwrap();
        let b = Disk::open(&p, true, None).unwrap();
        assert_eq!(a.id(), b.id(), "stable for the same file");
        assert_ne!(a.id(), &[0u8; ID_LEN]);
        let long = default_id(u64::MAX, u64::MAX);
        assert!(long.starts_with(b"aivmm-") && long.iter().all(|&b| b != 0));
    }

    #[test]
    fn reads_past_eof_are_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "disk.img", 4096);
        let d = Disk::open(&p, false, None).unwrap();
        let mem = guest_memory(0x10_0000);
        mem.write_slice(&[0xffu8; 1024], GuestAddress(0x1000))
            .unwrap();
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[7u8; 16], 4096 - 16)
            .unwrap();
        // Shrink the file under the device: the tail must read as zeros, not stale data.
        File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096 - 512)
            .unwrap();
        d.read_to_guest(&mem, GuestAddress(0x1000), 1024, 3072)
            .unwrap();
        let mut out = [0xeeu8; 1024];
        mem.read_slice(&mut out, GuestAddress(0x1000)).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn fallocate_probe_on_this_fs() {
        let dir = tempfile::tempdir().unwrap();
        let p = image(dir.path(), "disk.img", 1 << 20);
        let d = Disk::open(&p, false, None).unwrap();
        // Whatever the fs says, write-zeroes must produce zeros.
        d.file.write_all_at(&[1u8; 8192], 0).unwrap();
        d.write_zeroes(0, 4096, false).unwrap();
        d.write_zeros_slowly(4096, 4096).unwrap();
        let mut buf = [1u8; 8192];
        d.file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
}
