//! The virtio devices of a VM configuration, the same on every backend.
//!
//! Both the x86 KVM VMM (`vmm.rs`, Linux) and the arm64 Hypervisor.framework
//! machine (`vmm_hvf_run.rs`) take their virtio devices from
//! [`virtio_devices`], so a command line means the same devices on either.

use aivmm_devices::virtio::VirtioDevice;

use crate::config::VmConfig;

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
}

/// `Result` of device creation.
pub type Result<T> = std::result::Result<T, Error>;

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// Creates the virtio devices of `config`, in the order they are placed: disks
/// first (so the guest names them vda, vdb, … in `--disk` order), then shares, then rng.
pub fn virtio_devices(config: &VmConfig) -> Result<Vec<(String, Box<dyn VirtioDevice>)>> {
    use aivmm_devices::virtio::{block, fs, rng};
    let mut out: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for d in &config.disks {
        let name = format!("virtio-blk {}", d.path.display());
        let dev = block::Block::new(block::BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            id: None,
        })
        .map_err(|e| device_err(&name, e))?;
        out.push((name, Box::new(dev)));
    }
    for s in &config.shares {
        let name = format!("virtio-fs {}", s.path.display());
        let cache = match s.cache {
            crate::config::FsCache::None => fs::CachePolicy::None,
            crate::config::FsCache::Auto => fs::CachePolicy::Auto,
            crate::config::FsCache::Always => fs::CachePolicy::Always,
        };
        let cfg = fs::FsConfig {
            read_only: s.read_only,
            cache,
            ..fs::FsConfig::new(&s.path, &s.tag)
        };
        out.push((
            name.clone(),
            Box::new(fs::Fs::new(cfg).map_err(|e| device_err(&name, e))?),
        ));
    }
    if config.net != crate::config::NetMode::None {
        use aivmm_devices::virtio::net;
        let backend = match &config.net {
            crate::config::NetMode::Tap(name) => net::BackendConfig::Tap { name: name.clone() },
            crate::config::NetMode::Unix(path) => {
                net::BackendConfig::UnixDgram { path: path.clone() }
            }
            _ => net::BackendConfig::Passt {
                forwards: config
                    .forwards
                    .iter()
                    .map(|f| net::PortForward {
                        host_port: f.host,
                        guest_port: f.guest,
                        udp: f.udp,
                    })
                    .collect(),
            },
        };
        let dev = net::Net::new(net::NetConfig { backend, mac: None })
            .map_err(|e| device_err("virtio-net", e))?;
        out.push(("virtio-net".into(), Box::new(dev)));
    }
    if let Some(v) = &config.vsock {
        use aivmm_devices::virtio::vsock;
        let dev = vsock::Vsock::new(vsock::VsockConfig {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        })
        .map_err(|e| device_err("virtio-vsock", e))?;
        out.push(("virtio-vsock".into(), Box::new(dev)));
    }
    if config.rng {
        out.push(("virtio-rng".into(), Box::new(rng::Rng::new())));
    }
    Ok(out)
}
