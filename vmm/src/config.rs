//! The VM configuration: plain data, parsed once from the CLI and checked here.

use std::path::PathBuf;

/// Errors in a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Neither a workdir nor a kernel was given.
    #[error("nothing to run: give --workdir DIR to run the agent on a project, or --kernel PATH to boot a kernel")]
    NoKernel,
    /// A flag of `run --workdir` was given without --workdir.
    #[error("{0} needs --workdir (without it aivmm boots the kernel alone and would ignore it)")]
    NeedsWorkdir(&'static str),
    /// A size could not be parsed.
    #[error("bad size '{0}': use a number with an optional K, M, G or T suffix, e.g. 512M or 4G")]
    Size(String),
    /// Guest memory is outside the supported range.
    #[error("memory must be between {min} MiB and {max} GiB, not {got} bytes")]
    MemoryRange {
        /// Smallest allowed, in MiB.
        min: u64,
        /// Largest allowed, in GiB.
        max: u64,
        /// What was asked.
        got: u64,
    },
    /// The vCPU count is outside the supported range.
    #[error("cpus must be between 1 and {max}, not {got}")]
    Cpus {
        /// Largest allowed.
        max: u32,
        /// What was asked.
        got: u32,
    },
    /// A `--disk` value could not be parsed.
    #[error("bad --disk '{0}': use PATH or PATH:ro")]
    Disk(String),
    /// A `--share` value could not be parsed.
    #[error(
        "bad --share '{0}': use HOST_DIR:TAG or HOST_DIR:TAG:ro (TAG is 1 to 36 bytes, no ':')"
    )]
    Share(String),
    /// A `--net` value could not be parsed.
    #[error("bad --net '{0}': use none, user, passt, tap:NAME or unix:PATH")]
    Net(String),
    /// A `--forward` value could not be parsed.
    #[error("bad --forward '{0}': use HOSTPORT:GUESTPORT, optionally with /udp (ports 1-65535)")]
    Forward(String),
    /// Port forwards need user-mode networking.
    #[error("--forward needs user-mode networking (--net user or --net passt)")]
    ForwardNeedsUser,
    /// An egress rule was given without aivmm's own user-mode network.
    #[error("--net-allow and --net-allow-only need aivmm's user-mode network (--net user)")]
    PolicyNeedsUser,
    /// An egress rule is malformed.
    #[error("{0}")]
    Policy(String),
    /// The vsock guest CID is reserved or does not fit.
    #[error("the vsock guest CID must be between 3 and 4294967294, not {0}")]
    VsockCid(u64),
    /// The kernel command line is longer than Linux takes.
    #[error("the kernel command line is {0} bytes; Linux takes at most {MAX_CMDLINE_LEN}")]
    CmdlineTooLong(usize),
    /// The persistent disk size is out of range.
    #[error("--disk-size must be between {min} MiB and {max} TiB, not {0} bytes", min = MIN_DISK_SIZE >> 20, max = MAX_DISK_SIZE >> 40)]
    DiskSize(u64),
    /// Two shares use one tag.
    #[error("the share tag '{0}' is used twice")]
    DuplicateTag(String),
    /// A share is at or under a read-write share's directory.
    #[error(
        "the share {} is inside the read-write share {}: the guest could replace it with a \
         link to anywhere before aivmm opens it; share only one of them",
        inner.display(),
        outer.display()
    )]
    NestedShare {
        /// The share inside.
        inner: PathBuf,
        /// The read-write share around it.
        outer: PathBuf,
    },
    /// More devices than interrupt lines.
    #[error("too many devices: at most {0} disks, shares and other virtio devices together")]
    TooManyDevices(usize),
    /// Without ACPI there is no way to describe more than one CPU.
    #[error("--no-acpi supports one vCPU only: aivmm describes CPUs to the guest through ACPI")]
    SmpNeedsAcpi,
    /// Two `--forward`s bind one host port.
    #[error("--forward: host port {0}/{1} is forwarded twice")]
    DuplicateForward(u16, &'static str),
}

/// `Result` of configuration checks.
pub type Result<T> = std::result::Result<T, Error>;

/// The smallest guest, in MiB.
pub const MIN_MEMORY_MIB: u64 = 32;
/// The largest guest, in GiB.
pub const MAX_MEMORY_GIB: u64 = 1024;
/// The most vCPUs (the IOAPIC/xAPIC id space, less the IOAPIC's own id).
pub const MAX_CPUS: u32 = 254;

/// The longest kernel command line (x86 `COMMAND_LINE_SIZE` less the NUL); the
/// kernel would cut a longer one short without a word.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// The smallest persistent workdir disk (the guest formats it ext4).
pub const MIN_DISK_SIZE: u64 = 64 << 20;
/// The largest persistent workdir disk (it is sparse, but ext4 has limits too).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Checks a `--disk-size` (or `disk_size` setting).
pub fn check_disk_size(size: u64) -> Result<u64> {
    if (MIN_DISK_SIZE..=MAX_DISK_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(Error::DiskSize(size))
    }
}

/// The most virtio devices: one interrupt line each, GSIs 5 to 22 (23 is the
/// power button's).
pub const MAX_VIRTIO_DEVICES: usize = 18;

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// The initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Describe the platform with ACPI tables (otherwise devices go on the command line).
    pub acpi: bool,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// Attach a virtio-balloon device (free page reporting, `aivmm balloon`).
    pub balloon: bool,
    /// Block devices, in the order the guest sees them (vda, vdb, …).
    pub disks: Vec<BlockConfig>,
    /// Shared host directories (virtio-fs).
    pub shares: Vec<FsConfig>,
    /// The network card, if any.
    pub net: NetMode,
    /// The egress policy of `--net user`.
    pub net_policy: aivmm_devices::virtio::net::usernet::PolicyConfig,
    /// Host ports forwarded into the guest (user-mode networking).
    pub forwards: Vec<Forward>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Seccomp filters on every thread (off only for debugging).
    pub seccomp: crate::seccomp::SeccompMode,
    /// Landlock on the device threads (off only for debugging).
    pub landlock: crate::landlock::LandlockMode,
    /// Where a bzImage's unpacked vmlinux is cached, so the guest boots without
    /// its decompressor ([`crate::arch::x86_64::vmlinux`]); `None` boots the bzImage.
    pub kernel_cache: Option<PathBuf>,
}

/// The network backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetMode {
    /// No network card.
    #[default]
    None,
    /// aivmm's own user-mode network (in-process): DHCP, DNS, outbound NAT
    /// under an egress policy, no root, no helper process.
    User,
    /// User-mode networking through a passt child process (Linux).
    Passt,
    /// A TAP interface (needs CAP_NET_ADMIN or a TAP owned by the user).
    Tap(String),
    /// A unix datagram socket, one frame per datagram (gvproxy, vmnet-helper).
    Unix(PathBuf),
}

/// Parses `none`, `user`, `tap:NAME` or `unix:PATH`.
pub fn parse_net(s: &str) -> Result<NetMode> {
    match s {
        "none" => Ok(NetMode::None),
        "user" => Ok(NetMode::User),
        "passt" => Ok(NetMode::Passt),
        _ => match s.split_once(':') {
            Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                Ok(NetMode::Tap(name.into()))
            }
            Some(("unix", path)) if !path.is_empty() => Ok(NetMode::Unix(path.into())),
            _ => Err(Error::Net(s.to_string())),
        },
    }
}

/// A host port forwarded to a guest port, bound on 127.0.0.1 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    /// The port on the host's loopback.
    pub host: u16,
    /// The port in the guest.
    pub guest: u16,
    /// UDP instead of TCP.
    pub udp: bool,
}

/// Parses `HOSTPORT:GUESTPORT[/udp|/tcp]`.
pub fn parse_forward(s: &str) -> Result<Forward> {
    let err = || Error::Forward(s.to_string());
    let (ports, udp) = match s.rsplit_once('/') {
        Some((p, "udp")) => (p, true),
        Some((p, "tcp")) => (p, false),
        Some(_) => return Err(err()),
        None => (s, false),
    };
    let (h, g) = ports.split_once(':').ok_or_else(err)?;
    let port = |p: &str| p.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(err);
    Ok(Forward {
        host: port(h)?,
        guest: port(g)?,
        udp,
    })
}

// The devices' own configurations: a VmConfig holds them as the devices take them.
pub use aivmm_devices::virtio::block::BlockConfig;
pub use aivmm_devices::virtio::fs::FsConfig;
pub use aivmm_devices::virtio::vsock::VsockConfig;

/// The guest CID aivmm uses unless told otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// How much the guest kernel may cache of a shared directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FsCache {
    /// No caching: every access goes to the host; always coherent with host-side changes.
    None,
    /// Cache for a short time (about a second) and revalidate on open.
    #[default]
    Auto,
    /// Cache without expiry: fastest, for shares nobody changes on the host meanwhile.
    Always,
}

impl From<FsCache> for aivmm_devices::virtio::fs::CachePolicy {
    fn from(c: FsCache) -> Self {
        match c {
            FsCache::None => Self::None,
            FsCache::Auto => Self::Auto,
            FsCache::Always => Self::Always,
        }
    }
}

/// A share of host directory `root` under `tag`: read-only or not, with the
/// guest's `cache`, and the device's defaults for the rest (`protect_workdir`
/// only for the workdir's own share).
pub fn share(root: impl Into<PathBuf>, tag: impl Into<String>, read_only: bool, cache: FsCache) -> FsConfig {
    FsConfig {
        read_only,
        cache: cache.into(),
        ..FsConfig::new(root, tag)
    }
}

/// A disk image, read-only or not.
pub fn disk(path: impl Into<PathBuf>, read_only: bool) -> BlockConfig {
    BlockConfig {
        path: path.into(),
        read_only,
        id: None,
    }
}

/// Refuses a share at or under a read-write share's directory: the guest can put
/// anything at that path (a symlink to the user's home, say), and the next run
/// would share what it names. Paths are compared resolved; one that does not
/// resolve is left to the device, which reports it.
fn check_nesting(shares: &[FsConfig]) -> Result<()> {
    let resolved: Vec<_> = shares
        .iter()
        .map(|s| (s, std::fs::canonicalize(&s.root).ok()))
        .collect();
    for (i, (outer, outer_path)) in resolved.iter().enumerate() {
        let Some(outer_path) = outer_path.as_ref().filter(|_| !outer.read_only) else {
            continue;
        };
        for (j, (inner, inner_path)) in resolved.iter().enumerate() {
            if i != j
                && inner_path
                    .as_ref()
                    .is_some_and(|p| p.starts_with(outer_path))
            {
                return Err(Error::NestedShare {
                    inner: inner.root.clone(),
                    outer: outer.root.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Longest virtio-fs tag (the config-space field).
pub const MAX_TAG_LEN: usize = 36;

/// Splits an optional `:ro` or `:rw` suffix off `s`.
fn split_mode(s: &str) -> (&str, bool) {
    if let Some(rest) = s.strip_suffix(":ro") {
        (rest, true)
    } else if let Some(rest) = s.strip_suffix(":rw") {
        (rest, false)
    } else {
        (s, false)
    }
}

/// Parses `PATH[:ro]`.
pub fn parse_disk(s: &str) -> Result<BlockConfig> {
    let (path, read_only) = split_mode(s);
    if path.is_empty() {
        return Err(Error::Disk(s.to_string()));
    }
    Ok(disk(path, read_only))
}

/// Parses `HOST_DIR:TAG[:ro]`.
pub fn parse_share(s: &str, cache: FsCache) -> Result<FsConfig> {
    let (rest, read_only) = split_mode(s);
    let (path, tag) = rest
        .rsplit_once(':')
        .ok_or_else(|| Error::Share(s.to_string()))?;
    if path.is_empty() || tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
        return Err(Error::Share(s.to_string()));
    }
    Ok(share(path, tag, read_only, cache))
}

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 pci=off";

/// Checks a VM's vCPU count and memory size against aivmm's limits.
pub fn check_size(cpus: u32, memory: u64) -> Result<()> {
    if !(1..=MAX_CPUS).contains(&cpus) {
        return Err(Error::Cpus {
            max: MAX_CPUS,
            got: cpus,
        });
    }
    if !(MIN_MEMORY_MIB << 20..=MAX_MEMORY_GIB << 30).contains(&memory) {
        return Err(Error::MemoryRange {
            min: MIN_MEMORY_MIB,
            max: MAX_MEMORY_GIB,
            got: memory,
        });
    }
    Ok(())
}

impl VmConfig {
    /// Checks the values that the CLI parser cannot.
    pub fn validate(&self) -> Result<()> {
        check_size(self.cpus, self.memory)?;
        let mut tags: Vec<&str> = self.shares.iter().map(|s| s.tag.as_str()).collect();
        tags.sort_unstable();
        if let Some(w) = tags.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::DuplicateTag(w[0].to_string()));
        }
        check_nesting(&self.shares)?;
        let devices = self.disks.len()
            + self.shares.len()
            + usize::from(self.rng)
            + usize::from(self.balloon)
            + usize::from(self.net != NetMode::None)
            + usize::from(self.vsock.is_some());
        if devices > MAX_VIRTIO_DEVICES {
            return Err(Error::TooManyDevices(MAX_VIRTIO_DEVICES));
        }
        if !self.forwards.is_empty() && !matches!(self.net, NetMode::User | NetMode::Passt) {
            return Err(Error::ForwardNeedsUser);
        }
        let policy = &self.net_policy;
        if (!policy.allow.is_empty() || policy.allow_only.is_some()) && self.net != NetMode::User {
            return Err(Error::PolicyNeedsUser);
        }
        // The helper would refuse the second bind and leave the guest without network.
        let mut ports: Vec<(u16, bool)> = self.forwards.iter().map(|f| (f.host, f.udp)).collect();
        ports.sort_unstable();
        if let Some(w) = ports.windows(2).find(|w| w[0] == w[1]) {
            let proto = if w[0].1 { "udp" } else { "tcp" };
            return Err(Error::DuplicateForward(w[0].0, proto));
        }
        if let Some(v) = &self.vsock {
            // 0-2 are the hypervisor, local and host; u32::MAX is VMADDR_CID_ANY.
            if v.guest_cid < 3 || v.guest_cid >= u64::from(u32::MAX) {
                return Err(Error::VsockCid(v.guest_cid));
            }
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(Error::CmdlineTooLong(self.cmdline.len()));
        }
        if !self.acpi && self.cpus > 1 {
            return Err(Error::SmpNeedsAcpi);
        }
        Ok(())
    }
}

/// The vmlinux cache directory, `<cache root>/kernels`, when `enabled` and there
/// is a cache directory; otherwise `None` (the bzImage boots as it is). Only x86
/// kernels come as bzImages, so other hosts get `None`.
pub fn kernel_cache_dir(enabled: bool) -> Option<PathBuf> {
    if !enabled || !cfg!(target_arch = "x86_64") {
        return None;
    }
    crate::image::cache_root().ok().map(|d| d.join("kernels"))
}

/// Formats a size the way [`parse_size`] and the kernel's `memparse` read it:
/// `4G`, `1M`, `4K`, or bytes.
pub fn format_size(len: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (unit, suffix) in UNITS {
        if len >= unit && len % unit == 0 {
            return format!("{}{suffix}", len / unit);
        }
    }
    len.to_string()
}

/// Parses a size such as `4G`, `512M`, `65536K` or `1073741824`; a bare number is
/// in bytes. Suffixes are binary (`G` = GiB) and may be followed by `iB` or `B`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let err = || Error::Size(s.to_string());
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (body, 0),
        _ => return Err(err()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory: 128 << 20,
            acpi: true,
            rng: true,
            balloon: true,
            disks: vec![],
            shares: vec![],
            net: NetMode::None,
            net_policy: Default::default(),
            forwards: vec![],
            vsock: None,
            seccomp: crate::seccomp::SeccompMode::On,
            landlock: crate::landlock::LandlockMode::On,
            kernel_cache: None,
        }
    }

    #[test]
    fn net_forward_and_vsock() {
        assert_eq!(parse_net("none"), Ok(NetMode::None));
        assert_eq!(parse_net("user"), Ok(NetMode::User));
        assert_eq!(parse_net("tap:tap0"), Ok(NetMode::Tap("tap0".into())));
        assert_eq!(
            parse_net("unix:/run/gv.sock"),
            Ok(NetMode::Unix("/run/gv.sock".into()))
        );
        for bad in ["", "tap:", "tap:waytoolongname01", "slirp", "unix:"] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_forward("2222:22"),
            Ok(Forward {
                host: 2222,
                guest: 22,
                udp: false
            })
        );
        assert_eq!(
            parse_forward("5353:53/udp"),
            Ok(Forward {
                host: 5353,
                guest: 53,
                udp: true
            })
        );
        for bad in ["22", "0:22", "22:0", "70000:22", "a:b", "1:2/sctp", ":22"] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
        let fwd = vec![parse_forward("2222:22").unwrap()];
        assert_eq!(
            VmConfig {
                forwards: fwd.clone(),
                ..cfg()
            }
            .validate(),
            Err(Error::ForwardNeedsUser)
        );
        assert_eq!(
            VmConfig {
                forwards: fwd,
                net: NetMode::User,
                ..cfg()
            }
            .validate(),
            Ok(())
        );
        let fwds = |list: &[&str]| VmConfig {
            forwards: list.iter().map(|f| parse_forward(f).unwrap()).collect(),
            net: NetMode::User,
            ..cfg()
        };
        assert_eq!(
            fwds(&["2222:22", "2222:23"]).validate(),
            Err(Error::DuplicateForward(2222, "tcp"))
        );
        assert_eq!(fwds(&["53:53/udp", "53:53"]).validate(), Ok(()));
        assert_eq!(
            fwds(&["53:53/udp", "53:54/udp"]).validate(),
            Err(Error::DuplicateForward(53, "udp"))
        );
        let v = |cid| {
            Some(VsockConfig {
                guest_cid: cid,
                uds_path: "/tmp/v".into(),
            })
        };
        assert_eq!(
            VmConfig {
                vsock: v(2),
                ..cfg()
            }
            .validate(),
            Err(Error::VsockCid(2))
        );
        assert_eq!(
            VmConfig {
                vsock: v(3),
                ..cfg()
            }
            .validate(),
            Ok(())
        );
        for bad in [u64::from(u32::MAX), 1 << 40] {
            assert_eq!(
                VmConfig {
                    vsock: v(bad),
                    ..cfg()
                }
                .validate(),
                Err(Error::VsockCid(bad))
            );
        }
    }

    /// A share at or under a read-write share's directory is refused, whichever
    /// comes first and however it is spelt; under a read-only share it is fine.
    #[test]
    fn shares_inside_read_write_shares_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(work.join("sub/deeper")).unwrap();
        std::fs::create_dir(&other).unwrap();
        std::os::unix::fs::symlink(work.join("sub"), other.join("link")).unwrap();
        let share = |path: &std::path::Path, tag: &str, read_only: bool| share(path, tag, read_only, FsCache::Auto);
        let check = |shares: Vec<FsConfig>| VmConfig { shares, ..cfg() }.validate();
        let nested = |inner: &std::path::Path, outer: &std::path::Path| {
            Err(Error::NestedShare {
                inner: inner.to_path_buf(),
                outer: outer.to_path_buf(),
            })
        };
        let sub = work.join("sub");
        let dotted = work.join("sub/deeper/..");
        for ro in [true, false] {
            assert_eq!(
                check(vec![share(&work, "work", false), share(&sub, "s", ro)]),
                nested(&sub, &work)
            );
            assert_eq!(
                check(vec![share(&sub, "s", ro), share(&work, "work", false)]),
                nested(&sub, &work)
            );
            assert_eq!(
                check(vec![share(&work, "work", false), share(&dotted, "s", ro)]),
                nested(&dotted, &work)
            );
            let link = other.join("link");
            assert_eq!(
                check(vec![share(&work, "work", false), share(&link, "s", ro)]),
                nested(&link, &work)
            );
            assert_eq!(
                check(vec![share(&work, "work", false), share(&work, "w2", ro)]),
                nested(&work, &work)
            );
            // Under a read-only share, or beside a read-write one, is fine.
            assert_eq!(
                check(vec![share(&work, "work", true), share(&sub, "s", ro)]),
                Ok(())
            );
            assert_eq!(
                check(vec![share(&work, "work", false), share(&other, "o", ro)]),
                Ok(())
            );
        }
        let msg = check(vec![share(&work, "work", false), share(&sub, "s", true)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&*sub.to_string_lossy()) && msg.contains(&*work.to_string_lossy()),
            "{msg}"
        );
    }

    #[test]
    fn disks_and_shares() {
        assert_eq!(
            parse_disk("a.img"),
            Ok(BlockConfig {
                path: "a.img".into(),
                read_only: false,
                id: None
            })
        );
        assert_eq!(
            parse_disk("/x/a:b.img:ro"),
            Ok(BlockConfig {
                path: "/x/a:b.img".into(),
                read_only: true,
                id: None
            })
        );
        assert!(parse_disk(":ro").is_err());
        let s = parse_share("/src:work", FsCache::Auto).unwrap();
        assert_eq!(
            (s.root, s.tag.as_str(), s.read_only),
            ("/src".into(), "work", false)
        );
        let s = parse_share("/a:b:tag:ro", FsCache::None).unwrap();
        assert_eq!(
            (s.root, s.tag.as_str(), s.read_only, s.cache),
            ("/a:b".into(), "tag", true, aivmm_devices::virtio::fs::CachePolicy::None)
        );
        for bad in [
            "/src",
            ":tag",
            "/src:",
            "/src::ro",
            &format!("/s:{}", "t".repeat(37)),
        ] {
            assert!(parse_share(bad, FsCache::Auto).is_err(), "{bad}");
        }
        let share = |tag: &str| parse_share(&format!("/d:{tag}"), FsCache::Auto).unwrap();
        let c = VmConfig {
            shares: vec![share("a"), share("b"), share("a")],
            ..cfg()
        };
        assert_eq!(c.validate(), Err(Error::DuplicateTag("a".into())));
        let c = VmConfig {
            shares: vec![share("a"), share("b")],
            ..cfg()
        };
        assert_eq!(
            c.validate(),
            Ok(()),
            "paths that do not resolve are the device's"
        );
        let c = VmConfig {
            disks: vec![parse_disk("d").unwrap(); 19],
            ..cfg()
        };
        assert_eq!(c.validate(), Err(Error::TooManyDevices(MAX_VIRTIO_DEVICES)));
    }

    #[test]
    fn cmdline_and_disk_size_limits() {
        let long = "a".repeat(MAX_CMDLINE_LEN + 1);
        assert_eq!(
            VmConfig {
                cmdline: long,
                ..cfg()
            }
            .validate(),
            Err(Error::CmdlineTooLong(MAX_CMDLINE_LEN + 1))
        );
        let fits = "a".repeat(MAX_CMDLINE_LEN);
        assert_eq!(
            VmConfig {
                cmdline: fits,
                ..cfg()
            }
            .validate(),
            Ok(())
        );
        assert_eq!(check_disk_size(16 << 30), Ok(16 << 30));
        for bad in [0, 1, (64 << 20) - 1, (64 << 40) + 1, u64::MAX] {
            assert_eq!(check_disk_size(bad), Err(Error::DiskSize(bad)));
        }
        assert!(Error::DiskSize(0).to_string().contains("between 64 MiB and 64 TiB"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in [
            "",
            "G",
            "-1G",
            "1.5G",
            "4X",
            "99999999999999999999G",
            "20000000000T",
            "4 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation() {
        assert_eq!(cfg().validate(), Ok(()));
        assert!(matches!(
            VmConfig { cpus: 0, ..cfg() }.validate(),
            Err(Error::Cpus { .. })
        ));
        assert!(matches!(
            VmConfig { cpus: 255, ..cfg() }.validate(),
            Err(Error::Cpus { .. })
        ));
        assert!(matches!(
            VmConfig {
                memory: 1 << 20,
                ..cfg()
            }
            .validate(),
            Err(Error::MemoryRange { .. })
        ));
        assert!(matches!(
            VmConfig {
                memory: 2 << 40,
                ..cfg()
            }
            .validate(),
            Err(Error::MemoryRange { .. })
        ));
        assert_eq!(
            VmConfig {
                cpus: 2,
                acpi: false,
                ..cfg()
            }
            .validate(),
            Err(Error::SmpNeedsAcpi)
        );
        assert_eq!(
            VmConfig {
                cpus: 254,
                memory: 16 << 30,
                ..cfg()
            }
            .validate(),
            Ok(())
        );
    }
}
