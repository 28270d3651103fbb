//! `aivmm builder install` / `uninstall`: what a host needs to use the builder.
//! - The service: systemd socket + service units (Linux) or a launchd plist
//!   (macOS). The service manager listens on 127.0.0.1:PORT and starts
//!   `aivmm builder serve` at the first connection, handing it the socket.
//! - Nix: the `machines` entry (and the same as a nix.conf `builders` line).
//! - SSH: the ssh_config snippet that maps the host alias to 127.0.0.1:PORT with
//!   the client key and the pinned host key (nix-daemon runs ssh as root, so it
//!   belongs in the system ssh_config, e.g. /etc/ssh/ssh_config.d/).
//!
//! Without `--write` everything is printed. With it the unit files (or plist),
//! `STATE/nix/machines` and `STATE/ssh/config` are written and, for the default
//! systemd unit directory, the socket is enabled; the lines to add to nix.conf
//! and ssh_config are printed. `uninstall` disables and removes what `install`
//! wrote; keys and the disk stay (delete the state directory to drop them).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cli::{format_duration, InstallArgs, VmArgs};
use super::keys::Keys;
use super::{io_err, Error, Result, HOST_ALIAS, USER};

/// The launchd label (and plist name).
pub const LAUNCHD_LABEL: &str = "org.aivmm.builder";
/// The systemd unit base name.
pub const UNIT: &str = "aivmm-builder";
/// Features advertised to Nix on every host.
pub const FEATURES: &str = "benchmark,big-parallel";
/// Added when the host's KVM allows nested virtualization: the guest then has
/// `/dev/kvm` (its init loads KVM, and its nix-daemon finds it), so NixOS VM
/// tests and other `kvm` builds run there.
pub const NESTED_FEATURES: &str = "kvm,nixos-test";

/// Whether this host's KVM gives its guests virtualization of their own
/// (`kvm_amd`/`kvm_intel` loaded with `nested=1`).
pub fn host_nested_kvm() -> bool {
    cfg!(target_os = "linux")
        && ["kvm_amd", "kvm_intel"].iter().any(|m| {
            std::fs::read_to_string(format!("/sys/module/{m}/parameters/nested"))
                .is_ok_and(|v| nested_param_on(&v))
        })
}

/// `nested` reads `1` (kvm_amd) or `Y` (kvm_intel) when on.
fn nested_param_on(v: &str) -> bool {
    matches!(v.trim(), "1" | "Y" | "y")
}

/// The features of the machines line: `FEATURES`, plus `NESTED_FEATURES` with nested KVM.
pub fn features(nested: bool) -> String {
    if nested {
        format!("{NESTED_FEATURES},{FEATURES}")
    } else {
        FEATURES.to_string()
    }
}

/// The Nix system the builder builds for: Linux on this CPU.
pub fn nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// The `machines` entry: `URI SYSTEMS KEY MAXJOBS SPEED FEATURES MANDATORY HOSTKEY`,
/// the host key being base64 of `ssh-ed25519 AAAA…`.
pub fn machines_line(
    client_key: &Path,
    cpus: u32,
    features: &str,
    host_public: Option<&str>,
) -> String {
    format!(
        "ssh-ng://{USER}@{HOST_ALIAS} {} {} {cpus} 1 {features} - {}",
        nix_system(),
        client_key.display(),
        host_public.map_or_else(|| "-".to_string(), |k| crate::image::base64(k.trim().as_bytes()))
    )
}

/// The ssh_config snippet for the host alias.
pub fn ssh_config(port: u16, keys: &Keys) -> String {
    format!(
        "Host {HOST_ALIAS}\n  HostName 127.0.0.1\n  Port {port}\n  User {USER}\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
         HostKeyAlias {HOST_ALIAS}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  \
         # The first connection waits for the VM to boot.\n  ConnectTimeout 300\n  ServerAliveInterval 30\n",
        keys.client_key.display(),
        keys.known_hosts.display()
    )
}

/// `aivmm builder serve` with the settings of `vm`, as a service runs it.
pub fn serve_argv(exe: &Path, vm: &VmArgs, state: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![exe.into(), "builder".into(), "serve".into()];
    let mut add = |k: &str, v: OsString| {
        a.push(k.into());
        a.push(v);
    };
    add("--state-dir", state.into());
    add("--port", vm.port.to_string().into());
    add("--cpus", vm.cpus().to_string().into());
    add("--memory", format!("{}M", vm.memory() >> 20).into());
    add("--disk-size", format!("{}M", vm.disk_size() >> 20).into());
    add("--net", vm.net.clone().into());
    if vm.always_on {
        a.push("--always-on".into());
    } else {
        add("--idle", format_duration(vm.idle).into());
    }
    a
}

/// One argument quoted for a systemd `ExecStart=` line.
fn systemd_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=@+,".contains(c))
    {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
        )
    }
}

/// The systemd socket and service units: (socket, service).
pub fn systemd_units(
    argv: &[OsString],
    port: u16,
    always_on: bool,
    system: bool,
) -> (String, String) {
    let socket = format!(
        "[Unit]\nDescription=aivmm Nix builder (SSH on loopback)\n\n[Socket]\n\
         # Loopback only: aivmm refuses any other address.\nListenStream=127.0.0.1:{port}\n\
         # One aivmm for all connections; it accepts them itself.\nAccept=no\n\n\
         [Install]\nWantedBy=sockets.target\n"
    );
    let exec = argv
        .iter()
        .map(|a| systemd_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    let install = if always_on {
        format!(
            "\n[Install]\nWantedBy={}\n",
            if system {
                "multi-user.target"
            } else {
                "default.target"
            }
        )
    } else {
        String::new()
    };
    let service = format!(
        "[Unit]\nDescription=aivmm Nix builder VM\nRequires={UNIT}.socket\nAfter={UNIT}.socket\n\n\
         [Service]\nExecStart={exec}\n\
         # With an idle TTL aivmm exits 0 once the VM stopped; systemd starts it again\n\
         # at the next connection. A crash is retried.\nRestart=on-failure\nRestartSec=2\n\
         # The guest gets a clean power-off (its disk synced) before the kill.\nTimeoutStopSec=60\nKillMode=mixed\n{install}"
    );
    (socket, service)
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The launchd plist (a LaunchAgent, or a LaunchDaemon as root).
pub fn launchd_plist(argv: &[OsString], port: u16, always_on: bool, log: &Path) -> String {
    let args: String = argv
        .iter()
        .map(|a| format!("    <string>{}</string>\n", xml(&a.to_string_lossy())))
        .collect();
    let flag = |b: bool| if b { "<true/>" } else { "<false/>" };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n  <key>Label</key>\n  <string>{LAUNCHD_LABEL}</string>\n  \
         <key>ProgramArguments</key>\n  <array>\n{args}  </array>\n  <key>Sockets</key>\n  <dict>\n    \
         <key>Listener</key>\n    <dict>\n      <key>SockNodeName</key>\n      <string>127.0.0.1</string>\n      \
         <key>SockServiceName</key>\n      <string>{port}</string>\n      <key>SockFamily</key>\n      \
         <string>IPv4</string>\n      <key>SockType</key>\n      <string>stream</string>\n    </dict>\n  </dict>\n  \
         <key>RunAtLoad</key>\n  {}\n  <key>KeepAlive</key>\n  {}\n  <key>ProcessType</key>\n  <string>Interactive</string>\n  \
         <key>StandardErrorPath</key>\n  <string>{}</string>\n</dict>\n</plist>\n",
        flag(always_on),
        flag(always_on),
        xml(&log.to_string_lossy())
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| Error::Arg("HOME is not set; give --unit-dir".into()))
}

/// Where the service files go, and whether that is the default place (then
/// systemctl/launchctl is run).
fn unit_dir(a: &InstallArgs) -> Result<(PathBuf, bool)> {
    if let Some(d) = &a.unit_dir {
        return Ok((d.clone(), false));
    }
    let d = if cfg!(target_os = "macos") {
        if is_root() {
            PathBuf::from("/Library/LaunchDaemons")
        } else {
            home()?.join("Library/LaunchAgents")
        }
    } else if is_root() {
        PathBuf::from("/etc/systemd/system")
    } else {
        std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or(home()?.join(".config"))
            .join("systemd/user")
    };
    Ok((d, true))
}

/// The service files: (path, contents).
fn service_files(a: &InstallArgs, state: &Path, dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let exe = std::env::current_exe().map_err(io_err("the aivmm executable"))?;
    let argv = serve_argv(&exe, &a.vm, state);
    Ok(if cfg!(target_os = "macos") {
        vec![(
            dir.join(format!("{LAUNCHD_LABEL}.plist")),
            launchd_plist(&argv, a.vm.port, a.vm.always_on, &state.join("launchd.log")),
        )]
    } else {
        let (socket, service) = systemd_units(&argv, a.vm.port, a.vm.always_on, is_root());
        vec![
            (dir.join(format!("{UNIT}.socket")), socket),
            (dir.join(format!("{UNIT}.service")), service),
        ]
    })
}

fn systemctl(args: &[&str]) {
    let mut c = Command::new("systemctl");
    if !is_root() {
        c.arg("--user");
    }
    match c.args(args).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("aivmm builder: systemctl {} failed ({s})", args.join(" ")),
        Err(e) => eprintln!("aivmm builder: systemctl: {e}"),
    }
}

/// `install` without `--write`: prints what it would write, and changes
/// nothing (no state directory, no keys). Before the first `--write` the keys
/// do not exist yet, so the machines line has no host key (`-`); `--write`
/// makes them and writes the line with it.
fn print_plan(a: &InstallArgs, state: &Path) -> Result<()> {
    let state = std::fs::canonicalize(state)
        .or_else(|_| std::path::absolute(state))
        .map_err(io_err(state))?;
    let keys = Keys::paths(&state);
    let host_public = if keys.host_pub.exists() {
        Some(keys.host_public()?)
    } else {
        None
    };
    let machines = machines_line(
        &keys.client_key,
        a.vm.cpus(),
        &features(host_nested_kvm()),
        host_public.as_deref(),
    );
    let ssh = ssh_config(a.vm.port, &keys);
    let (dir, _) = unit_dir(a)?;
    for (p, text) in &service_files(a, &state, &dir)? {
        println!("# ---- {}\n{text}", p.display());
    }
    println!(
        "# ---- Nix machines entry (/etc/nix/machines, or {}):",
        state.join("nix/machines").display()
    );
    if host_public.is_none() {
        println!("# (no keys yet: --write makes them, and this line then pins the builder's host key)");
    }
    println!("{machines}\n");
    println!("# ---- nix.conf (the same machine as a builders line):");
    println!("builders = {machines}\nbuilders-use-substitutes = true\n");
    println!("# ---- ssh_config for nix-daemon (root): /etc/ssh/ssh_config.d/{UNIT}.conf");
    print!("{ssh}");
    println!("\n# `aivmm builder install --write` writes the files above and enables the service.");
    Ok(())
}

/// `aivmm builder install`.
pub fn install(a: &InstallArgs) -> Result<()> {
    let state = a.vm.state.state_dir()?;
    if !a.write {
        return print_plan(a, &state);
    }
    crate::state_fs::dir(&state).map_err(io_err(&state))?;
    let state = std::fs::canonicalize(&state).map_err(io_err(&state))?;
    let keys = Keys::ensure(&state, a.vm.port)?;
    let machines = machines_line(
        &keys.client_key,
        a.vm.cpus(),
        &features(host_nested_kvm()),
        Some(&keys.host_public()?),
    );
    let ssh = ssh_config(a.vm.port, &keys);
    let (dir, default_dir) = unit_dir(a)?;
    let files = service_files(a, &state, &dir)?;
    let machines_file = state.join("nix/machines");
    let ssh_file = state.join("ssh/config");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for (p, text) in &files {
        std::fs::write(p, text).map_err(io_err(p))?;
        println!("wrote {}", p.display());
    }
    if let Some(d) = machines_file.parent() {
        crate::state_fs::dir(d).map_err(io_err(d))?;
    }
    // In the state dir, read by the nix-daemon (root): 0600, no symlinks followed.
    let write = |p: &Path, text: &str| {
        crate::state_fs::create(p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(io_err(p))
    };
    write(&machines_file, &format!("{machines}\n"))?;
    write(&ssh_file, &ssh)?;
    println!(
        "wrote {}\nwrote {}",
        machines_file.display(),
        ssh_file.display()
    );
    if default_dir {
        if cfg!(target_os = "macos") {
            println!("load it with: launchctl load -w {}", files[0].0.display());
        } else {
            systemctl(&["daemon-reload"]);
            systemctl(&["enable", "--now", &format!("{UNIT}.socket")]);
            if a.vm.always_on {
                systemctl(&["enable", "--now", &format!("{UNIT}.service")]);
            }
        }
    }
    println!(
        "\nNow add to nix.conf (then restart nix-daemon):\n  builders = @{}\n  builders-use-substitutes = true\n\
         and to root's ssh_config (nix-daemon runs ssh as root):\n  Include {}\n\
         Check with: sudo ssh {HOST_ALIAS} true  (the first connection boots the VM)",
        machines_file.display(),
        ssh_file.display()
    );
    Ok(())
}

/// `aivmm builder uninstall`.
pub fn uninstall(a: &InstallArgs) -> Result<()> {
    let state = a.vm.state.state_dir()?;
    let (dir, default_dir) = unit_dir(a)?;
    if default_dir && !cfg!(target_os = "macos") {
        systemctl(&[
            "disable",
            "--now",
            &format!("{UNIT}.socket"),
            &format!("{UNIT}.service"),
        ]);
    }
    let mut files: Vec<PathBuf> = if cfg!(target_os = "macos") {
        vec![dir.join(format!("{LAUNCHD_LABEL}.plist"))]
    } else {
        vec![
            dir.join(format!("{UNIT}.socket")),
            dir.join(format!("{UNIT}.service")),
        ]
    };
    if default_dir && cfg!(target_os = "macos") && files[0].exists() {
        let _ = Command::new("launchctl")
            .arg("unload")
            .arg("-w")
            .arg(&files[0])
            .status();
    }
    files.push(state.join("nix/machines"));
    files.push(state.join("ssh/config"));
    for f in files {
        match std::fs::remove_file(&f) {
            Ok(()) => println!("removed {}", f.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&f)(e)),
        }
    }
    if default_dir && !cfg!(target_os = "macos") {
        systemctl(&["daemon-reload"]);
    }
    println!(
        "Remove the builders line from nix.conf and the Include from ssh_config. The keys and the \
         VM's disk stay in {} (delete it to drop them).",
        state.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    fn vm_args(extra: &[&str]) -> VmArgs {
        let mut v = vec!["aivmm", "builder", "install"];
        v.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(v).unwrap().command {
            crate::cli::Command::Builder {
                command: super::super::Command::Install(a),
            } => a.vm,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_machines_line_has_the_eight_fields_nix_wants() {
        let pubkey =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBEkd4Q9uyb2TTvyJ4c+1e7Ww8bSt7AJxLNfwGX0uGGc";
        let line = machines_line(
            Path::new("/var/lib/b/ssh/id_ed25519"),
            6,
            &features(false),
            Some(pubkey),
        );
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 8, "{line}");
        assert_eq!(f[0], "ssh-ng://builder@aivmm-builder");
        assert_eq!(f[1], format!("{}-linux", std::env::consts::ARCH));
        assert_eq!(f[2], "/var/lib/b/ssh/id_ed25519");
        assert_eq!(
            (f[3], f[4], f[5], f[6]),
            ("6", "1", "benchmark,big-parallel", "-")
        );
        assert_eq!(f[7], crate::image::base64(pubkey.as_bytes()));
        assert!(
            f[7].starts_with("c3NoLWVkMjU1MTkg"),
            "base64 of 'ssh-ed25519 '"
        );
    }

    #[test]
    fn nested_kvm_adds_kvm_and_nixos_test() {
        assert_eq!(features(true), "kvm,nixos-test,benchmark,big-parallel");
        assert_eq!(features(false), "benchmark,big-parallel");
        for on in ["1\n", "Y\n", "y"] {
            assert!(nested_param_on(on), "{on:?}");
        }
        for off in ["0\n", "N\n", ""] {
            assert!(!nested_param_on(off), "{off:?}");
        }
    }

    #[test]
    fn install_without_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("units");
        let fresh = dir.path().join("new-state");
        let empty = dir.path().join("empty-state");
        std::fs::create_dir(&empty).unwrap();
        for state in [&fresh, &empty] {
            let a = InstallArgs {
                vm: vm_args(&["--state-dir", state.to_str().unwrap()]),
                write: false,
                unit_dir: Some(units.clone()),
            };
            install(&a).unwrap();
        }
        assert!(!units.exists(), "no unit directory");
        assert!(!fresh.exists(), "no state directory");
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing in the state directory");
    }

    #[test]
    fn units_run_serve_with_the_settings() {
        let vm = vm_args(&[
            "--state-dir",
            "/st",
            "--port",
            "31999",
            "--cpus",
            "2",
            "--memory",
            "3G",
            "--idle",
            "90m",
        ]);
        let argv = serve_argv(Path::new("/usr/bin/aivmm"), &vm, Path::new("/st dir"));
        let (socket, service) = systemd_units(&argv, vm.port, vm.always_on, false);
        assert!(
            socket.contains("\nListenStream=127.0.0.1:31999\n"),
            "{socket}"
        );
        assert!(socket.contains("\nAccept=no\n"));
        assert!(
            service.contains(
                "\nExecStart=/usr/bin/aivmm builder serve --state-dir \"/st dir\" --port 31999 --cpus 2 \
                 --memory 3072M --disk-size 65536M --net user --idle 1h30m\n"
            ),
            "{service}"
        );
        assert!(
            !service.contains("WantedBy"),
            "on demand: the socket starts it"
        );
        let on = vm_args(&["--always-on"]);
        let argv = serve_argv(Path::new("/a"), &on, Path::new("/s"));
        assert!(argv.iter().any(|a| a == "--always-on"));
        let (_, service) = systemd_units(&argv, on.port, true, true);
        assert!(service.contains("WantedBy=multi-user.target"));
        let plist = launchd_plist(&argv, 31022, false, Path::new("/s/launchd.log"));
        assert!(plist.contains("<string>127.0.0.1</string>"));
        assert!(plist.contains("<key>SockServiceName</key>\n      <string>31022</string>"));
        assert!(plist.contains("<string>--always-on</string>"));
        assert!(plist.contains("<key>RunAtLoad</key>\n  <false/>"));
        // The serve arguments parse back to the same settings.
        let mut full: Vec<String> = vec!["aivmm".into()];
        full.extend(
            serve_argv(Path::new("/a"), &vm, Path::new("/st"))
                .iter()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned()),
        );
        let back = match crate::cli::Cli::try_parse_from(full).unwrap().command {
            crate::cli::Command::Builder {
                command: super::super::Command::Serve(s),
            } => s.vm,
            _ => unreachable!(),
        };
        assert_eq!(
            (back.port, back.cpus(), back.memory(), back.disk_size(), back.idle),
            (vm.port, vm.cpus(), vm.memory(), vm.disk_size(), vm.idle)
        );
    }

    #[test]
    fn ssh_config_points_at_loopback_and_pins_the_host_key() {
        let k = Keys::paths(Path::new("/st"));
        let c = ssh_config(31022, &k);
        for want in [
            "Host aivmm-builder\n",
            "  HostName 127.0.0.1\n",
            "  Port 31022\n",
            "  User builder\n",
            "  IdentityFile /st/ssh/id_ed25519\n",
            "  UserKnownHostsFile /st/ssh/known_hosts\n",
            "  StrictHostKeyChecking yes\n",
        ] {
            assert!(c.contains(want), "{want:?} missing:\n{c}");
        }
    }
}
