//! `aivmm.toml`: the settings of `aivmm run --workdir`, from the user's config
//! file and the workdir, merged with the command line into one [`RunConfig`]
//! whose every value knows where it came from.
//!
//! ```text
//! ~/.config/aivmm/config.toml ─ read_file ─┐ (trusted)
//! DIR/aivmm.toml ── read_file (O_NOFOLLOW) ─┼─ check_trust ─┐ (untrusted unless pinned)
//! the command line ── Layer::from_args ─────┴───────────────┴─ merge ─► RunConfig
//!                                                   RunConfig + RunArgs ─► plan::Mode ─► VmConfig
//! ```
//!
//! Both files apply: the user's config (`$XDG_CONFIG_HOME/aivmm/config.toml`,
//! `~/.config/aivmm/config.toml`), then the workdir's, then the command line.
//! A later source's value replaces an earlier one's (`claude_auth = false` in
//! the workdir turns off the user's `true`); lists (`forward`, `env`, `share`,
//! `share_ro`, `share_rw`, `net_allow`) are joined in that order.
//! `net_allow_only` is the exception: the user's file and the command line set
//! it, and a workdir's file only narrows it (what both lists allow; see
//! [`PolicyConfig::narrowed_by`]), so a workdir can never widen the egress policy.
//!
//! The user's file and the command line are trusted. The workdir's file is not
//! (the guest can write it, and so can any repository the user clones): on its
//! own it may only narrow or size the sandbox within [`Limits`]. A key that
//! widens it ([`widening`]) needs the user's approval of that exact file, a
//! sha256 pin written by `aivmm trust DIR` ([`crate::pins`]); otherwise the run
//! is refused before anything is built. The file is read once: the bytes that
//! are hashed are the bytes that are parsed.
//!
//! ```toml
//! cpus = 8
//! memory = "8G"
//! disk_size = "32G"
//! net = "user"
//! forward = ["3000:3000"]
//! net_allow = ["127.0.0.1:11434"]
//! net_allow_only = ["api.anthropic.com", "registry.npmjs.org", "*.github.com"]
//! env = ["ANTHROPIC_API_KEY"]
//! share = ["/home/me/notes:notes:ro"]
//! share_ro = ["/home/me/docs"]
//! share_rw = ["/home/me/scratch"]
//! claude_auth = true
//! ssh = false
//! ```

use std::fmt;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::cli::RunArgs;
use crate::config::{self, Forward, NetMode};
use aivmm_devices::virtio::net::usernet::policy::{self, PolicyConfig};
use crate::pins::{self, Pins};

/// Errors in a settings file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or bad values.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The workdir's file is a symlink.
    #[error("{0} is a symlink; aivmm reads only a regular file there")]
    Symlink(PathBuf),
    /// The file is a directory, FIFO, device or socket.
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    /// The file is larger than any settings file needs.
    #[error("{0} is larger than {MAX_FILE_SIZE} bytes")]
    TooBig(PathBuf),
    /// The workdir's file widens the sandbox and the user has not approved it.
    #[error("{path} asks for {keys}, which widen the sandbox; {why} (run `aivmm trust {dir}` after reading it)")]
    NotTrusted {
        /// The file.
        path: PathBuf,
        /// The widening keys, comma-separated.
        keys: String,
        /// "it is not trusted" or "it changed since you trusted it".
        why: &'static str,
        /// The workdir, for the hint.
        dir: String,
    },
    /// A file the trust decision rests on (the user's config, the pin file) is
    /// inside the workdir, where the guest can write it.
    #[error("{path} is inside the workdir {dir}, where the guest can write it, so it cannot {what}; move it out, or run on a directory that does not hold it")]
    GuestWritable {
        /// The file.
        path: PathBuf,
        /// The workdir.
        dir: PathBuf,
        /// What it cannot do.
        what: &'static str,
    },
    /// The pin file could not be read.
    #[error(transparent)]
    Pins(#[from] pins::Error),
}

/// `Result` of settings handling.
pub type Result<T> = std::result::Result<T, Error>;

/// The largest settings file read.
pub const MAX_FILE_SIZE: u64 = 64 << 10;

/// The workdir's settings file, in the workdir.
pub const WORKDIR_FILE: &str = "aivmm.toml";

/// What an `aivmm.toml` may say, as written.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory, e.g. "4G".
    pub memory: Option<String>,
    /// The persistent disk's size.
    pub disk_size: Option<String>,
    /// Network mode, as `--net`.
    pub net: Option<String>,
    /// Port forwards, as `--forward`.
    #[serde(default)]
    pub forward: Vec<String>,
    /// Destinations the egress policy opens, as `--net-allow`.
    #[serde(default)]
    pub net_allow: Vec<String>,
    /// The strict egress allowlist, as `--net-allow-only`.
    pub net_allow_only: Option<Vec<String>>,
    /// Environment passthrough, as `--env`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Extra shares, as `--share`.
    #[serde(default)]
    pub share: Vec<String>,
    /// Read-only shares at the same path in the guest, as `--share-ro`.
    #[serde(default)]
    pub share_ro: Vec<PathBuf>,
    /// Read-write shares at the same path in the guest, as `--share-rw`.
    #[serde(default)]
    pub share_rw: Vec<PathBuf>,
    /// Share the Claude Code login, as `--claude-auth`.
    pub claude_auth: Option<bool>,
    /// Start sshd in the guest, as `--ssh`.
    pub ssh: Option<bool>,
}

/// The values of one source, checked and typed: a settings file or the
/// command line. `None` and empty lists say nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Guest memory in bytes.
    pub memory: Option<u64>,
    /// The persistent disk's size in bytes.
    pub disk_size: Option<u64>,
    /// The network.
    pub net: Option<NetMode>,
    /// Port forwards.
    pub forward: Vec<Forward>,
    /// `--net-allow` entries.
    pub net_allow: Vec<String>,
    /// `--net-allow-only` entries (`None`: not set here).
    pub net_allow_only: Option<Vec<String>>,
    /// Environment passthrough (`NAME` or `NAME=VALUE`).
    pub env: Vec<String>,
    /// `--share` entries (`HOST_DIR:TAG[:ro]`).
    pub share: Vec<String>,
    /// Read-only shares at the same path.
    pub share_ro: Vec<PathBuf>,
    /// Read-write shares at the same path.
    pub share_rw: Vec<PathBuf>,
    /// Share the Claude Code login.
    pub claude_auth: Option<bool>,
    /// Start sshd in the guest.
    pub ssh: Option<bool>,
}

/// Checks each egress rule's syntax (`net_allow`, `net_allow_only`).
fn check_specs(specs: &[String], key: &str, path: &Path) -> Result<Vec<String>> {
    for s in specs {
        policy::validate_spec(s).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            reason: format!("{key}: {e}"),
        })?;
    }
    Ok(specs.to_vec())
}

impl Layer {
    /// Checks and types `s`; `path` names the file in errors.
    pub fn from_settings(s: &Settings, path: &Path) -> Result<Self> {
        let bad = |what: &str, e: config::Error| Error::Parse {
            path: path.to_path_buf(),
            reason: format!("{what}: {e}"),
        };
        Ok(Self {
            cpus: s.cpus,
            memory: s
                .memory
                .as_deref()
                .map(config::parse_size)
                .transpose()
                .map_err(|e| bad("memory", e))?,
            disk_size: s
                .disk_size
                .as_deref()
                .map(|d| config::parse_size(d).and_then(config::check_disk_size))
                .transpose()
                .map_err(|e| bad("disk_size", e))?,
            net: s
                .net
                .as_deref()
                .map(config::parse_net)
                .transpose()
                .map_err(|e| bad("net", e))?,
            forward: s
                .forward
                .iter()
                .map(|f| config::parse_forward(f).map_err(|e| bad("forward", e)))
                .collect::<Result<_>>()?,
            net_allow: check_specs(&s.net_allow, "net_allow", path)?,
            net_allow_only: s
                .net_allow_only
                .as_ref()
                .map(|l| check_specs(l, "net_allow_only", path))
                .transpose()?,
            env: s.env.clone(),
            share: s.share.clone(),
            share_ro: s.share_ro.clone(),
            share_rw: s.share_rw.clone(),
            claude_auth: s.claude_auth,
            ssh: s.ssh,
        })
    }

    /// The command line's values (a switch not given says nothing).
    pub fn from_args(a: &RunArgs) -> Self {
        Self {
            cpus: a.size.cpus,
            memory: a.size.memory,
            disk_size: a.size.disk_size,
            net: a.net.clone(),
            forward: a.forward.clone(),
            net_allow: a.net_allow.clone(),
            net_allow_only: (!a.net_allow_only.is_empty()).then(|| a.net_allow_only.clone()),
            env: a.env.clone(),
            share: a.share.clone(),
            share_ro: a.share_ro.clone(),
            share_rw: a.share_rw.clone(),
            claude_auth: a.claude_auth.then_some(true),
            ssh: a.ssh.then_some(true),
        }
    }
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// aivmm's default.
    Default,
    /// The user's config file.
    UserConfig(PathBuf),
    /// The workdir's `aivmm.toml`.
    WorkdirConfig(PathBuf),
    /// The command line.
    Cli,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::UserConfig(p) | Self::WorkdirConfig(p) => write!(f, "{}", p.display()),
            Self::Cli => f.write_str("command line"),
        }
    }
}

/// A value and its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sourced<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub source: Source,
}

impl<T> Sourced<T> {
    fn default(value: T) -> Self {
        Self {
            value,
            source: Source::Default,
        }
    }
}

/// The merged settings of a workdir run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    /// vCPUs.
    pub cpus: Sourced<u32>,
    /// Guest memory in bytes.
    pub memory: Sourced<u64>,
    /// The persistent disk's size in bytes.
    pub disk_size: Sourced<u64>,
    /// The network.
    pub net: Sourced<NetMode>,
    /// Port forwards.
    pub forward: Vec<Sourced<Forward>>,
    /// Destinations the egress policy opens.
    pub net_allow: Vec<Sourced<String>>,
    /// The strict egress allowlist, if any.
    pub net_allow_only: Option<Sourced<Vec<String>>>,
    /// Environment passthrough.
    pub env: Vec<Sourced<String>>,
    /// `--share` entries.
    pub share: Vec<Sourced<String>>,
    /// Read-only shares at the same path.
    pub share_ro: Vec<Sourced<PathBuf>>,
    /// Read-write shares at the same path.
    pub share_rw: Vec<Sourced<PathBuf>>,
    /// Share the Claude Code login.
    pub claude_auth: Sourced<bool>,
    /// Start sshd in the guest.
    pub ssh: Sourced<bool>,
}

impl Default for RunConfig {
    /// The defaults of a workdir run.
    fn default() -> Self {
        Self {
            cpus: Sourced::default(crate::launch::DEFAULT_CPUS),
            memory: Sourced::default(crate::launch::DEFAULT_MEMORY),
            disk_size: Sourced::default(crate::launch::DEFAULT_DISK_SIZE),
            net: Sourced::default(crate::machine::default_net()),
            forward: Vec::new(),
            net_allow: Vec::new(),
            net_allow_only: None,
            env: Vec::new(),
            share: Vec::new(),
            share_ro: Vec::new(),
            share_rw: Vec::new(),
            claude_auth: Sourced::default(false),
            ssh: Sourced::default(false),
        }
    }
}

impl RunConfig {
    /// The settings of `aivmm run --kernel` (no --workdir): the command line
    /// over that mode's defaults (1 vCPU, 512 MiB, no network); no file applies.
    pub fn kernel(a: &RunArgs) -> Self {
        let base = Self {
            cpus: Sourced::default(1),
            memory: Sourced::default(512 << 20),
            net: Sourced::default(NetMode::default()),
            ..Self::default()
        };
        merge_onto(base, None, None, &Layer::from_args(a))
    }

    /// One line per value that is not a default, with its source.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut one = |key: &str, value: String, source: &Source| {
            if *source != Source::Default {
                out.push(format!("{key} = {value} ({source})"));
            }
        };
        one("cpus", self.cpus.value.to_string(), &self.cpus.source);
        one(
            "memory",
            format!("{} MiB", self.memory.value >> 20),
            &self.memory.source,
        );
        one(
            "disk_size",
            format!("{} MiB", self.disk_size.value >> 20),
            &self.disk_size.source,
        );
        one("net", format!("{:?}", self.net.value), &self.net.source);
        for f in &self.forward {
            one(
                "forward",
                format!(
                    "{}:{}{}",
                    f.value.host,
                    f.value.guest,
                    if f.value.udp { "/udp" } else { "" }
                ),
                &f.source,
            );
        }
        for a in &self.net_allow {
            one("net_allow", a.value.clone(), &a.source);
        }
        if let Some(o) = &self.net_allow_only {
            one("net_allow_only", o.value.join(","), &o.source);
        }
        for e in &self.env {
            // Only the name: a value given here may be a secret.
            one(
                "env",
                e.value.split('=').next().unwrap_or_default().to_string(),
                &e.source,
            );
        }
        for s in &self.share {
            one("share", format!("{:?}", s.value), &s.source);
        }
        for s in &self.share_ro {
            one("share_ro", format!("{:?}", s.value), &s.source);
        }
        for s in &self.share_rw {
            one("share_rw", format!("{:?}", s.value), &s.source);
        }
        one(
            "claude_auth",
            self.claude_auth.value.to_string(),
            &self.claude_auth.source,
        );
        one("ssh", self.ssh.value.to_string(), &self.ssh.source);
        out
    }
}

/// A settings file as read: its path, the sha256 of its bytes, and those bytes
/// parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// The sha256 of the bytes parsed.
    pub sha256: [u8; 32],
    /// What it says.
    pub settings: Settings,
    /// The same, checked and typed.
    pub layer: Layer,
}

impl ConfigFile {
    /// Hashes and parses `bytes`, the content of `path`.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        let text = std::str::from_utf8(bytes).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            reason: format!("not UTF-8: {e}"),
        })?;
        let settings = parse(text, path)?;
        let layer = Layer::from_settings(&settings, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            sha256,
            settings,
            layer,
        })
    }
}

/// Reads the settings file at `path` once, if there is one: a regular file of
/// at most [`MAX_FILE_SIZE`] bytes, and not a symlink unless `follow`.
pub fn read_file(path: &Path, follow: bool) -> Result<Option<ConfigFile>> {
    let read = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let f = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if !follow && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::Symlink(path.to_path_buf()))
        }
        Err(e) => return Err(read(e)),
    };
    let meta = f.metadata().map_err(read)?;
    if !meta.is_file() {
        return Err(Error::NotRegular(path.to_path_buf()));
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(Error::TooBig(path.to_path_buf()));
    }
    ConfigFile::from_bytes(&bytes, path).map(Some)
}

/// The user's config file: `$XDG_CONFIG_HOME/aivmm/config.toml` or
/// `~/.config/aivmm/config.toml`.
pub fn user_config_path() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("aivmm").join("config.toml"))
}

/// Parses settings text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Settings> {
    toml::from_str(text).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The keys that widen the sandbox when a workdir file sets them (to anything
/// but "off": `net = "none"`, `claude_auth = false`, `ssh = false` and empty
/// lists narrow or say nothing). [`widening`] decides per value.
pub const WIDENING_KEYS: &[&str] = &[
    "share",
    "share_ro",
    "share_rw",
    "env",
    "claude_auth",
    "ssh",
    "net",
    "forward",
    "net_allow",
];

/// The keys a workdir file may set on its own because they can only narrow the
/// sandbox (merged as an intersection, never a replacement).
pub const NARROWING_KEYS: &[&str] = &["net_allow_only"];

/// The keys a workdir file may set on its own, up to the [`Limits`].
pub const SIZING_KEYS: &[&str] = &["cpus", "memory", "disk_size"];

/// How large an untrusted workdir file may make the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The persistent disk in bytes.
    pub disk_size: u64,
}

impl Limits {
    /// This host's: its CPU count, half its RAM (at least the defaults), and a
    /// 64 GiB disk (four times the default; it is sparse).
    pub fn host() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        // SAFETY: sysconf reads a constant.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let ram = u64::try_from(pages)
            .unwrap_or(0)
            .saturating_mul(u64::try_from(page).unwrap_or(0));
        Self {
            cpus: cpus.max(crate::launch::DEFAULT_CPUS),
            memory: (ram / 2).max(crate::launch::DEFAULT_MEMORY),
            disk_size: 4 * crate::launch::DEFAULT_DISK_SIZE,
        }
    }
}

/// A key of a workdir file that widens the sandbox, and what it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Widening {
    /// The key.
    pub key: &'static str,
    /// Its value as written (control characters escaped).
    pub value: String,
}

/// What in `file` widens the sandbox beyond `limits`, in the order of
/// [`WIDENING_KEYS`], then sizes over the limits.
pub fn widening(file: &ConfigFile, limits: &Limits) -> Vec<Widening> {
    // Every key is named here, so a new one cannot be added unclassified.
    let Settings {
        cpus,
        memory,
        disk_size,
        net,
        forward,
        net_allow,
        // Narrows only: merged as the intersection with what came before.
        net_allow_only: _,
        env,
        share,
        share_ro,
        share_rw,
        claude_auth,
        ssh,
    } = &file.settings;
    let l = &file.layer;
    let mut out = Vec::new();
    let mut add = |key: &'static str, value: String| out.push(Widening { key, value });
    if !share.is_empty() {
        add("share", format!("{share:?}"));
    }
    if !share_ro.is_empty() {
        add("share_ro", format!("{share_ro:?}"));
    }
    if !share_rw.is_empty() {
        add("share_rw", format!("{share_rw:?}"));
    }
    if !env.is_empty() {
        add("env", format!("{env:?}"));
    }
    if *claude_auth == Some(true) {
        add("claude_auth", "true".into());
    }
    if *ssh == Some(true) {
        add("ssh", "true".into());
    }
    if let (Some(n), Some(mode)) = (net, &l.net) {
        if *mode != NetMode::None {
            add("net", format!("{n:?}"));
        }
    }
    if !forward.is_empty() {
        add("forward", format!("{forward:?}"));
    }
    if !net_allow.is_empty() {
        add("net_allow", format!("{net_allow:?}"));
    }
    let over = |max: u64| format!(" (over the {} MiB a workdir file may ask for)", max >> 20);
    if let Some(c) = cpus.filter(|c| *c > limits.cpus) {
        add(
            "cpus",
            format!("{c} (over the {} a workdir file may ask for)", limits.cpus),
        );
    }
    if let (Some(m), Some(_)) = (memory, l.memory.filter(|v| *v > limits.memory)) {
        add("memory", format!("{m:?}{}", over(limits.memory)));
    }
    if let (Some(d), Some(_)) = (disk_size, l.disk_size.filter(|v| *v > limits.disk_size)) {
        add("disk_size", format!("{d:?}{}", over(limits.disk_size)));
    }
    out
}

/// Whether the user approved `file`, the settings of canonical `workdir`: it
/// runs if it widens nothing beyond `limits`, or if `pins` holds its exact hash.
pub fn check_trust(file: &ConfigFile, workdir: &Path, pins: &Pins, limits: &Limits) -> Result<()> {
    let wide = widening(file, limits);
    if wide.is_empty() {
        return Ok(());
    }
    let why = match pins.get(workdir) {
        Some(sha) if *sha == file.sha256 => return Ok(()),
        Some(_) => "it changed since you trusted it",
        None => "it is not trusted",
    };
    let keys: Vec<&str> = wide.iter().map(|w| w.key).collect();
    Err(Error::NotTrusted {
        path: file.path.clone(),
        keys: keys.join(", "),
        why,
        dir: workdir.display().to_string(),
    })
}

/// Merges the user's config, the workdir's and the command line, in that order,
/// over the defaults: a later source's value replaces an earlier one's, lists
/// are joined. Trust is checked before ([`check_trust`]).
pub fn merge(user: Option<&ConfigFile>, workdir: Option<&ConfigFile>, cli: &Layer) -> RunConfig {
    merge_onto(RunConfig::default(), user, workdir, cli)
}

/// [`merge`] over `base`'s values instead of a workdir run's defaults.
fn merge_onto(
    base: RunConfig,
    user: Option<&ConfigFile>,
    workdir: Option<&ConfigFile>,
    cli: &Layer,
) -> RunConfig {
    fn set<T: Clone>(slot: &mut Sourced<T>, v: &Option<T>, source: &Source) {
        if let Some(v) = v {
            *slot = Sourced {
                value: v.clone(),
                source: source.clone(),
            };
        }
    }
    fn join<T: Clone>(list: &mut Vec<Sourced<T>>, v: &[T], source: &Source) {
        list.extend(v.iter().map(|v| Sourced {
            value: v.clone(),
            source: source.clone(),
        }));
    }
    let mut layers = Vec::new();
    if let Some(u) = user {
        layers.push((Source::UserConfig(u.path.clone()), &u.layer));
    }
    if let Some(w) = workdir {
        layers.push((Source::WorkdirConfig(w.path.clone()), &w.layer));
    }
    layers.push((Source::Cli, cli));
    let mut c = base;
    for (src, l) in layers {
        let Layer {
            cpus,
            memory,
            disk_size,
            net,
            forward,
            net_allow,
            net_allow_only,
            env,
            share,
            share_ro,
            share_rw,
            claude_auth,
            ssh,
        } = l;
        set(&mut c.cpus, cpus, &src);
        set(&mut c.memory, memory, &src);
        set(&mut c.disk_size, disk_size, &src);
        set(&mut c.net, net, &src);
        join(&mut c.forward, forward, &src);
        join(&mut c.net_allow, net_allow, &src);
        if let Some(only) = net_allow_only {
            let narrowed = match (&src, &c.net_allow_only) {
                // A workdir's list narrows what came before it, never widens it.
                (Source::WorkdirConfig(_), Some(before)) => PolicyConfig {
                    allow: Vec::new(),
                    allow_only: Some(before.value.clone()),
                }
                .narrowed_by(&PolicyConfig {
                    allow: Vec::new(),
                    allow_only: Some(only.clone()),
                })
                .allow_only
                .unwrap_or_default(),
                _ => only.clone(),
            };
            c.net_allow_only = Some(Sourced {
                value: narrowed,
                source: src.clone(),
            });
        }
        join(&mut c.env, env, &src);
        join(&mut c.share, share, &src);
        join(&mut c.share_ro, share_ro, &src);
        join(&mut c.share_rw, share_rw, &src);
        set(&mut c.claude_auth, claude_auth, &src);
        set(&mut c.ssh, ssh, &src);
    }
    c
}

/// The settings files that applied to a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The user's config file.
    pub user: Option<PathBuf>,
    /// The workdir's, and whether it needed (and had) the user's approval.
    pub workdir: Option<(PathBuf, bool)>,
}

impl Applied {
    /// The one stderr line naming the files, if any applied.
    pub fn line(&self) -> Option<String> {
        let mut files = Vec::new();
        if let Some(u) = &self.user {
            files.push(u.display().to_string());
        }
        if let Some((w, trusted)) = &self.workdir {
            let how = if *trusted {
                "trusted"
            } else {
                "untrusted: sizes and narrowing only"
            };
            files.push(format!("{} ({how})", w.display()));
        }
        (!files.is_empty()).then(|| format!("aivmm: config: {}", files.join(", ")))
    }
}

/// Reads the user's config and `workdir`'s `aivmm.toml`, refuses a workdir file
/// that widens the sandbox without the user's approval (pins at `pins_path`),
/// and merges both with the command line `args`: the run's settings, and the
/// files that applied.
pub fn load(
    args: &RunArgs,
    workdir: &Path,
    user_config: Option<&Path>,
    pins_path: &Path,
) -> Result<(RunConfig, Applied)> {
    // A workdir that does not exist has no file; the run reports it.
    let canon = std::fs::canonicalize(workdir).unwrap_or_else(|_| workdir.to_path_buf());
    let limits = Limits::host();
    let user = match user_config {
        Some(p) => read_file(p, true)?,
        None => None,
    };
    if let Some(u) = &user {
        // `--workdir ~` shares the user's config with the guest: then it is no
        // more trusted than the workdir's own file.
        if inside(&u.path, &canon) && !widening(u, &limits).is_empty() {
            return Err(Error::GuestWritable {
                path: u.path.clone(),
                dir: canon,
                what: "widen the sandbox",
            });
        }
    }
    let local = read_file(&canon.join(WORKDIR_FILE), false)?;
    let mut applied = Applied {
        user: user.as_ref().map(|u| u.path.clone()),
        workdir: None,
    };
    if let Some(w) = &local {
        let needs_trust = !widening(w, &limits).is_empty();
        if needs_trust {
            if inside(pins_path, &canon) {
                return Err(Error::GuestWritable {
                    path: pins_path.to_path_buf(),
                    dir: canon,
                    what: "approve its aivmm.toml",
                });
            }
            check_trust(w, &canon, &Pins::load(pins_path)?, &limits)?;
        }
        applied.workdir = Some((w.path.clone(), needs_trust));
    }
    let merged = merge(user.as_ref(), local.as_ref(), &Layer::from_args(args));
    for line in merged.describe() {
        tracing::info!("setting {line}");
    }
    Ok((merged, applied))
}

/// Whether the guest of a run on canonical `dir` can write or replace `path`.
fn inside(path: &Path, dir: &Path) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    let parent = path.parent().and_then(canonical);
    parent.is_some_and(|p| p.starts_with(dir))
        || canonical(path).is_some_and(|p| p.starts_with(dir))
}

/// [`load`] for `aivmm run --workdir`, with the user's files, printing the
/// files that applied on stderr (unless `-q`); returns the run's settings.
pub fn apply(args: &RunArgs, workdir: &Path) -> Result<RunConfig> {
    let (settings, applied) = load(
        args,
        workdir,
        user_config_path().as_deref(),
        &pins::default_path()?,
    )?;
    if let Some(line) = applied.line() {
        if !crate::logging::quiet() {
            eprintln!("{line}");
        }
        tracing::info!("{line}");
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> RunArgs {
        let mut v = vec!["aivmm", "run", "--workdir", "."];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(v).unwrap().command {
            crate::cli::Command::Run(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_kernel_mode_has_its_own_defaults() {
        let c = RunConfig::kernel(&args(&[]));
        assert_eq!((c.cpus.value, c.memory.value, c.net.value.clone()), (1, 512 << 20, NetMode::None));
        assert_eq!(c.cpus.source, Source::Default);
        let c = RunConfig::kernel(&args(&["--cpus", "2", "--net", "user"]));
        assert_eq!((c.cpus.value, c.net.value.clone()), (2, NetMode::User));
        assert_eq!((c.cpus.source, c.net.source), (Source::Cli, Source::Cli));
        assert_eq!(c.memory.source, Source::Default);
    }

    fn file(text: &str, path: &str) -> ConfigFile {
        ConfigFile::from_bytes(text.as_bytes(), Path::new(path)).unwrap()
    }

    /// A workdir's `net_allow_only` narrows the user's list (what both allow) and
    /// is taken as it is when nothing came before; the command line replaces.
    #[test]
    fn a_workdir_allowlist_only_narrows() {
        let user = file(
            "net_allow_only = [\"a.example\", \"b.example:443\"]\n",
            "/home/u/.config/aivmm/config.toml",
        );
        let work = file("net_allow_only = [\"b.example:443,c.example\"]\n", "/w/aivmm.toml");
        let c = merge(Some(&user), Some(&work), &Layer::default());
        let only = c.net_allow_only.unwrap();
        assert_eq!(only.value, vec!["b.example:443".to_string()]);
        assert_eq!(only.source, Source::WorkdirConfig(PathBuf::from("/w/aivmm.toml")));
        // Nothing before it: the workdir's list is narrower than the open default.
        let c = merge(None, Some(&work), &Layer::default());
        assert_eq!(c.net_allow_only.unwrap().value, vec!["b.example:443,c.example".to_string()]);
        // The workdir's list alone needs no trust; its net_allow does.
        assert!(widening(&work, &LIMITS).is_empty());
        let wide = file("net_allow = [\"10.0.0.0/8\"]\n", "/w/aivmm.toml");
        assert_eq!(widening(&wide, &LIMITS)[0].key, "net_allow");
        // The command line is the user's own word: it replaces.
        let cli = Layer {
            net_allow_only: Some(vec!["d.example".into()]),
            ..Layer::default()
        };
        let c = merge(Some(&user), Some(&work), &cli);
        assert_eq!(c.net_allow_only.unwrap().value, vec!["d.example".to_string()]);
        // A malformed rule is a parse error naming the key.
        let e = Layer::from_settings(&parse("net_allow = [\"10.0.0.1/8\"]", Path::new("/w/aivmm.toml")).unwrap(), Path::new("/w/aivmm.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("net_allow") && e.contains("10.0.0.1/8"), "{e}");
    }

    const LIMITS: Limits = Limits {
        cpus: 8,
        memory: 8 << 30,
        disk_size: 64 << 30,
    };

    /// Every key once, each value different from the default.
    const EVERY_KEY: &str = "cpus = 6\nmemory = \"6G\"\ndisk_size = \"20G\"\nnet = \"user\"\n\
        forward = [\"3000:3000\"]\nnet_allow = [\"127.0.0.1:11434\"]\n\
        net_allow_only = [\"api.anthropic.com\"]\nenv = [\"A=1\"]\nshare = [\"/s:tag\"]\nshare_ro = [\"/r\"]\n\
        share_rw = [\"/w\"]\nclaude_auth = true\nssh = true\n";

    #[test]
    fn every_key_is_sizing_or_widening() {
        let f = file(EVERY_KEY, "/w/aivmm.toml");
        let keys: Vec<&str> = widening(&f, &LIMITS).iter().map(|w| w.key).collect();
        assert_eq!(
            keys, WIDENING_KEYS,
            "every widening key is reported, in order"
        );
        // Every key of the file is in exactly one of the two sets.
        let table: toml::Table = toml::from_str(EVERY_KEY).unwrap();
        assert_eq!(table.len(), WIDENING_KEYS.len() + SIZING_KEYS.len() + NARROWING_KEYS.len());
        for k in table.keys() {
            let n = WIDENING_KEYS.contains(&k.as_str()) as u8
                + SIZING_KEYS.contains(&k.as_str()) as u8
                + NARROWING_KEYS.contains(&k.as_str()) as u8;
            assert_eq!(n, 1, "{k}");
        }
        // One key at a time: the widening ones alone need trust; off-values narrow.
        for line in EVERY_KEY.lines() {
            let key = line.split(' ').next().unwrap();
            let w = widening(&file(line, "/w/aivmm.toml"), &LIMITS);
            let expect: Vec<&str> = WIDENING_KEYS
                .iter()
                .filter(|k| **k == key)
                .copied()
                .collect();
            assert_eq!(
                w.iter().map(|w| w.key).collect::<Vec<_>>(),
                expect,
                "{line}"
            );
        }
        for narrow in [
            "net = \"none\"",
            "claude_auth = false",
            "ssh = false",
            "env = []",
            "share = []",
            "",
        ] {
            assert!(
                widening(&file(narrow, "/w/aivmm.toml"), &LIMITS).is_empty(),
                "{narrow}"
            );
        }
        // Sizes above the limits widen.
        let big = file(
            "cpus = 9\nmemory = \"9G\"\ndisk_size = \"65G\"\n",
            "/w/aivmm.toml",
        );
        let keys: Vec<&str> = widening(&big, &LIMITS).iter().map(|w| w.key).collect();
        assert_eq!(keys, SIZING_KEYS);
        let at = file(
            "cpus = 8\nmemory = \"8G\"\ndisk_size = \"64G\"\n",
            "/w/aivmm.toml",
        );
        assert!(
            widening(&at, &LIMITS).is_empty(),
            "the limits themselves are allowed"
        );
        // Values are shown escaped: a file cannot paint on the terminal.
        let esc = widening(&file("env = [\"A\\u001b[2J\"]", "/w/aivmm.toml"), &LIMITS);
        assert_eq!(esc[0].value, "[\"A\\u{1b}[2J\"]");
    }

    #[test]
    fn merge_knows_every_value_s_source() {
        let up = PathBuf::from("/home/u/.config/aivmm/config.toml");
        let wp = PathBuf::from("/w/aivmm.toml");
        let (u_src, w_src) = (
            Source::UserConfig(up.clone()),
            Source::WorkdirConfig(wp.clone()),
        );

        // Defaults alone.
        let d = merge(None, None, &Layer::default());
        assert_eq!(d, RunConfig::default());
        assert_eq!(d.cpus.source, Source::Default);
        assert!(d.describe().is_empty());

        // Each source alone sets every key.
        let every = file(EVERY_KEY, "/x");
        for (src, c) in [
            (
                u_src.clone(),
                merge(
                    Some(&ConfigFile {
                        path: up.clone(),
                        ..every.clone()
                    }),
                    None,
                    &Layer::default(),
                ),
            ),
            (
                w_src.clone(),
                merge(
                    None,
                    Some(&ConfigFile {
                        path: wp.clone(),
                        ..every.clone()
                    }),
                    &Layer::default(),
                ),
            ),
            (Source::Cli, merge(None, None, &every.layer)),
        ] {
            assert_eq!(
                c.cpus,
                Sourced {
                    value: 6,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.memory,
                Sourced {
                    value: 6 << 30,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.disk_size,
                Sourced {
                    value: 20 << 30,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.net,
                Sourced {
                    value: NetMode::User,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.forward,
                vec![Sourced {
                    value: Forward {
                        host: 3000,
                        guest: 3000,
                        udp: false
                    },
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.env,
                vec![Sourced {
                    value: "A=1".to_string(),
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.share,
                vec![Sourced {
                    value: "/s:tag".to_string(),
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.share_ro,
                vec![Sourced {
                    value: PathBuf::from("/r"),
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.share_rw,
                vec![Sourced {
                    value: PathBuf::from("/w"),
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.claude_auth,
                Sourced {
                    value: true,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.ssh,
                Sourced {
                    value: true,
                    source: src.clone()
                }
            );
            assert_eq!(
                c.net_allow,
                vec![Sourced {
                    value: "127.0.0.1:11434".to_string(),
                    source: src.clone()
                }]
            );
            assert_eq!(
                c.net_allow_only,
                Some(Sourced {
                    value: vec!["api.anthropic.com".to_string()],
                    source: src.clone()
                })
            );
            assert_eq!(c.describe().len(), 13, "{src}");
        }

        // All three: scalars from the last source that sets them, lists joined in order.
        let user = file("cpus = 2\nmemory = \"2G\"\nnet = \"user\"\nenv = [\"U\"]\nclaude_auth = true\nssh = true\nshare_ro = [\"/u\"]\n", "/home/u/.config/aivmm/config.toml");
        let work = file(
            "cpus = 3\nnet = \"none\"\nenv = [\"W\"]\nclaude_auth = false\nshare_ro = [\"/w\"]\n",
            "/w/aivmm.toml",
        );
        let a = args(&["--cpus", "5", "--env", "C", "--share-ro", "/c"]);
        let c = merge(Some(&user), Some(&work), &Layer::from_args(&a));
        assert_eq!(
            c.cpus,
            Sourced {
                value: 5,
                source: Source::Cli
            }
        );
        assert_eq!(
            c.memory,
            Sourced {
                value: 2 << 30,
                source: u_src.clone()
            }
        );
        assert_eq!(c.disk_size.source, Source::Default);
        assert_eq!(
            c.net,
            Sourced {
                value: NetMode::None,
                source: w_src.clone()
            },
            "the workdir narrows"
        );
        assert_eq!(
            c.claude_auth,
            Sourced {
                value: false,
                source: w_src.clone()
            },
            "the workdir drops it"
        );
        assert_eq!(
            c.ssh,
            Sourced {
                value: true,
                source: u_src.clone()
            },
            "an absent switch says nothing"
        );
        let env: Vec<_> = c
            .env
            .iter()
            .map(|e| (e.value.as_str(), e.source.clone()))
            .collect();
        assert_eq!(
            env,
            vec![
                ("U", u_src.clone()),
                ("W", w_src.clone()),
                ("C", Source::Cli)
            ]
        );
        let ro: Vec<_> = c.share_ro.iter().map(|e| e.value.clone()).collect();
        assert_eq!(
            ro,
            vec![
                PathBuf::from("/u"),
                PathBuf::from("/w"),
                PathBuf::from("/c")
            ]
        );

        // The command line's value replaces the files'.
        let c5 = merge(Some(&user), Some(&work), &Layer::from_args(&args(&["--cpus", "5"])));
        assert_eq!(
            (c5.cpus.value, c5.memory.value, c5.net.value.clone()),
            (5, 2 << 30, NetMode::None)
        );
        assert_eq!(c5.cpus.source, Source::Cli);
        assert!(!c5.claude_auth.value && c5.ssh.value);
        let env: Vec<_> = c5.env.iter().map(|e| e.value.as_str()).collect();
        assert_eq!(env, vec!["U", "W"]);
        // The command line's switch turns it back on.
        let c = merge(
            Some(&user),
            Some(&work),
            &Layer::from_args(&args(&["--claude-auth"])),
        );
        assert_eq!(
            c.claude_auth,
            Sourced {
                value: true,
                source: Source::Cli
            }
        );
    }

    #[test]
    fn bad_files_are_refused_clearly() {
        let p = Path::new("/w/aivmm.toml");
        let e = parse("cpu = 4", p).unwrap_err().to_string();
        assert!(e.contains("/w/aivmm.toml") && e.contains("cpu"), "{e}");
        assert!(parse("cpus = \"four\"", p).is_err());
        let e = ConfigFile::from_bytes(b"memory = \"lots\"", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory") && e.contains("bad size"), "{e}");
        let e = ConfigFile::from_bytes(b"disk_size = \"1M\"", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disk_size") && e.contains("must be between"),
            "{e}"
        );
        let e = ConfigFile::from_bytes(b"cpus = 2\n\xff", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn only_a_small_regular_file_is_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("aivmm.toml");
        assert_eq!(read_file(&p, false).unwrap(), None, "no file");
        std::fs::write(d.path().join("real.toml"), "cpus = 2\n").unwrap();
        std::os::unix::fs::symlink(d.path().join("real.toml"), &p).unwrap();
        let e = read_file(&p, false).unwrap_err();
        assert!(matches!(e, Error::Symlink(_)), "{e}");
        assert!(e.to_string().contains("is a symlink"));
        assert_eq!(
            read_file(&p, true).unwrap().unwrap().layer.cpus,
            Some(2),
            "the user's may be a link"
        );
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(read_file(&p, false), Err(Error::NotRegular(_))));
        std::fs::remove_dir(&p).unwrap();
        let fifo = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(
            matches!(read_file(&p, false), Err(Error::NotRegular(_))),
            "a FIFO, without hanging"
        );
        std::fs::remove_file(&p).unwrap();
        let mut big = "# padding\n".repeat(7000);
        big.push_str("cpus = 2\n");
        std::fs::write(&p, &big).unwrap();
        assert!(matches!(read_file(&p, false), Err(Error::TooBig(_))));
        std::fs::write(&p, "cpus = 2\n").unwrap();
        let f = read_file(&p, false).unwrap().unwrap();
        let sha: [u8; 32] = Sha256::digest(b"cpus = 2\n").into();
        assert_eq!(
            (f.sha256, f.layer.cpus),
            (sha, Some(2)),
            "the bytes hashed are the bytes parsed"
        );
    }

    /// A workdir with `text` as its aivmm.toml, and a pin file path.
    fn workdir(text: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("project");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join(WORKDIR_FILE), text).unwrap();
        let pins = d.path().join("state").join("trusted");
        let w = std::fs::canonicalize(w).unwrap();
        (d, w, pins)
    }

    const HOSTILE: &str =
        "share = [\"/:hostroot\"]\nenv = [\"AWS_SECRET_ACCESS_KEY\"]\nclaude_auth = true\n";

    #[test]
    fn a_widening_workdir_file_runs_only_while_pinned() {
        let (_d, w, pins) = workdir(HOSTILE);
        let a = args(&[]);
        let e = load(&a, &w, None, &pins).unwrap_err().to_string();
        let want = format!(
            "{}/aivmm.toml asks for share, env, claude_auth, which widen the sandbox; it is not trusted (run `aivmm trust {}` after reading it)",
            w.display(),
            w.display()
        );
        assert_eq!(e, want);

        // Pinned: it runs, and its values arrive.
        let f = read_file(&w.join(WORKDIR_FILE), false).unwrap().unwrap();
        let mut p = Pins::default();
        p.set(&w, f.sha256).unwrap();
        p.save(&pins).unwrap();
        let (c, applied) = load(&args(&[]), &w, None, &pins).unwrap();
        assert_eq!(applied.workdir, Some((w.join(WORKDIR_FILE), true)));
        assert!(applied.line().unwrap().contains("aivmm.toml (trusted)"));
        let share: Vec<_> = c.share.iter().map(|x| x.value.as_str()).collect();
        assert_eq!(share, vec!["/:hostroot"]);
        assert_eq!(c.share[0].source, Source::WorkdirConfig(w.join(WORKDIR_FILE)));
        assert!(c.claude_auth.value);

        // One byte changed: refused again, saying it changed.
        std::fs::write(
            w.join(WORKDIR_FILE),
            HOSTILE.replace("hostroot", "hostrooT"),
        )
        .unwrap();
        let e = load(&args(&[]), &w, None, &pins)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("changed since you trusted it") && e.contains("aivmm trust"),
            "{e}"
        );

        // Revoked: refused as never trusted.
        std::fs::write(w.join(WORKDIR_FILE), HOSTILE).unwrap();
        assert!(load(&args(&[]), &w, None, &pins).is_ok());
        let mut p = Pins::load(&pins).unwrap();
        assert!(p.remove(&w));
        p.save(&pins).unwrap();
        let e = load(&args(&[]), &w, None, &pins)
            .unwrap_err()
            .to_string();
        assert!(e.contains("it is not trusted"), "{e}");

        // A pin of another workdir does not count.
        let mut p = Pins::default();
        p.set(&w.join("sub"), f.sha256).unwrap();
        p.save(&pins).unwrap();
        assert!(load(&args(&[]), &w, None, &pins).is_err());
    }

    #[test]
    fn a_workdir_holding_the_user_s_files_cannot_widen_through_them() {
        // `--workdir ~`: the user's config and the pin file are the guest's to write.
        let (_d, w, _) = workdir(HOSTILE);
        let pins = w.join(".local/state/aivmm/trusted");
        let f = read_file(&w.join(WORKDIR_FILE), false).unwrap().unwrap();
        let mut p = Pins::default();
        p.set(&w, f.sha256).unwrap();
        p.save(&pins).unwrap();
        let e = load(&args(&[]), &w, None, &pins)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("where the guest can write it, so it cannot approve"),
            "{e}"
        );

        std::fs::write(w.join(WORKDIR_FILE), "cpus = 2\n").unwrap();
        let user = w.join(".config/aivmm/config.toml");
        std::fs::create_dir_all(user.parent().unwrap()).unwrap();
        std::fs::write(&user, "share_rw = [\"/\"]\n").unwrap();
        let e = load(&args(&[]), &w, Some(&user), &pins)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.toml is inside the workdir") && e.contains("cannot widen"),
            "{e}"
        );
        std::fs::write(&user, "memory = \"2G\"\n").unwrap();
        let (c, _) = load(&args(&[]), &w, Some(&user), &pins).unwrap();
        assert_eq!(
            (c.cpus.value, c.memory.value),
            (2, 2 << 30),
            "sizes still apply"
        );

        // A link inside to a file outside is replaceable by the guest too; a
        // link outside to a file inside is writable through.
        let outside = tempfile::tempdir().unwrap();
        let out_file = outside.path().join("config.toml");
        std::fs::write(&out_file, "").unwrap();
        assert!(!inside(&out_file, &w));
        let link_in = w.join(".config/aivmm/link.toml");
        std::os::unix::fs::symlink(&out_file, &link_in).unwrap();
        assert!(inside(&link_in, &w));
        let link_out = outside.path().join("link.toml");
        std::os::unix::fs::symlink(&user, &link_out).unwrap();
        assert!(inside(&link_out, &w));
    }

    #[test]
    fn a_narrowing_workdir_file_runs_untrusted_over_the_user_s() {
        let (d, w, pins) = workdir("cpus = 2\nnet = \"none\"\nclaude_auth = false\n");
        let user = d.path().join("config.toml");
        std::fs::write(
            &user,
            "memory = \"3G\"\nclaude_auth = true\nenv = [\"TOKEN\"]\nshare_ro = [\"/docs\"]\n",
        )
        .unwrap();
        let (c, applied) = load(&args(&["--forward", "8080:80"]), &w, Some(&user), &pins).unwrap();
        assert_eq!(applied.user, Some(user.clone()));
        assert_eq!(applied.workdir, Some((w.join(WORKDIR_FILE), false)));
        let line = applied.line().unwrap();
        assert!(
            line.starts_with("aivmm: config: ")
                && line.contains("config.toml, ")
                && line.contains("(untrusted"),
            "{line}"
        );
        assert_eq!((c.cpus.value, c.memory.value), (2, 3 << 30));
        assert_eq!(c.net.value, NetMode::None);
        assert!(!c.claude_auth.value, "the workdir turned it off");
        let env: Vec<_> = c.env.iter().map(|e| e.value.as_str()).collect();
        assert_eq!(env, vec!["TOKEN"], "the user's widening keys need no pin");
        assert_eq!(c.forward.len(), 1);
        assert_eq!(c.forward[0].source, Source::Cli);
        assert!(!pins.exists(), "a run writes no state");

        // No files at all: the command line and defaults.
        let (_e, w2, pins2) = workdir("");
        std::fs::remove_file(w2.join(WORKDIR_FILE)).unwrap();
        let (c, applied) = load(&args(&["--cpus", "3"]), &w2, None, &pins2).unwrap();
        assert_eq!(applied.line(), None);
        assert_eq!(
            (c.cpus.value, c.memory.value),
            (3, crate::launch::DEFAULT_MEMORY)
        );
        assert_eq!(c.memory.source, Source::Default);
    }
}
