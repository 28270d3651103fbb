//! Debian package metadata: parsing `apt-cache dumpavail` stanzas and closing a
//! set of package names over Depends and Pre-Depends, as dpkg would need them
//! installed. Pure functions; apt itself only downloads.

use std::collections::{BTreeMap, BTreeSet};

use super::{Error, Result};

/// One binary package, as much of its stanza as the builder needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Package {
    /// `Package:`.
    pub name: String,
    /// `Version:`.
    pub version: String,
    /// `Architecture:`.
    pub arch: String,
    /// `Essential: yes`.
    pub essential: bool,
    /// `Priority:` as a rank: 0 required, 1 important, 2 standard, 3 optional, 4 other.
    pub priority: u8,
    /// `Pre-Depends:` then `Depends:`, each group a list of alternatives (names only).
    pub depends: Vec<Vec<String>>,
    /// `Provides:` (names only).
    pub provides: Vec<String>,
    /// `Filename:` in the archive.
    pub filename: String,
    /// `SHA256:` of the .deb.
    pub sha256: String,
    /// `Size:` of the .deb in bytes.
    pub size: u64,
}

/// All packages of one archive view, by name, with the providers of virtual names.
#[derive(Debug, Default)]
pub struct Index {
    /// Real packages by name.
    pub packages: BTreeMap<String, Package>,
    /// Virtual name → real packages that provide it (sorted, deduplicated).
    pub providers: BTreeMap<String, BTreeSet<String>>,
}

fn priority_rank(p: &str) -> u8 {
    match p {
        "required" => 0,
        "important" => 1,
        "standard" => 2,
        "optional" => 3,
        _ => 4,
    }
}

/// Parses a dependency field: `a (>= 1) | b:any, c` → `[[a, b], [c]]`.
pub fn parse_depends(field: &str) -> Vec<Vec<String>> {
    field
        .split(',')
        .map(|group| {
            group
                .split('|')
                .filter_map(|alt| {
                    let name = alt.trim().split([' ', '(', '[', '<']).next().unwrap_or("");
                    let name = name.split(':').next().unwrap_or("");
                    (!name.is_empty()).then(|| name.to_string())
                })
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect()
}

/// Parses the stanzas of `apt-cache dumpavail` (or a Packages file). When a name
/// appears twice, the first stanza wins (apt prints the candidate).
pub fn parse_index(text: &str) -> Index {
    let mut index = Index::default();
    for stanza in text.split("\n\n") {
        let mut p = Package {
            priority: 4,
            ..Package::default()
        };
        let (mut pre, mut deps) = (Vec::new(), Vec::new());
        // Continuation lines (leading space) belong to the previous field; the
        // fields read here are all single-line except Description, which is skipped.
        for line in stanza.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if line.starts_with([' ', '\t']) {
                continue;
            }
            let value = value.trim();
            match key {
                "Package" => p.name = value.to_string(),
                "Version" => p.version = value.to_string(),
                "Architecture" => p.arch = value.to_string(),
                "Essential" => p.essential = value == "yes",
                "Priority" => p.priority = priority_rank(value),
                "Pre-Depends" => pre = parse_depends(value),
                "Depends" => deps = parse_depends(value),
                "Provides" => p.provides = parse_depends(value).into_iter().flatten().collect(),
                "Filename" => p.filename = value.to_string(),
                "SHA256" => p.sha256 = value.to_string(),
                "Size" => p.size = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        if p.name.is_empty() || p.version.is_empty() || index.packages.contains_key(&p.name) {
            continue;
        }
        pre.extend(deps);
        p.depends = pre;
        for v in &p.provides {
            index
                .providers
                .entry(v.clone())
                .or_default()
                .insert(p.name.clone());
        }
        index.packages.insert(p.name.clone(), p);
    }
    index
}

impl Index {
    /// Names of every `Essential: yes` package.
    pub fn essential(&self) -> Vec<String> {
        self.packages
            .values()
            .filter(|p| p.essential)
            .map(|p| p.name.clone())
            .collect()
    }

    /// The real package that satisfies `name` given what is already `chosen`:
    /// the package itself, else a provider already chosen, else the provider
    /// with the best priority (then the first by name), so the answer is stable.
    fn satisfy(&self, name: &str, chosen: &BTreeSet<String>) -> Option<String> {
        if self.packages.contains_key(name) {
            return Some(name.to_string());
        }
        let providers = self.providers.get(name)?;
        if let Some(p) = providers.iter().find(|p| chosen.contains(*p)) {
            return Some(p.clone());
        }
        providers
            .iter()
            .filter_map(|p| self.packages.get(p))
            .min_by_key(|p| (p.priority, p.name.clone()))
            .map(|p| p.name.clone())
    }

    /// Closes `roots` over Pre-Depends and Depends. For each group of
    /// alternatives, one already chosen wins; otherwise the first alternative
    /// that exists. Versions are not compared: one suite's candidates agree.
    pub fn resolve(&self, roots: &[String]) -> Result<Vec<&Package>> {
        let mut chosen = BTreeSet::new();
        let mut queue: Vec<String> = Vec::new();
        for r in roots {
            let name = self
                .satisfy(r, &chosen)
                .ok_or_else(|| Error::UnknownPackage(r.clone()))?;
            if chosen.insert(name.clone()) {
                queue.push(name);
            }
        }
        while let Some(name) = queue.pop() {
            let Some(pkg) = self.packages.get(&name) else {
                continue;
            };
            for group in &pkg.depends {
                let already = group.iter().any(|alt| {
                    chosen.contains(alt)
                        || self
                            .providers
                            .get(alt)
                            .is_some_and(|ps| ps.iter().any(|p| chosen.contains(p)))
                });
                if already {
                    continue;
                }
                let pick = group
                    .iter()
                    .find_map(|alt| self.satisfy(alt, &chosen))
                    .ok_or_else(|| Error::Unsatisfiable {
                        package: name.clone(),
                        dependency: group.join(" | "),
                    })?;
                if chosen.insert(pick.clone()) {
                    queue.push(pick);
                }
            }
        }
        Ok(chosen.iter().filter_map(|n| self.packages.get(n)).collect())
    }
}

/// Reads a package list: one name per line, `#` comments, blank lines ignored.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const INDEX: &str = "\
Package: app
Version: 1.0
Architecture: amd64
Priority: optional
Pre-Depends: libc6 (>= 2.34)
Depends: libfoo1 (>= 1) | libfoo-alt, awk, perl:any, debconf | debconf-2.0
Description: an app
 with a long description: Depends: nothing

Package: libc6
Version: 2.36-9
Architecture: amd64
Priority: optional
Depends: libgcc-s1
Filename: pool/main/g/glibc/libc6_2.36-9_amd64.deb
Size: 2800000
SHA256: abcd

Package: libgcc-s1
Version: 12.2
Architecture: amd64
Depends: libc6 (>= 2.35)

Package: libfoo1
Version: 1
Architecture: amd64

Package: libfoo-alt
Version: 1
Architecture: amd64

Package: gawk
Version: 5
Architecture: amd64
Priority: optional
Provides: awk

Package: mawk
Version: 1.3
Architecture: amd64
Priority: required
Provides: awk

Package: perl
Version: 5.36
Architecture: amd64

Package: cdebconf
Version: 0.2
Architecture: amd64
Provides: debconf-2.0

Package: debconf
Version: 1.5
Architecture: all
Essential: no
Provides: debconf-2.0

Package: dash
Version: 0.5
Architecture: amd64
Essential: yes
Depends: missing-thing

Package: libc6
Version: 0.0-older
Architecture: amd64
";

    #[test]
    fn depends_are_parsed_to_names() {
        assert_eq!(
            parse_depends("a (>= 1) | b:any, c [amd64], d <!nocheck>"),
            vec![
                vec!["a".to_string(), "b".to_string()],
                vec!["c".to_string()],
                vec!["d".to_string()]
            ]
        );
        assert!(parse_depends("").is_empty());
    }

    #[test]
    fn index_keeps_the_first_stanza() {
        let idx = parse_index(INDEX);
        let libc = &idx.packages["libc6"];
        assert_eq!(
            (libc.version.as_str(), libc.size, libc.sha256.as_str()),
            ("2.36-9", 2800000, "abcd")
        );
        assert_eq!(libc.filename, "pool/main/g/glibc/libc6_2.36-9_amd64.deb");
        assert_eq!(idx.essential(), vec!["dash".to_string()]);
        assert_eq!(
            idx.providers["awk"].iter().collect::<Vec<_>>(),
            ["gawk", "mawk"]
        );
        // Pre-Depends come first.
        assert_eq!(idx.packages["app"].depends[0], vec!["libc6".to_string()]);
    }

    #[test]
    fn resolution_picks_first_alternatives_and_best_providers() {
        let idx = parse_index(INDEX);
        let got: Vec<&str> = idx
            .resolve(&["app".into()])
            .unwrap()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(
            got,
            [
                "app",
                "debconf",
                "libc6",
                "libfoo1",
                "libgcc-s1",
                "mawk",
                "perl"
            ]
        );
        // A provider already chosen satisfies the virtual name.
        let got: Vec<&str> = idx
            .resolve(&["gawk".into(), "app".into()])
            .unwrap()
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert!(got.contains(&"gawk") && !got.contains(&"mawk"));
    }

    #[test]
    fn resolution_errors_name_the_culprit() {
        let idx = parse_index(INDEX);
        assert!(
            matches!(idx.resolve(&["nope".into()]), Err(Error::UnknownPackage(n)) if n == "nope")
        );
        assert!(matches!(
            idx.resolve(&["dash".into()]),
            Err(Error::Unsatisfiable { package, dependency }) if package == "dash" && dependency == "missing-thing"
        ));
    }

    #[test]
    fn lists_skip_comments() {
        assert_eq!(
            parse_list("# hi\nbash\n\n git # vcs\n"),
            vec!["bash".to_string(), "git".to_string()]
        );
    }
}
