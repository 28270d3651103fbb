//! The command line: `aivmm run …`, parsed with clap into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, VmConfig};

/// aivmm: run an AI coding agent in a real VM.
#[derive(Debug, Parser)]
#[command(name = "aivmm", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command (by default `claude`) in a VM on a work directory, or boot a
    /// kernel of your own with its serial console on this terminal.
    ///
    /// `aivmm run --workdir DIR [-- COMMAND…]` boots the default guest with DIR at
    /// /work and attaches this terminal to COMMAND; aivmm exits with its status.
    /// `aivmm run --kernel K …` boots K with the guest's serial console here
    /// (Ctrl-A x stops the VM).
    Run(RunArgs),
    /// Build (or rebuild) the default Debian-based guest image into the cache.
    Image {
        /// What to do with the image.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// List running VMs: workdir, pid, uptime, forwarded ports.
    Ps,
    /// Stop the VM running on a workdir (or with that pid): SIGTERM, then SIGKILL
    /// after a timeout.
    Stop {
        /// The workdir or the pid of the aivmm process.
        target: String,
        /// Seconds to wait before killing it.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

/// `aivmm image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest image (cached: only missing or changed parts are redone).
    Build {
        /// Leave Claude Code out (about 381 MB less; for tests).
        #[arg(long)]
        no_claude: bool,
        /// Extra Debian packages for the root filesystem.
        #[arg(long, value_name = "PKG")]
        package: Vec<String>,
        /// Rebuild even if the image exists.
        #[arg(long)]
        force: bool,
        /// Build into this directory instead of the cache.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

/// Arguments of `aivmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The project directory: shared read-write at /work, where the command runs.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Kernel image: an x86_64 ELF vmlinux or a bzImage (default with --workdir:
    /// the guest image's).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// With --workdir: the guest's root filesystem image (default: the guest image's).
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Kernel command line [default: console=ttyS0 reboot=acpi panic=-1 pci=off, or the
    /// guest image's with --workdir].
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Number of vCPUs [default: 4 with --workdir, else 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory, e.g. 512M or 4G [default: 4G with --workdir, else 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub memory: Option<u64>,
    /// With --workdir: size of the persistent per-workdir disk (sparse) [default: 16G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub disk_size: Option<u64>,
    /// With --workdir: pass an environment variable to the command (NAME takes its
    /// value from this environment). Sent over vsock, never on the kernel command line.
    #[arg(long, value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// With --workdir: seconds to wait for the guest agent.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub agent_timeout: u64,
    /// With --workdir: the command to run in /work [default: claude].
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    /// Describe devices on the kernel command line (`virtio_mmio.device=`) instead of ACPI.
    #[arg(long)]
    pub no_acpi: bool,
    /// Do not attach the virtio-rng device.
    #[arg(long)]
    pub no_rng: bool,
    /// Attach a raw disk image as virtio-blk (vda, vdb, … in order); `:ro` for read-only.
    #[arg(long, value_name = "PATH[:ro]")]
    pub disk: Vec<String>,
    /// Share a host directory over virtio-fs; the guest mounts it with
    /// `mount -t virtiofs TAG DIR`. `:ro` makes it read-only.
    #[arg(long, value_name = "HOST_DIR:TAG[:ro]")]
    pub share: Vec<String>,
    /// Network: none, user (passt: DHCP, DNS and NAT, no root), tap:NAME, or unix:PATH
    /// (a unix datagram socket such as gvproxy's).
    #[arg(long, value_name = "MODE", value_parser = parse_net_arg)]
    pub net: Option<config::NetMode>,
    /// Forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (with --net user); add /udp for UDP.
    #[arg(long, value_name = "HOSTPORT:GUESTPORT[/udp]", value_parser = parse_forward_arg)]
    pub forward: Vec<config::Forward>,
    /// Attach virtio-vsock with its host side at this unix socket: host programs connect
    /// to PATH and send `CONNECT <port>\n`; guest connections to CID 2 port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, value_name = "CID", default_value_t = config::DEFAULT_GUEST_CID)]
    pub vsock_cid: u64,
    /// How much the guest may cache of shared directories.
    #[arg(long, value_enum, default_value_t = config::FsCache::Auto)]
    pub fs_cache: config::FsCache,
}

fn parse_net_arg(s: &str) -> Result<config::NetMode, String> {
    config::parse_net(s).map_err(|e| e.to_string())
}

fn parse_forward_arg(s: &str) -> Result<config::Forward, String> {
    config::parse_forward(s).map_err(|e| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

impl TryFrom<&RunArgs> for VmConfig {
    type Error = config::Error;

    /// The VM of `aivmm run --kernel …` (without --workdir).
    fn try_from(a: &RunArgs) -> Result<Self, Self::Error> {
        let kernel = a.kernel.clone().ok_or(config::Error::NoKernel)?;
        let c = VmConfig {
            kernel,
            initrd: a.initrd.clone(),
            cmdline: a
                .cmdline
                .clone()
                .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string()),
            cpus: a.cpus.unwrap_or(1),
            memory: a.memory.unwrap_or(512 << 20),
            acpi: !a.no_acpi,
            rng: !a.no_rng,
            disks: a
                .disk
                .iter()
                .map(|d| config::parse_disk(d))
                .collect::<Result<_, _>>()?,
            shares: a
                .share
                .iter()
                .map(|s| config::parse_share(s, a.fs_cache))
                .collect::<Result<_, _>>()?,
            net: a.net.clone().unwrap_or_default(),
            forwards: a.forward.clone(),
            vsock: a.vsock.as_ref().map(|p| config::VsockConfig {
                guest_cid: a.vsock_cid,
                uds_path: p.clone(),
            }),
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let Command::Run(r) = cli.command else {
            return Err("not run".into());
        };
        VmConfig::try_from(&r).map_err(|e| e.to_string())
    }

    #[test]
    fn run_args_become_a_config() {
        let c = run(&[
            "aivmm", "run", "--kernel", "k", "--initrd", "i", "--cpus", "4", "--memory", "2G",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!((c.cpus, c.memory, c.acpi, c.rng), (4, 2 << 30, true, true));
        assert_eq!(c.cmdline, config::DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_args_are_refused() {
        assert!(run(&["aivmm", "run"]).unwrap_err().contains("--workdir"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--memory", "lots"])
            .unwrap_err()
            .contains("bad size"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--cpus", "0"])
            .unwrap_err()
            .contains("cpus"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--memory", "1M"])
            .unwrap_err()
            .contains("memory"));
    }
}
