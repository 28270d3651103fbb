//! File attributes, directory entries and file-system statistics in the Linux
//! FUSE ABI (`include/uapi/linux/fuse.h`), from what macOS `stat`, `readdir` and
//! `statfs` return.
//!
//! The records are written as explicit little-endian bytes at the ABI's offsets,
//! so the layout does not depend on the host's struct definitions (which on
//! macOS are macFUSE's, not Linux's).

use super::errno::linux;
use super::{Error, Result};

/// `sizeof(struct fuse_attr)`.
pub const FUSE_ATTR_SIZE: usize = 88;
/// `sizeof(struct fuse_kstatfs)`.
pub const FUSE_KSTATFS_SIZE: usize = 80;
/// The fixed part of `struct fuse_dirent` (ino, off, namelen, type).
pub const FUSE_DIRENT_HEADER: usize = 24;
/// File type mask; the type values (S_IFREG, S_IFDIR...) are the same on both.
pub const S_IFMT: u32 = 0o170000;
/// macOS whiteout inodes, which Linux cannot represent.
pub const S_IFWHT: u32 = 0o160000;
/// Longest name on APFS and HFS+ (bytes of UTF-8).
pub const NAME_MAX: u32 = 255;

/// The fields of a macOS `struct stat` the guest needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStat {
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub size: i64,
    /// `st_blocks` (512-byte units on both systems).
    pub blocks: i64,
    /// `st_atimespec`.
    pub atime: (i64, i64),
    /// `st_mtimespec`.
    pub mtime: (i64, i64),
    /// `st_ctimespec`.
    pub ctime: (i64, i64),
    /// `st_mode` (`mode_t` is 16 bits on macOS).
    pub mode: u16,
    /// `st_nlink`.
    pub nlink: u16,
    /// `st_uid`.
    pub uid: u32,
    /// `st_gid`.
    pub gid: u32,
    /// `st_rdev` (macOS `dev_t`: 8-bit major, 24-bit minor).
    pub rdev: i32,
    /// `st_blksize`.
    pub blksize: i32,
}

/// A macOS device number as Linux's 32-bit `new_encode_dev`, which the guest
/// kernel decodes from `fuse_attr.rdev`.
pub fn rdev_to_linux(rdev: i32) -> u32 {
    let dev = rdev as u32;
    let (major, minor) = ((dev >> 24) & 0xff, dev & 0xff_ffff);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn nsec(t: (i64, i64)) -> u32 {
    // tv_nsec is 0..1e9 on a sane host; clamp anything else.
    t.1.clamp(0, 999_999_999) as u32
}

/// Encodes `st` as a Linux `fuse_attr`. `owner` replaces uid/gid (shares map
/// files to the guest's user).
pub fn fuse_attr(st: &HostStat, owner: Option<(u32, u32)>) -> Result<[u8; FUSE_ATTR_SIZE]> {
    let mode = u32::from(st.mode);
    if mode & S_IFMT == S_IFWHT {
        return Err(Error::Unsupported(linux::EIO));
    }
    let (uid, gid) = owner.unwrap_or((st.uid, st.gid));
    let mut b = [0u8; FUSE_ATTR_SIZE];
    put_u64(&mut b, 0, st.ino);
    put_u64(&mut b, 8, st.size.max(0) as u64);
    put_u64(&mut b, 16, st.blocks.max(0) as u64);
    // Times are signed seconds carried in u64 fields (the kernel reads them as s64).
    put_u64(&mut b, 24, st.atime.0 as u64);
    put_u64(&mut b, 32, st.mtime.0 as u64);
    put_u64(&mut b, 40, st.ctime.0 as u64);
    put_u32(&mut b, 48, nsec(st.atime));
    put_u32(&mut b, 52, nsec(st.mtime));
    put_u32(&mut b, 56, nsec(st.ctime));
    put_u32(&mut b, 60, mode);
    put_u32(&mut b, 64, u32::from(st.nlink));
    put_u32(&mut b, 68, uid);
    put_u32(&mut b, 72, gid);
    put_u32(&mut b, 76, rdev_to_linux(st.rdev));
    put_u32(&mut b, 80, st.blksize.max(0) as u32);
    // 84: flags (no FUSE_ATTR_SUBMOUNT, no DAX).
    Ok(b)
}

/// The `d_type` of a file mode (DT_* values are the same on macOS and Linux).
pub fn dirent_type(mode: u32) -> u32 {
    (mode & S_IFMT) >> 12
}

/// Appends one `fuse_dirent` to `buf` if it fits in `max` bytes in total;
/// `Ok(false)` when the reply is full.
pub fn push_dirent(
    buf: &mut Vec<u8>,
    max: usize,
    ino: u64,
    off: u64,
    dtype: u32,
    name: &[u8],
) -> Result<bool> {
    if name.is_empty()
        || name.len() > NAME_MAX as usize
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(Error::Invalid(linux::EIO));
    }
    let len = FUSE_DIRENT_HEADER + name.len();
    let padded = (len + 7) & !7;
    if buf.len() + padded > max {
        return Ok(false);
    }
    buf.extend_from_slice(&ino.to_le_bytes());
    buf.extend_from_slice(&off.to_le_bytes());
    buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
    buf.extend_from_slice(&dtype.to_le_bytes());
    buf.extend_from_slice(name);
    buf.resize(buf.len() + (padded - len), 0);
    Ok(true)
}

/// The fields of a macOS `struct statfs` the guest needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostStatfs {
    /// `f_bsize`: the fundamental block size (what `f_blocks` counts).
    pub bsize: u32,
    /// `f_iosize`: the optimal transfer size.
    pub iosize: i32,
    /// `f_blocks`.
    pub blocks: u64,
    /// `f_bfree`.
    pub bfree: u64,
    /// `f_bavail`.
    pub bavail: u64,
    /// `f_files`.
    pub files: u64,
    /// `f_ffree`.
    pub ffree: u64,
}

/// Encodes `st` as a Linux `fuse_kstatfs`: Linux's `f_frsize` is the unit of
/// the block counts (macOS `f_bsize`) and its `f_bsize` the preferred I/O size.
pub fn fuse_kstatfs(st: &HostStatfs) -> [u8; FUSE_KSTATFS_SIZE] {
    let mut b = [0u8; FUSE_KSTATFS_SIZE];
    put_u64(&mut b, 0, st.blocks);
    put_u64(&mut b, 8, st.bfree);
    put_u64(&mut b, 16, st.bavail);
    put_u64(&mut b, 24, st.files);
    put_u64(&mut b, 32, st.ffree);
    let io = if st.iosize > 0 {
        st.iosize as u32
    } else {
        st.bsize
    };
    put_u32(&mut b, 40, io);
    put_u32(&mut b, 44, NAME_MAX);
    put_u32(&mut b, 48, st.bsize);
    b
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn stat_lands_at_the_linux_offsets() {
        let st = HostStat {
            ino: 0x1122_3344_5566,
            size: 4097,
            blocks: 16,
            atime: (1_700_000_000, 5),
            mtime: (1_700_000_001, 6),
            ctime: (-1, 7),
            mode: 0o100644,
            nlink: 3,
            uid: 501,
            gid: 20,
            rdev: 0,
            blksize: 4096,
        };
        let b = fuse_attr(&st, None).unwrap();
        assert_eq!(u64_at(&b, 0), 0x1122_3344_5566);
        assert_eq!(u64_at(&b, 8), 4097);
        assert_eq!(u64_at(&b, 16), 16);
        assert_eq!(u64_at(&b, 24), 1_700_000_000);
        assert_eq!(u64_at(&b, 32), 1_700_000_001);
        assert_eq!(u64_at(&b, 40) as i64, -1, "pre-1970 times stay signed");
        assert_eq!((u32_at(&b, 48), u32_at(&b, 52), u32_at(&b, 56)), (5, 6, 7));
        assert_eq!(u32_at(&b, 60), 0o100644);
        assert_eq!(
            (u32_at(&b, 64), u32_at(&b, 68), u32_at(&b, 72)),
            (3, 501, 20)
        );
        assert_eq!(
            (u32_at(&b, 76), u32_at(&b, 80), u32_at(&b, 84)),
            (0, 4096, 0)
        );
        let mapped = fuse_attr(&st, Some((1000, 1000))).unwrap();
        assert_eq!((u32_at(&mapped, 68), u32_at(&mapped, 72)), (1000, 1000));
    }

    #[test]
    fn device_numbers_are_reencoded_for_linux() {
        // macOS makedev(major 3, minor 2) = 0x0300_0002 -> Linux MKDEV(3, 2) new encoding 0x302.
        assert_eq!(rdev_to_linux(0x0300_0002), 0x302);
        // A minor above 255 uses the high bits of Linux's encoding.
        let dev = rdev_to_linux((16 << 24) | 0x1234);
        let (major, minor) = ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00));
        assert_eq!((major, minor), (16, 0x1234));
    }

    #[test]
    fn whiteouts_cannot_be_described() {
        let st = HostStat {
            mode: 0o160000,
            ..HostStat::default()
        };
        assert_eq!(fuse_attr(&st, None), Err(Error::Unsupported(5)));
    }

    #[test]
    fn dirents_are_padded_to_eight_and_stop_when_full() {
        let mut buf = Vec::new();
        assert!(push_dirent(&mut buf, 64, 7, 1, dirent_type(0o040755), b"src").unwrap());
        assert_eq!(buf.len(), 32);
        assert_eq!(u64_at(&buf, 0), 7);
        assert_eq!(u64_at(&buf, 8), 1);
        assert_eq!(u32_at(&buf, 16), 3);
        assert_eq!(u32_at(&buf, 20), 4, "DT_DIR");
        assert_eq!(&buf[24..27], b"src");
        assert_eq!(&buf[27..32], &[0; 5]);
        assert!(push_dirent(&mut buf, 64, 8, 2, dirent_type(0o100644), b"12345678").unwrap());
        assert_eq!(buf.len(), 64);
        assert!(!push_dirent(&mut buf, 64, 9, 3, 8, b"x").unwrap(), "full");
        assert_eq!(buf.len(), 64);
        for bad in [&b""[..], b"a/b", b"nul\0", &[b'a'; 256][..]] {
            assert!(push_dirent(&mut buf, 4096, 1, 1, 8, bad).is_err());
        }
        assert_eq!(dirent_type(0o120777), 10, "DT_LNK");
    }

    #[test]
    fn statfs_units_follow_linux_meaning() {
        let st = HostStatfs {
            bsize: 4096,
            iosize: 1 << 20,
            blocks: 1000,
            bfree: 600,
            bavail: 500,
            files: 99,
            ffree: 42,
        };
        let b = fuse_kstatfs(&st);
        assert_eq!(
            (u64_at(&b, 0), u64_at(&b, 8), u64_at(&b, 16)),
            (1000, 600, 500)
        );
        assert_eq!((u64_at(&b, 24), u64_at(&b, 32)), (99, 42));
        assert_eq!(
            (u32_at(&b, 40), u32_at(&b, 44), u32_at(&b, 48)),
            (1 << 20, 255, 4096)
        );
        let no_io = fuse_kstatfs(&HostStatfs {
            bsize: 512,
            iosize: 0,
            ..st
        });
        assert_eq!(u32_at(&no_io, 40), 512, "no iosize: the block size");
        assert_eq!(u32_at(&no_io, 48), 512);
    }
}
