//! Preparing the guest before the first command: the host's [`Setup`] message.
//!
//! Runs as root in the agent. Each step that fails is reported back as one line
//! (the host prints it) and the rest goes on: a missing extra share should not
//! keep the user from their shell.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use aivmm_protocol::{Mount, Setup};

/// Where sshd lives in a Debian-built guest.
const SSHD: &str = "/usr/sbin/sshd";

/// Applies `setup`; returns one message per step that failed.
pub fn apply(setup: &Setup) -> Vec<String> {
    let mut problems = Vec::new();
    for m in &setup.mounts {
        if let Err(e) = mount(m) {
            problems.push(format!("cannot mount share '{}' on {}: {e}", m.tag, m.path));
        }
    }
    for (path, target) in &setup.links {
        if let Err(e) = link(path, target, setup.uid, setup.gid) {
            problems.push(format!("cannot link {path} to {target}: {e}"));
        }
    }
    if let Some(key) = &setup.ssh_key {
        if let Err(e) = start_sshd(key, setup) {
            problems.push(format!("cannot start sshd: {e}"));
        }
    }
    problems
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

fn mount(m: &Mount) -> io::Result<()> {
    let path = Path::new(&m.path);
    fs::create_dir_all(path)?;
    let src = CString::new(m.tag.as_str()).map_err(|_| io::Error::other("tag contains NUL"))?;
    let target = cstr(path)?;
    let fstype = c"virtiofs";
    let flags = if m.read_only { libc::MS_RDONLY } else { 0 } | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call;
    // the data argument may be null.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: `p` is a valid NUL-terminated path.
    if unsafe { libc::lchown(p.as_ptr(), uid, gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn link(path: &str, target: &str, uid: u32, gid: u32) -> io::Result<()> {
    let path = Path::new(path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {
            return Err(io::Error::other("a directory is in the way"));
        }
        Ok(_) => fs::remove_file(path)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, path)?;
    lchown(path, uid, gid)
}

/// Adds the privilege-separation user sshd wants if the image has none (no
/// maintainer script ran when the image was built).
fn ensure_sshd_user() -> io::Result<()> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    if passwd.lines().any(|l| l.starts_with("sshd:")) {
        return Ok(());
    }
    let used: Vec<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    let uid = (100..1000)
        .find(|u| !used.contains(u))
        .ok_or_else(|| io::Error::other("no free system uid"))?;
    let mut f = fs::OpenOptions::new().append(true).open("/etc/passwd")?;
    writeln!(f, "sshd:x:{uid}:65534::/run/sshd:/usr/sbin/nologin")
}

fn start_sshd(key: &str, setup: &Setup) -> io::Result<()> {
    if !Path::new(SSHD).exists() {
        return Err(io::Error::other(
            "the guest image has no sshd (openssh-server); rebuild it with `aivmm image build`",
        ));
    }
    let ssh_dir = Path::new(&setup.home).join(".ssh");
    fs::create_dir_all(&ssh_dir)?;
    fs::set_permissions(&ssh_dir, fs::Permissions::from_mode(0o700))?;
    lchown(&ssh_dir, setup.uid, setup.gid)?;
    let keys = ssh_dir.join("authorized_keys");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&keys)?;
    writeln!(f, "{}", key.trim())?;
    drop(f);
    lchown(&keys, setup.uid, setup.gid)?;
    ensure_sshd_user()?;
    // Debian's postinst makes sshd_config from this template; no postinst ran.
    let config = Path::new("/etc/ssh/sshd_config");
    if !config.exists() {
        fs::copy("/usr/share/openssh/sshd_config", config)?;
    }
    fs::create_dir_all("/run/sshd")?;
    fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755))?;
    // Host keys: made once, then kept on the state disk with the rest of /etc.
    let quiet = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    let out = quiet(Command::new("/usr/bin/ssh-keygen").arg("-A"))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ssh-keygen -A: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // sshd forks into the background itself; it stays up until power-off.
    let out = quiet(Command::new(SSHD).args(["-o", "PasswordAuthentication=no"]))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sshd: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn links_replace_files_but_not_directories() {
        let d = tempfile::tempdir().unwrap();
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let p = d.path().join("sub/.claude.json");
        link(p.to_str().unwrap(), "/run/x", uid, gid).unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), Path::new("/run/x"));
        link(p.to_str().unwrap(), "/run/y", uid, gid).unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), Path::new("/run/y"));
        let dir = d.path().join("dir");
        fs::create_dir(&dir).unwrap();
        assert!(link(dir.to_str().unwrap(), "/run/z", uid, gid).is_err());
    }

    #[test]
    fn a_failed_mount_is_reported_not_fatal() {
        let d = tempfile::tempdir().unwrap();
        let s = Setup {
            mounts: vec![Mount {
                tag: "no-such-tag".into(),
                path: d.path().join("m").to_str().unwrap().into(),
                read_only: true,
            }],
            home: "/nonexistent".into(),
            ..Setup::default()
        };
        let problems = apply(&s);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no-such-tag"), "{problems:?}");
    }
}
