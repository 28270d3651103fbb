//! A private apt: its own sources, lists and archive cache under the aivmm
//! cache directory, so `apt-get update` and `apt-get download` work without
//! root and whatever the host's own apt is set up for (only the host's apt.conf.d
//! is kept, for proxies).

use std::path::{Path, PathBuf};

use super::{tools, Error, Result};
use crate::image::packages::{self, Index, Package};

/// The Debian mirror, unless `AIVMM_DEBIAN_MIRROR` says otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The security archive, unless `AIVMM_DEBIAN_SECURITY` says otherwise.
pub const DEFAULT_SECURITY: &str = "http://deb.debian.org/debian-security";
/// The suite the guest is built from.
pub const SUITE: &str = "bookworm";
/// Debian's archive keyring, where the host has it.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The sources.list for `arch`, signed by Debian's keyring if present.
pub fn sources_list(mirror: &str, security: &str, keyring: Option<&Path>) -> String {
    let opts = keyring
        .map(|k| format!("[signed-by={}] ", k.display()))
        .unwrap_or_default();
    format!(
        "deb {opts}{mirror} {SUITE} main\ndeb {opts}{mirror} {SUITE}-updates main\ndeb {opts}{security} {SUITE}-security main\n"
    )
}

/// A private apt rooted at one directory.
#[derive(Debug)]
pub struct Apt {
    root: PathBuf,
    arch: String,
}

impl Apt {
    /// Lays out `root` (lists, archives, sources).
    pub fn new(root: &Path, arch: &str) -> Result<Self> {
        for d in [
            "state/lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/preferences.d",
            "debs",
        ] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
        let status = root.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "").map_err(|e| Error::io(&status, e))?;
        }
        let mirror = std::env::var("AIVMM_DEBIAN_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.into());
        let security =
            std::env::var("AIVMM_DEBIAN_SECURITY").unwrap_or_else(|_| DEFAULT_SECURITY.into());
        let keyring = Path::new(KEYRING);
        let list = sources_list(&mirror, &security, keyring.exists().then_some(keyring));
        let p = root.join("etc/sources.list");
        std::fs::write(&p, list).map_err(|e| Error::io(&p, e))?;
        Ok(Apt {
            root: root.to_path_buf(),
            arch: arch.to_string(),
        })
    }

    fn options(&self) -> Vec<String> {
        let r = self.root.display();
        let mut o = vec![
            format!("Dir::State={r}/state"),
            format!("Dir::State::status={r}/state/status"),
            format!("Dir::Cache={r}/cache"),
            format!("Dir::Etc::SourceList={r}/etc/sources.list"),
            format!("Dir::Etc::SourceParts={r}/etc/sources.list.d"),
            format!("Dir::Etc::PreferencesParts={r}/etc/preferences.d"),
            format!("Dir::Etc::Preferences={r}/etc/preferences"),
            format!("APT::Architecture={}", self.arch),
            format!("APT::Architectures={}", self.arch),
            "Acquire::Languages=none".into(),
            "Acquire::GzipIndexes=false".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false".into(),
            "Debug::NoLocking=true".into(),
        ];
        // As root, apt would hand downloads to the _apt user, which cannot write here.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            o.push("APT::Sandbox::User=root".into());
        }
        o.into_iter().flat_map(|s| ["-o".to_string(), s]).collect()
    }

    /// Refreshes the package lists from the mirror.
    pub fn update(&self) -> Result<()> {
        let mut args = self.options();
        args.extend(["-q".into(), "update".into()]);
        tools::run("apt-get", &args, None, &[])?;
        Ok(())
    }

    /// Every package's candidate stanza.
    pub fn index(&self) -> Result<Index> {
        let mut args = self.options();
        args.push("dumpavail".into());
        let out = tools::run("apt-cache", &args, None, &[])?;
        Ok(packages::parse_index(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Where a package's .deb is kept.
    pub fn deb_path(&self, p: &Package) -> PathBuf {
        // apt-get download's own naming: the epoch's ':' is written as %3a.
        self.root.join("debs").join(format!(
            "{}_{}_{}.deb",
            p.name,
            p.version.replace(':', "%3a"),
            p.arch
        ))
    }

    /// Downloads the packages that are not already cached with the right hash;
    /// `done` is told the bytes of each package when it is ready.
    pub fn download(&self, pkgs: &[&Package], mut done: impl FnMut(u64)) -> Result<Vec<PathBuf>> {
        let debs = self.root.join("debs");
        let mut missing = Vec::new();
        for p in pkgs {
            if p.filename.is_empty() {
                return Err(Error::BadPackage(format!(
                    "{} has no Filename in the index",
                    p.name
                )));
            }
            if super::sha256_file(&self.deb_path(p)).ok().as_deref() == Some(p.sha256.as_str()) {
                done(p.size);
            } else {
                missing.push(*p);
            }
        }
        for chunk in missing.chunks(64) {
            let mut args = self.options();
            args.extend(["-q".into(), "download".into()]);
            args.extend(chunk.iter().map(|p| format!("{}={}", p.name, p.version)));
            tools::run("apt-get", &args, Some(&debs), &[])?;
            for p in chunk {
                let got = super::sha256_file(&self.deb_path(p))
                    .map_err(|e| Error::io(&self.deb_path(p), e))?;
                if got != p.sha256 {
                    return Err(Error::BadPackage(format!(
                        "{}: sha256 {got}, the index says {}",
                        p.name, p.sha256
                    )));
                }
                done(p.size);
            }
        }
        Ok(pkgs.iter().map(|p| self.deb_path(p)).collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sources_cover_the_suite_updates_and_security() {
        let s = sources_list("http://m/debian", "http://m/sec", Some(Path::new("/k.gpg")));
        assert_eq!(
            s,
            "deb [signed-by=/k.gpg] http://m/debian bookworm main\n\
             deb [signed-by=/k.gpg] http://m/debian bookworm-updates main\n\
             deb [signed-by=/k.gpg] http://m/sec bookworm-security main\n"
        );
        assert!(
            sources_list("http://m", "http://s", None).starts_with("deb http://m bookworm main\n")
        );
    }
}
