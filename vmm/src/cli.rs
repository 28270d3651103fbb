//! The command line: `aivmm run …`, parsed with clap into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, VmConfig};

/// aivmm: run an AI coding agent in a real VM.
#[derive(Debug, Parser)]
#[command(name = "aivmm", version, about, propagate_version = true)]
pub struct Cli {
    /// Say more on stderr (-v: progress details, -vv: debug). The per-VM log file
    /// gets the details either way.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Print only errors (no progress, no notes).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// `run`'s arguments are the big variant; the enum is parsed once per process.
#[allow(clippy::large_enum_variant)]
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
    /// A Linux Nix remote builder in a VM, on 127.0.0.1 only, booted on demand
    /// (`serve`, `status`, `install`, `uninstall`).
    Builder {
        /// What to do.
        #[command(subcommand)]
        command: crate::builder::Command,
    },
    /// List running VMs: workdir, pid, uptime, state, forwarded ports.
    Ps,
    /// Stop the VM running on a workdir (or with that pid): aivmm presses the guest's
    /// ACPI power button, the guest stops its command (SIGHUP and SIGTERM), unmounts
    /// /work and powers off; after the timeout aivmm is killed.
    Stop {
        /// The workdir or the pid of the aivmm process.
        target: String,
        /// Seconds to wait for a clean power-off before killing it.
        #[arg(long, default_value_t = 15)]
        timeout: u64,
    },
    /// Run a command in the VM running on a workdir (over vsock), as the user, in
    /// /work; exits with its status.
    Exec(ExecArgs),
    /// Show or set the memory balloon of a running VM: without SIZE, what the
    /// guest gave back and its memory statistics; with SIZE (e.g. `1G`, `0`), take
    /// that much memory from the guest (it gives it back to the host) until set
    /// again. The guest takes memory back by itself before it would run out.
    Balloon(BalloonArgs),
    /// Approve DIR/aivmm.toml as it is now: a workdir's file may only size and
    /// narrow the sandbox unless you trust it (shares, env, claude_auth, ssh, net,
    /// forwards). Shows what it asks for and pins its sha256; a changed file must
    /// be trusted again.
    Trust(TrustArgs),
    /// Print a shell completion script, e.g. `aivmm completions bash >
    /// ~/.local/share/bash-completion/completions/aivmm`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `aivmm man | man -l -`.
    Man,
}

/// Arguments of `aivmm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The workdir (or the pid of its aivmm process).
    pub target: String,
    /// Pass an environment variable (NAME takes its value from this environment).
    #[arg(long, value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Run as root instead of the user.
    #[arg(long)]
    pub root: bool,
    /// The command [default: bash].
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Arguments of `aivmm balloon`.
#[derive(Debug, Args)]
pub struct BalloonArgs {
    /// The workdir, the pid of its aivmm process, or a `--control` socket.
    pub target: String,
    /// The balloon's size: memory taken from the guest (`512M`, `1G`; 0 gives it all back).
    #[arg(value_name = "SIZE", value_parser = parse_size_arg)]
    pub size: Option<u64>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `aivmm trust`.
#[derive(Debug, Args)]
pub struct TrustArgs {
    /// The workdir whose aivmm.toml to trust [default: .].
    #[arg(value_name = "DIR", conflicts_with = "list")]
    pub dir: Option<PathBuf>,
    /// List the trusted workdirs and whether each file still matches.
    #[arg(long, conflicts_with = "revoke")]
    pub list: bool,
    /// Remove DIR's trust.
    #[arg(long)]
    pub revoke: bool,
}

impl TrustArgs {
    /// What to do.
    pub fn action(&self) -> crate::trust::Action {
        let dir = self.dir.clone().unwrap_or_else(|| PathBuf::from("."));
        match (self.list, self.revoke) {
            (true, _) => crate::trust::Action::List,
            (false, true) => crate::trust::Action::Revoke(dir),
            (false, false) => crate::trust::Action::Trust(dir),
        }
    }
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
        /// Build the Nix builder image (sshd, Nix; no Claude Code) that `aivmm
        /// builder serve` boots.
        #[arg(long)]
        builder: bool,
        /// Build the kernel from Debian's linux-source with guest-image/kernel.config
        /// (everything the boot needs built in) instead of using Debian's cloud
        /// kernel. Needs make, gcc, flex, bison, bc, libelf-dev and libssl-dev; the
        /// first build takes 10-30 minutes, then it is cached.
        #[arg(long)]
        kernel_from_source: bool,
    },
}

/// The size of a VM: the flags `aivmm run` and `aivmm builder serve/install`
/// share. Unset flags stay `None`: each command applies its own defaults (and
/// `aivmm run --workdir` its `aivmm.toml` first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Args)]
pub struct VmSizeArgs {
    /// Number of vCPUs [default: 4 with --workdir and for the builder, else 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory, e.g. 512M or 4G [default: 4G with --workdir and for the builder,
    /// else 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub memory: Option<u64>,
    /// Size of the persistent disk (sparse): the workdir's (home and Nix store
    /// writes) or the builder's (/nix and the builds) [default: 16G for a workdir,
    /// 64G for the builder].
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size_arg)]
    pub disk_size: Option<u64>,
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
    /// --cpus, --memory, --disk-size.
    #[command(flatten)]
    pub size: VmSizeArgs,
    /// With --workdir: pass an environment variable to the command (NAME takes its
    /// value from this environment). Sent over vsock, never on the kernel command line.
    #[arg(long, value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// With --workdir: share a host directory read-only, at the same path in the
    /// guest. Any number.
    #[arg(long, value_name = "PATH")]
    pub share_ro: Vec<PathBuf>,
    /// With --workdir: share a host directory read-write, at the same path in the
    /// guest. Any number.
    #[arg(long, value_name = "PATH")]
    pub share_rw: Vec<PathBuf>,
    /// With --workdir: give the guest a copy of your Claude Code login (the
    /// credentials and ~/.claude.json's auth fields; never ~/.claude itself); a
    /// token the guest refreshes comes back when the VM stops.
    #[arg(long)]
    pub claude_auth: bool,
    /// With --workdir: start sshd in the guest, reachable on 127.0.0.1 at a free
    /// port with a key aivmm generates (needs --net user).
    #[arg(long)]
    pub ssh: bool,
    /// With --workdir: seconds to wait for the guest agent (1 to 86400).
    #[arg(long, value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
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
    /// Do not attach the virtio-balloon device (which gives memory the guest
    /// frees back to the host, and takes what `aivmm balloon` asks for).
    #[arg(long)]
    pub no_balloon: bool,
    /// Listen for `aivmm balloon PATH …` on this unix socket (a VM on a
    /// workdir always has one, in its state directory).
    #[arg(long, value_name = "PATH", conflicts_with = "workdir")]
    pub control: Option<PathBuf>,
    /// Attach a raw disk image as virtio-blk (vda, vdb, … in order); `:ro` for read-only.
    #[arg(long, value_name = "PATH[:ro]")]
    pub disk: Vec<String>,
    /// Share a host directory over virtio-fs; the guest mounts it with
    /// `mount -t virtiofs TAG DIR`. `:ro` makes it read-only.
    #[arg(long, value_name = "HOST_DIR:TAG[:ro]")]
    pub share: Vec<String>,
    /// Network: none; user (aivmm's own user-mode network: DHCP, DNS and NAT under
    /// an egress policy, no root); passt (the passt program, Linux); tap:NAME; or
    /// unix:PATH (a unix datagram socket such as gvproxy's).
    #[arg(long, value_name = "MODE", value_parser = parse_net_arg)]
    pub net: Option<config::NetMode>,
    /// Forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (with --net user); add /udp for UDP.
    #[arg(long, value_name = "HOSTPORT:GUESTPORT[/udp]", value_parser = parse_forward_arg)]
    pub forward: Vec<config::Forward>,
    /// Open a destination the egress policy of --net user closes (the host's
    /// loopback through the gateway 10.0.2.2, link-local and private ranges):
    /// an address, a CIDR or a host name, with an optional port, e.g.
    /// 127.0.0.1:11434 or 192.168.1.0/24. May be repeated.
    #[arg(long, value_name = "HOST|CIDR[:PORT]", value_parser = parse_policy_arg)]
    pub net_allow: Vec<String>,
    /// Let the guest reach only these (comma-separated, may be repeated): DNS
    /// names (`*.example.com` for subdomains), matched through the DNS answers
    /// aivmm gave the guest, and public addresses or CIDRs, each with an optional
    /// port, e.g. api.anthropic.com,registry.npmjs.org,github.com.
    #[arg(long, value_name = "NAME|CIDR[:PORT],...", value_parser = parse_policy_arg)]
    pub net_allow_only: Vec<String>,
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
    /// Seccomp filters on every thread; `off` is for debugging only.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = crate::seccomp::SeccompMode::On)]
    pub seccomp: crate::seccomp::SeccompMode,
    /// Landlock on the device threads (Linux): they reach only the shares, the
    /// disk images and the vsock sockets; `off` is for debugging only.
    #[arg(long, value_enum, value_name = "on|off", default_value_t = crate::landlock::LandlockMode::On)]
    pub landlock: crate::landlock::LandlockMode,
    /// Boot a bzImage with its own in-guest decompressor. By default aivmm unpacks
    /// an LZ4 bzImage once into a cached vmlinux (the cache directory's kernels/)
    /// and boots that, which skips the decompression on every later boot.
    #[arg(long)]
    pub no_kernel_cache: bool,
}

fn parse_net_arg(s: &str) -> Result<config::NetMode, String> {
    config::parse_net(s).map_err(|e| e.to_string())
}

fn parse_policy_arg(s: &str) -> Result<String, String> {
    aivmm_devices::virtio::net::usernet::policy::validate_spec(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn parse_forward_arg(s: &str) -> Result<config::Forward, String> {
    config::parse_forward(s).map_err(|e| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    config::parse_size(s).map_err(|e| e.to_string())
}

fn parse_disk_size_arg(s: &str) -> Result<u64, String> {
    config::parse_size(s)
        .and_then(config::check_disk_size)
        .map_err(|e| e.to_string())
}

impl TryFrom<&RunArgs> for VmConfig {
    type Error = config::Error;

    /// The VM of `aivmm run --kernel …` (without --workdir): the command line's
    /// settings over that mode's defaults, through [`crate::plan::Mode`].
    fn try_from(a: &RunArgs) -> Result<Self, Self::Error> {
        let settings = crate::settings::RunConfig::kernel(a);
        VmConfig::try_from(crate::plan::Mode::Kernel { args: a, settings: &settings })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
    fn workdir_flags_without_workdir_are_refused() {
        let k = ["aivmm", "run", "--kernel", "k"];
        for (extra, flag) in [
            (&["--env", "A=1"][..], "--env"),
            (&["--share-ro", "/tmp"][..], "--share-ro"),
            (&["--share-rw", "/tmp"][..], "--share-rw"),
            (&["--claude-auth"][..], "--claude-auth"),
            (&["--ssh"][..], "--ssh"),
            (&["--rootfs", "r"][..], "--rootfs"),
            (&["--disk-size", "1G"][..], "--disk-size"),
            (&["--", "ls"][..], "a command"),
        ] {
            let args: Vec<&str> = k.iter().chain(extra).copied().collect();
            let e = run(&args).unwrap_err();
            assert!(e.starts_with(flag) && e.contains("needs --workdir"), "{args:?}: {e}");
        }
    }

    #[test]
    fn completions_and_man_page_are_generated() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let mut out = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "aivmm", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("--share-ro") && text.contains("--claude-auth"));
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut man).unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(man.starts_with(".ie") || man.contains(".TH aivmm"), "{}", &man[..200]);
    }

    #[test]
    fn workdir_flags_parse() {
        let cli = Cli::try_parse_from([
            "aivmm", "-q", "run", "--workdir", ".", "--share-ro", "/a", "--share-rw", "/b",
            "--share-ro", "/c", "--claude-auth", "--ssh", "--", "sh", "-c", "x",
        ])
        .unwrap();
        assert!(cli.quiet);
        let Command::Run(r) = cli.command else { panic!() };
        assert_eq!(r.share_ro, vec![PathBuf::from("/a"), PathBuf::from("/c")]);
        assert_eq!(r.share_rw, vec![PathBuf::from("/b")]);
        assert!(r.claude_auth && r.ssh);
        assert_eq!(r.command, vec!["sh", "-c", "x"]);
        let cli = Cli::try_parse_from(["aivmm", "exec", "dir", "-vv", "--", "ls", "-l"]).unwrap();
        assert_eq!(cli.verbose, 2);
        let Command::Exec(e) = cli.command else { panic!() };
        assert_eq!((e.target.as_str(), e.command.len()), ("dir", 2));
        assert!(Cli::try_parse_from(["aivmm", "-q", "-v", "ps"]).is_err());
    }

    #[test]
    fn trust_args_parse() {
        use crate::trust::Action;
        let action = |argv: &[&str]| {
            let cli = Cli::try_parse_from(["aivmm", "trust"].iter().chain(argv)).map_err(|e| e.to_string())?;
            let Command::Trust(t) = cli.command else { return Err("not trust".to_string()) };
            Ok::<_, String>(t.action())
        };
        assert_eq!(action(&[]).unwrap(), Action::Trust(PathBuf::from(".")));
        assert_eq!(action(&["w"]).unwrap(), Action::Trust(PathBuf::from("w")));
        assert_eq!(action(&["--list"]).unwrap(), Action::List);
        assert_eq!(action(&["--revoke"]).unwrap(), Action::Revoke(PathBuf::from(".")));
        assert_eq!(action(&["--revoke", "w"]).unwrap(), Action::Revoke(PathBuf::from("w")));
        assert!(action(&["--list", "w"]).is_err());
        assert!(action(&["--list", "--revoke"]).is_err());
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
        assert!(run(&["aivmm", "run", "--kernel", "k", "--disk-size", "1M"])
            .unwrap_err()
            .contains("--disk-size must be between"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--agent-timeout", "0"])
            .unwrap_err()
            .contains("--agent-timeout"));
        assert!(run(&["aivmm", "run", "--kernel", "k", "--seccomp", "maybe"])
            .unwrap_err()
            .contains("--seccomp"));
        let long = "x".repeat(3000);
        assert!(run(&["aivmm", "run", "--kernel", "k", "--cmdline", &long])
            .unwrap_err()
            .contains("command line is 3000 bytes"));
        let c = run(&["aivmm", "run", "--kernel", "k", "--seccomp=off"]).unwrap();
        assert_eq!(c.seccomp, crate::seccomp::SeccompMode::Off);
        let c = run(&["aivmm", "run", "--kernel", "k"]).unwrap();
        assert_eq!(c.seccomp, crate::seccomp::SeccompMode::On, "on by default");
        assert_eq!(c.landlock, crate::landlock::LandlockMode::On, "on by default");
        let c = run(&["aivmm", "run", "--kernel", "k", "--landlock", "off"]).unwrap();
        assert_eq!(c.landlock, crate::landlock::LandlockMode::Off);
    }
}
