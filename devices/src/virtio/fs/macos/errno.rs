//! macOS errno values to Linux (asm-generic) errno values.
//!
//! 1..=34 are the historic Unix numbers both share, except EDEADLK (11 on macOS,
//! 35 on Linux, where 11 is EAGAIN). From 35 on the numbering diverges; errors
//! Linux has no name for map to the closest one a Linux program handles
//! (EIO for RPC and device failures, ENOEXEC for Mach-O loader errors, ENODATA
//! for ENOATTR as Linux's xattr calls return).

/// Linux errno values used in replies.
pub mod linux {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENOEXEC: i32 = 8;
    pub const EAGAIN: i32 = 11;
    pub const EACCES: i32 = 13;
    pub const EXDEV: i32 = 18;
    pub const EINVAL: i32 = 22;
    pub const ERANGE: i32 = 34;
    pub const EDEADLK: i32 = 35;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOLCK: i32 = 37;
    pub const ENOSYS: i32 = 38;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
    pub const ENOMSG: i32 = 42;
    pub const EIDRM: i32 = 43;
    pub const ENOSTR: i32 = 60;
    pub const ENODATA: i32 = 61;
    pub const ETIME: i32 = 62;
    pub const ENOSR: i32 = 63;
    pub const EREMOTE: i32 = 66;
    pub const ENOLINK: i32 = 67;
    pub const EPROTO: i32 = 71;
    pub const EMULTIHOP: i32 = 72;
    pub const EBADMSG: i32 = 74;
    pub const EOVERFLOW: i32 = 75;
    pub const EILSEQ: i32 = 84;
    pub const EUSERS: i32 = 87;
    pub const ENOTSOCK: i32 = 88;
    pub const EDESTADDRREQ: i32 = 89;
    pub const EMSGSIZE: i32 = 90;
    pub const EPROTOTYPE: i32 = 91;
    pub const ENOPROTOOPT: i32 = 92;
    pub const EPROTONOSUPPORT: i32 = 93;
    pub const ESOCKTNOSUPPORT: i32 = 94;
    pub const EOPNOTSUPP: i32 = 95;
    pub const EPFNOSUPPORT: i32 = 96;
    pub const EAFNOSUPPORT: i32 = 97;
    pub const EADDRINUSE: i32 = 98;
    pub const EADDRNOTAVAIL: i32 = 99;
    pub const ENETDOWN: i32 = 100;
    pub const ENETUNREACH: i32 = 101;
    pub const ENETRESET: i32 = 102;
    pub const ECONNABORTED: i32 = 103;
    pub const ECONNRESET: i32 = 104;
    pub const ENOBUFS: i32 = 105;
    pub const EISCONN: i32 = 106;
    pub const ENOTCONN: i32 = 107;
    pub const ESHUTDOWN: i32 = 108;
    pub const ETOOMANYREFS: i32 = 109;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
    pub const EHOSTDOWN: i32 = 112;
    pub const EHOSTUNREACH: i32 = 113;
    pub const EALREADY: i32 = 114;
    pub const EINPROGRESS: i32 = 115;
    pub const ESTALE: i32 = 116;
    pub const EDQUOT: i32 = 122;
    pub const ECANCELED: i32 = 125;
    pub const EOWNERDEAD: i32 = 130;
    pub const ENOTRECOVERABLE: i32 = 131;
}

/// macOS errno values (`<sys/errno.h>`) from 35 on, and EDEADLK.
pub mod darwin {
    pub const EDEADLK: i32 = 11;
    pub const EAGAIN: i32 = 35;
    pub const EINPROGRESS: i32 = 36;
    pub const EALREADY: i32 = 37;
    pub const ENOTSOCK: i32 = 38;
    pub const EDESTADDRREQ: i32 = 39;
    pub const EMSGSIZE: i32 = 40;
    pub const EPROTOTYPE: i32 = 41;
    pub const ENOPROTOOPT: i32 = 42;
    pub const EPROTONOSUPPORT: i32 = 43;
    pub const ESOCKTNOSUPPORT: i32 = 44;
    pub const ENOTSUP: i32 = 45;
    pub const EPFNOSUPPORT: i32 = 46;
    pub const EAFNOSUPPORT: i32 = 47;
    pub const EADDRINUSE: i32 = 48;
    pub const EADDRNOTAVAIL: i32 = 49;
    pub const ENETDOWN: i32 = 50;
    pub const ENETUNREACH: i32 = 51;
    pub const ENETRESET: i32 = 52;
    pub const ECONNABORTED: i32 = 53;
    pub const ECONNRESET: i32 = 54;
    pub const ENOBUFS: i32 = 55;
    pub const EISCONN: i32 = 56;
    pub const ENOTCONN: i32 = 57;
    pub const ESHUTDOWN: i32 = 58;
    pub const ETOOMANYREFS: i32 = 59;
    pub const ETIMEDOUT: i32 = 60;
    pub const ECONNREFUSED: i32 = 61;
    pub const ELOOP: i32 = 62;
    pub const ENAMETOOLONG: i32 = 63;
    pub const EHOSTDOWN: i32 = 64;
    pub const EHOSTUNREACH: i32 = 65;
    pub const ENOTEMPTY: i32 = 66;
    pub const EPROCLIM: i32 = 67;
    pub const EUSERS: i32 = 68;
    pub const EDQUOT: i32 = 69;
    pub const ESTALE: i32 = 70;
    pub const EREMOTE: i32 = 71;
    pub const EBADRPC: i32 = 72;
    pub const ERPCMISMATCH: i32 = 73;
    pub const EPROGUNAVAIL: i32 = 74;
    pub const EPROGMISMATCH: i32 = 75;
    pub const EPROCUNAVAIL: i32 = 76;
    pub const ENOLCK: i32 = 77;
    pub const ENOSYS: i32 = 78;
    pub const EFTYPE: i32 = 79;
    pub const EAUTH: i32 = 80;
    pub const ENEEDAUTH: i32 = 81;
    pub const EPWROFF: i32 = 82;
    pub const EDEVERR: i32 = 83;
    pub const EOVERFLOW: i32 = 84;
    pub const EBADEXEC: i32 = 85;
    pub const EBADARCH: i32 = 86;
    pub const ESHLIBVERS: i32 = 87;
    pub const EBADMACHO: i32 = 88;
    pub const ECANCELED: i32 = 89;
    pub const EIDRM: i32 = 90;
    pub const ENOMSG: i32 = 91;
    pub const EILSEQ: i32 = 92;
    pub const ENOATTR: i32 = 93;
    pub const EBADMSG: i32 = 94;
    pub const EMULTIHOP: i32 = 95;
    pub const ENODATA: i32 = 96;
    pub const ENOLINK: i32 = 97;
    pub const ENOSR: i32 = 98;
    pub const ENOSTR: i32 = 99;
    pub const EPROTO: i32 = 100;
    pub const ETIME: i32 = 101;
    pub const EOPNOTSUPP: i32 = 102;
    pub const ENOPOLICY: i32 = 103;
    pub const ENOTRECOVERABLE: i32 = 104;
    pub const EOWNERDEAD: i32 = 105;
    pub const EQFULL: i32 = 106;
}

/// The Linux errno for a macOS errno. Unknown values become EIO, never a
/// number that means something else to the guest.
pub fn to_linux(e: i32) -> i32 {
    use darwin as d;
    use linux as l;
    match e {
        d::EDEADLK => l::EDEADLK,
        1..=34 => e,
        d::EAGAIN | d::EPROCLIM => l::EAGAIN,
        d::EINPROGRESS => l::EINPROGRESS,
        d::EALREADY => l::EALREADY,
        d::ENOTSOCK => l::ENOTSOCK,
        d::EDESTADDRREQ => l::EDESTADDRREQ,
        d::EMSGSIZE => l::EMSGSIZE,
        d::EPROTOTYPE => l::EPROTOTYPE,
        d::ENOPROTOOPT => l::ENOPROTOOPT,
        d::EPROTONOSUPPORT => l::EPROTONOSUPPORT,
        d::ESOCKTNOSUPPORT => l::ESOCKTNOSUPPORT,
        d::ENOTSUP | d::EOPNOTSUPP => l::EOPNOTSUPP,
        d::EPFNOSUPPORT => l::EPFNOSUPPORT,
        d::EAFNOSUPPORT => l::EAFNOSUPPORT,
        d::EADDRINUSE => l::EADDRINUSE,
        d::EADDRNOTAVAIL => l::EADDRNOTAVAIL,
        d::ENETDOWN => l::ENETDOWN,
        d::ENETUNREACH => l::ENETUNREACH,
        d::ENETRESET => l::ENETRESET,
        d::ECONNABORTED => l::ECONNABORTED,
        d::ECONNRESET => l::ECONNRESET,
        d::ENOBUFS | d::EQFULL => l::ENOBUFS,
        d::EISCONN => l::EISCONN,
        d::ENOTCONN => l::ENOTCONN,
        d::ESHUTDOWN => l::ESHUTDOWN,
        d::ETOOMANYREFS => l::ETOOMANYREFS,
        d::ETIMEDOUT => l::ETIMEDOUT,
        d::ECONNREFUSED => l::ECONNREFUSED,
        d::ELOOP => l::ELOOP,
        d::ENAMETOOLONG => l::ENAMETOOLONG,
        d::EHOSTDOWN => l::EHOSTDOWN,
        d::EHOSTUNREACH => l::EHOSTUNREACH,
        d::ENOTEMPTY => l::ENOTEMPTY,
        d::EUSERS => l::EUSERS,
        d::EDQUOT => l::EDQUOT,
        d::ESTALE => l::ESTALE,
        d::EREMOTE => l::EREMOTE,
        d::ENOLCK => l::ENOLCK,
        d::ENOSYS => l::ENOSYS,
        d::EFTYPE => l::EINVAL,
        d::EAUTH | d::ENEEDAUTH => l::EACCES,
        d::ENOPOLICY => l::EPERM,
        d::EOVERFLOW => l::EOVERFLOW,
        d::EBADEXEC | d::EBADARCH | d::ESHLIBVERS | d::EBADMACHO => l::ENOEXEC,
        d::ECANCELED => l::ECANCELED,
        d::EIDRM => l::EIDRM,
        d::ENOMSG => l::ENOMSG,
        d::EILSEQ => l::EILSEQ,
        // getxattr(2) on Linux says ENODATA where macOS says ENOATTR.
        d::ENOATTR | d::ENODATA => l::ENODATA,
        d::EBADMSG => l::EBADMSG,
        d::EMULTIHOP => l::EMULTIHOP,
        d::ENOLINK => l::ENOLINK,
        d::ENOSR => l::ENOSR,
        d::ENOSTR => l::ENOSTR,
        d::EPROTO => l::EPROTO,
        d::ETIME => l::ETIME,
        d::ENOTRECOVERABLE => l::ENOTRECOVERABLE,
        d::EOWNERDEAD => l::EOWNERDEAD,
        _ => l::EIO,
    }
}

/// The Linux errno for a host `io::Error` on a macOS host (EIO without an OS code).
pub fn io_to_linux(e: &std::io::Error) -> i32 {
    e.raw_os_error().map_or(linux::EIO, to_linux)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn shared_low_numbers_pass_through_except_edeadlk() {
        for e in 1..=34 {
            let want = if e == 11 { linux::EDEADLK } else { e };
            assert_eq!(to_linux(e), want, "errno {e}");
        }
    }

    #[test]
    fn diverging_numbers_are_translated() {
        let cases = [
            (darwin::EAGAIN, linux::EAGAIN),
            (darwin::ENOTEMPTY, linux::ENOTEMPTY),
            (darwin::ENAMETOOLONG, linux::ENAMETOOLONG),
            (darwin::ELOOP, linux::ELOOP),
            (darwin::ENOSYS, linux::ENOSYS),
            (darwin::ENOTSUP, linux::EOPNOTSUPP),
            (darwin::EOPNOTSUPP, linux::EOPNOTSUPP),
            (darwin::EDQUOT, linux::EDQUOT),
            (darwin::ESTALE, linux::ESTALE),
            (darwin::ENOATTR, linux::ENODATA),
            (darwin::EOVERFLOW, linux::EOVERFLOW),
            (darwin::ETIMEDOUT, linux::ETIMEDOUT),
            (darwin::ECONNREFUSED, linux::ECONNREFUSED),
            (darwin::EBADMACHO, linux::ENOEXEC),
        ];
        for (mac, lin) in cases {
            assert_eq!(to_linux(mac), lin, "macOS errno {mac}");
        }
    }

    #[test]
    fn every_macos_errno_maps_somewhere_sensible_and_unknowns_are_eio() {
        for e in 1..=darwin::EQFULL {
            let l = to_linux(e);
            assert!((1..=133).contains(&l), "{e} -> {l}");
        }
        assert_eq!(to_linux(0), linux::EIO);
        assert_eq!(to_linux(500), linux::EIO);
        assert_eq!(to_linux(-3), linux::EIO);
        assert_eq!(io_to_linux(&std::io::Error::other("no code")), linux::EIO);
        assert_eq!(
            io_to_linux(&std::io::Error::from_raw_os_error(darwin::ENOTEMPTY)),
            linux::ENOTEMPTY
        );
    }
}
