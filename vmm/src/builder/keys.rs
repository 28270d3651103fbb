//! The builder's SSH keys, made at first start (ED25519, OpenSSH formats, written
//! 0600 by the user the service runs as, so that user owns them):
//! - `guest/ssh_host_ed25519_key{,.pub}`: the guest sshd's host key;
//! - `guest/authorized_keys`: who may log in as `builder` (the client key below,
//!   unless something else, e.g. the NixOS module, put its own key there);
//! - `ssh/id_ed25519{,.pub}`: the client key for the host's Nix;
//! - `ssh/known_hosts`: the host key pinned for the alias and for `[127.0.0.1]:PORT`.
//!
//! `guest/` is what aivmm shares read-only with the guest (tag [`super::KEY_TAG`]);
//! the guest copies the host key to a root-owned 0600 file before sshd starts.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use super::{io_err, Error, Result, HOST_ALIAS};

/// The key files of a state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// The directory shared with the guest.
    pub guest_dir: PathBuf,
    /// The guest sshd's private host key.
    pub host_key: PathBuf,
    /// Its public half.
    pub host_pub: PathBuf,
    /// The guest's authorized_keys.
    pub authorized: PathBuf,
    /// The client's private key.
    pub client_key: PathBuf,
    /// Its public half.
    pub client_pub: PathBuf,
    /// known_hosts pinning the host key.
    pub known_hosts: PathBuf,
}

impl Keys {
    /// The key paths under `state`.
    pub fn paths(state: &Path) -> Self {
        let guest = state.join("guest");
        let ssh = state.join("ssh");
        Keys {
            host_key: guest.join("ssh_host_ed25519_key"),
            host_pub: guest.join("ssh_host_ed25519_key.pub"),
            authorized: guest.join("authorized_keys"),
            guest_dir: guest,
            client_key: ssh.join("id_ed25519"),
            client_pub: ssh.join("id_ed25519.pub"),
            known_hosts: ssh.join("known_hosts"),
        }
    }

    /// Makes whatever is missing; existing keys are kept. Returns the paths.
    pub fn ensure(state: &Path, port: u16) -> Result<Self> {
        let k = Self::paths(state);
        let ssh_dir = k
            .client_key
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for d in [&k.guest_dir, &ssh_dir] {
            crate::state_fs::dir(d).map_err(io_err(d))?;
        }
        if !k.host_key.exists() {
            generate(&k.host_key, &k.host_pub, HOST_ALIAS)?;
        }
        if !k.authorized.exists() {
            if !k.client_key.exists() {
                generate(&k.client_key, &k.client_pub, "nix@aivmm-builder")?;
            }
            let public = fs::read_to_string(&k.client_pub).map_err(io_err(&k.client_pub))?;
            write_file(&k.authorized, public.as_bytes(), 0o644)?;
        }
        let host = k.host_public()?;
        let known = format!("{HOST_ALIAS} {host}\n[127.0.0.1]:{port} {host}\n");
        if fs::read_to_string(&k.known_hosts).ok().as_deref() != Some(known.as_str()) {
            write_file(&k.known_hosts, known.as_bytes(), 0o644)?;
        }
        Ok(k)
    }

    /// The host's public key as `ssh-ed25519 AAAA…` (no comment).
    pub fn host_public(&self) -> Result<String> {
        let text = fs::read_to_string(&self.host_pub).map_err(io_err(&self.host_pub))?;
        let mut parts = text.split_whitespace();
        match (parts.next(), parts.next()) {
            (Some(t), Some(k)) => Ok(format!("{t} {k}")),
            _ => Err(Error::Key {
                path: self.host_pub.clone(),
                detail: "not an OpenSSH public key".into(),
            }),
        }
    }
}

/// Writes `data` to `path` through a temporary file created with `mode`, so the
/// file never exists with wider permissions, and renames it into place.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = crate::state_fs::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    // The umask may have narrowed `mode`; 0600 and 0644 are what we mean.
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// A new ED25519 key pair: `private` (OpenSSH format, 0600) and `public` (0644).
pub fn generate(private: &Path, public: &Path, comment: &str) -> Result<()> {
    let key_err = |detail: String| Error::Key {
        path: private.to_path_buf(),
        detail,
    };
    let mut key =
        PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(|e| key_err(e.to_string()))?;
    key.set_comment(comment);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| key_err(e.to_string()))?;
    let public_line = key
        .public_key()
        .to_openssh()
        .map_err(|e| key_err(e.to_string()))?;
    write_file(private, pem.as_bytes(), 0o600)?;
    write_file(public, format!("{public_line}\n").as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn keys_are_made_once_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keys::ensure(dir.path(), 31022).unwrap();
        for (p, mode) in [
            (&k.host_key, 0o600),
            (&k.client_key, 0o600),
            (&k.host_pub, 0o644),
            (&k.authorized, 0o644),
            (&k.guest_dir, 0o700),
        ] {
            let md = fs::metadata(p).unwrap();
            assert_eq!(md.mode() & 0o777, mode, "{}", p.display());
            // SAFETY: getuid cannot fail.
            assert_eq!(md.uid(), unsafe { libc::getuid() });
        }
        let private = fs::read_to_string(&k.host_key).unwrap();
        assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        let parsed = PrivateKey::from_openssh(&private).unwrap();
        assert_eq!(parsed.algorithm(), Algorithm::Ed25519);
        let public = k.host_public().unwrap();
        assert!(
            public.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            "{public}"
        );
        assert_eq!(
            parsed.public_key().to_openssh().unwrap(),
            format!("{public} {HOST_ALIAS}")
        );
        let client_pub = fs::read_to_string(&k.client_pub).unwrap();
        assert_eq!(fs::read_to_string(&k.authorized).unwrap(), client_pub);
        let known = fs::read_to_string(&k.known_hosts).unwrap();
        assert_eq!(
            known,
            format!("{HOST_ALIAS} {public}\n[127.0.0.1]:31022 {public}\n")
        );

        // A second start keeps every key; a new port only changes known_hosts.
        let before = fs::read(&k.host_key).unwrap();
        let k2 = Keys::ensure(dir.path(), 40000).unwrap();
        assert_eq!(fs::read(&k2.host_key).unwrap(), before);
        assert_eq!(fs::read_to_string(&k2.client_pub).unwrap(), client_pub);
        assert!(fs::read_to_string(&k2.known_hosts)
            .unwrap()
            .contains("[127.0.0.1]:40000 "));
        // Two generations never give the same key.
        let other = tempfile::tempdir().unwrap();
        let k3 = Keys::ensure(other.path(), 31022).unwrap();
        assert_ne!(k3.host_public().unwrap(), public);
    }

    #[test]
    fn an_authorized_keys_from_elsewhere_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keys::paths(dir.path());
        fs::create_dir_all(&k.guest_dir).unwrap();
        fs::write(&k.authorized, "ssh-ed25519 AAAAfromnixos root@host\n").unwrap();
        let k = Keys::ensure(dir.path(), 31022).unwrap();
        assert!(!k.client_key.exists(), "no client key needed");
        assert_eq!(
            fs::read_to_string(&k.authorized).unwrap(),
            "ssh-ed25519 AAAAfromnixos root@host\n"
        );
    }

    #[test]
    fn ssh_keygen_reads_the_keys() {
        // Cross-check with OpenSSH itself where it is installed.
        if std::process::Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .is_err()
        {
            eprintln!("skipped: no ssh-keygen");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let k = Keys::ensure(dir.path(), 31022).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&k.client_key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8_lossy(&out.stdout);
        let want = fs::read_to_string(&k.client_pub).unwrap();
        assert_eq!(
            derived.split_whitespace().take(2).collect::<Vec<_>>(),
            want.split_whitespace().take(2).collect::<Vec<_>>()
        );
    }
}
