//! The virtio devices of a VM configuration, the same on every backend.
//!
//! Both the x86 KVM VMM (`vmm.rs`, Linux) and the arm64 Hypervisor.framework
//! machine (`vmm_hvf_run.rs`) take their virtio devices from
//! [`virtio_devices`], so a command line means the same devices on either.

use aivmm_devices::virtio::VirtioDevice;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::config::{BlockConfig, VmConfig};

/// Errors of device creation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A device could not be created.
    #[error("device {name}: {reason}")]
    Device {
        /// The device.
        name: String,
        /// Why.
        reason: String,
    },
    /// One image file is attached twice (by two names, or the same name twice).
    #[error(
        "{}: attach each image once (two opens of one image, one of them writable, \
         would corrupt it)",
        same_file(first, second)
    )]
    SameDisk {
        /// Where it is attached first.
        first: PathBuf,
        /// Where it is attached again.
        second: PathBuf,
    },
}

fn same_file(first: &std::path::Path, second: &std::path::Path) -> String {
    if first == second {
        format!("disk image {} is given twice", first.display())
    } else {
        format!("disk images {} and {} are the same file", first.display(), second.display())
    }
}

/// `Result` of device creation.
pub type Result<T> = std::result::Result<T, Error>;

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// Refuses an image attached twice unless both are read-only: the second
/// open's lock would conflict with the first's (which said "another process"),
/// and two writers would corrupt it. Files are compared by device and inode
/// from `stat` (which never blocks, unlike opening a FIFO); a path that cannot
/// be stat'ed is left for the device to report.
fn distinct_disks(disks: &[BlockConfig]) -> Result<()> {
    let mut seen: Vec<((u64, u64), &BlockConfig)> = Vec::new();
    for d in disks {
        let Ok(m) = std::fs::metadata(&d.path) else {
            continue;
        };
        let key = (m.dev(), m.ino());
        if let Some((_, first)) = seen
            .iter()
            .find(|(k, first)| *k == key && !(first.read_only && d.read_only))
        {
            return Err(Error::SameDisk {
                first: first.path.clone(),
                second: d.path.clone(),
            });
        }
        seen.push((key, d));
    }
    Ok(())
}

/// The virtio devices of a configuration, by name, and the handles the VMM keeps.
pub struct Devices {
    /// The devices, in the order they are placed.
    pub list: Vec<(String, Box<dyn VirtioDevice>)>,
    /// The balloon's handle, for the control socket.
    pub balloon: Option<aivmm_devices::virtio::balloon::BalloonHandle>,
}

/// Creates the virtio devices of `config`, in the order they are placed: disks
/// first (so the guest names them vda, vdb, … in `--disk` order), then shares,
/// network, vsock, rng and the balloon.
pub fn virtio_devices(config: &VmConfig) -> Result<Devices> {
    use aivmm_devices::virtio::{balloon, block, fs, rng};
    let mut out: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    distinct_disks(&config.disks)?;
    for d in &config.disks {
        let name = format!("virtio-blk {}", d.path.display());
        let dev = block::Block::new(d.clone()).map_err(|e| device_err(&name, e))?;
        out.push((name, Box::new(dev)));
    }
    for s in &config.shares {
        let name = format!("virtio-fs {}", s.root.display());
        out.push((
            name.clone(),
            Box::new(fs::Fs::new(s.clone()).map_err(|e| device_err(&name, e))?),
        ));
    }
    if config.net != crate::config::NetMode::None {
        use aivmm_devices::virtio::net;
        let forwards: Vec<net::PortForward> = config
            .forwards
            .iter()
            .map(|f| net::PortForward {
                host_port: f.host,
                guest_port: f.guest,
                udp: f.udp,
            })
            .collect();
        let backend = match &config.net {
            crate::config::NetMode::Tap(name) => net::BackendConfig::Tap { name: name.clone() },
            crate::config::NetMode::Unix(path) => {
                net::BackendConfig::UnixDgram { path: path.clone() }
            }
            crate::config::NetMode::Passt => net::BackendConfig::Passt { forwards },
            _ => net::BackendConfig::User {
                config: net::usernet::UserNetConfig {
                    forwards,
                    policy: config.net_policy.clone(),
                    limits: Default::default(),
                },
                // Under seccomp the gateway thread waits for its filter (vmm::run).
                gated: config.seccomp == crate::seccomp::SeccompMode::On
                    && cfg!(target_os = "linux"),
            },
        };
        let dev = net::Net::new(net::NetConfig { backend, mac: None })
            .map_err(|e| device_err("virtio-net", e))?;
        out.push(("virtio-net".into(), Box::new(dev)));
    }
    if let Some(v) = &config.vsock {
        use aivmm_devices::virtio::vsock;
        let dev = vsock::Vsock::new(v.clone()).map_err(|e| device_err("virtio-vsock", e))?;
        out.push(("virtio-vsock".into(), Box::new(dev)));
    }
    if config.rng {
        out.push(("virtio-rng".into(), Box::new(rng::Rng::new())));
    }
    let mut handle = None;
    if config.balloon {
        let (dev, h) = balloon::Balloon::new(config.memory).map_err(|e| device_err("virtio-balloon", e))?;
        out.push(("virtio-balloon".into(), Box::new(dev)));
        handle = Some(h);
    }
    Ok(Devices { list: out, balloon: handle })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn disk(path: &std::path::Path, read_only: bool) -> BlockConfig {
        crate::config::disk(path, read_only)
    }

    /// `--disk a.img --disk a.img`, or the same file by another name, is said to
    /// be one file before anything is opened or locked.
    #[test]
    fn an_image_attached_twice_is_named() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.img");
        let b = d.path().join("b.img");
        std::fs::write(&a, [0u8; 512]).unwrap();
        std::fs::write(&b, [0u8; 512]).unwrap();
        let link = d.path().join("link.img");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        // (Path equality ignores a "." component, so another name is a hard link.)
        let other_name = d.path().join("hard.img");
        std::fs::hard_link(&a, &other_name).unwrap();
        for (x, y) in [(&a, &a), (&a, &link), (&a, &other_name)] {
            for ro in [(false, false), (true, false), (false, true)] {
                let e = distinct_disks(&[disk(x, ro.0), disk(&b, false), disk(y, ro.1)]).unwrap_err();
                let msg = e.to_string();
                assert!(matches!(e, Error::SameDisk { .. }), "{msg}");
                assert!(msg.contains(&y.display().to_string()), "{msg}");
                let want = if x == y { "is given twice" } else { "are the same file" };
                assert!(msg.contains(want), "{msg}");
            }
        }
        // Read-only twice shares the image safely; different files are fine; a
        // missing file is left for the device's own error.
        distinct_disks(&[disk(&a, true), disk(&link, true)]).unwrap();
        distinct_disks(&[disk(&a, false), disk(&b, false)]).unwrap();
        let gone = d.path().join("gone.img");
        distinct_disks(&[disk(&gone, false), disk(&gone, false)]).unwrap();
    }
}
