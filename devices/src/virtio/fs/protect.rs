//! Protected paths of a share: the files on the host that the host itself runs or
//! reads as config (`.git/config`, `.git/hooks/`, `aivmm.toml`, `.envrc`), which the
//! guest may read but never change.
//!
//! The set is decided once, when the device is created, before the guest runs:
//! [`git_repos`] finds the repositories in the share by a bounded walk, and
//! [`Protection::resolve`] turns each [`Rule`] (a path relative to the root) into
//! identities: the protected object's (device, inode), and its name in its parent
//! directory as ((device, inode) of the parent, name). `ShareFs` checks requests
//! against those identities, so a hard link, a rename of an ancestor or a name
//! that does not exist yet does not get around it (see `filesystem.rs`).
//!
//! # Bounds of the walk
//! At most [`MAX_DEPTH`] directories below the root, at most [`MAX_ENTRIES`]
//! directory entries read in all, never through a symlink or into another file
//! system, and never into `.git`, `node_modules` or `target`. A repository deeper
//! or later than that is not protected at creation (the stop-time report in
//! [`super::gitconfig`] still looks at what it can reach).

use std::collections::{HashSet, VecDeque};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// How many directories below the root the repository walk descends.
pub const MAX_DEPTH: usize = 4;
/// How many directory entries the walks read in all.
pub const MAX_ENTRIES: usize = 20_000;
/// Directories the walk never enters: large, and not where repositories live.
const SKIPPED: &[&str] = &[".git", "node_modules", "target"];

/// Files at the root of a workdir that the host reads as config.
pub const ROOT_CONFIG_FILES: &[&str] = &["aivmm.toml", ".envrc"];
/// Entries of a `.git` directory that make git run commands: its config (and the
/// per-worktree one), the hooks, and `commondir`, which would point git at another
/// directory's config.
pub const GIT_DIR_ENTRIES: &[&str] = &["config", "config.worktree", "hooks", "commondir"];

/// One protected path and how far the protection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The path, relative to the share root.
    pub path: PathBuf,
    /// Whether the object itself is read-only, and if a directory, everything in
    /// it. Without it only the name is pinned (`.git`: it cannot be removed,
    /// renamed or replaced, but its contents stay writable).
    pub seal: bool,
}

/// The directories under `root` (relative to it, `""` for the root itself) that
/// hold a `.git` (a directory or a `gitdir:` file), found by the bounded walk.
pub fn git_repos(root: &Path) -> Vec<PathBuf> {
    let mut repos = Vec::new();
    walk_dirs(root, |rel, names| {
        if names.iter().any(|n| n == ".git") {
            repos.push(rel.to_path_buf());
        }
    });
    repos
}

/// Visits `root` and the directories below it within the walk's bounds, in
/// breadth-first order, with the names each holds.
pub fn walk_dirs(root: &Path, mut visit: impl FnMut(&Path, &[std::ffi::OsString])) {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return;
    };
    let dev = meta.dev();
    let mut budget = MAX_ENTRIES;
    let mut queue = VecDeque::from([(PathBuf::new(), 0usize)]);
    while let Some((rel, depth)) = queue.pop_front() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        let mut names = Vec::new();
        for entry in rd.flatten() {
            if budget == 0 {
                break;
            }
            budget -= 1;
            let name = entry.file_name();
            if depth < MAX_DEPTH && !SKIPPED.iter().any(|s| OsStr::new(s) == name) {
                // `symlink_metadata`: a link is never followed.
                if let Ok(m) = std::fs::symlink_metadata(entry.path()) {
                    if m.is_dir() && m.dev() == dev {
                        queue.push_back((rel.join(&name), depth + 1));
                    }
                }
            }
            names.push(name);
        }
        visit(&rel, &names);
        if budget == 0 {
            break;
        }
    }
}

/// The default rules of a workdir share: [`ROOT_CONFIG_FILES`], and for every
/// repository [`git_repos`] finds, its `.git` (name pinned) and
/// [`GIT_DIR_ENTRIES`] (sealed).
pub fn workdir_rules(root: &Path) -> Vec<Rule> {
    let mut rules: Vec<Rule> = ROOT_CONFIG_FILES
        .iter()
        .map(|f| Rule {
            path: PathBuf::from(f),
            seal: true,
        })
        .collect();
    for repo in git_repos(root) {
        let git = repo.join(".git");
        for e in GIT_DIR_ENTRIES {
            rules.push(Rule {
                path: git.join(e),
                seal: true,
            });
        }
        rules.push(Rule {
            path: git,
            seal: false,
        });
    }
    rules
}

/// A (device, inode) pair.
pub type Id = (u64, u64);

/// The protected set as identities, checked by `ShareFs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// Objects that may not change (sealed files and directories).
    pub objects: HashSet<Id>,
    /// Directories in which no entry may be made, removed or renamed.
    pub sealed_dirs: HashSet<Id>,
    /// Names that may not be made, removed, renamed or replaced in their parent.
    pub names: HashSet<(Id, Vec<u8>)>,
    /// The host paths of the sealed rules' objects, and of the sealed directories:
    /// a file the host user puts in their place while the VM runs (git writes its
    /// config by renaming a new file over it) is a new inode, caught by its path.
    pub paths: HashSet<PathBuf>,
}

fn id_of(m: &std::fs::Metadata) -> Id {
    (m.dev(), m.ino())
}

impl Protection {
    /// Resolves `rules` under `root` (the host path of the share root). A rule
    /// whose parent directory does not exist, or is reached through a symlink,
    /// protects nothing: there is no identity to hold.
    pub fn resolve(root: &Path, rules: &[Rule]) -> Protection {
        let mut p = Protection::default();
        let mut budget = MAX_ENTRIES;
        for rule in rules {
            p.add(root, rule, &mut budget);
        }
        p
    }

    /// Whether `path` (a host path) is a sealed object's or under a sealed
    /// directory's, by name.
    pub fn covers_path(&self, path: &Path) -> bool {
        path.ancestors().any(|a| self.paths.contains(a))
    }

    /// Whether nothing is protected.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.names.is_empty() && self.sealed_dirs.is_empty()
    }

    fn add(&mut self, root: &Path, rule: &Rule, budget: &mut usize) {
        let mut parts = Vec::new();
        for c in rule.path.components() {
            match c {
                Component::Normal(n) => parts.push(n),
                Component::CurDir => {}
                // Absolute paths and `..` leave the share: nothing to protect.
                _ => return,
            }
        }
        let Some((last, dirs)) = parts.split_last() else {
            return;
        };
        let mut dir = root.to_path_buf();
        for d in dirs {
            dir.push(d);
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                _ => return,
            }
        }
        let Ok(parent) = std::fs::symlink_metadata(&dir) else {
            return;
        };
        self.names
            .insert((id_of(&parent), last.as_bytes().to_vec()));
        if !rule.seal {
            return;
        }
        let path = dir.join(last);
        self.paths.insert(path.clone());
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            self.seal(&path, &m, budget);
        }
    }

    /// Makes `path` read-only, and if it is a directory, everything under it.
    fn seal(&mut self, path: &Path, m: &std::fs::Metadata, budget: &mut usize) {
        self.objects.insert(id_of(m));
        if !m.is_dir() {
            return;
        }
        self.sealed_dirs.insert(id_of(m));
        self.paths.insert(path.to_path_buf());
        let Ok(rd) = std::fs::read_dir(path) else {
            return;
        };
        for entry in rd.flatten() {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            if let Ok(cm) = std::fs::symlink_metadata(entry.path()) {
                if cm.dev() == m.dev() {
                    self.seal(&entry.path(), &cm, budget);
                }
            }
        }
    }
}

/// Whether `dir` (a host path) is a hooks directory: named `hooks`, in a directory
/// named `.git`. Files made there never get an execute bit.
pub fn is_hooks_dir(dir: &Path) -> bool {
    dir.file_name() == Some(OsStr::new("hooks"))
        && dir.parent().and_then(Path::file_name) == Some(OsStr::new(".git"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs;

    #[test]
    fn repos_are_found_within_bounds() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        for d in [
            ".git/hooks",
            "a/.git",
            "a/b/c/d/.git",
            "a/b/c/d/e/.git",
            "node_modules/x/.git",
            "t/.git/sub/.git",
        ] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::create_dir_all(r.join("wt")).unwrap();
        fs::write(r.join("wt/.git"), "gitdir: ../.git/worktrees/wt\n").unwrap();
        fs::create_dir_all(r.join("real/.git")).unwrap();
        std::os::unix::fs::symlink(r.join("real"), r.join("link")).unwrap();
        let mut repos = git_repos(r);
        repos.sort();
        let want: Vec<PathBuf> = ["", "a", "a/b/c/d", "real", "t", "wt"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(repos, want);
    }

    #[test]
    fn rules_resolve_to_identities() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        fs::create_dir_all(r.join(".git/hooks/sub")).unwrap();
        fs::write(r.join(".git/config"), "").unwrap();
        fs::write(r.join(".git/hooks/sub/x"), "").unwrap();
        fs::write(r.join("aivmm.toml"), "").unwrap();
        let p = Protection::resolve(r, &workdir_rules(r));
        let id = |p: &str| id_of(&fs::symlink_metadata(r.join(p)).unwrap());
        for o in [
            ".git/config",
            ".git/hooks",
            ".git/hooks/sub",
            ".git/hooks/sub/x",
            "aivmm.toml",
        ] {
            assert!(p.objects.contains(&id(o)), "{o}");
        }
        assert!(!p.objects.contains(&id(".git")));
        assert!(p.sealed_dirs.contains(&id(".git/hooks/sub")));
        assert!(!p.sealed_dirs.contains(&id(".git")));
        for (dir, name) in [
            ("", ".envrc"),
            ("", ".git"),
            (".git", "config"),
            (".git", "commondir"),
        ] {
            assert!(
                p.names.contains(&(id(dir), name.as_bytes().to_vec())),
                "{name}"
            );
        }
        // Paths leaving the share protect nothing.
        let out = Protection::resolve(
            r,
            &[
                Rule {
                    path: "../x".into(),
                    seal: true,
                },
                Rule {
                    path: "/etc/passwd".into(),
                    seal: true,
                },
            ],
        );
        assert!(out.is_empty());
    }

    #[test]
    fn hooks_dirs_are_recognised() {
        assert!(is_hooks_dir(Path::new("/w/r/.git/hooks")));
        assert!(!is_hooks_dir(Path::new("/w/r/git/hooks")));
        assert!(!is_hooks_dir(Path::new("/w/hooks")));
    }
}
