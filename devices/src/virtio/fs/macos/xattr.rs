//! Linux extended-attribute names on a macOS host.
//!
//! Linux names carry a namespace (`user.`, `trusted.`, `security.`,
//! `system.`); macOS names have none. The guest's `user.NAME` is the host's
//! `NAME`, and every host attribute is listed to the guest as `user.NAME`. The
//! other namespaces need privileges or kernel support the host does not give a
//! share: reads answer ENODATA ("no such attribute", which is what the guest
//! kernel expects for e.g. `security.capability` on every write), writes
//! EOPNOTSUPP.

use super::errno::linux;
use super::{Error, Result};

/// The namespace the guest's names must use.
pub const USER_PREFIX: &[u8] = b"user.";

/// What the guest does with an attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// getxattr.
    Get,
    /// setxattr.
    Set,
    /// removexattr.
    Remove,
}

/// The host name for the guest's `name`, or the errno to answer.
pub fn host_name(name: &[u8], op: Op) -> Result<&[u8]> {
    match name.strip_prefix(USER_PREFIX) {
        Some(rest) if !rest.is_empty() && !rest.contains(&0) => Ok(rest),
        Some(_) => Err(Error::Invalid(linux::EINVAL)),
        None => Err(match op {
            Op::Get | Op::Remove => Error::Unsupported(linux::ENODATA),
            Op::Set => Error::Unsupported(linux::EOPNOTSUPP),
        }),
    }
}

/// The guest's view of a host `listxattr` buffer (NUL-terminated names): each
/// name under `user.`.
pub fn guest_list(host: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(host.len() + 8 * USER_PREFIX.len());
    for name in host.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        out.extend_from_slice(USER_PREFIX);
        out.extend_from_slice(name);
        out.push(0);
    }
    out
}

/// Linux setxattr flags.
pub const LINUX_XATTR_CREATE: u32 = 1;
/// Linux XATTR_REPLACE.
pub const LINUX_XATTR_REPLACE: u32 = 2;
/// macOS XATTR_CREATE (`<sys/xattr.h>`).
pub const DARWIN_XATTR_CREATE: i32 = 0x2;
/// macOS XATTR_REPLACE.
pub const DARWIN_XATTR_REPLACE: i32 = 0x4;

/// Translates setxattr flags.
pub fn set_flags(guest: u32) -> Result<i32> {
    if guest & !(LINUX_XATTR_CREATE | LINUX_XATTR_REPLACE) != 0 {
        return Err(Error::Invalid(linux::EINVAL));
    }
    let mut out = 0;
    if guest & LINUX_XATTR_CREATE != 0 {
        out |= DARWIN_XATTR_CREATE;
    }
    if guest & LINUX_XATTR_REPLACE != 0 {
        out |= DARWIN_XATTR_REPLACE;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn user_names_lose_their_prefix_on_the_host() {
        assert_eq!(
            host_name(b"user.com.apple.quarantine", Op::Get).unwrap(),
            b"com.apple.quarantine"
        );
        assert_eq!(host_name(b"user.", Op::Set), Err(Error::Invalid(22)));
    }

    #[test]
    fn other_namespaces_read_as_absent_and_refuse_writes() {
        assert_eq!(
            host_name(b"security.capability", Op::Get),
            Err(Error::Unsupported(61))
        );
        assert_eq!(
            host_name(b"system.posix_acl_access", Op::Remove),
            Err(Error::Unsupported(61))
        );
        assert_eq!(
            host_name(b"trusted.overlay.opaque", Op::Set),
            Err(Error::Unsupported(95))
        );
    }

    #[test]
    fn listing_puts_every_host_name_under_user() {
        assert_eq!(
            guest_list(b"a\0com.apple.x\0"),
            b"user.a\0user.com.apple.x\0".to_vec()
        );
        assert!(guest_list(b"").is_empty());
    }

    #[test]
    fn set_flags_translate() {
        assert_eq!(set_flags(0), Ok(0));
        assert_eq!(set_flags(1), Ok(DARWIN_XATTR_CREATE));
        assert_eq!(set_flags(2), Ok(DARWIN_XATTR_REPLACE));
        assert!(set_flags(4).is_err());
    }
}
