//! Every `*.nix` file in the repository must parse: `nix-instantiate --parse FILE`.
//!
//! Nothing Nix-side can be built in CI (no nixpkgs, no binary cache), but a syntax
//! error in the flake or a module is caught here. Debian's `nix-bin` provides
//! `nix-instantiate`; set `AIVMM_SKIP_NIX_PARSE=1` to skip the check where it is
//! not installed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files this check must find, so it cannot pass by finding nothing.
const EXPECTED: &[&str] = &[
    "flake.nix",
    "nix/package.nix",
    "nix/agent.nix",
    "nix/builder-common.nix",
    "nix/module.nix",
    "nix/darwin-module.nix",
    "guest-image/nixos/guest.nix",
    "guest-image/nixos/kernel.nix",
    "guest-image/nixos/image.nix",
    "guest-image/nixos/builder.nix",
];

/// Collects `*.nix` files under `dir`, skipping build output and VCS metadata. Symlinks
/// are not followed (a `nix build` leaves `result` links into the store).
fn find_nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        let path = entry.path();
        let file_type = entry
            .file_type()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = entry.file_name();
        if file_type.is_dir() {
            if name != "target" && name != ".git" && name != "node_modules" {
                find_nix_files(&path, out);
            }
        } else if file_type.is_file() && path.extension().is_some_and(|e| e == "nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let nix = std::env::var_os("NIX_INSTANTIATE").unwrap_or_else(|| "nix-instantiate".into());
    let found = Command::new(&nix)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var_os("AIVMM_SKIP_NIX_PARSE").is_some_and(|v| v == "1") {
            eprintln!("skipping the Nix parse check: nix-instantiate is not installed (AIVMM_SKIP_NIX_PARSE=1)");
            return;
        }
        panic!(
            "nix-instantiate not found: install Debian's nix-bin (apt-get install nix-bin), \
             or set AIVMM_SKIP_NIX_PARSE=1 to skip this check"
        );
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    find_nix_files(root, &mut files);
    files.sort();

    let relative: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(root)
                .unwrap_or(f)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let missing: Vec<&&str> = EXPECTED
        .iter()
        .filter(|e| !relative.iter().any(|r| r == **e))
        .collect();
    assert!(
        missing.is_empty(),
        "expected Nix files not found: {missing:?} (found {relative:?})"
    );

    let mut failures = Vec::new();
    for (file, rel) in files.iter().zip(&relative) {
        // A dummy store: parsing needs none, and without it a non-root user's
        // nix-instantiate tries the daemon socket and fails on its permissions.
        let out = Command::new(&nix)
            .args(["--store", "dummy://", "--parse"])
            .arg(file)
            .env("HOME", std::env::temp_dir())
            .output()
            .unwrap_or_else(|e| panic!("running nix-instantiate on {rel}: {e}"));
        if !out.status.success() {
            failures.push(format!(
                "{rel}:\n{}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} Nix files do not parse:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
    eprintln!("{} Nix files parse", files.len());
}

/// The flake's evaluation checks must not build what they evaluate: a `drvPath`
/// interpolated as it is depends on every output of the closure (its string
/// context is "all outputs"), so each goes through
/// `builtins.unsafeDiscardOutputDependency`, which leaves only the `.drv`.
/// (Checked by `nix-instantiate --eval` by hand: `getContext d.drvPath` is
/// `{ allOutputs = true; }`, and `{ path = true; }` once discarded.)
#[test]
fn the_flakes_eval_checks_do_not_build_the_guests() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("flake.nix");
    let flake = std::fs::read_to_string(&path).expect("flake.nix is readable");
    let uses: Vec<&str> = flake.lines().filter(|l| l.contains(".drvPath")).collect();
    assert!(!uses.is_empty(), "the flake's eval checks are gone: update this test");
    for line in uses {
        assert!(
            line.contains("builtins.unsafeDiscardOutputDependency"),
            "a drvPath without unsafeDiscardOutputDependency builds the whole closure: {line}"
        );
    }
}
