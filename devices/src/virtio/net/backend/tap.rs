//! A TAP interface: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
//!
//! Each read or write is one frame preceded by a 12-byte `virtio_net_hdr_v1`
//! (TUNSETVNETHDRSZ), the same header the guest uses, so frames pass through
//! untouched and the guest can use checksum offload and TSO. TUNSETOFFLOAD tells
//! the kernel which of those the guest accepted, so the tap only hands us frames
//! the guest can take.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

use super::{is_would_block, Backend};
use crate::virtio::net::{Error, Result, VNET_HDR_LEN};

/// The clone device.
const TUN_PATH: &str = "/dev/net/tun";
/// IFNAMSIZ, with the terminating NUL.
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF uses it: the name, the flags, and the union's padding.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or, with CAP_NET_ADMIN, creates) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self> {
        let bad_name = || Error::TapName {
            name: name.to_string(),
        };
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(bad_name());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => Error::TunMissing,
                io::ErrorKind::PermissionDenied => Error::TapPermission {
                    name: name.to_string(),
                },
                _ => Error::Tap {
                    name: name.to_string(),
                    what: "open /dev/net/tun",
                    source,
                },
            })?;
        let mut ifr = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `IfReq` has its
        // layout and size (40 bytes) and lives for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if r < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => Error::TapPermission {
                    name: name.to_string(),
                },
                Some(libc::EBUSY) => Error::TapBusy {
                    name: name.to_string(),
                },
                _ => Error::Tap {
                    name: name.to_string(),
                    what: "TUNSETIFF",
                    source,
                },
            });
        }
        let len = ifr.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let actual = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the pointer, which is live.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(Error::Tap {
                name: actual,
                what: "TUNSETVNETHDRSZ",
                source: io::Error::last_os_error(),
            });
        }
        let mut tap = Self { file, name: actual };
        tap.set_offloads(0).map_err(|source| Error::Tap {
            name: tap.name.clone(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface name the kernel gave (with `%d` resolved).
    pub fn if_name(&self) -> &str {
        &self.name
    }
}

/// The TUN_F_* flags matching the guest's receive offloads.
pub fn tun_offload_flags(acked: u64) -> libc::c_uint {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // The kernel only segments for us if we take partial checksums.
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl Backend for Tap {
    fn name(&self) -> &'static str {
        "tap"
    }

    fn vnet_hdr_len(&self) -> usize {
        VNET_HDR_LEN
    }

    fn offload_features(&self) -> u64 {
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]
        .iter()
        .fold(0, |f, &b| f | (1u64 << b))
    }

    fn set_offloads(&mut self, acked_features: u64) -> io::Result<()> {
        let flags = tun_offload_flags(acked_features);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match (&self.file).write(frame) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_would_block(&e) => return Ok(false),
                // A frame the kernel refuses (bad GSO header, interface down) is dropped.
                Err(e)
                    if e.raw_os_error() == Some(libc::EINVAL)
                        || e.raw_os_error() == Some(libc::EIO) =>
                {
                    log::debug!("virtio-net: tap {} dropped a frame: {e}", self.name);
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_would_block(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a-very-long-interface-name", "nul\0"] {
            assert!(matches!(Tap::open(n), Err(Error::TapName { .. })), "{n:?}");
        }
    }

    #[test]
    fn offload_flags_follow_the_guest() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |a, &b| a | (1 << b));
        assert_eq!(tun_offload_flags(0), 0);
        assert_eq!(tun_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tun_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
    }

    #[test]
    fn open_a_tap_if_allowed() {
        match Tap::open("aivmmt%d") {
            Ok(mut t) => {
                assert!(t.if_name().starts_with("aivmmt"));
                assert_eq!(t.vnet_hdr_len(), VNET_HDR_LEN);
                let all = t.offload_features();
                t.set_offloads(all).unwrap();
                // Nothing to read on a fresh, down interface.
                let mut buf = [0u8; 128];
                assert_eq!(t.recv(&mut buf).unwrap(), None);
            }
            // Without CAP_NET_ADMIN or /dev/net/tun the error must say so.
            Err(e @ (Error::TapPermission { .. } | Error::TunMissing)) => {
                assert!(e.to_string().contains("tap") || e.to_string().contains("tun"));
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}
