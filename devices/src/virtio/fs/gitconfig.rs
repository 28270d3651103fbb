//! The stop-time check of the git configs in a share: which `.git/config` files
//! the guest made or changed, and which of their keys make the host's git run a
//! command.
//!
//! [`snapshot`] records every `.git/config`, `.git` link (a `gitdir:` file or a
//! symlink) and executable `.git/hooks` file that the bounded walk of
//! [`super::protect::walk_dirs`] reaches when the VM starts (its bytes' digest);
//! [`risky_git_configs`] walks again when it stops, parses each new or changed
//! file with [`parse`] and names the keys of [`is_risky`]. The parser follows git's
//! syntax: `[section]`, `[section "subsection"]` and the old `[section.sub]`,
//! case-insensitive section and key names, `#` and `;` comments, quotes, escapes
//! and line continuations, and a key on the same line as its section header.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};

use super::protect::walk_dirs;

/// The largest config file read; a bigger one is reported as unreadable.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;

/// One `section.subsection.key = value` entry (section and key lowercased).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The section name, lowercased.
    pub section: String,
    /// The subsection, as written (the old `[a.b]` syntax lowercases it).
    pub subsection: Option<String>,
    /// The key, lowercased.
    pub key: String,
    /// The value; `None` for a bare key (boolean true).
    pub value: Option<String>,
}

impl Entry {
    /// The entry's full name, as `git config` prints it.
    pub fn name(&self) -> String {
        match &self.subsection {
            Some(sub) => format!("{}.{sub}.{}", self.section, self.key),
            None => format!("{}.{}", self.section, self.key),
        }
    }
}

/// Errors of the git config parser.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A line that git would also refuse.
    #[error("bad config line {0}")]
    BadLine(usize),
}

/// `Result` of the git config parser.
pub type Result<T> = std::result::Result<T, Error>;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// Parses git config text.
pub fn parse(text: &str) -> Result<Vec<Entry>> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut line = 1;
    let mut out = Vec::new();
    let mut section: Option<(String, Option<String>)> = None;
    let skip_blank = |i: &mut usize| {
        while *i < chars.len() && (chars[*i] == ' ' || chars[*i] == '\t') {
            *i += 1;
        }
    };
    let skip_line = |i: &mut usize| {
        while *i < chars.len() && chars[*i] != '\n' {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
            continue;
        }
        if c.is_whitespace() || c == '\u{feff}' {
            i += 1;
            continue;
        }
        if c == '#' || c == ';' {
            skip_line(&mut i);
            continue;
        }
        if c == '[' {
            i += 1;
            let mut name = String::new();
            while i < chars.len() && (is_name_char(chars[i]) || chars[i] == '.') {
                name.push(chars[i].to_ascii_lowercase());
                i += 1;
            }
            let mut sub = None;
            if i < chars.len() && chars[i] == ' ' {
                skip_blank(&mut i);
                if chars.get(i) != Some(&'"') {
                    return Err(Error::BadLine(line));
                }
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None | Some('\n') => return Err(Error::BadLine(line)),
                        Some('"') => break,
                        Some('\\') => {
                            i += 1;
                            match chars.get(i) {
                                None | Some('\n') => return Err(Error::BadLine(line)),
                                Some(&e) => s.push(e),
                            }
                        }
                        Some(&e) => s.push(e),
                    }
                    i += 1;
                }
                i += 1;
                sub = Some(s);
            }
            if chars.get(i) != Some(&']') || name.is_empty() {
                return Err(Error::BadLine(line));
            }
            i += 1;
            if sub.is_none() {
                if let Some((a, b)) = name.split_once('.') {
                    sub = Some(b.to_owned());
                    name = a.to_owned();
                }
            }
            if name.is_empty() || name.contains('.') {
                return Err(Error::BadLine(line));
            }
            section = Some((name, sub));
            continue;
        }
        if !c.is_ascii_alphabetic() {
            return Err(Error::BadLine(line));
        }
        let Some((sec, sub)) = section.clone() else {
            return Err(Error::BadLine(line));
        };
        let mut key = String::new();
        while i < chars.len() && is_name_char(chars[i]) {
            key.push(chars[i].to_ascii_lowercase());
            i += 1;
        }
        skip_blank(&mut i);
        let value = match chars.get(i) {
            None | Some('\n') | Some('#') | Some(';') => {
                skip_line(&mut i);
                None
            }
            Some('=') => {
                i += 1;
                Some(parse_value(&chars, &mut i, &mut line)?)
            }
            Some(_) => return Err(Error::BadLine(line)),
        };
        out.push(Entry {
            section: sec,
            subsection: sub,
            key,
            value,
        });
    }
    Ok(out)
}

/// Parses a value from `chars[*i..]` up to the end of its (logical) line.
fn parse_value(chars: &[char], i: &mut usize, line: &mut usize) -> Result<String> {
    let mut v = String::new();
    let mut quoted = false;
    // Whitespace outside quotes is kept only between words.
    let mut pending_space = String::new();
    while let Some(&c) = chars.get(*i) {
        match c {
            '\n' if !quoted => break,
            '\n' => return Err(Error::BadLine(*line)),
            '#' | ';' if !quoted => {
                while *i < chars.len() && chars[*i] != '\n' {
                    *i += 1;
                }
                break;
            }
            '"' => quoted = !quoted,
            '\\' => {
                *i += 1;
                match chars.get(*i) {
                    Some('\n') => *line += 1,
                    Some('n') => v.push('\n'),
                    Some('t') => v.push('\t'),
                    Some('b') => {
                        v.pop();
                    }
                    Some('"') => v.push('"'),
                    Some('\\') => v.push('\\'),
                    _ => return Err(Error::BadLine(*line)),
                }
            }
            ' ' | '\t' if !quoted => {
                if !v.is_empty() {
                    pending_space.push(c);
                }
            }
            c => {
                v.push_str(&pending_space);
                pending_space.clear();
                v.push(c);
            }
        }
        if !matches!(c, ' ' | '\t') || quoted {
            // A quote or escape ends a run of spaces too.
            if c == '"' || c == '\\' {
                v.push_str(&pending_space);
                pending_space.clear();
            }
        }
        *i += 1;
    }
    if quoted {
        return Err(Error::BadLine(*line));
    }
    Ok(v)
}

/// Whether `e` makes git run a command (or read another config file).
pub fn is_risky(e: &Entry) -> bool {
    let sub = e.subsection.is_some();
    let k = e.key.as_str();
    match e.section.as_str() {
        "core" => matches!(
            k,
            "fsmonitor" | "hookspath" | "sshcommand" | "pager" | "editor" | "askpass" | "gitproxy"
        ),
        "diff" => (!sub && k == "external") || (sub && matches!(k, "textconv" | "command")),
        "merge" => sub && k == "driver",
        "filter" => sub && matches!(k, "clean" | "smudge" | "process"),
        "credential" => k == "helper",
        "sequence" => k == "editor",
        "gpg" => k == "program",
        "uploadpack" => k == "packobjectshook",
        "alias" => e
            .value
            .as_deref()
            .is_some_and(|v| v.trim_start().starts_with('!')),
        "include" => k == "path",
        "includeif" => sub && k == "path",
        "pager" => true,
        "difftool" | "mergetool" | "browser" | "man" => sub && matches!(k, "cmd" | "path"),
        "remote" => sub && matches!(k, "uploadpack" | "receivepack"),
        "trailer" => sub && matches!(k, "command" | "cmd"),
        _ => false,
    }
}

/// What the `.git/config` files of a share were when the VM started: a keyed
/// digest of each, by its host path.
#[derive(Debug, Default)]
pub struct Snapshot {
    hasher: RandomState,
    digests: HashMap<PathBuf, Option<u64>>,
}

/// What a watched path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A `.git/config`.
    Config,
    /// A `.git` that is a file (`gitdir: ...`) or a symlink: it names another
    /// directory, whose config and hooks git would use.
    GitLink,
    /// An executable regular file in `.git/hooks`.
    Hook,
}

/// The most hooks looked at in one repository.
const MAX_HOOKS: usize = 64;

/// Reads `path` if it is a regular file no larger than [`MAX_CONFIG_LEN`].
fn read_bounded(path: &Path, m: &std::fs::Metadata) -> Option<Vec<u8>> {
    (m.is_file() && m.len() <= MAX_CONFIG_LEN)
        .then(|| std::fs::read(path).ok())
        .flatten()
}

/// Everything the bounded walk reaches under `root` that would make the host's
/// git run something: each `.git/config`, each `.git` link, each executable hook,
/// with its bytes (a link's target), or `None` if it cannot be read or is larger
/// than [`MAX_CONFIG_LEN`].
fn watched(root: &Path) -> Vec<(PathBuf, Kind, Option<Vec<u8>>)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    walk_dirs(root, |rel, names| {
        if !names.iter().any(|n| n == ".git") {
            return;
        }
        let git = root.join(rel).join(".git");
        let Ok(gm) = std::fs::symlink_metadata(&git) else {
            return;
        };
        if !gm.is_dir() {
            let bytes = if gm.is_symlink() {
                std::fs::read_link(&git)
                    .ok()
                    .map(|t| t.as_os_str().as_bytes().to_vec())
            } else {
                read_bounded(&git, &gm)
            };
            out.push((git, Kind::GitLink, bytes));
            return;
        }
        let config = git.join("config");
        if let Ok(m) = std::fs::symlink_metadata(&config) {
            let bytes = read_bounded(&config, &m);
            out.push((config, Kind::Config, bytes));
        }
        let Ok(rd) = std::fs::read_dir(git.join("hooks")) else {
            return;
        };
        for entry in rd.flatten().take(MAX_HOOKS) {
            let path = entry.path();
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                    out.push((path.clone(), Kind::Hook, read_bounded(&path, &m)));
                } else if m.is_symlink() {
                    let target = std::fs::read_link(&path)
                        .ok()
                        .map(|t| t.as_os_str().as_bytes().to_vec());
                    out.push((path, Kind::Hook, target));
                }
            }
        }
    });
    out
}

/// Records the `.git/config` files, `.git` links and executable hooks under
/// `root` (see [`Snapshot`]).
pub fn snapshot(root: &Path) -> Snapshot {
    let hasher = RandomState::new();
    let digests = watched(root)
        .into_iter()
        .map(|(p, _, b)| {
            let d = b.map(|b| hasher.hash_one(&b));
            (p, d)
        })
        .collect();
    Snapshot { hasher, digests }
}

/// What under `root` is new or changed since `before` and would make the
/// host's git run a command: `.git/config` files that set such a key (with those
/// keys; `(unreadable)` or `(unparsable)` for one that cannot be read or parsed),
/// `.git` links (`a gitdir link`) and executable hooks (`an executable hook`).
pub fn risky_git_configs(root: &Path, before: &Snapshot) -> Vec<(PathBuf, Vec<String>)> {
    let mut out = Vec::new();
    for (path, kind, bytes) in watched(root) {
        let digest = bytes.as_ref().map(|b| before.hasher.hash_one(b));
        if let Some(old) = before.digests.get(&path) {
            if old.is_some() && *old == digest {
                continue;
            }
        }
        let keys = match (kind, bytes) {
            (Kind::GitLink, _) => vec!["a gitdir link".to_owned()],
            (Kind::Hook, _) => vec!["an executable hook".to_owned()],
            (Kind::Config, None) => vec!["(unreadable)".to_owned()],
            (Kind::Config, Some(b)) => match parse(&String::from_utf8_lossy(&b)) {
                Err(_) => vec!["(unparsable)".to_owned()],
                Ok(entries) => {
                    let mut keys: Vec<String> = entries
                        .iter()
                        .filter(|e| is_risky(e))
                        .map(Entry::name)
                        .collect();
                    keys.dedup();
                    keys
                }
            },
        };
        if !keys.is_empty() {
            out.push((path, keys));
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn risky(text: &str) -> Vec<String> {
        parse(text)
            .unwrap()
            .iter()
            .filter(|e| is_risky(e))
            .map(Entry::name)
            .collect()
    }

    #[test]
    fn parses_git_syntax() {
        let text = "\u{feff}# comment\n[Core]\n\tBare = false ; trailing\n\tfilemode\n\
            [remote \"ori\\\"gin\"]\n\turl = \"a b\" c  # x\n[Foo.Bar] k = v\\\n  w\n\
            [x]\n\tq = \"x;#y\"\n\te = a\\tb\\\\\n";
        let e = parse(text).unwrap();
        let got: Vec<(String, Option<String>)> =
            e.iter().map(|e| (e.name(), e.value.clone())).collect();
        assert_eq!(
            got,
            vec![
                ("core.bare".into(), Some("false".into())),
                ("core.filemode".into(), None),
                ("remote.ori\"gin.url".into(), Some("a b c".into())),
                ("foo.bar.k".into(), Some("v  w".into())),
                ("x.q".into(), Some("x;#y".into())),
                ("x.e".into(), Some("a\tb\\".into())),
            ]
        );
        for bad in [
            "key = v\n",
            "[core\n",
            "[core]\n x = \"open\n",
            "[a \"b]\n",
            "[c]\n1x = y\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn risky_keys_are_found() {
        let text = "[core]\n\tFSMonitor = \"/tmp/x\"\n\thooksPath=h\n[CORE]\n\tsshcommand = s\n\
            [diff]\n\texternal = d\n[diff \"pdf\"]\n\ttextconv = t\n\tbinary = true\n\
            [merge \"m\"]\n\tdriver = d\n[filter \"lfs\"]\n\tclean = c\n\tsmudge = s\n\trequired\n\
            [credential \"https://h\"]\n\thelper = h\n[alias]\n\tst = status\n\tx = \"  !sh -c y\"\n\
            [includeIf \"gitdir:/\"]\n\tpath = p\n[include]\n\tpath = q\n[gpg \"ssh\"]\n\tprogram = g\n\
            [uploadpack]\n\tpackObjectsHook = p\n[sequence]\n\teditor = e\n[user]\n\tname = n\n\
            [core] pager = less\n";
        assert_eq!(
            risky(text),
            vec![
                "core.fsmonitor",
                "core.hookspath",
                "core.sshcommand",
                "diff.external",
                "diff.pdf.textconv",
                "merge.m.driver",
                "filter.lfs.clean",
                "filter.lfs.smudge",
                "credential.https://h.helper",
                "alias.x",
                "includeif.gitdir:/.path",
                "include.path",
                "gpg.ssh.program",
                "uploadpack.packobjectshook",
                "sequence.editor",
                "core.pager",
            ]
        );
        // A comment that looks like a key; a key cannot be continued (git refuses it too).
        assert_eq!(risky("[core]\n# fsmonitor = x\n;editor=y\n").len(), 0);
        assert!(parse("[core]\n\tedi\\\ntor = vi\n").is_err());
        assert_eq!(risky("[core]\n\teditor = v\\\ni\n"), vec!["core.editor"]);
    }

    proptest::proptest! {
        /// Any text, hostile or not, parses or is refused, without a panic; a
        /// parsed one keeps finding a risky key put after it.
        #[test]
        fn any_text_parses_or_is_refused(text in "[\\[\\]\"\\\\#; =a-zA-Z.\n\t-]{0,200}") {
            if parse(&text).is_ok() {
                let more = format!("{text}\n[core]\n\tfsmonitor = x\n");
                if let Ok(entries) = parse(&more) {
                    proptest::prop_assert!(entries.iter().any(is_risky));
                }
            }
        }
    }

    #[test]
    fn only_new_or_changed_configs_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        for d in ["same/.git/hooks", "changed/.git", "new/.git", "benign/.git"] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        for name in ["old", "kept"] {
            let p = r.join("same/.git/hooks").join(name);
            fs::write(&p, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let evil = "[core]\n\tfsmonitor = /tmp/x\n";
        fs::write(r.join("same/.git/config"), evil).unwrap();
        fs::write(r.join("changed/.git/config"), "[core]\n\tbare = false\n").unwrap();
        fs::write(r.join("benign/.git/config"), "[core]\n").unwrap();
        let snap = snapshot(r);
        fs::write(
            r.join("changed/.git/config"),
            "[core]\n\tbare = false\n[alias]\n\tx = !rm\n",
        )
        .unwrap();
        fs::write(r.join("new/.git/config"), evil).unwrap();
        fs::write(r.join("benign/.git/config"), "[core]\n\tbare = true\n").unwrap();
        fs::create_dir_all(r.join("bad/.git")).unwrap();
        fs::write(r.join("bad/.git/config"), "[core\n").unwrap();
        // A new gitdir link, a new executable hook, a changed one, an unchanged
        // one and a new one without execute bits.
        fs::create_dir_all(r.join("wt")).unwrap();
        fs::write(r.join("wt/.git"), "gitdir: ../new/.git\n").unwrap();
        let hooks = r.join("same/.git/hooks");
        for (name, mode) in [("pre-commit", 0o755), ("post-merge", 0o644)] {
            fs::write(hooks.join(name), "#!/bin/sh\n").unwrap();
            fs::set_permissions(hooks.join(name), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::write(hooks.join("old"), "#!/bin/sh\necho changed\n").unwrap();
        let got = risky_git_configs(r, &snap);
        assert_eq!(
            got,
            vec![
                (r.join("bad/.git/config"), vec!["(unparsable)".to_owned()]),
                (r.join("changed/.git/config"), vec!["alias.x".to_owned()]),
                (r.join("new/.git/config"), vec!["core.fsmonitor".to_owned()]),
                (
                    r.join("same/.git/hooks/old"),
                    vec!["an executable hook".to_owned()]
                ),
                (
                    r.join("same/.git/hooks/pre-commit"),
                    vec!["an executable hook".to_owned()]
                ),
                (r.join("wt/.git"), vec!["a gitdir link".to_owned()]),
            ]
        );
    }
}
