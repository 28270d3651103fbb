//! `aivmm builder serve`: takes the state directory, the keys and the listening
//! socket, starts the VM manager ([`super::vm`]), and turns every accepted TCP
//! connection into a vsock connection to the guest's sshd, copying bytes both
//! ways until either side closes.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cli::{format_duration, ServeArgs};
use super::keys::Keys;
use super::listen::{self, Source};
use super::state::{Log, StateDir};
use super::vm::{self, Vm, VmSpec};
use super::{io_err, Error, Result, SSH_VSOCK_PORT};
use crate::image::{self, GuestImage};

/// How long a connection keeps trying to reach the guest's vsock port 22 after
/// the guest said ready (its socat may still be starting).
const GUEST_PATIENCE: Duration = Duration::from_secs(10);

/// The builder image: --kernel/--initrd/--rootfs/--cmdline, else
/// `AIVMM_BUILDER_KERNEL`, `_INITRD`, `_ROOTFS`, `_CMDLINE_FILE` (what the Nix
/// modules set), else the Debian builder image, built now if it is missing.
pub fn resolve_image(a: &ServeArgs) -> Result<GuestImage> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let kernel = a.kernel.clone().or_else(|| env("AIVMM_BUILDER_KERNEL"));
    let mut img = match kernel {
        Some(kernel) => {
            let cmdline = match (&a.cmdline, env("AIVMM_BUILDER_CMDLINE_FILE")) {
                (Some(c), _) => c.clone(),
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(io_err(&f))?
                    .trim()
                    .to_string(),
                (None, None) => image::CMDLINE.to_string(),
            };
            GuestImage {
                kernel,
                initrd: a
                    .initrd
                    .clone()
                    .or_else(|| env("AIVMM_BUILDER_INITRD"))
                    .unwrap_or_default(),
                rootfs: a
                    .rootfs
                    .clone()
                    .or_else(|| env("AIVMM_BUILDER_ROOTFS"))
                    .ok_or_else(|| {
                        Error::Arg("--kernel needs --rootfs (or AIVMM_BUILDER_ROOTFS)".into())
                    })?,
                cmdline,
            }
        }
        None => image::default_image(&image::BuildOptions::builder(), &image::Progress::auto())?,
    };
    if let Some(c) = &a.cmdline {
        img.cmdline = c.clone();
    }
    for p in [&img.kernel, &img.rootfs] {
        std::fs::metadata(p).map_err(io_err(p))?;
    }
    Ok(img)
}

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    vm::QUIT.store(true, Ordering::SeqCst);
}

/// Runs the server until SIGTERM/SIGINT, or until the VM went idle when the
/// service manager holds the socket.
pub fn serve(a: &ServeArgs) -> Result<()> {
    let dir = a.vm.state.state_dir()?;
    let state = StateDir::lock(&dir)?;
    let keys = Keys::ensure(&state.dir, a.vm.port)?;
    let (listener, source) = listen::listener(a.vm.port)?;
    let addr = listener.local_addr().map_err(io_err("listening socket"))?;
    let img = resolve_image(a)?;
    let disk = state.disk(a.vm.disk_size(), a.vm.size.disk_size.is_some())?;
    let log_path = a
        .log
        .clone()
        .unwrap_or_else(|| state.dir.join("builder.log"));
    let log = Arc::new(Log::open(&log_path)?);
    let idle = (!a.vm.always_on).then_some(a.vm.idle);
    let spec = VmSpec {
        exe: std::env::current_exe().map_err(io_err("the aivmm executable"))?,
        image: img,
        cpus: a.vm.cpus(),
        memory: a.vm.memory(),
        net: a.vm.net.clone(),
        disk,
        keys_dir: keys.guest_dir.clone(),
        vsock: state.vsock(),
        console: state.console_log(),
        boot_timeout: Duration::from_secs(a.boot_timeout),
    };
    let summary = format!(
        "serving on {addr} ({}), state {}, VM {} vCPUs {} MiB, disk {} ({} GiB), {}",
        match source {
            Source::Bound => "bound here",
            Source::Systemd => "socket from systemd",
            Source::Launchd => "socket from launchd",
        },
        state.dir.display(),
        a.vm.cpus(),
        a.vm.memory() >> 20,
        spec.disk.display(),
        a.vm.disk_size() >> 30,
        match idle {
            Some(d) => format!("idle stop after {}", format_duration(d)),
            None => "always on".to_string(),
        }
    );
    log.line(&summary);
    eprintln!("aivmm builder: {summary}; log {}", log_path.display());
    if log_path != Path::new("-") {
        // From here stderr (the VM process's too, and any aivmm warning) is the log.
        let f = vm::open_append(&log_path)?;
        // SAFETY: dup2 onto stderr of a descriptor we own; both stay valid.
        if unsafe { libc::dup2(f.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            log.line("cannot send stderr to the log");
        }
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        if let Err(e) = crate::signals::register_handler(sig, on_signal) {
            log.line(format_args!("cannot handle signal {sig}: {e}"));
        }
    }
    let vm = Arc::new(Vm::new(
        spec,
        idle,
        addr.to_string(),
        state.dir.clone(),
        Arc::clone(&log),
    ));
    let manager = {
        let vm = Arc::clone(&vm);
        let log = Arc::clone(&log);
        std::thread::Builder::new()
            .name("builder-vm".into())
            .spawn(move || {
                vm.manage(source.activated());
                log.line("serve ends");
                // Connections still open lose their VM anyway; end the process.
                std::process::exit(0);
            })
            .map_err(io_err("manager thread"))?
    };
    accept_loop(&listener, &vm, &log);
    let _ = manager.join();
    drop(state);
    Ok(())
}

fn accept_loop(listener: &TcpListener, vm: &Arc<Vm>, log: &Arc<Log>) {
    loop {
        match listener.accept() {
            Ok((tcp, peer)) => {
                let vm = Arc::clone(vm);
                let conn_log = Arc::clone(log);
                let r = std::thread::Builder::new()
                    .name("builder-conn".into())
                    .spawn(move || handle(&vm, tcp, &peer.to_string(), &conn_log));
                if let Err(e) = r {
                    log.line(format_args!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log.line(format_args!("accept: {e}"));
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// One connection: wait for the VM, reach the guest's sshd, copy bytes.
fn handle(vm: &Arc<Vm>, tcp: TcpStream, peer: &str, log: &Log) {
    let t = Instant::now();
    let _ = tcp.set_nodelay(true);
    let session = match vm.acquire() {
        Ok(s) => s,
        Err(e) => {
            log.line(format_args!("connection from {peer} closed: {e}"));
            return;
        }
    };
    let waited = t.elapsed().as_millis();
    let guest = match connect_guest(&vm.spec().vsock, SSH_VSOCK_PORT, GUEST_PATIENCE) {
        Ok(g) => g,
        Err(e) => {
            log.line(format_args!("connection from {peer} closed: {e}"));
            return;
        }
    };
    let reached = t.elapsed().as_millis() - waited;
    let (up, down) = proxy(tcp, guest);
    log.line(format_args!(
        "connection from {peer}: waited {waited} ms for the VM and {reached} ms for the guest's port 22, \
         {up} bytes in, {down} bytes out, {} ms",
        t.elapsed().as_millis()
    ));
    drop(session);
}

/// A stream to the guest's vsock `port` through the vsock device's socket at
/// `path` (`CONNECT <port>` / `OK <n>`), retried for `patience`.
pub fn connect_guest(path: &Path, port: u32, patience: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + patience;
    loop {
        match try_connect(path, port) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Guest(format!(
                    "{}: CONNECT {port}: {e}",
                    path.display()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn try_connect(path: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line is the guest's (sshd speaks first).
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "refused (nothing listens on that guest port yet)",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(std::io::Error::other(
                "no answer line from the vsock device",
            ));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::other(format!(
            "vsock device said {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// Copies both ways until both directions ended; returns (bytes to the guest,
/// bytes from the guest). A direction that ends half-closes the other side.
pub fn proxy(tcp: TcpStream, guest: UnixStream) -> (u64, u64) {
    let (mut tcp_r, mut guest_w) = match (tcp.try_clone(), guest.try_clone()) {
        (Ok(t), Ok(g)) => (t, g),
        _ => return (0, 0),
    };
    let up = std::thread::Builder::new()
        .name("builder-up".into())
        .spawn(move || {
            let n = std::io::copy(&mut tcp_r, &mut guest_w).unwrap_or(0);
            let _ = guest_w.shutdown(Shutdown::Write);
            n
        });
    let (mut guest_r, mut tcp_w) = (guest, tcp);
    let down = std::io::copy(&mut guest_r, &mut tcp_w).unwrap_or(0);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let up = match up {
        Ok(h) => h.join().unwrap_or(0),
        Err(_) => 0,
    };
    (up, down)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::BufRead;

    /// A stand-in for the VM process, speaking both host-side protocols: the
    /// vsock device's unix socket (`CONNECT 22` → `OK`, then an "sshd" that sends
    /// a banner and echoes) and the guest's control channel (`ready`, `poweroff`).
    const FAKE_VM: &str = r#"
import os, socket, sys, threading
a = sys.argv[1:]
vsock = a[a.index("--vsock") + 1]
srv = socket.socket(socket.AF_UNIX); srv.bind(vsock); srv.listen(8)
def conn(c):
    f = c.makefile("rb")
    if f.readline() != b"CONNECT 22\n":
        c.close(); return
    c.sendall(b"OK 1024\nSSH-2.0-fake-guest\r\n")
    while True:
        d = c.recv(4096)
        if not d: break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)
def accept():
    while True:
        c, _ = srv.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
threading.Thread(target=accept, daemon=True).start()
ctl = socket.socket(socket.AF_UNIX); ctl.connect(vsock + "_10022")
ctl.sendall(b"ready fake\n")
for line in ctl.makefile("rb"):
    if line == b"poweroff\n":
        ctl.sendall(b"bye\n"); os._exit(0)
os._exit(3)
"#;

    #[test]
    fn connections_boot_the_vm_reach_the_guest_and_idle_stops_it() {
        use std::process::Command;
        if Command::new("python3").arg("-c").arg("1").output().is_err() {
            eprintln!("skipped: no python3");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("fake-vm");
        std::fs::write(&exe, format!("#!/usr/bin/env python3\n{FAKE_VM}")).unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let spec = VmSpec {
            exe,
            image: GuestImage {
                kernel: "/k".into(),
                initrd: "/i".into(),
                rootfs: "/r".into(),
                cmdline: "x".into(),
            },
            cpus: 1,
            memory: 1 << 30,
            net: "none".into(),
            disk: dir.path().join("disk.img"),
            keys_dir: dir.path().join("guest"),
            vsock: dir.path().join("vsock.sock"),
            console: dir.path().join("console.log"),
            boot_timeout: Duration::from_secs(20),
        };
        let log = Arc::new(Log::open(&dir.path().join("builder.log")).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let vm = Arc::new(Vm::new(
            spec,
            Some(Duration::from_millis(700)),
            addr.to_string(),
            dir.path().to_path_buf(),
            Arc::clone(&log),
        ));
        let m = Arc::clone(&vm);
        let manager = std::thread::spawn(move || m.manage(false));
        {
            let (vm, log) = (Arc::clone(&vm), Arc::clone(&log));
            std::thread::spawn(move || accept_loop(&listener, &vm, &log));
        }
        let status = || super::super::state::read_status(dir.path()).unwrap();
        assert_eq!(
            status()["state"],
            "off",
            "nothing boots before a connection"
        );

        let talk = || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut banner = String::new();
            r.read_line(&mut banner).unwrap();
            assert_eq!(banner, "SSH-2.0-fake-guest\r\n");
            s.write_all(b"through the vsock proxy\n").unwrap();
            let mut echo = String::new();
            r.read_line(&mut echo).unwrap();
            assert_eq!(echo, "through the vsock proxy\n");
            assert_eq!(status()["state"], "running");
            assert_ne!(status()["sessions"], "0");
            s.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "the guest's half-close reaches the client");
        };
        talk();
        assert_eq!(status()["boots"], "1");
        // Two connections at once share one VM.
        std::thread::scope(|sc| {
            sc.spawn(talk);
            talk();
        });
        assert_eq!(status()["boots"], "1");
        // Idle: the VM is powered off through the control channel.
        let t0 = Instant::now();
        while status()["state"] != "off" {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "no idle stop: {:?}",
                status()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let logged = std::fs::read_to_string(dir.path().join("builder.log")).unwrap();
        assert!(logged.contains("stopping the VM: idle"), "{logged}");
        assert!(
            logged.contains("VM stopped in"),
            "the guest did not power off by itself: {logged}"
        );
        // The next connection boots it again.
        talk();
        assert_eq!(status()["boots"], "2");
        vm.quit();
        manager.join().unwrap();
        assert_eq!(status()["state"], "off");
    }

    #[test]
    fn a_refused_guest_port_is_an_error_after_the_patience() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                drop(c); // the device closes: nothing listens on the guest port
            }
        });
        let t = Instant::now();
        let err = connect_guest(&path, 22, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONNECT 22"), "{err}");
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
