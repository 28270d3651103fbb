//! `aivmm builder install` as a user runs it: without `--write` the real binary
//! prints the Nix `machines` entry, the `builders` line and the ssh_config
//! snippet and changes nothing (a fresh state directory is not even made, so the
//! entry has no host key yet); once `--write` has made the keys, the entry is
//! checked field by field against them. `--write` with a unit directory of our
//! own writes the systemd units and the files it names, and `uninstall` removes
//! them again.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn aivmm(args: &[&str], state: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run aivmm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Standard base64 decoding (enough for a test).
fn unbase64(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = A.iter().position(|&a| a == c).expect("base64 character") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

#[test]
fn install_prints_a_machines_line_for_the_generated_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("builder");
    let install = ["builder", "install", "--cpus", "3", "--port", "31555"];
    let machines_of = |out: &str| -> String {
        let lines: Vec<&str> = out.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with("# ---- Nix machines entry"))
            .expect("no machines section");
        lines[i + 1..]
            .iter()
            .find(|l| !l.starts_with('#'))
            .expect("no machines entry")
            .to_string()
    };
    // Before any --write: the plan, with no host key, and nothing made.
    let (ok, out, err) = aivmm(&install, &state);
    assert!(ok, "install failed: {err}");
    let first = machines_of(&out);
    assert_eq!(first.split(' ').nth(7), Some("-"), "{first}");
    assert!(out.contains("no keys yet"), "{out}");
    assert!(!state.exists(), "install without --write made the state directory");
    // --write (units in a directory of our own) makes the keys.
    let units = tmp.path().join("units");
    let mut write = install.to_vec();
    write.extend(["--write", "--unit-dir", units.to_str().unwrap()]);
    let (ok, _, err) = aivmm(&write, &state);
    assert!(ok, "install --write failed: {err}");
    let (ok, out, err) = aivmm(&install, &state);
    assert!(ok, "install failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    let machines_owned = machines_of(&out);
    let machines = machines_owned.as_str();
    let f: Vec<&str> = machines.split(' ').collect();
    assert_eq!(f.len(), 8, "machines entry must have 8 fields: {machines}");
    assert_eq!(f[0], "ssh-ng://builder@aivmm-builder");
    assert_eq!(f[1], format!("{}-linux", std::env::consts::ARCH));
    let key = Path::new(f[2]);
    assert!(
        key.is_absolute() && key.starts_with(std::fs::canonicalize(&state).unwrap()),
        "{machines}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the client key must be private");
    assert!(std::fs::read_to_string(key)
        .unwrap()
        .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert_eq!(f[3], "3", "maxJobs = --cpus");
    assert_eq!(f[4], "1");
    assert_eq!(f[5], "benchmark,big-parallel");
    assert_eq!(f[6], "-");
    // The last field is the guest's host key, base64 of its public key line.
    let host_pub = std::fs::read_to_string(state.join("guest/ssh_host_ed25519_key.pub")).unwrap();
    let decoded = String::from_utf8(unbase64(f[7])).unwrap();
    assert!(decoded.starts_with("ssh-ed25519 "), "{decoded}");
    assert_eq!(
        decoded,
        host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    // The client key's public half is what the guest authorizes.
    assert_eq!(
        std::fs::read_to_string(state.join("guest/authorized_keys")).unwrap(),
        std::fs::read_to_string(state.join("ssh/id_ed25519.pub")).unwrap()
    );

    // The same entry as a nix.conf builders line, and the ssh_config for the alias.
    assert!(
        lines.contains(&format!("builders = {machines}").as_str()),
        "{out}"
    );
    assert!(
        out.contains("Host aivmm-builder\n  HostName 127.0.0.1\n  Port 31555\n"),
        "{out}"
    );
    assert!(out.contains("ListenStream=127.0.0.1:31555"), "{out}");
    assert!(out.contains(" builder serve --state-dir "), "{out}");

    // What --write wrote is the same line.
    assert_eq!(
        std::fs::read_to_string(state.join("nix/machines")).unwrap().trim_end(),
        machines
    );
    // A second run keeps the keys: the same line.
    let (ok, again, err) = aivmm(&install, &state);
    assert!(ok, "{err}");
    assert!(again.contains(machines), "keys changed between runs");
}

#[test]
fn install_write_and_uninstall() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("st");
    let units = tmp.path().join("units");
    let u = units.to_str().unwrap();
    let (ok, out, err) = aivmm(
        &[
            "builder",
            "install",
            "--write",
            "--unit-dir",
            u,
            "--idle",
            "45m",
        ],
        &state,
    );
    assert!(ok, "{err}");
    let service = std::fs::read_to_string(units.join("aivmm-builder.service")).unwrap();
    assert!(service.contains("--idle 45m"), "{service}");
    assert!(units.join("aivmm-builder.socket").is_file());
    let machines = std::fs::read_to_string(state.join("nix/machines")).unwrap();
    assert!(
        machines.starts_with("ssh-ng://builder@aivmm-builder "),
        "{machines}"
    );
    let ssh = std::fs::read_to_string(state.join("ssh/config")).unwrap();
    assert!(ssh.contains("IdentityFile "), "{ssh}");
    assert!(out.contains("builders = @"), "{out}");
    let (ok, _, err) = aivmm(&["builder", "uninstall", "--unit-dir", u], &state);
    assert!(ok, "{err}");
    for f in [
        units.join("aivmm-builder.service"),
        units.join("aivmm-builder.socket"),
        state.join("nix/machines"),
        state.join("ssh/config"),
    ] {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    assert!(
        state.join("ssh/id_ed25519").exists(),
        "uninstall keeps the keys"
    );
}

#[test]
fn status_of_a_builder_that_never_ran() {
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out, err) = aivmm(&["builder", "status"], tmp.path());
    assert!(ok, "{err}");
    assert!(out.starts_with("state: not serving"), "{out}");
    assert!(out.contains("last use: never"), "{out}");
}

#[test]
fn bad_arguments_get_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args(["builder", "serve", "--idle", "soon", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad duration 'soon'"), "{err}");
    // --kernel without a root filesystem is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_aivmm"))
        .args([
            "builder",
            "serve",
            "--kernel",
            "/nonexistent",
            "--port",
            "0",
            "--state-dir",
        ])
        .arg(tmp.path())
        .env_remove("AIVMM_BUILDER_ROOTFS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("aivmm: error: --kernel needs --rootfs"),
        "{err}"
    );
}
