//! `aivmm.toml`: defaults for `aivmm run --workdir`, from the workdir or the
//! user's config dir.
//!
//! The first file found wins: `<workdir>/aivmm.toml`, then
//! `$XDG_CONFIG_HOME/aivmm/config.toml` (`~/.config/aivmm/config.toml`). Flags on
//! the command line override its values; its lists (`forward`, `env`, `share`,
//! `share_ro`, `share_rw`) come before the command line's, and its switches
//! (`claude_auth`, `ssh`) turn the feature on unless the command line already did.
//!
//! ```toml
//! cpus = 8
//! memory = "8G"
//! disk_size = "32G"
//! net = "user"
//! forward = ["3000:3000"]
//! env = ["ANTHROPIC_API_KEY"]
//! share = ["/home/me/notes:notes:ro"]
//! share_ro = ["/home/me/docs"]
//! share_rw = ["/home/me/scratch"]
//! claude_auth = true
//! ssh = false
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::RunArgs;
use crate::config;

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
}

/// `Result` of settings handling.
pub type Result<T> = std::result::Result<T, Error>;

/// What an `aivmm.toml` may say.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
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

/// The settings file for `workdir`, if any.
pub fn find(workdir: &Path) -> Option<PathBuf> {
    let local = workdir.join("aivmm.toml");
    if local.is_file() {
        return Some(local);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    let user = config.join("aivmm").join("config.toml");
    user.is_file().then_some(user)
}

/// Parses settings text; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Settings> {
    toml::from_str(text).map_err(|e| Error::Parse { path: path.to_path_buf(), reason: e.to_string() })
}

/// Reads the settings file for `workdir` and merges it under `args`.
pub fn apply(args: &mut RunArgs, workdir: &Path) -> Result<Option<PathBuf>> {
    let Some(path) = find(workdir) else { return Ok(None) };
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
    merge(args, parse(&text, &path)?, &path)?;
    Ok(Some(path))
}

/// Fills what `args` leaves unset from `s`, and puts `s`'s lists first.
pub fn merge(args: &mut RunArgs, s: Settings, path: &Path) -> Result<()> {
    let bad = |what: &str, e: config::Error| Error::Parse { path: path.to_path_buf(), reason: format!("{what}: {e}") };
    if args.size.cpus.is_none() {
        args.size.cpus = s.cpus;
    }
    if args.size.memory.is_none() {
        if let Some(m) = &s.memory {
            args.size.memory = Some(config::parse_size(m).map_err(|e| bad("memory", e))?);
        }
    }
    if args.size.disk_size.is_none() {
        if let Some(d) = &s.disk_size {
            let size = config::parse_size(d).and_then(config::check_disk_size);
            args.size.disk_size = Some(size.map_err(|e| bad("disk_size", e))?);
        }
    }
    if args.net.is_none() {
        if let Some(n) = &s.net {
            args.net = Some(config::parse_net(n).map_err(|e| bad("net", e))?);
        }
    }
    let mut forwards = s
        .forward
        .iter()
        .map(|f| config::parse_forward(f).map_err(|e| bad("forward", e)))
        .collect::<Result<Vec<_>>>()?;
    forwards.append(&mut args.forward);
    args.forward = forwards;
    let mut env = s.env;
    env.append(&mut args.env);
    args.env = env;
    let mut share = s.share;
    share.append(&mut args.share);
    args.share = share;
    let mut ro = s.share_ro;
    ro.append(&mut args.share_ro);
    args.share_ro = ro;
    let mut rw = s.share_rw;
    rw.append(&mut args.share_rw);
    args.share_rw = rw;
    args.claude_auth |= s.claude_auth.unwrap_or(false);
    args.ssh |= s.ssh.unwrap_or(false);
    Ok(())
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
    fn file_fills_gaps_and_flags_win() {
        let p = Path::new("aivmm.toml");
        let s = parse(
            "cpus = 8\nmemory = \"8G\"\ndisk_size = \"32G\"\nnet = \"none\"\nforward = [\"3000:3000\"]\nenv = [\"A=1\"]\n",
            p,
        )
        .unwrap();
        let mut a = args(&["--memory", "2G", "--forward", "8080:80"]);
        merge(&mut a, s, p).unwrap();
        assert_eq!(a.size.cpus, Some(8));
        assert_eq!(a.size.memory, Some(2 << 30), "the flag wins");
        assert_eq!(a.size.disk_size, Some(32 << 30));
        assert_eq!(a.net, Some(config::NetMode::None));
        let fwd: Vec<u16> = a.forward.iter().map(|f| f.host).collect();
        assert_eq!(fwd, vec![3000, 8080]);
        assert_eq!(a.env, vec!["A=1".to_string()]);

        let mut c = args(&["--share-ro", "/b"]);
        let s = parse("share_ro = [\"/a\"]\nshare_rw = [\"/w\"]\nclaude_auth = true\nssh = true\n", p).unwrap();
        merge(&mut c, s, p).unwrap();
        assert_eq!(c.share_ro, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(c.share_rw, vec![PathBuf::from("/w")]);
        assert!(c.claude_auth && c.ssh);

        let mut b = args(&["--disk-size", "4G"]);
        merge(&mut b, parse("disk_size = \"32G\"", p).unwrap(), p).unwrap();
        assert_eq!(b.size.disk_size, Some(4 << 30), "an explicit --disk-size wins");
    }

    #[test]
    fn bad_files_are_refused_clearly() {
        let p = Path::new("/w/aivmm.toml");
        let e = parse("cpu = 4", p).unwrap_err().to_string();
        assert!(e.contains("/w/aivmm.toml") && e.contains("cpu"), "{e}");
        assert!(parse("cpus = \"four\"", p).is_err());
        let mut a = args(&[]);
        let e = merge(&mut a, parse("memory = \"lots\"", p).unwrap(), p).unwrap_err().to_string();
        assert!(e.contains("memory") && e.contains("bad size"), "{e}");
    }

    #[test]
    fn workdir_file_is_found_first() {
        let w = tempfile::tempdir().unwrap();
        assert_eq!(find(w.path()).filter(|f| f.starts_with(w.path())), None);
        std::fs::write(w.path().join("aivmm.toml"), "cpus = 2\n").unwrap();
        assert_eq!(find(w.path()), Some(w.path().join("aivmm.toml")));
        let mut a = args(&[]);
        assert_eq!(apply(&mut a, w.path()).unwrap(), Some(w.path().join("aivmm.toml")));
        assert_eq!(a.size.cpus, Some(2));
    }
}
