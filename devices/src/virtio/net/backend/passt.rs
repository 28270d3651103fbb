//! User-mode networking through passt.
//!
//! aivmm makes a `socketpair(AF_UNIX, SOCK_STREAM)`, keeps one end and starts
//!
//! ```text
//! passt -f -e -q -1 --no-map-gw --fd N [-D ADDR]... [-t 127.0.0.1/HOST:GUEST]... [-u ...]
//! ```
//!
//! with the other end as fd `N`: foreground, log to stderr, quiet, serve this one
//! peer and quit when it goes. Frames then use QEMU's stream protocol
//! ([`Stream`]). No socket path is needed.
//!
//! `--no-map-gw` is the sandbox boundary: without it passt sends the guest's
//! connections to the gateway address to the host's 127.0.0.1, so the guest could
//! reach every loopback-only service of the host (other VMs' ssh, the builder,
//! databases). Port forwards still work: passt tracks each connection it accepts
//! on the host's 127.0.0.1 and answers the guest's side of it without the
//! gateway mapping. (Bookworm's passt does not track UDP that way, so a UDP
//! forward's replies may not reach the host client; a warning says so.)
//!
//! With `--no-map-gw` passt drops loopback resolvers from `/etc/resolv.conf`
//! (they were reached through the same mapping). On a host whose resolv.conf
//! names only a local stub (systemd-resolved's 127.0.0.53) aivmm passes the
//! stub's upstream servers from `/run/systemd/resolve/resolv.conf` with `-D`, so
//! the guest still gets a resolver by DHCP.
//!
//! passt lives exactly as long as the backend: the child gets `PR_SET_PDEATHSIG`
//! (SIGKILL) so it dies with aivmm, `-1` makes it quit when its end of the socket
//! closes (the fallback for when passt drops privileges, which clears the death
//! signal), and dropping the backend kills and reaps it. A monitor thread forwards
//! passt's stderr to the log and reports how it exited.
//!
//! passt refuses to start if it cannot bind any forwarded port, but only says so on
//! stderr; aivmm binds each port on 127.0.0.1 itself first to give a clear error.

use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, error, info, warn};

use super::{Backend, PortForward, Stream};
use crate::virtio::net::{Error, Result};

/// The passt binary, looked up on PATH.
pub const PASST_BINARY: &str = "passt";

/// The passt child process and the thread watching it.
struct Process {
    child: Arc<Mutex<Child>>,
    pid: u32,
    stopping: Arc<AtomicBool>,
    monitor: Option<JoinHandle<()>>,
    /// How passt ended, once the monitor saw it end while the VM still needed it.
    died: Arc<Mutex<Option<String>>>,
}

/// A passt child serving the device over a stream socket.
pub struct Passt {
    stream: Stream,
    process: Process,
}

impl Passt {
    /// Checks the forwards, then starts passt from PATH.
    pub fn spawn(forwards: &[PortForward]) -> Result<Self> {
        Self::spawn_with(Path::new(PASST_BINARY), forwards)
    }

    /// Like [`Passt::spawn`] with an explicit binary.
    pub fn spawn_with(binary: &Path, forwards: &[PortForward]) -> Result<Self> {
        for f in forwards {
            check_forward(f)?;
        }
        let (ours, theirs) = UnixStream::pair().map_err(Error::Socket)?;
        let fd = theirs.as_raw_fd();
        if forwards.iter().any(|f| f.udp) {
            warn!(
                "virtio-net: passt does not map UDP replies back to the host's loopback \
                 (--no-map-gw), so a UDP port forward may not answer its host client"
            );
        }
        let dns = host_resolvers();
        let mut cmd = Command::new(binary);
        cmd.args(args(fd, &dns, forwards))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: getpid is async-signal-safe and called before the fork.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe calls (prctl, getppid, fcntl) on plain integers.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the death signal was armed.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                // std made the socketpair close-on-exec; passt must inherit its end.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                Error::PasstNotInstalled
            } else {
                Error::PasstSpawn {
                    binary: binary.to_path_buf(),
                    source,
                }
            }
        })?;
        // passt has its copy now.
        drop(theirs);
        let pid = child.id();
        info!(
            "virtio-net: started passt (pid {pid}) with {} port forward(s)",
            forwards.len()
        );
        let stderr = child.stderr.take();
        let child = Arc::new(Mutex::new(child));
        let stopping = Arc::new(AtomicBool::new(false));
        let died = Arc::new(Mutex::new(None));
        let monitor = {
            let child = child.clone();
            let stopping = stopping.clone();
            let died = died.clone();
            std::thread::Builder::new()
                .name("aivmm-passt".into())
                .spawn(move || monitor(stderr, &child, &stopping, &died))
        };
        let mut process = Process {
            child,
            pid,
            stopping,
            monitor: None,
            died,
        };
        match monitor {
            Ok(h) => process.monitor = Some(h),
            Err(e) => {
                // `process` kills and reaps passt when dropped here.
                return Err(Error::Spawn(e));
            }
        }
        let stream = Stream::new(ours).map_err(Error::Socket)?;
        Ok(Self { stream, process })
    }
}

/// passt's command line for socket fd `fd`, explicit resolvers `dns` (none:
/// passt reads `/etc/resolv.conf`) and `forwards`.
pub fn args(fd: RawFd, dns: &[IpAddr], forwards: &[PortForward]) -> Vec<String> {
    let mut a: Vec<String> = ["-f", "-e", "-q", "-1", "--no-map-gw", "--fd"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(fd.to_string());
    for d in dns {
        a.push("-D".into());
        a.push(d.to_string());
    }
    for f in forwards {
        a.push(if f.udp { "-u" } else { "-t" }.into());
        a.push(format!("127.0.0.1/{}:{}", f.host_port, f.guest_port));
    }
    a
}

/// The host's resolv.conf, and systemd-resolved's list of its upstream servers.
const RESOLV_CONF: &str = "/etc/resolv.conf";
const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// Resolvers to hand passt with `-D`: none when `/etc/resolv.conf` names a
/// non-loopback server (passt reads it itself), else the local stub's upstreams.
fn host_resolvers() -> Vec<IpAddr> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let main = read(RESOLV_CONF);
    if nameservers(&main).into_iter().any(usable) {
        return Vec::new();
    }
    let dns = resolvers_for_passt(&main, &read(RESOLVED_UPSTREAM));
    if dns.is_empty() {
        warn!(
            "virtio-net: {RESOLV_CONF} names no resolver the guest may use (loopback ones \
             need the gateway mapping that --no-map-gw turns off); the guest gets no DNS server"
        );
    }
    dns
}

/// Whether the guest can reach resolver `a` through passt: not the host's
/// loopback, and not link-local (its scope is a host interface).
fn usable(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
    }
}

/// The `nameserver` addresses of resolv.conf text `text` (unparsable ones skipped).
fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // A scoped IPv6 address ("fe80::1%eth0") keeps only its address part.
            w.next()?.split('%').next()?.parse().ok()
        })
        .collect()
}

/// Which resolvers aivmm names to passt, from the text of `/etc/resolv.conf`
/// (`main`) and of systemd-resolved's upstream list (`upstream`): none while
/// `main` has a [`usable`] server, else `upstream`'s usable servers (at most
/// three, as resolv.conf itself allows).
fn resolvers_for_passt(main: &str, upstream: &str) -> Vec<IpAddr> {
    if nameservers(main).into_iter().any(usable) {
        return Vec::new();
    }
    nameservers(upstream)
        .into_iter()
        .filter(|a| usable(*a))
        .take(3)
        .collect()
}

/// Refuses port 0 and host ports another process holds on 127.0.0.1.
fn check_forward(f: &PortForward) -> Result<()> {
    if f.host_port == 0 || f.guest_port == 0 {
        return Err(Error::InvalidPort {
            host: f.host_port,
            guest: f.guest_port,
        });
    }
    let addr = (Ipv4Addr::LOCALHOST, f.host_port);
    let r = if f.udp {
        UdpSocket::bind(addr).map(drop)
    } else {
        TcpListener::bind(addr).map(drop)
    };
    r.map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            Error::PortInUse {
                port: f.host_port,
                udp: f.udp,
            }
        } else {
            Error::PortCheck {
                port: f.host_port,
                source,
            }
        }
    })
}

impl Passt {
    /// How passt ended, if it died while the VM was running (it is also logged as
    /// an error, with passt's last words before it).
    pub fn died(&self) -> Option<String> {
        self.process.died.lock().ok().and_then(|d| d.clone())
    }
}

/// Forwards passt's stderr to the log until it closes, then reaps passt and
/// reports its exit.
fn monitor(
    stderr: Option<ChildStderr>,
    child: &Mutex<Child>,
    stopping: &AtomicBool,
    died: &Mutex<Option<String>>,
) {
    if let Some(stderr) = stderr {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = line.trim();
            // Without a syslog socket passt complains about every message it logs.
            if line.is_empty() || (line.starts_with("Failed to send") && line.ends_with("syslog")) {
                continue;
            }
            if line.starts_with("Don't run as root") {
                debug!("passt: {line}");
            } else {
                warn!("passt: {line}");
            }
        }
    }
    let status = match child.lock() {
        Ok(mut c) => c.wait(),
        Err(_) => return,
    };
    match status {
        Ok(s) if stopping.load(Ordering::SeqCst) => debug!("virtio-net: passt stopped ({s})"),
        Ok(s) => {
            let pid = child.lock().map(|c| c.id()).unwrap_or(0);
            error!(
                "virtio-net: the user-mode network helper passt (pid {pid}) exited ({s}); \
                 the guest has no network now"
            );
            if let Ok(mut d) = died.lock() {
                *d = Some(s.to_string());
            }
        }
        Err(e) => error!("virtio-net: waiting for passt failed: {e}"),
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(mut c) = self.child.lock() {
            // Fails harmlessly if passt already exited; Child never signals a reaped pid.
            let _ = c.kill();
            if let Err(e) = c.wait() {
                warn!("virtio-net: reaping passt failed: {e}");
            }
        }
        if let Some(h) = self.monitor.take() {
            if h.join().is_err() {
                error!("virtio-net: the passt monitor thread panicked");
            }
        }
    }
}

impl Backend for Passt {
    fn name(&self) -> &'static str {
        "passt"
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.stream.send(frame)
    }

    fn has_pending_output(&self) -> bool {
        self.stream.has_pending_output()
    }

    fn flush(&mut self) -> io::Result<bool> {
        self.stream.flush()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.stream.recv(buf)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn process_id(&self) -> Option<u32> {
        Some(self.process.pid)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn command_line() {
        let f = [
            PortForward {
                host_port: 8080,
                guest_port: 80,
                udp: false,
            },
            PortForward {
                host_port: 5353,
                guest_port: 53,
                udp: true,
            },
        ];
        let a = args(7, &[], &f);
        assert_eq!(
            a.join(" "),
            "-f -e -q -1 --no-map-gw --fd 7 -t 127.0.0.1/8080:80 -u 127.0.0.1/5353:53"
        );
        // The gateway is never the host's loopback, whatever else is given.
        assert!(a.iter().any(|x| x == "--no-map-gw"));
        let dns: [IpAddr; 2] = ["192.0.2.53".parse().unwrap(), "2001:db8::53".parse().unwrap()];
        assert_eq!(
            args(3, &dns, &[]).join(" "),
            "-f -e -q -1 --no-map-gw --fd 3 -D 192.0.2.53 -D 2001:db8::53"
        );
    }

    #[test]
    fn loopback_resolvers_are_replaced_by_the_stubs_upstreams() {
        let stub = "# systemd-resolved\nnameserver 127.0.0.53\noptions edns0\nsearch lan\n";
        let upstream = "nameserver 192.0.2.1\nnameserver fe80::1%eth0\nnameserver 127.0.0.1\n\
                        nameserver 192.0.2.2\nnameserver 192.0.2.3\nnameserver 192.0.2.4\n";
        let got: Vec<String> = resolvers_for_passt(stub, upstream)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["192.0.2.1", "192.0.2.2", "192.0.2.3"]);
        // A usable resolver in resolv.conf: passt reads it itself.
        assert!(resolvers_for_passt("nameserver 10.0.0.1\nnameserver ::1\n", upstream).is_empty());
        // Nothing usable anywhere: nothing named (and a warning at spawn).
        assert!(resolvers_for_passt(stub, "").is_empty());
        assert!(resolvers_for_passt("", "garbage\nnameserver x.y\n").is_empty());
    }

    /// A passt that dies while the VM runs is reported.
    #[test]
    fn a_helper_that_dies_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("passt");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'fake passt: going away' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let p = Passt::spawn_with(&fake, &[]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while p.died().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(p.died().as_deref(), Some("exit status: 3"));
        // A helper stopped by aivmm itself is not reported as dead.
        let dir2 = tempfile::tempdir().unwrap();
        let sleeper = dir2.path().join("passt");
        std::fs::write(&sleeper, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(
            &sleeper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let q = Passt::spawn_with(&sleeper, &[]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(q.died(), None);
        let died = q.process.died.clone();
        drop(q);
        assert_eq!(*died.lock().unwrap(), None);
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = Passt::spawn_with(Path::new("/nonexistent/passt"), &[])
            .err()
            .unwrap();
        assert!(matches!(e, Error::PasstNotInstalled), "{e}");
        assert!(e.to_string().contains("apt install passt"), "{e}");
    }

    #[test]
    fn port_in_use_is_a_clear_error() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let f = PortForward {
            host_port: port,
            guest_port: 80,
            udp: false,
        };
        let e = Passt::spawn(&[f]).err().unwrap();
        assert!(matches!(e, Error::PortInUse { .. }), "{e}");
        assert!(e.to_string().contains(&format!("port {port}")), "{e}");
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = u.local_addr().unwrap().port();
        let f = PortForward {
            host_port: port,
            guest_port: 53,
            udp: true,
        };
        let e = Passt::spawn(&[f]).err().unwrap();
        assert!(e.to_string().contains("udp"), "{e}");
        let f = PortForward {
            host_port: 0,
            guest_port: 53,
            udp: true,
        };
        assert!(matches!(Passt::spawn(&[f]), Err(Error::InvalidPort { .. })));
    }
}
