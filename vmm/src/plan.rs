//! From what the user asked for to the VM that is built: one conversion,
//! `VmConfig::try_from(Mode)`, for both kinds of `aivmm run`.
//!
//! ```text
//! RunArgs (what is not a setting: kernel, command, seccomp…) ─┐
//! RunConfig (settings::merge: sizes, net, shares, forwards…) ─┼─ Mode::Kernel  ─┐
//!                  + guest image, state dir, extras (launch) ─┴─ Mode::Workdir ─┴─► VmConfig
//! ```
//!
//! Everything a setting decides (vCPUs, memory, network, `--share`) is read from
//! the merged [`RunConfig`], never from the command line alone, so a value from
//! a config file and one from a flag take the same way into the VM.

use std::path::Path;

use crate::cli::RunArgs;
use crate::config::{self, BlockConfig, FsConfig, Forward, VmConfig, VsockConfig};
use crate::image::GuestImage;
use crate::launch::{Extras, AGENT_TAG, WORK_TAG};
use crate::settings::{RunConfig, Source};
use crate::workdir::WorkdirState;

/// What `aivmm run` boots.
pub enum Mode<'a> {
    /// `aivmm run --kernel …`: that kernel with the disks, shares and network
    /// given; `settings` is [`RunConfig::kernel`].
    Kernel {
        /// The command line.
        args: &'a RunArgs,
        /// Its settings.
        settings: &'a RunConfig,
    },
    /// `aivmm run --workdir DIR`: the guest image, DIR at `/work`, the agent.
    Workdir(Workdir<'a>),
}

/// The parts of a workdir run that `launch` prepares before the VM.
pub struct Workdir<'a> {
    /// The command line.
    pub args: &'a RunArgs,
    /// The merged settings ([`crate::settings::load`]).
    pub settings: &'a RunConfig,
    /// Kernel, initramfs, root filesystem and command line of the guest.
    pub image: &'a GuestImage,
    /// The workdir and its state directory.
    pub state: &'a WorkdirState,
    /// The workdir's persistent disk.
    pub state_disk: &'a Path,
    /// The directory holding the guest agent (shared read-only).
    pub agent_dir: &'a Path,
    /// The host user's uid and gid, which the guest's user gets.
    pub ids: (u32, u32),
    /// Shares, forwards and setup of `--share-ro`/`-rw`, `--claude-auth`, `--ssh`.
    pub extras: &'a Extras,
}

impl TryFrom<Mode<'_>> for VmConfig {
    type Error = config::Error;

    fn try_from(mode: Mode<'_>) -> Result<Self, Self::Error> {
        let c = match mode {
            Mode::Kernel { args: a, settings } => {
                let kernel = a.kernel.clone().ok_or(config::Error::NoKernel)?;
                // Without --workdir these would be dropped without a word.
                // Read from the settings, whatever their source, so that none is
                // dropped; the rest are the command line's own.
                let workdir_only = [
                    (!settings.env.is_empty(), "--env"),
                    (!settings.share_ro.is_empty(), "--share-ro"),
                    (!settings.share_rw.is_empty(), "--share-rw"),
                    (settings.claude_auth.value, "--claude-auth"),
                    (settings.ssh.value, "--ssh"),
                    (a.rootfs.is_some(), "--rootfs"),
                    (settings.disk_size.source != Source::Default, "--disk-size"),
                    (!a.command.is_empty(), "a command (after --)"),
                ];
                if let Some(&(_, flag)) = workdir_only.iter().find(|(given, _)| *given) {
                    return Err(config::Error::NeedsWorkdir(flag));
                }
                let cmdline = a
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| config::DEFAULT_CMDLINE.to_string());
                let vsock = a.vsock.as_ref().map(|p| VsockConfig {
                    guest_cid: a.vsock_cid,
                    uds_path: p.clone(),
                });
                let forwards = settings.forward.iter().map(|f| f.value).collect();
                vm(a, settings, (kernel, a.initrd.clone(), cmdline), Vec::new(), Vec::new(), forwards, vsock)?
            }
            Mode::Workdir(w) => {
                let a = w.args;
                let mut shares = vec![
                    FsConfig {
                        protect_workdir: true,
                        ..config::share(&w.state.workdir, WORK_TAG, false, a.fs_cache)
                    },
                    config::share(w.agent_dir, AGENT_TAG, true, config::FsCache::Always),
                ];
                shares.extend(w.extras.shares.iter().cloned());
                let disks = vec![
                    config::disk(&w.image.rootfs, true),
                    config::disk(w.state_disk, false),
                ];
                let boot = (
                    w.image.kernel.clone(),
                    (!w.image.initrd.as_os_str().is_empty()).then(|| w.image.initrd.clone()),
                    format!("{} aivmm.uid={} aivmm.gid={}", w.image.cmdline, w.ids.0, w.ids.1),
                );
                let vsock = Some(VsockConfig {
                    guest_cid: a.vsock_cid,
                    uds_path: w.state.vsock_path(),
                });
                vm(a, w.settings, boot, disks, shares, w.extras.forwards.clone(), vsock)?
            }
        };
        c.validate()?;
        Ok(c)
    }
}

/// The VM both modes share: sizes, network and `--share` from the settings,
/// `--disk` and the switches from the command line, after the mode's own
/// `disks` and `shares`.
fn vm(
    a: &RunArgs,
    s: &RunConfig,
    (kernel, initrd, cmdline): (std::path::PathBuf, Option<std::path::PathBuf>, String),
    mut disks: Vec<BlockConfig>,
    mut shares: Vec<FsConfig>,
    forwards: Vec<Forward>,
    vsock: Option<VsockConfig>,
) -> Result<VmConfig, config::Error> {
    for d in &a.disk {
        disks.push(config::parse_disk(d)?);
    }
    for x in &s.share {
        shares.push(config::parse_share(&x.value, a.fs_cache)?);
    }
    Ok(VmConfig {
        kernel,
        initrd,
        cmdline,
        cpus: s.cpus.value,
        memory: s.memory.value,
        acpi: !a.no_acpi,
        rng: !a.no_rng,
        // Linux only for now: on macOS the balloon could not give memory back
        // (see `balloon::discard`).
        balloon: !a.no_balloon && cfg!(target_os = "linux"),
        disks,
        shares,
        net: s.net.value.clone(),
        net_policy: aivmm_devices::virtio::net::usernet::PolicyConfig {
            allow: s.net_allow.iter().map(|a| a.value.clone()).collect(),
            allow_only: s.net_allow_only.as_ref().map(|o| o.value.clone()),
        },
        forwards,
        vsock,
        seccomp: a.seccomp,
        landlock: a.landlock,
        kernel_cache: config::kernel_cache_dir(!a.no_kernel_cache),
    })
}
