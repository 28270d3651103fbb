//! aivmm's state on the host is the user's alone (DESIGN.md): directories 0700,
//! files 0600, opened without following symlinks.
//!
//! Every per-workdir and builder state path goes through here. [`dir`] makes a
//! directory (parents 0700 as well) and checks the one it names: it must be a
//! directory of the user's own (else it is refused: another user could read or
//! swap what aivmm keeps there), and a wider mode, left by an older aivmm or a
//! umask of 022, is tightened to 0700 (the files in it were never meant for
//! others, so narrowing is always right). [`options`] opens files with
//! `O_NOFOLLOW` and mode 0600, and [`create`] also tightens a file that already
//! existed with a wider mode.
//!
//! The base is `$XDG_STATE_HOME`, else `$HOME/.local/state` ([`base`]); there is
//! no fallback to a shared directory such as `/tmp`.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a state path is refused (wrapped in an `io::Error`, so callers keep
/// their own path-carrying error variants).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither variable that locates the state directory is set.
    #[error("no state directory: set XDG_STATE_HOME or HOME (aivmm keeps no state in a shared directory such as /tmp)")]
    NoBase,
    /// A state directory belongs to someone else.
    #[error("{} belongs to uid {owner}, not to you (uid {me}); aivmm will not keep state there", .path.display())]
    NotOwned {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// A state directory is not a directory.
    #[error("{}: not a directory", .path.display())]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
}

/// The base of aivmm's state: `$XDG_STATE_HOME`, else `$HOME/.local/state`
/// (empty values count as unset).
pub fn base() -> Result<PathBuf, Error> {
    base_from(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
}

fn base_from(xdg: Option<OsString>, home: Option<OsString>) -> Result<PathBuf, Error> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty());
    set(xdg)
        .map(PathBuf::from)
        .or_else(|| set(home).map(|h| PathBuf::from(h).join(".local/state")))
        .ok_or(Error::NoBase)
}

/// The mode bits of `mode` that others than the owner hold.
const OTHERS: u32 = 0o077;

/// Makes directory `path` (and missing parents, 0700) and checks it: the user's
/// own, mode tightened to 0700 if wider. A symlink to a directory is followed
/// (the user may keep state on another disk) but the target must pass too.
pub fn dir(path: &Path) -> io::Result<()> {
    // SAFETY: geteuid cannot fail.
    dir_for(path, unsafe { libc::geteuid() })
}

/// [`dir`] for user `me`.
fn dir_for(path: &Path, me: u32) -> io::Result<()> {
    let not_a_dir = || {
        io::Error::other(Error::NotADirectory {
            path: path.to_path_buf(),
        })
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        // Recursive creation fails with EEXIST only where a non-directory stands.
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                not_a_dir()
            } else {
                e
            }
        })?;
    // O_DIRECTORY: the check below is on the directory itself, never on a file
    // swapped in between.
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                not_a_dir()
            } else {
                e
            }
        })?;
    let m = d.metadata()?;
    if m.uid() != me {
        return Err(io::Error::other(Error::NotOwned {
            path: path.to_path_buf(),
            owner: m.uid(),
            me,
        }));
    }
    if m.mode() & OTHERS != 0 {
        fchmod(&d, 0o700)?;
        tracing::info!(
            "{}: tightened to 0700 (aivmm state is yours alone)",
            path.display()
        );
    }
    Ok(())
}

/// Open options for a state file: `O_NOFOLLOW` (a symlink planted in a state
/// directory is refused, not followed), close-on-exec, and mode 0600 when
/// created. Add read/write/create as needed.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// Creates (or truncates) state file `path` for writing, 0600; a file that
/// existed with a wider mode is tightened.
pub fn create(path: &Path) -> io::Result<File> {
    let f = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    tighten(&f)?;
    Ok(f)
}

/// Writes `bytes` to `path` atomically: a fresh 0600 temporary file beside it
/// (created exclusively, no symlink followed), fsync, renamed over `path`, then
/// the directory fsynced. On an error the temporary file is removed and `path`
/// is as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = dir.join(format!(".{name}.aivmm-{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir).and_then(|d| d.sync_all())
}

/// What [`sparse_disk`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disk {
    /// Made now: all zeros, which the guest formats itself.
    Created,
    /// There already, as large as asked or larger.
    Kept,
    /// There, and smaller than asked: now grown, with `from` bytes before. The
    /// guest grows its filesystem to the disk at its next boot.
    Grown { from: u64 },
}

/// The persistent disk image `path`, sparse: made with `size` bytes the first
/// time (as `PATH.new`, renamed into place), grown to `size` when smaller (and
/// logged), never shrunk. A larger disk is used as it is when its size was not asked for
/// (`asked` false: a default), and refused when it was, since shrinking would cut
/// off the filesystem's end: the user learns that the setting did nothing.
pub fn sparse_disk(path: &Path, size: u64, asked: bool) -> io::Result<Disk> {
    match options().read(true).write(true).open(path) {
        Ok(f) => {
            // An older aivmm made it 0644: the guest's data is no one else's.
            tighten(&f)?;
            let have = f.metadata()?.len();
            if have < size {
                f.set_len(size)?;
                f.sync_all()?;
                tracing::info!(
                    "{}: grown from {} to {}; the guest grows its filesystem as it boots",
                    path.display(),
                    crate::config::format_size(have),
                    crate::config::format_size(size)
                );
                Ok(Disk::Grown { from: have })
            } else if have > size && asked {
                use crate::config::format_size;
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the disk is {} and {} was asked for: aivmm grows a disk but never shrinks \
                         one (its filesystem would be cut); ask for {0} or more, or delete the disk \
                         to start over",
                        format_size(have),
                        format_size(size)
                    ),
                ))
            } else {
                Ok(Disk::Kept)
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".new");
            let tmp = PathBuf::from(tmp);
            let f = create(&tmp)?;
            f.set_len(size)?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            Ok(Disk::Created)
        }
        Err(e) => Err(e),
    }
}

/// Removes group and other permissions from open state file `f`.
pub fn tighten(f: &File) -> io::Result<()> {
    let mode = f.metadata()?.mode();
    if mode & OTHERS != 0 {
        fchmod(f, mode & 0o700)?;
    }
    Ok(())
}

/// The last lines of a guest-written state file (the console log), for a
/// message: at most the last `max` bytes are read, whatever the file's size; a
/// line cut by that start is dropped; invalid UTF-8 is replaced; control
/// characters other than newlines and tabs are escaped, so the guest's text
/// cannot drive the user's terminal.
pub fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = options().read(true).open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = match (start, text.find('\n')) {
        (0, _) => &text[..],
        (_, Some(nl)) => &text[nl + 1..],
        (_, None) => "",
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn fchmod(f: &File, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod on a descriptor we own; `mode` fits mode_t (at most 0o777).
    if unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_disk_is_made_sparse_grown_when_asked_and_never_shrunk() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        assert_eq!(sparse_disk(&p, 1 << 30, true).unwrap(), Disk::Created);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 30);
        assert_eq!(mode(&p), 0o600);
        assert!(std::fs::metadata(&p).unwrap().blocks() < 64, "sparse");
        assert!(!dir.path().join("disk.img.new").exists());
        // What the guest wrote stays when the disk grows.
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"filesystem").unwrap();
        drop(f);
        assert_eq!(sparse_disk(&p, 1 << 30, true).unwrap(), Disk::Kept);
        assert_eq!(sparse_disk(&p, 2 << 30, false).unwrap(), Disk::Grown { from: 1 << 30 });
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30);
        let mut buf = [0u8; 10];
        let mut f = File::open(&p).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"filesystem");
        // Smaller: kept as it is when the size is a default, refused when asked for.
        assert_eq!(sparse_disk(&p, 1 << 30, false).unwrap(), Disk::Kept);
        let e = sparse_disk(&p, 1 << 30, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("the disk is 2G and 1G was asked for"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30, "untouched");
        // A symlink in its place is refused, not followed.
        let q = dir.path().join("link.img");
        std::os::unix::fs::symlink(&p, &q).unwrap();
        assert!(sparse_disk(&q, 4 << 30, true).is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 30);
    }

    #[test]
    fn read_tail_is_bounded_and_printable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut data = vec![b'x'; 100_000];
        data.extend(b"\nline one\r\n\x1b[2Jline two\n");
        std::fs::write(&p, &data).unwrap();
        let t = read_tail(&p, 64).unwrap();
        assert_eq!(t, "line one\\r\n\\u{1b}[2Jline two\n");
        // The cut line is dropped; a whole short file is kept.
        assert_eq!(read_tail(&p, 20).unwrap(), "\\u{1b}[2Jline two\n");
        std::fs::write(&p, "a\nb\n").unwrap();
        assert_eq!(read_tail(&p, 64).unwrap(), "a\nb\n");
    }

    #[test]
    fn directories_are_made_and_tightened_to_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        dir(&d).unwrap();
        for p in [t.path().join("a"), t.path().join("a/b"), d.clone()] {
            assert_eq!(mode(&p) & OTHERS, 0, "{}", p.display());
        }
        // An older aivmm's 0755 directory is narrowed.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        // A file where a directory belongs is refused.
        let f = t.path().join("file");
        std::fs::write(&f, "x").unwrap();
        let e = dir(&f).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn files_are_0600_and_symlinks_are_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        create(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        // A world-readable file left by an older aivmm is narrowed.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        create(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
        // A planted symlink is refused; its target is untouched.
        let target = t.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        let link = t.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = create(&link).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }

    #[test]
    fn no_base_without_xdg_state_home_or_home() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(base_from(os("/x"), os("/h")).unwrap(), Path::new("/x"));
        assert_eq!(
            base_from(os(""), os("/h")).unwrap(),
            Path::new("/h/.local/state")
        );
        assert_eq!(
            base_from(None, os("/h")).unwrap(),
            Path::new("/h/.local/state")
        );
        let e = base_from(None, os("")).unwrap_err();
        assert!(matches!(e, Error::NoBase));
        assert!(e.to_string().contains("XDG_STATE_HOME or HOME"), "{e}");
        assert!(base_from(None, None).is_err());
    }

    #[test]
    fn another_users_directory_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // SAFETY: geteuid cannot fail.
        let someone_else = unsafe { libc::geteuid() } + 4242;
        let e = dir_for(t.path(), someone_else).unwrap_err();
        assert!(e.to_string().contains("not to you"), "{e}");
        // Refused, not tightened: it is not ours to change.
        assert_eq!(mode(t.path()), 0o755);
    }
}
