//! The root filesystem: a staging tree unpacked from .debs, the few things the
//! skipped maintainer scripts would have done, then `mke2fs -d` and a debugfs
//! pass that gives every inode its real owner, mode and the fixed timestamps
//! (mke2fs copies the staging tree's, which belong to the building user).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::deb::{Meta, MERGED_USR};
use super::{tools, Error, Result};

/// Files the image carries verbatim: path, contents, mode.
pub const STATIC_FILES: &[(&str, &str, u32)] = &[
    (
        "etc/pam.d/common-auth",
        include_str!("../../../guest-image/debian/rootfs/etc/pam.d/common-auth"),
        0o644,
    ),
    (
        "etc/pam.d/common-account",
        include_str!("../../../guest-image/debian/rootfs/etc/pam.d/common-account"),
        0o644,
    ),
    (
        "etc/pam.d/common-password",
        include_str!("../../../guest-image/debian/rootfs/etc/pam.d/common-password"),
        0o644,
    ),
    (
        "etc/pam.d/common-session",
        include_str!("../../../guest-image/debian/rootfs/etc/pam.d/common-session"),
        0o644,
    ),
    (
        "etc/pam.d/common-session-noninteractive",
        include_str!("../../../guest-image/debian/rootfs/etc/pam.d/common-session-noninteractive"),
        0o644,
    ),
    (
        "etc/sudoers.d/aivmm",
        include_str!("../../../guest-image/debian/rootfs/etc/sudoers.d/aivmm"),
        0o440,
    ),
    (
        "etc/profile.d/aivmm.sh",
        include_str!("../../../guest-image/debian/rootfs/etc/profile.d/aivmm.sh"),
        0o644,
    ),
    (
        "etc/hostname",
        include_str!("../../../guest-image/debian/rootfs/etc/hostname"),
        0o644,
    ),
    (
        "etc/hosts",
        include_str!("../../../guest-image/debian/rootfs/etc/hosts"),
        0o644,
    ),
    (
        "etc/resolv.conf",
        include_str!("../../../guest-image/debian/rootfs/etc/resolv.conf"),
        0o644,
    ),
    (
        "etc/shells",
        include_str!("../../../guest-image/debian/rootfs/etc/shells"),
        0o644,
    ),
    (
        "etc/apt/sources.list.d/debian.sources",
        include_str!("../../../guest-image/debian/rootfs/etc/apt/sources.list.d/debian.sources"),
        0o644,
    ),
    ("usr/lib/aivmm/init2", super::initramfs::INIT2, 0o755),
    (
        "usr/lib/aivmm/modules.sh",
        include_str!("../../../guest-image/debian/modules.sh"),
        0o644,
    ),
];

/// `update-alternatives` links: `LINK TARGET` per line.
pub const ALTERNATIVES: &str = include_str!("../../../guest-image/debian/alternatives.txt");

/// System users and groups that maintainer scripts would add (`adduser --system`).
const EXTRA_USERS: &[&str] = &["_apt:x:42:65534::/nonexistent:/usr/sbin/nologin"];
const EXTRA_GROUPS: &[&str] = &["_ssh:x:101:"];

fn write(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<()> {
    let p = root.join(rel);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
    }
    std::fs::write(&p, data).map_err(|e| Error::io(&p, e))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode | 0o600))
        .map_err(|e| Error::io(&p, e))
}

/// Makes the merged-/usr skeleton before anything is unpacked.
pub fn prepare(root: &Path) -> Result<()> {
    for (link, target) in MERGED_USR {
        let t = root.join(target);
        std::fs::create_dir_all(&t).map_err(|e| Error::io(&t, e))?;
        let l = root.join(link);
        std::os::unix::fs::symlink(target, &l).map_err(|e| Error::io(&l, e))?;
    }
    Ok(())
}

/// Appends lines whose first field is not yet present.
pub fn merge_db(base: &str, extra: &[&str]) -> String {
    let mut out = base.trim_end().to_string();
    out.push('\n');
    for line in extra {
        let key = line.split(':').next().unwrap_or("");
        if !base.lines().any(|l| l.split(':').next() == Some(key)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The shadow file for a passwd file: every account locked (`*`).
pub fn shadow_for(passwd: &str) -> String {
    passwd
        .lines()
        .filter_map(|l| l.split(':').next().filter(|n| !n.is_empty()))
        .map(|n| format!("{n}:*:19000:0:99999:7:::\n"))
        .collect()
}

/// The user databases, ca-certificates bundle, alternatives, static files and
/// dpkg's status: what postinst scripts and the installer would have made.
/// `extra` (a variant's files, see [`super::variant`]) is written after
/// [`STATIC_FILES`], so it may replace them.
pub fn configure(
    root: &Path,
    meta: &mut BTreeMap<String, Meta>,
    status: &str,
    lists: &[(String, Vec<String>)],
    extra: &[(&str, &str, u32)],
) -> Result<()> {
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).unwrap_or_default();
    let passwd = merge_db(&read("usr/share/base-passwd/passwd.master"), EXTRA_USERS);
    let group = merge_db(&read("usr/share/base-passwd/group.master"), EXTRA_GROUPS);
    if passwd.trim().is_empty() || group.trim().is_empty() {
        return Err(Error::BadPackage(
            "base-passwd's passwd.master or group.master is missing".into(),
        ));
    }
    let shadow_gid = group
        .lines()
        .find(|l| l.starts_with("shadow:"))
        .and_then(|l| l.split(':').nth(2)?.parse().ok());
    write(root, "etc/passwd", passwd.as_bytes(), 0o644)?;
    write(root, "etc/group", group.as_bytes(), 0o644)?;
    write(root, "etc/shadow", shadow_for(&passwd).as_bytes(), 0o640)?;
    let gshadow: String = group
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(|n| format!("{n}:*::\n"))
        .collect();
    write(root, "etc/gshadow", gshadow.as_bytes(), 0o640)?;
    for f in ["etc/shadow", "etc/gshadow"] {
        meta.insert(
            f.into(),
            Meta {
                uid: 0,
                gid: shadow_gid.unwrap_or(0),
                mode: 0o640,
            },
        );
    }

    // update-ca-certificates: every shipped certificate, enabled, in one bundle.
    let ca_dir = root.join("usr/share/ca-certificates");
    let mut certs = Vec::new();
    if ca_dir.is_dir() {
        for sub in sorted_dir(&ca_dir)? {
            if sub.is_dir() {
                for c in sorted_dir(&sub)? {
                    if c.extension().is_some_and(|x| x == "crt") {
                        certs.push(c);
                    }
                }
            }
        }
        let mut bundle = Vec::new();
        let mut conf = String::from("# Written by the aivmm image builder.\n");
        for c in &certs {
            let mut pem = std::fs::read(c).map_err(|e| Error::io(c, e))?;
            if !pem.ends_with(b"\n") {
                pem.push(b'\n');
            }
            bundle.extend_from_slice(&pem);
            let rel = c.strip_prefix(&ca_dir).unwrap_or(c);
            let _ = writeln!(conf, "{}", rel.display());
        }
        write(root, "etc/ssl/certs/ca-certificates.crt", &bundle, 0o644)?;
        write(root, "etc/ca-certificates.conf", conf.as_bytes(), 0o644)?;
    }

    for line in super::packages::parse_list(ALTERNATIVES) {
        let mut it = line.split_whitespace();
        let (Some(link), Some(target)) = (it.next(), it.next()) else {
            continue;
        };
        let (l, t) = (
            root.join(link.trim_start_matches('/')),
            root.join(target.trim_start_matches('/')),
        );
        if t.exists() && std::fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink(target, &l).map_err(|e| Error::io(&l, e))?;
        }
    }

    for (rel, data, mode) in STATIC_FILES.iter().chain(extra) {
        write(root, rel, data.as_bytes(), *mode)?;
        meta.insert(
            rel.to_string(),
            Meta {
                uid: 0,
                gid: 0,
                mode: *mode,
            },
        );
    }
    let mtab = root.join("etc/mtab");
    if std::fs::symlink_metadata(&mtab).is_err() {
        std::os::unix::fs::symlink("../proc/self/mounts", &mtab)
            .map_err(|e| Error::io(&mtab, e))?;
    }
    for d in [
        "work",
        "home",
        "run",
        "tmp",
        "proc",
        "sys",
        "dev",
        "root",
        "usr/local/bin",
    ] {
        let p = root.join(d);
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
    }
    meta.insert(
        "tmp".into(),
        Meta {
            uid: 0,
            gid: 0,
            mode: 0o1777,
        },
    );
    meta.insert(
        "root".into(),
        Meta {
            uid: 0,
            gid: 0,
            mode: 0o700,
        },
    );

    // dpkg's database, so apt in the guest sees what is installed.
    write(root, "var/lib/dpkg/status", status.as_bytes(), 0o644)?;
    for (name, files) in lists {
        write(
            root,
            &format!("var/lib/dpkg/info/{name}.list"),
            (files.join("\n") + "\n").as_bytes(),
            0o644,
        )?;
    }
    for f in [
        "var/lib/dpkg/available",
        "var/lib/dpkg/diversions",
        "var/lib/dpkg/statoverride",
    ] {
        write(root, f, b"", 0o644)?;
    }
    Ok(())
}

/// The `Status:` stanza dpkg keeps for an installed package, from its control file.
pub fn status_stanza(control: &str) -> String {
    let mut out = String::new();
    for line in control.trim_end().lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("Package:") {
            out.push_str("Status: install ok installed\n");
        }
    }
    out.push('\n');
    out
}

fn sorted_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Every path under `root` (relative, sorted, parents first), not following symlinks.
pub fn walk(root: &Path) -> Result<Vec<(String, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut children = sorted_dir(&dir)?;
        children.reverse();
        for c in children {
            let md = std::fs::symlink_metadata(&c).map_err(|e| Error::io(&c, e))?;
            let r = c.strip_prefix(root).unwrap_or(&c).to_path_buf();
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push((r.to_string_lossy().into_owned(), md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The debugfs commands that give each inode its image owner, mode and times.
/// `entries` are (path, staging uid, gid, mode) and `meta` the wanted values
/// (root:root and the staging mode when absent).
pub fn fixup_script(
    entries: &[(String, u32, u32, u32)],
    meta: &BTreeMap<String, Meta>,
    epoch: u64,
) -> String {
    let mut s = String::new();
    let mut emit = |path: &str, field: &str, value: String| {
        let _ = writeln!(s, "sif \"/{path}\" {field} {value}");
    };
    for (path, uid, gid, mode) in entries {
        if path.contains(['"', '\n', '\\']) {
            tracing::warn!("cannot fix up a path with quotes: {path:?}");
            continue;
        }
        let want = meta.get(path).copied().unwrap_or(Meta {
            uid: 0,
            gid: 0,
            mode: mode & 0o7777,
        });
        if want.uid != *uid {
            emit(path, "uid", want.uid.to_string());
        }
        if want.gid != *gid {
            emit(path, "gid", want.gid.to_string());
        }
        let is_link = mode & 0o170000 == 0o120000;
        if !is_link && want.mode & 0o7777 != mode & 0o7777 {
            emit(
                path,
                "mode",
                format!("0{:o}", (mode & 0o170000) | (want.mode & 0o7777)),
            );
        }
        for t in ["atime", "mtime", "ctime", "crtime"] {
            emit(path, t, format!("@{epoch}"));
        }
    }
    for t in ["atime", "mtime", "ctime", "crtime"] {
        emit("", t, format!("@{epoch}"));
    }
    s
}

/// Parameters of the ext4 image.
#[derive(Debug)]
pub struct Ext4 {
    /// Volume label.
    pub label: String,
    /// Filesystem UUID, also the directory hash seed.
    pub uuid: String,
    /// Every timestamp in the image.
    pub epoch: u64,
}

/// Makes `out` from `root`: sized to fit with room to spare, no journal (it is
/// mounted read-only), then owners, modes and times fixed with debugfs.
pub fn make_ext4(root: &Path, meta: &BTreeMap<String, Meta>, out: &Path, p: &Ext4) -> Result<u64> {
    let entries = walk(root)?;
    let bytes: u64 = entries
        .iter()
        .map(|(_, m)| m.len().div_ceil(4096) * 4096 + 256)
        .sum();
    let size_mib = (bytes + bytes / 5).div_ceil(1 << 20) + 64;
    let inodes = entries.len() as u64 + entries.len() as u64 / 4 + 1024;
    let epoch = p.epoch.to_string();
    let env = [
        ("E2FSPROGS_FAKE_TIME", epoch.as_str()),
        ("SOURCE_DATE_EPOCH", epoch.as_str()),
        ("MKE2FS_CONFIG", "/dev/null"),
    ];
    let _ = std::fs::remove_file(out);
    let rootdir = root.to_string_lossy().into_owned();
    let outs = out.to_string_lossy().into_owned();
    tools::run(
        "mke2fs",
        [
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-O",
            "^has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize",
            "-L",
            &p.label,
            "-U",
            &p.uuid,
            "-E",
            &format!(
                "root_owner=0:0,hash_seed={},lazy_itable_init=0,nodiscard",
                p.uuid
            ),
            "-N",
            &inodes.to_string(),
            "-d",
            &rootdir,
            &outs,
            &format!("{size_mib}M"),
        ],
        None,
        &env,
    )?;
    let staged: Vec<(String, u32, u32, u32)> = entries
        .iter()
        .map(|(r, m)| (r.clone(), m.uid(), m.gid(), m.mode()))
        .collect();
    let script = fixup_script(&staged, meta, p.epoch);
    let script_path = out.with_extension("debugfs");
    std::fs::write(&script_path, script).map_err(|e| Error::io(&script_path, e))?;
    let sp = script_path.to_string_lossy().into_owned();
    let r = tools::run("debugfs", ["-w", "-f", &sp, &outs], None, &env)?;
    let err = String::from_utf8_lossy(&r.stderr);
    if let Some(bad) = err
        .lines()
        .find(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
    {
        return Err(Error::Tool {
            tool: "debugfs".into(),
            detail: bad.to_string(),
        });
    }
    let _ = std::fs::remove_file(&script_path);
    // The superblock counts the bytes written so far, which differs between a
    // root and a user build (more owners to fix); reset it so both give the same image.
    tools::run(
        "debugfs",
        ["-w", "-R", "ssv kbytes_written 0", &outs],
        None,
        &env,
    )?;
    tools::run("e2fsck", ["-f", "-n", &outs], None, &env)?;
    Ok(size_mib << 20)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn user_databases() {
        let p = merge_db(
            "root:x:0:0:root:/root:/bin/bash\n_apt:x:1:1::/:/bin/false\n",
            &["_apt:x:42:65534::", "x:x:9:9::"],
        );
        assert_eq!(
            p,
            "root:x:0:0:root:/root:/bin/bash\n_apt:x:1:1::/:/bin/false\nx:x:9:9::\n"
        );
        assert_eq!(
            shadow_for("root:x:0:0::/root:/bin/sh\n\n"),
            "root:*:19000:0:99999:7:::\n"
        );
    }

    #[test]
    fn status_marks_packages_installed() {
        let s = status_stanza("Package: git\nVersion: 1\nDescription: x\n more\n");
        assert_eq!(
            s,
            "Package: git\nStatus: install ok installed\nVersion: 1\nDescription: x\n more\n\n"
        );
    }

    #[test]
    fn fixup_sets_owners_modes_and_times() {
        let meta = BTreeMap::from([(
            "usr/bin/sudo".to_string(),
            Meta {
                uid: 0,
                gid: 0,
                mode: 0o4755,
            },
        )]);
        let entries = vec![
            ("usr/bin/sudo".to_string(), 1000, 1000, 0o100755),
            ("etc/x".to_string(), 0, 0, 0o100644),
            ("bin".to_string(), 1000, 0, 0o120777),
            ("a\"b".to_string(), 0, 0, 0o100644),
        ];
        let s = fixup_script(&entries, &meta, 1700000000);
        assert!(s.contains("sif \"/usr/bin/sudo\" uid 0\nsif \"/usr/bin/sudo\" gid 0\nsif \"/usr/bin/sudo\" mode 0104755\n"));
        assert!(!s.contains("\"/etc/x\" uid") && !s.contains("\"/etc/x\" mode"));
        assert!(s.contains("sif \"/etc/x\" mtime @1700000000\n"));
        assert!(s.contains("sif \"/bin\" uid 0\n") && !s.contains("\"/bin\" mode"));
        assert!(!s.contains("a\"b"));
        assert!(s.ends_with("sif \"/\" crtime @1700000000\n"));
    }

    #[test]
    fn walk_is_sorted_and_does_not_follow_links() {
        let d = tempfile::tempdir().unwrap();
        prepare(d.path()).unwrap();
        std::fs::write(d.path().join("usr/bin/x"), "x").unwrap();
        let names: Vec<String> = walk(d.path())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "lib",
                "lib64",
                "sbin",
                "usr",
                "usr/bin",
                "usr/bin/x",
                "usr/lib",
                "usr/lib64",
                "usr/sbin"
            ]
        );
    }
}
