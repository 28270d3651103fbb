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
    /// Boot a VM. The guest's serial console is attached to this terminal; the
    /// VM stops when the guest powers off. Press Ctrl-A then x to stop it at once.
    Run(RunArgs),
}

/// Arguments of `aivmm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: an x86_64 ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT", default_value = config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory, e.g. 512M or 4G.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size_arg)]
    pub memory: u64,
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
    #[arg(long, value_name = "MODE", default_value = "none", value_parser = parse_net_arg)]
    pub net: config::NetMode,
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

    fn try_from(a: &RunArgs) -> Result<Self, Self::Error> {
        let c = VmConfig {
            kernel: a.kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
            cpus: a.cpus,
            memory: a.memory,
            acpi: !a.no_acpi,
            rng: !a.no_rng,
            disks: a.disk.iter().map(|d| config::parse_disk(d)).collect::<Result<_, _>>()?,
            shares: a
                .share
                .iter()
                .map(|s| config::parse_share(s, a.fs_cache))
                .collect::<Result<_, _>>()?,
            net: a.net.clone(),
            forwards: a.forward.clone(),
            vsock: a
                .vsock
                .as_ref()
                .map(|p| config::VsockConfig { guest_cid: a.vsock_cid, uds_path: p.clone() }),
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
        let Command::Run(r) = cli.command;
        VmConfig::try_from(&r).map_err(|e| e.to_string())
    }

    #[test]
    fn run_args_become_a_config() {
        let c = run(&["aivmm", "run", "--kernel", "k", "--initrd", "i", "--cpus", "4", "--memory", "2G"]).unwrap();
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!((c.cpus, c.memory, c.acpi, c.rng), (4, 2 << 30, true, true));
        assert_eq!(c.cmdline, config::DEFAULT_CMDLINE);
    }

    #[test]
    fn bad_args_are_refused() {
        assert!(run(&["aivmm", "run"]).unwrap_err().contains("--kernel"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--memory", "lots"]).unwrap_err().contains("bad size"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--cpus", "0"]).unwrap_err().contains("cpus"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--memory", "1M"]).unwrap_err().contains("memory"));
    }
}
