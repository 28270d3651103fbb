//! `aivmm trust [DIR]`: the user approves the exact `DIR/aivmm.toml` that widens
//! the sandbox (shares, env passthrough, Claude login, ssh, network, forwards,
//! sizes over the untrusted limits).
//!
//! It reads the file once (as `aivmm run` does: no symlink, at most 64 KiB),
//! prints what widens the sandbox, and pins the sha256 of those bytes with the
//! canonical workdir in the pin file ([`crate::pins`]). Any later change to the
//! file, by the guest or by a `git pull`, makes `aivmm run` refuse it until the
//! user trusts it again. A file that widens nothing is not pinned: it runs as
//! it is, and pinning it would approve nothing. `--list` shows the pins and
//! whether each file still matches; `--revoke` removes a workdir's pin.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::pins::{self, Pins};
use crate::settings::{self, Limits, WORKDIR_FILE};

/// Errors of `aivmm trust`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory does not exist or cannot be resolved.
    #[error("{path}: {source}")]
    Dir {
        /// The directory given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory has no `aivmm.toml`.
    #[error("{0} has no aivmm.toml: nothing to trust")]
    NoFile(PathBuf),
    /// The file could not be read or parsed.
    #[error(transparent)]
    Settings(#[from] settings::Error),
    /// The pin file could not be read or written.
    #[error(transparent)]
    Pins(#[from] pins::Error),
    /// The terminal could not be written.
    #[error("stdout: {0}")]
    Out(std::io::Error),
}

/// `Result` of `aivmm trust`.
pub type Result<T> = std::result::Result<T, Error>;

/// What `aivmm trust` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Approve `DIR/aivmm.toml` as it is now.
    Trust(PathBuf),
    /// List the pins.
    List,
    /// Remove `DIR`'s pin.
    Revoke(PathBuf),
}

/// Runs `action` with the pin file at `pins_path`, writing to `out`.
pub fn run(action: &Action, pins_path: &Path, limits: &Limits, out: &mut dyn Write) -> Result<i32> {
    match action {
        Action::Trust(dir) => trust(dir, pins_path, limits, out),
        Action::List => list(pins_path, limits, out),
        Action::Revoke(dir) => revoke(dir, pins_path, out),
    }
}

fn canonical(dir: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(dir).map_err(|source| Error::Dir {
        path: dir.to_path_buf(),
        source,
    })
}

fn trust(dir: &Path, pins_path: &Path, limits: &Limits, out: &mut dyn Write) -> Result<i32> {
    let dir = canonical(dir)?;
    let path = dir.join(WORKDIR_FILE);
    let file = settings::read_file(&path, false)?.ok_or_else(|| Error::NoFile(dir.clone()))?;
    let wide = settings::widening(&file, limits);
    let o = |r: std::io::Result<()>| r.map_err(Error::Out);
    if wide.is_empty() {
        o(writeln!(
            out,
            "{} widens nothing (only cpus, memory and disk_size within limits, net = \"none\" or \
             switches off): it runs without trust; nothing pinned",
            path.display()
        ))?;
        return Ok(0);
    }
    o(writeln!(out, "{} widens the sandbox with:", path.display()))?;
    for w in &wide {
        o(writeln!(out, "  {} = {}", w.key, w.value))?;
    }
    let mut pins = Pins::load(pins_path)?;
    pins.set(&dir, file.sha256)?;
    pins.save(pins_path)?;
    o(writeln!(
        out,
        "trusted: sha256 {} pinned for {}; any change to the file needs `aivmm trust` again",
        pins::hex(&file.sha256),
        dir.display()
    ))?;
    Ok(0)
}

fn list(pins_path: &Path, limits: &Limits, out: &mut dyn Write) -> Result<i32> {
    let pins = Pins::load(pins_path)?;
    let o = |r: std::io::Result<()>| r.map_err(Error::Out);
    if pins.pins.is_empty() {
        o(writeln!(
            out,
            "no trusted workdir configs ({})",
            pins_path.display()
        ))?;
    }
    for p in &pins.pins {
        let state = match settings::read_file(&p.workdir.join(WORKDIR_FILE), false) {
            Ok(Some(f)) if f.sha256 == p.sha256 => "trusted",
            Ok(Some(f)) if settings::widening(&f, limits).is_empty() => {
                "changed (widens nothing now)"
            }
            Ok(Some(_)) | Err(_) => "changed: refused until trusted again",
            Ok(None) => "gone",
        };
        o(writeln!(
            out,
            "{}  {}  {state}",
            &pins::hex(&p.sha256)[..16],
            p.workdir.display()
        ))?;
    }
    Ok(0)
}

fn revoke(dir: &Path, pins_path: &Path, out: &mut dyn Write) -> Result<i32> {
    // A workdir that is gone can still be revoked by the path it had.
    let dir = canonical(dir).or_else(|e| {
        if dir.is_absolute() {
            Ok(dir.to_path_buf())
        } else {
            Err(e)
        }
    })?;
    let mut pins = Pins::load(pins_path)?;
    let o = |r: std::io::Result<()>| r.map_err(Error::Out);
    if pins.remove(&dir) {
        pins.save(pins_path)?;
        o(writeln!(
            out,
            "revoked: {} is no longer trusted",
            dir.display()
        ))?;
    } else {
        o(writeln!(out, "{} was not trusted", dir.display()))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const LIMITS: Limits = Limits {
        cpus: 8,
        memory: 8 << 30,
        disk_size: 64 << 30,
    };

    fn go(action: Action, pins: &Path) -> (Result<i32>, String) {
        let mut out = Vec::new();
        let r = run(&action, pins, &LIMITS, &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn trust_list_and_revoke() {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("p");
        std::fs::create_dir(&w).unwrap();
        let w = std::fs::canonicalize(&w).unwrap();
        let pins = d.path().join("state").join("trusted");

        let (r, _) = go(Action::Trust(w.clone()), &pins);
        assert!(matches!(r, Err(Error::NoFile(_))));

        std::fs::write(w.join(WORKDIR_FILE), "cpus = 2\nnet = \"none\"\n").unwrap();
        let (r, text) = go(Action::Trust(w.clone()), &pins);
        assert_eq!(r.unwrap(), 0);
        assert!(
            text.contains("widens nothing") && text.contains("nothing pinned"),
            "{text}"
        );
        assert!(!pins.exists());

        std::fs::write(
            w.join(WORKDIR_FILE),
            "share_ro = [\"/secret\"]\nenv = [\"AWS_SECRET_ACCESS_KEY\"]\n",
        )
        .unwrap();
        let (r, text) = go(Action::Trust(w.clone()), &pins);
        assert_eq!(r.unwrap(), 0);
        assert!(
            text.contains("  share_ro = [\"/secret\"]\n  env = [\"AWS_SECRET_ACCESS_KEY\"]\n"),
            "{text}"
        );
        assert!(text.contains("pinned for"), "{text}");
        let file = settings::read_file(&w.join(WORKDIR_FILE), false)
            .unwrap()
            .unwrap();
        assert_eq!(Pins::load(&pins).unwrap().get(&w), Some(&file.sha256));

        let (_, text) = go(Action::List, &pins);
        assert!(
            text.contains(&w.display().to_string()) && text.ends_with("trusted\n"),
            "{text}"
        );
        std::fs::write(w.join(WORKDIR_FILE), "share_ro = [\"/secret\"]\n").unwrap();
        let (_, text) = go(Action::List, &pins);
        assert!(text.contains("changed: refused"), "{text}");

        let (r, text) = go(Action::Revoke(w.clone()), &pins);
        assert_eq!(r.unwrap(), 0);
        assert!(text.starts_with("revoked"), "{text}");
        assert_eq!(Pins::load(&pins).unwrap().get(&w), None);
        let (_, text) = go(Action::Revoke(w.clone()), &pins);
        assert!(text.contains("was not trusted"), "{text}");
        let (_, text) = go(Action::List, &pins);
        assert!(text.starts_with("no trusted workdir configs"), "{text}");

        // A symlinked aivmm.toml is not trusted either.
        std::fs::remove_file(w.join(WORKDIR_FILE)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", w.join(WORKDIR_FILE)).unwrap();
        let (r, _) = go(Action::Trust(w.clone()), &pins);
        assert!(matches!(
            r,
            Err(Error::Settings(settings::Error::Symlink(_)))
        ));
    }
}
