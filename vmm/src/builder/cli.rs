//! The arguments of `aivmm builder …` (clap), and the little parsers they need.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{Error, Result, DEFAULT_PORT};
use crate::cli::VmSizeArgs;

/// `aivmm builder …`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a Nix remote builder on 127.0.0.1:PORT: the first SSH connection boots
    /// the builder VM, each connection is passed to the guest's sshd over vsock,
    /// and the VM stops after --idle without connections.
    Serve(ServeArgs),
    /// Show the builder's state, VM uptime and last use.
    Status(StateArgs),
    /// Print the service units (systemd socket + service, or a launchd plist) and
    /// the Nix `machines` entry, `builders` line and ssh_config snippet; --write
    /// installs them.
    Install(InstallArgs),
    /// Remove what `install --write` installed.
    Uninstall(InstallArgs),
}

/// Where the builder keeps its state.
#[derive(Clone, Debug, Args)]
pub struct StateArgs {
    /// The builder's state directory: keys, disk, log, status [default:
    /// $XDG_STATE_HOME/aivmm/builder].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateArgs {
    /// The state directory: --state-dir, else `$XDG_STATE_HOME/aivmm/builder`,
    /// else `~/.local/state/aivmm/builder`.
    pub fn state_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        let base = crate::state_fs::base().map_err(|_| Error::NoStateDir)?;
        Ok(base.join("aivmm").join("builder"))
    }
}

/// The settings `serve` runs with, which `install` also writes into the units.
#[derive(Clone, Debug, Args)]
pub struct VmArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// The TCP port on 127.0.0.1 (a socket from systemd or launchd wins).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// --cpus (also the `maxJobs` in the machines entry), --memory, --disk-size:
    /// the same flags as `aivmm run`'s.
    #[command(flatten)]
    pub size: VmSizeArgs,
    /// Stop the VM after this long without an open connection, e.g. 30m, 3h.
    #[arg(long, value_name = "DURATION", default_value = "3h", value_parser = parse_duration_arg)]
    pub idle: Duration,
    /// Boot the VM at start and keep it running (no idle stop).
    #[arg(long)]
    pub always_on: bool,
    /// The VM's network, for the builds' own downloads: user (aivmm's own user-mode
    /// network, in process: no helper), passt, none, tap:NAME, unix:PATH. SSH does not
    /// need it (it goes over vsock). Default: user.
    #[arg(long, value_name = "MODE", default_value = crate::machine::default_net_arg(std::env::consts::OS), value_parser = parse_net_arg)]
    pub net: String,
}

/// vCPUs of the builder VM unless --cpus says otherwise.
pub const DEFAULT_CPUS: u32 = 4;
/// Memory of the builder VM unless --memory says otherwise.
pub const DEFAULT_MEMORY: u64 = 4 << 30;
/// The builder's persistent disk unless --disk-size says otherwise.
pub const DEFAULT_DISK_SIZE: u64 = 64 << 30;

impl VmArgs {
    /// vCPUs of the builder VM.
    pub fn cpus(&self) -> u32 {
        self.size.cpus.unwrap_or(DEFAULT_CPUS)
    }

    /// Memory of the builder VM, in bytes.
    pub fn memory(&self) -> u64 {
        self.size.memory.unwrap_or(DEFAULT_MEMORY)
    }

    /// Size of the builder's persistent disk, in bytes.
    pub fn disk_size(&self) -> u64 {
        self.size.disk_size.unwrap_or(DEFAULT_DISK_SIZE)
    }
}

/// `aivmm builder serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// The guest kernel [default: AIVMM_BUILDER_KERNEL, else the Debian builder
    /// image, built on first use].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The guest initrd [default: AIVMM_BUILDER_INITRD or the image's].
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// The guest root filesystem [default: AIVMM_BUILDER_ROOTFS or the image's].
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// The guest kernel command line [default: AIVMM_BUILDER_CMDLINE_FILE's or the image's].
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// Seconds a connection waits for the VM to boot before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub boot_timeout: u64,
    /// The log file [default: STATE_DIR/builder.log]; `-` logs to stderr.
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
}

/// `aivmm builder install` / `uninstall`.
#[derive(Clone, Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Write the files (service units or plist, `STATE_DIR/nix/machines`,
    /// `STATE_DIR/ssh/config`) and enable the socket, instead of only printing.
    #[arg(long)]
    pub write: bool,
    /// Where the units or plist go [default: ~/.config/systemd/user, /etc/systemd/system
    /// as root; ~/Library/LaunchAgents, /Library/LaunchDaemons as root on macOS].
    #[arg(long, value_name = "DIR")]
    pub unit_dir: Option<PathBuf>,
}

fn parse_net_arg(s: &str) -> std::result::Result<String, String> {
    crate::config::parse_net(s)
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> std::result::Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// Parses `90`, `90s`, `30m`, `3h`, `1d`, `1h30m`: plain numbers are seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let err = || Error::Duration(s.to_string());
    let t = s.trim();
    if t.is_empty() {
        return Err(err());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(err()),
        };
        let n: u64 = num.parse().map_err(|_| err())?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    if !num.is_empty() {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

/// A duration as the shortest `1h30m`-style text (the inverse of [`parse_duration`]).
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, name) in [(86400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if s >= unit {
            out.push_str(&format!("{}{name}", s / unit));
            s %= unit;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    #[test]
    fn durations() {
        let d = |s: &str| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(d("90").unwrap(), 90);
        assert_eq!(d("90s").unwrap(), 90);
        assert_eq!(d("30m").unwrap(), 1800);
        assert_eq!(d("3h").unwrap(), 10800);
        assert_eq!(d("1h30m").unwrap(), 5400);
        assert_eq!(d("2d").unwrap(), 172_800);
        for bad in ["", "h", "3x", "1h30", "-5", "99999999999999999999d", "1.5h"] {
            assert!(d(bad).is_err(), "{bad} accepted");
        }
        for s in [1, 59, 60, 3600, 5400, 90061] {
            assert_eq!(d(&format_duration(Duration::from_secs(s))).unwrap(), s);
        }
        assert_eq!(format_duration(Duration::from_secs(10800)), "3h");
    }

    #[test]
    fn serve_defaults_and_errors() {
        let parse = |v: &[&str]| {
            let mut all = vec!["aivmm", "builder", "serve"];
            all.extend_from_slice(v);
            match crate::cli::Cli::try_parse_from(all).map(|c| c.command) {
                Ok(crate::cli::Command::Builder {
                    command: Command::Serve(a),
                }) => Ok(a),
                Ok(_) => Err("not serve".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let a = parse(&[]).unwrap();
        assert_eq!(a.vm.port, DEFAULT_PORT);
        assert_eq!(a.vm.idle, Duration::from_secs(3 * 3600));
        assert_eq!(
            (a.vm.cpus(), a.vm.memory(), a.vm.disk_size()),
            (4, 4 << 30, 64 << 30)
        );
        assert!(!a.vm.always_on);
        assert_eq!(a.vm.net, "user", "aivmm's own network");
        let b = parse(&[
            "--idle",
            "20s",
            "--memory",
            "1G",
            "--always-on",
            "--net",
            "none",
        ])
        .unwrap();
        assert_eq!(
            (b.vm.idle.as_secs(), b.vm.memory(), b.vm.always_on),
            (20, 1 << 30, true)
        );
        assert!(parse(&["--idle", "soon"])
            .unwrap_err()
            .contains("bad duration"));
        assert!(parse(&["--net", "wifi"]).is_err());
        // The size flags are `aivmm run`'s: same parsers, same checks.
        let c = parse(&["--cpus", "2", "--memory", "512M", "--disk-size", "8G"]).unwrap();
        assert_eq!(
            c.vm.size,
            VmSizeArgs {
                cpus: Some(2),
                memory: Some(512 << 20),
                disk_size: Some(8 << 30)
            }
        );
        assert!(parse(&["--memory", "lots"]).is_err());
        assert!(parse(&["--disk-size", "1K"]).is_err(), "below the smallest disk");
        assert!(parse(&["--port", "70000"]).is_err());
    }
}
