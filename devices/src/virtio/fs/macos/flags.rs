//! The guest's open(2) and renameat2(2) flags, as macOS flags.
//!
//! FUSE passes the guest's flags through unchanged, so they are Linux values of
//! the guest's architecture: arm64 here (the only guest a Mac runs), which
//! differs from x86 in O_DIRECTORY, O_NOFOLLOW, O_DIRECT and O_LARGEFILE.
//! Flags without a macOS counterpart are dropped when they only tune behaviour
//! (O_LARGEFILE, O_NOATIME, O_DIRECT, which becomes `F_NOCACHE`) and refused when
//! ignoring them would change the meaning (O_TMPFILE, O_PATH, unknown bits).

use super::errno::linux;
use super::{Error, Result};

/// Linux open flags (arm64 / asm-generic values where they differ from x86).
pub mod linux_open {
    pub const O_ACCMODE: u32 = 0o3;
    pub const O_CREAT: u32 = 0o100;
    pub const O_EXCL: u32 = 0o200;
    pub const O_NOCTTY: u32 = 0o400;
    pub const O_TRUNC: u32 = 0o1000;
    pub const O_APPEND: u32 = 0o2000;
    pub const O_NONBLOCK: u32 = 0o4000;
    pub const O_DSYNC: u32 = 0o10000;
    pub const FASYNC: u32 = 0o20000;
    pub const O_DIRECTORY: u32 = 0o40000;
    pub const O_NOFOLLOW: u32 = 0o100000;
    pub const O_DIRECT: u32 = 0o200000;
    pub const O_LARGEFILE: u32 = 0o400000;
    pub const O_NOATIME: u32 = 0o1000000;
    pub const O_CLOEXEC: u32 = 0o2000000;
    /// `__O_SYNC`; O_SYNC is `__O_SYNC | O_DSYNC`.
    pub const O_SYNC_BIT: u32 = 0o4000000;
    pub const O_PATH: u32 = 0o10000000;
    /// `__O_TMPFILE`; O_TMPFILE is `__O_TMPFILE | O_DIRECTORY`.
    pub const O_TMPFILE_BIT: u32 = 0o20000000;
}

/// macOS open flags (`<sys/fcntl.h>`).
pub mod darwin_open {
    pub const O_NONBLOCK: i32 = 0x4;
    pub const O_APPEND: i32 = 0x8;
    pub const O_ASYNC: i32 = 0x40;
    pub const O_SYNC: i32 = 0x80;
    pub const O_NOFOLLOW: i32 = 0x100;
    pub const O_CREAT: i32 = 0x200;
    pub const O_TRUNC: i32 = 0x400;
    pub const O_EXCL: i32 = 0x800;
    pub const O_NOCTTY: i32 = 0x20000;
    pub const O_DIRECTORY: i32 = 0x100000;
    pub const O_DSYNC: i32 = 0x400000;
    pub const O_CLOEXEC: i32 = 0x1000000;
}

/// How to open a file on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostOpen {
    /// Flags for macOS `open`/`openat`.
    pub flags: i32,
    /// Set `F_NOCACHE` on the descriptor (the guest asked for O_DIRECT).
    pub nocache: bool,
}

/// Translates the guest's open flags.
pub fn open_flags(guest: u32) -> Result<HostOpen> {
    use darwin_open as d;
    use linux_open as l;
    if guest & l::O_TMPFILE_BIT != 0 {
        return Err(Error::Unsupported(linux::EOPNOTSUPP));
    }
    if guest & l::O_PATH != 0 {
        return Err(Error::Invalid(linux::EINVAL));
    }
    let acc = guest & l::O_ACCMODE;
    if acc == l::O_ACCMODE {
        return Err(Error::Invalid(linux::EINVAL));
    }
    let table: [(u32, i32); 11] = [
        (l::O_CREAT, d::O_CREAT),
        (l::O_EXCL, d::O_EXCL),
        (l::O_NOCTTY, d::O_NOCTTY),
        (l::O_TRUNC, d::O_TRUNC),
        (l::O_APPEND, d::O_APPEND),
        (l::O_NONBLOCK, d::O_NONBLOCK),
        (l::O_DSYNC, d::O_DSYNC),
        (l::FASYNC, d::O_ASYNC),
        (l::O_DIRECTORY, d::O_DIRECTORY),
        (l::O_NOFOLLOW, d::O_NOFOLLOW),
        (l::O_CLOEXEC, d::O_CLOEXEC),
    ];
    let known = table.iter().fold(
        l::O_ACCMODE | l::O_DIRECT | l::O_LARGEFILE | l::O_NOATIME | l::O_SYNC_BIT,
        |m, (f, _)| m | f,
    );
    if guest & !known != 0 {
        return Err(Error::Invalid(linux::EINVAL));
    }
    // O_RDONLY, O_WRONLY, O_RDWR are 0, 1, 2 on both.
    let mut flags = acc as i32;
    for (lf, df) in table {
        if guest & lf != 0 {
            flags |= df;
        }
    }
    if guest & l::O_SYNC_BIT != 0 {
        flags |= d::O_SYNC;
    }
    Ok(HostOpen {
        flags,
        nocache: guest & l::O_DIRECT != 0,
    })
}

/// Linux renameat2 flags.
pub mod linux_rename {
    pub const RENAME_NOREPLACE: u32 = 1;
    pub const RENAME_EXCHANGE: u32 = 2;
    pub const RENAME_WHITEOUT: u32 = 4;
}

/// macOS `renamex_np` flags (`<stdio.h>`).
pub mod darwin_rename {
    pub const RENAME_SWAP: u32 = 0x2;
    pub const RENAME_EXCL: u32 = 0x4;
}

/// Translates renameat2 flags to `renamex_np`/`renameatx_np` flags.
pub fn rename_flags(guest: u32) -> Result<u32> {
    use linux_rename as l;
    if guest & l::RENAME_WHITEOUT != 0 {
        // Overlay whiteouts need a character device 0/0, which macOS cannot make here.
        return Err(Error::Unsupported(linux::EINVAL));
    }
    if guest & !(l::RENAME_NOREPLACE | l::RENAME_EXCHANGE) != 0
        || guest & (l::RENAME_NOREPLACE | l::RENAME_EXCHANGE)
            == (l::RENAME_NOREPLACE | l::RENAME_EXCHANGE)
    {
        return Err(Error::Invalid(linux::EINVAL));
    }
    let mut out = 0;
    if guest & l::RENAME_NOREPLACE != 0 {
        out |= darwin_rename::RENAME_EXCL;
    }
    if guest & l::RENAME_EXCHANGE != 0 {
        out |= darwin_rename::RENAME_SWAP;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::darwin_open as d;
    use super::linux_open as l;
    use super::*;

    #[test]
    fn access_modes_and_each_flag_translate() {
        assert_eq!(
            open_flags(0).unwrap(),
            HostOpen {
                flags: 0,
                nocache: false
            }
        );
        assert_eq!(open_flags(1).unwrap().flags, 1);
        assert_eq!(open_flags(2).unwrap().flags, 2);
        let pairs = [
            (l::O_CREAT, d::O_CREAT),
            (l::O_EXCL, d::O_EXCL),
            (l::O_TRUNC, d::O_TRUNC),
            (l::O_APPEND, d::O_APPEND),
            (l::O_NONBLOCK, d::O_NONBLOCK),
            (l::O_DIRECTORY, d::O_DIRECTORY),
            (l::O_NOFOLLOW, d::O_NOFOLLOW),
            (l::O_CLOEXEC, d::O_CLOEXEC),
            (l::O_DSYNC, d::O_DSYNC),
            (l::O_NOCTTY, d::O_NOCTTY),
        ];
        for (lf, df) in pairs {
            assert_eq!(open_flags(2 | lf).unwrap().flags, 2 | df, "linux {lf:#o}");
        }
        // O_SYNC is __O_SYNC | O_DSYNC.
        assert_eq!(
            open_flags(1 | l::O_SYNC_BIT | l::O_DSYNC).unwrap().flags,
            1 | d::O_SYNC | d::O_DSYNC
        );
    }

    #[test]
    fn arm64_values_not_x86_ones() {
        // On x86, 0o200000 is O_DIRECTORY; on arm64 it is O_DIRECT.
        assert_eq!(
            open_flags(0o200000).unwrap(),
            HostOpen {
                flags: 0,
                nocache: true
            }
        );
        assert_eq!(open_flags(0o40000).unwrap().flags, d::O_DIRECTORY);
        // O_LARGEFILE and O_NOATIME are accepted and dropped.
        assert_eq!(open_flags(l::O_LARGEFILE | l::O_NOATIME).unwrap().flags, 0);
    }

    #[test]
    fn meaning_changing_flags_are_refused() {
        assert_eq!(
            open_flags(l::O_TMPFILE_BIT | l::O_DIRECTORY | 2),
            Err(Error::Unsupported(95))
        );
        assert_eq!(open_flags(l::O_PATH), Err(Error::Invalid(22)));
        assert_eq!(open_flags(3), Err(Error::Invalid(22)));
        assert_eq!(open_flags(1 << 30).unwrap_err().linux_errno(), 22);
    }

    #[test]
    fn rename_flags_translate_or_fail() {
        assert_eq!(rename_flags(0), Ok(0));
        assert_eq!(rename_flags(1), Ok(darwin_rename::RENAME_EXCL));
        assert_eq!(rename_flags(2), Ok(darwin_rename::RENAME_SWAP));
        assert_eq!(rename_flags(3), Err(Error::Invalid(22)));
        assert!(rename_flags(4).is_err());
        assert!(rename_flags(8).is_err());
    }
}
