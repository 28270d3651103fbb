//! Unpacking .deb files without root. `dpkg-deb --fsys-tarfile` gives the data
//! tar; the entries are written into the staging tree with owner-writable modes
//! (so later packages can replace files), while their real owners and modes are
//! recorded, to be set in the ext4 image afterwards. No maintainer script runs.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Error, Result};

/// The owner and mode a path must have in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits (07777).
    pub mode: u32,
}

/// Paths dpkg would install but the guest has no use for (dpkg's `path-exclude`).
pub const EXCLUDED: &[&str] = &[
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/locale/",
    "usr/share/lintian/",
];

/// Directories that are symlinks into /usr in a merged-/usr system (as
/// debootstrap makes bookworm): the link and its target.
pub const MERGED_USR: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];

/// Maps an archive path (`./bin/sh`) to where it lands in a merged-/usr tree
/// (`usr/bin/sh`); `None` for the root itself, `..` or absolute tricks, and
/// excluded paths. `merged` says whether to fold /bin etc. into /usr.
pub fn target_path(archive_path: &Path, merged: bool) -> Option<String> {
    let mut parts = Vec::new();
    for c in archive_path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    let mut p = parts.join("/");
    if p.is_empty() {
        return None;
    }
    if merged {
        for (link, target) in MERGED_USR {
            if p == *link {
                return None;
            }
            if let Some(rest) = p.strip_prefix(&format!("{link}/")) {
                p = format!("{target}/{rest}");
                break;
            }
        }
    }
    let with_slash = format!("{p}/");
    if EXCLUDED
        .iter()
        .any(|x| with_slash.starts_with(x) && with_slash.len() > x.len())
    {
        return None;
    }
    Some(p)
}

/// What one unpacked package left behind.
#[derive(Debug, Default)]
pub struct Unpacked {
    /// Every path the package ships, as dpkg lists it (`/usr/bin/git`).
    pub listed: Vec<String>,
}

/// Unpacks `deb` into `root`, recording owners and modes in `meta` (keys are
/// paths relative to `root`). `merged` folds /bin, /sbin, /lib, /lib64 into /usr.
pub fn unpack(
    deb: &Path,
    root: &Path,
    merged: bool,
    meta: &mut BTreeMap<String, Meta>,
) -> Result<Unpacked> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool {
            tool: "dpkg-deb".into(),
            detail: e.to_string(),
        })?;
    let stdout = child.stdout.take().ok_or_else(|| Error::Tool {
        tool: "dpkg-deb".into(),
        detail: "no stdout".into(),
    })?;
    let result = unpack_tar(stdout, root, merged, meta);
    let out = child.wait_with_output().map_err(|e| Error::Tool {
        tool: "dpkg-deb".into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Tool {
            tool: "dpkg-deb".into(),
            detail: format!(
                "{}: {}",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    result.map_err(|e| match e {
        Error::Io { path, source } => Error::Io {
            path: PathBuf::from(format!("{} in {}", path.display(), deb.display())),
            source,
        },
        other => other,
    })
}

/// Unpacks a tar stream (see [`unpack`]).
pub fn unpack_tar(
    reader: impl Read,
    root: &Path,
    merged: bool,
    meta: &mut BTreeMap<String, Meta>,
) -> Result<Unpacked> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacked = Unpacked::default();
    let entries = archive.entries().map_err(|e| Error::io(root, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io(root, e))?;
        let header = entry.header();
        let apath = entry.path().map_err(|e| Error::io(root, e))?.into_owned();
        let parts: Vec<_> = apath
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy()),
                _ => None,
            })
            .collect();
        if !parts.is_empty() {
            unpacked.listed.push(format!("/{}", parts.join("/")));
        }
        let Some(rel) = target_path(&apath, merged) else {
            continue;
        };
        let m = Meta {
            uid: header.uid().unwrap_or(0) as u32,
            gid: header.gid().unwrap_or(0) as u32,
            mode: header.mode().unwrap_or(0o644) & 0o7777,
        };
        let dest = root.join(&rel);
        let kind = header.entry_type();
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let io = |e| Error::io(&dest, e);
        if kind.is_dir() {
            if !dest.is_dir() {
                std::fs::create_dir_all(&dest).map_err(io)?;
            }
            std::fs::set_permissions(
                &dest,
                std::fs::Permissions::from_mode((m.mode | 0o700) & 0o777),
            )
            .map_err(io)?;
        } else if kind.is_file() {
            remove_existing(&dest)?;
            let mut f = std::fs::File::create(&dest).map_err(io)?;
            std::io::copy(&mut entry, &mut f).map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode((m.mode | 0o600) & 0o777))
                .map_err(io)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io)?
                .ok_or_else(|| Error::BadPackage(format!("{rel}: symlink without target")))?;
            remove_existing(&dest)?;
            std::os::unix::fs::symlink(&target, &dest).map_err(io)?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(io)?
                .ok_or_else(|| Error::BadPackage(format!("{rel}: hard link without target")))?;
            let Some(trel) = target_path(&target, merged) else {
                continue;
            };
            remove_existing(&dest)?;
            std::fs::hard_link(root.join(trel), &dest).map_err(io)?;
        } else {
            // Device nodes and FIFOs: Debian packages do not ship them.
            tracing::warn!("skipping special file /{rel}");
            continue;
        }
        meta.insert(rel, m);
    }
    Ok(unpacked)
}

fn remove_existing(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => Err(Error::BadPackage(format!(
            "{} is a directory in another package",
            p.display()
        ))),
        Ok(_) => std::fs::remove_file(p).map_err(|e| Error::io(p, e)),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_fold_into_usr_and_skip_docs() {
        let t = |p: &str| target_path(Path::new(p), true);
        assert_eq!(t("./bin/bash").as_deref(), Some("usr/bin/bash"));
        assert_eq!(
            t("./lib64/ld-linux-x86-64.so.2").as_deref(),
            Some("usr/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(t("./libexec/x").as_deref(), Some("libexec/x"));
        assert_eq!(t("./usr/bin/git").as_deref(), Some("usr/bin/git"));
        assert_eq!(t("./bin/"), None);
        assert_eq!(t("./"), None);
        assert_eq!(t("./usr/share/doc/git/copyright"), None);
        assert_eq!(t("./usr/share/doc").as_deref(), Some("usr/share/doc"));
        assert_eq!(t("../etc/passwd"), None);
        assert_eq!(t("/etc/passwd"), None);
        assert_eq!(
            target_path(Path::new("./lib/modules/x.ko"), false).as_deref(),
            Some("lib/modules/x.ko")
        );
    }

    #[test]
    fn tar_entries_land_with_recorded_metadata() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add =
            |path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(kind);
                h.set_mode(mode);
                h.set_uid(0);
                h.set_gid(if path.contains("sudo") { 0 } else { 5 });
                h.set_size(data.len() as u64);
                if let Some(l) = link {
                    h.set_link_name(l).unwrap();
                }
                b.append_data(&mut h, path, data).unwrap();
            };
        add("./usr/", tar::EntryType::Directory, 0o755, b"", None);
        add("./usr/bin/", tar::EntryType::Directory, 0o755, b"", None);
        add(
            "./usr/bin/sudo",
            tar::EntryType::Regular,
            0o4755,
            b"x",
            None,
        );
        add(
            "./bin/sh",
            tar::EntryType::Symlink,
            0o777,
            b"",
            Some("dash"),
        );
        add(
            "./usr/bin/sudoedit",
            tar::EntryType::Link,
            0o4755,
            b"",
            Some("./usr/bin/sudo"),
        );
        add(
            "./usr/share/doc/sudo/README",
            tar::EntryType::Regular,
            0o444,
            b"doc",
            None,
        );
        let tarball = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        for (l, t) in MERGED_USR {
            std::fs::create_dir_all(dir.path().join(t)).unwrap();
            std::os::unix::fs::symlink(t, dir.path().join(l)).unwrap();
        }
        let mut meta = BTreeMap::new();
        let u = unpack_tar(&tarball[..], dir.path(), true, &mut meta).unwrap();
        assert_eq!(
            u.listed,
            [
                "/usr",
                "/usr/bin",
                "/usr/bin/sudo",
                "/bin/sh",
                "/usr/bin/sudoedit",
                "/usr/share/doc/sudo/README"
            ]
        );
        assert_eq!(
            meta["usr/bin/sudo"],
            Meta {
                uid: 0,
                gid: 0,
                mode: 0o4755
            }
        );
        assert_eq!(meta["usr/bin/sh"].gid, 5);
        assert_eq!(
            std::fs::read_link(dir.path().join("usr/bin/sh")).unwrap(),
            Path::new("dash")
        );
        assert_eq!(
            std::fs::read(dir.path().join("usr/bin/sudoedit")).unwrap(),
            b"x"
        );
        assert!(!dir.path().join("usr/share/doc/sudo").exists());
        assert!(!meta.contains_key("usr/share/doc/sudo/README"));
    }
}
