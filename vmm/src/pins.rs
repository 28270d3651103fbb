//! The workdir configs the user has approved with `aivmm trust`: one line per
//! workdir, the sha256 of its `aivmm.toml` and its canonical path.
//!
//! The file is `$XDG_STATE_HOME/aivmm/trusted` (`~/.local/state/aivmm/trusted`),
//! mode 0600 in a 0700 directory, replaced atomically (a new file, fsynced, then
//! renamed over the old one). `aivmm run` only reads it; `aivmm trust` writes it.
//! A pin file that someone else owns or may write is refused, not read: it is
//! what lets a workdir widen the sandbox.
//!
//! ```text
//! # aivmm trusted workdir configs: sha256 of DIR/aivmm.toml, then DIR
//! 3b0c…e1f2 /home/me/src/project
//! ```

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors of the pin file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or its directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not the user's alone.
    #[error("{0}: not trusted: it must be a regular file owned by you and writable by you alone (chmod 600)")]
    Unsafe(PathBuf),
    /// The file is larger than any pin file aivmm writes.
    #[error("{0}: larger than {MAX_PINS_SIZE} bytes; not an aivmm pin file")]
    TooBig(PathBuf),
    /// A line is not `SHA256 PATH`.
    #[error("{path}:{line}: not `SHA256 DIR`")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
    },
    /// A workdir path that a line cannot hold.
    #[error("{0}: a path with a newline cannot be trusted")]
    Newline(PathBuf),
    /// There is no state directory to keep pins in.
    #[error(transparent)]
    NoState(#[from] crate::workdir::Error),
}

/// `Result` of pin handling.
pub type Result<T> = std::result::Result<T, Error>;

/// The largest pin file read (about 3,000 pins of long paths).
pub const MAX_PINS_SIZE: u64 = 1 << 20;

const HEADER: &str = "# aivmm trusted workdir configs: sha256 of DIR/aivmm.toml, then DIR\n";

/// One approved workdir config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The workdir, canonical.
    pub workdir: PathBuf,
    /// The sha256 of its `aivmm.toml` when it was approved.
    pub sha256: [u8; 32],
}

/// Every pin, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pins {
    /// The pins.
    pub pins: Vec<Pin>,
}

/// aivmm's state directory: `$XDG_STATE_HOME/aivmm` or `~/.local/state/aivmm`,
/// the parent of the per-workdir state.
pub fn state_base() -> Result<PathBuf> {
    let vms = crate::workdir::state_root()?;
    Ok(vms.parent().map(Path::to_path_buf).unwrap_or(vms))
}

/// The pin file.
pub fn default_path() -> Result<PathBuf> {
    Ok(state_base()?.join("trusted"))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Pins {
    /// Reads the pin file at `path`; a missing file is no pins.
    pub fn load(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Error::Unsafe(path.to_path_buf()))
            }
            Err(e) => return Err(io(e)),
        };
        let meta = f.metadata().map_err(io)?;
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(Error::Unsafe(path.to_path_buf()));
        }
        let mut bytes = Vec::new();
        f.take(MAX_PINS_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() as u64 > MAX_PINS_SIZE {
            return Err(Error::TooBig(path.to_path_buf()));
        }
        Self::parse(&bytes, path)
    }

    /// Parses pin file bytes; `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let mut pins = Vec::new();
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let bad = || Error::Line {
                path: path.to_path_buf(),
                line: i + 1,
            };
            let (sha, dir) = match line.iter().position(|b| *b == b' ') {
                Some(p) => (&line[..p], &line[p + 1..]),
                None => return Err(bad()),
            };
            let sha = std::str::from_utf8(sha)
                .ok()
                .and_then(unhex)
                .ok_or_else(bad)?;
            if !dir.starts_with(b"/") {
                return Err(bad());
            }
            pins.push(Pin {
                workdir: PathBuf::from(OsStr::from_bytes(dir)),
                sha256: sha,
            });
        }
        Ok(Self { pins })
    }

    /// The file's bytes.
    pub fn render(&self) -> Result<Vec<u8>> {
        let mut out = HEADER.as_bytes().to_vec();
        for p in &self.pins {
            let dir = p.workdir.as_os_str().as_bytes();
            if dir.contains(&b'\n') {
                return Err(Error::Newline(p.workdir.clone()));
            }
            out.extend_from_slice(hex(&p.sha256).as_bytes());
            out.push(b' ');
            out.extend_from_slice(dir);
            out.push(b'\n');
        }
        Ok(out)
    }

    /// The approved hash for canonical `workdir`.
    pub fn get(&self, workdir: &Path) -> Option<&[u8; 32]> {
        self.pins
            .iter()
            .find(|p| p.workdir == workdir)
            .map(|p| &p.sha256)
    }

    /// Approves `sha256` for `workdir` (replacing its old pin).
    pub fn set(&mut self, workdir: &Path, sha256: [u8; 32]) -> Result<()> {
        if workdir.as_os_str().as_bytes().contains(&b'\n') {
            return Err(Error::Newline(workdir.to_path_buf()));
        }
        self.remove(workdir);
        self.pins.push(Pin {
            workdir: workdir.to_path_buf(),
            sha256,
        });
        Ok(())
    }

    /// Removes `workdir`'s pin; whether there was one.
    pub fn remove(&mut self, workdir: &Path) -> bool {
        let before = self.pins.len();
        self.pins.retain(|p| p.workdir != workdir);
        self.pins.len() != before
    }

    /// Writes the pins to `path` atomically: mode 0600, its directory 0700 and
    /// the user's own ([`crate::state_fs`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io { path: p, source }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::state_fs::dir(dir).map_err(io(dir))?;
        let bytes = self.render()?;
        crate::state_fs::write_atomic(path, &bytes).map_err(io(path))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pins_round_trip_through_a_private_file() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state").join("trusted");
        assert_eq!(
            Pins::load(&path).unwrap(),
            Pins::default(),
            "no file is no pins"
        );
        let mut p = Pins::default();
        p.set(Path::new("/w/a b"), [7; 32]).unwrap();
        p.set(Path::new("/w/c"), [1; 32]).unwrap();
        p.set(Path::new("/w/a b"), [9; 32]).unwrap();
        assert_eq!(p.pins.len(), 2, "a new pin replaces the workdir's old one");
        p.save(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        let back = Pins::load(&path).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.get(Path::new("/w/a b")), Some(&[9; 32]));
        assert_eq!(back.get(Path::new("/w")), None);
        let mut back = back;
        assert!(back.remove(Path::new("/w/c")));
        assert!(!back.remove(Path::new("/w/c")));
        back.save(&path).unwrap();
        assert_eq!(Pins::load(&path).unwrap().pins.len(), 1);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left");
    }

    #[test]
    fn unsafe_or_bad_pin_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("trusted");
        fs::write(&path, HEADER).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            matches!(Pins::load(&path), Err(Error::Unsafe(_))),
            "world-writable"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Pins::load(&path).unwrap().pins.is_empty());
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(
            matches!(Pins::load(&link), Err(Error::Unsafe(_))),
            "a symlink"
        );
        for bad in [
            "zz /w\n",
            "abcd /w\n",
            &format!("{} relative\n", "0".repeat(64)),
            "nospace\n",
        ] {
            let e = Pins::parse(bad.as_bytes(), &path).unwrap_err().to_string();
            assert!(e.contains(":1: not `SHA256 DIR`"), "{bad}: {e}");
        }
        let mut p = Pins::default();
        assert!(matches!(
            p.set(Path::new("/w/a\nb"), [0; 32]),
            Err(Error::Newline(_))
        ));
    }
}
