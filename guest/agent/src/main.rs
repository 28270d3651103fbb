//! aivmm-agent: the guest side of `aivmm run`.
//!
//! The guest's init starts it once `/work` is mounted. It connects to the host
//! (vsock CID 2, port [`AGENT_PORT`] unless told otherwise), says `Ready`, applies
//! the host's `Setup` (extra shares, links, sshd), runs the command the host sends
//! in `Start` (see [`aivmm_protocol`]) on a new pty or on pipes, relays its input,
//! output, terminal size and signals, reports how it ended, and exits with the same
//! status. Meanwhile it listens on vsock port [`EXEC_PORT`] (or `--exec-listen`)
//! for `aivmm exec`: each connection there runs one more command the same way, on
//! its own thread. It also watches the guest's ACPI power button ([`power`]):
//! a press (`aivmm stop`) stops the command the way the host's `Shutdown` does.
//!
//! ```text
//! aivmm-agent [--connect vsock:CID:PORT | --connect unix:PATH] [--connect-timeout SECS]
//!             [--exec-listen vsock:PORT | unix:PATH | none] [--hostile MODE]
//! ```
//!
//! `--hostile MODE` makes it a hostile agent instead ([`hostile`]), for tests of
//! the host: it connects, writes bad frames, reports what the host did, and exits.

#[cfg(target_os = "linux")]
mod child;
#[cfg(target_os = "linux")]
mod clock;
#[cfg(target_os = "linux")]
mod hostile;
#[cfg(target_os = "linux")]
mod power;
#[cfg(target_os = "linux")]
mod relay;
#[cfg(target_os = "linux")]
mod setup;
#[cfg(target_os = "linux")]
mod transport;

#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::process::ExitCode;
#[cfg(target_os = "linux")]
use std::time::Duration;

#[cfg(target_os = "linux")]
use aivmm_protocol::{AGENT_PORT, EXEC_PORT};
#[cfg(target_os = "linux")]
use transport::{Address, Listen};

/// The host's vsock context id.
#[cfg(target_os = "linux")]
const HOST_CID: u32 = 2;
/// How long the agent keeps trying to reach the host.
#[cfg(target_os = "linux")]
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The exit status for the agent's own failures.
#[cfg(target_os = "linux")]
const AGENT_FAILURE: u8 = 125;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
#[cfg(target_os = "linux")]
pub enum Error {
    /// The command line is wrong.
    #[error(
        "{0}\nusage: aivmm-agent [--connect vsock:CID:PORT|unix:PATH] [--connect-timeout SECS] [--exec-listen vsock:PORT|unix:PATH|none] [--hostile MODE]"
    )]
    Usage(String),
    /// The host could not be reached.
    #[error("cannot connect to the host at {addr:?}: {source}")]
    Connect {
        /// Where.
        addr: Address,
        /// Why.
        source: io::Error,
    },
    /// The host closed the connection before the command ended.
    #[error("the host closed the connection")]
    HostGone,
    /// The host sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] aivmm_protocol::Error),
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The parsed command line.
#[derive(Debug, PartialEq, Eq)]
#[cfg(target_os = "linux")]
struct Args {
    addr: Address,
    connect_timeout: Duration,
    /// Where `aivmm exec` connections arrive; `None` for none.
    exec: Option<Listen>,
    /// Be a hostile agent in this mode ([`hostile`]).
    hostile: Option<String>,
}

#[cfg(target_os = "linux")]
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, Error> {
    let mut a = Args {
        addr: Address::Vsock {
            cid: HOST_CID,
            port: AGENT_PORT,
        },
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        exec: Some(Listen::Vsock(EXEC_PORT)),
        hostile: None,
    };
    let mut exec_given = false;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| Error::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--connect" => a.addr = value("--connect")?.parse().map_err(Error::Usage)?,
            "--exec-listen" => {
                let v = value("--exec-listen")?;
                exec_given = true;
                a.exec = if v == "none" {
                    None
                } else {
                    Some(v.parse().map_err(Error::Usage)?)
                };
            }
            "--hostile" => a.hostile = Some(value("--hostile")?),
            "--connect-timeout" => {
                let v = value("--connect-timeout")?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| Error::Usage(format!("bad timeout '{v}'")))?;
                a.connect_timeout = Duration::try_from_secs_f64(secs)
                    .map_err(|_| Error::Usage(format!("bad timeout '{v}'")))?;
            }
            "-h" | "--help" => {
                return Err(Error::Usage(
                    "aivmm-agent runs the command aivmm asks for".into(),
                ))
            }
            other => return Err(Error::Usage(format!("unknown argument '{other}'"))),
        }
    }
    // Without a VM (a unix socket to the host) there is no vsock to listen on.
    if !exec_given && matches!(a.addr, Address::Unix(_)) {
        a.exec = None;
    }
    Ok(a)
}

/// Serves `aivmm exec` connections on `listen`, one thread each, for the life of
/// the agent. A listener that cannot be made is reported and skipped: the main
/// command matters more.
#[cfg(target_os = "linux")]
fn spawn_exec_listener(listen: Listen) {
    let listener = match transport::listen(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aivmm-agent: cannot listen for exec on {listen:?}: {e}");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name("exec".into())
        .spawn(move || loop {
            match transport::accept(&listener) {
                Ok(sock) => {
                    let _ = std::thread::Builder::new()
                        .name("exec-session".into())
                        .spawn(move || {
                            if let Err(e) = relay::serve(sock, false) {
                                eprintln!("aivmm-agent: exec: {e}");
                            }
                        });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("aivmm-agent: exec listener: {e}");
                    return;
                }
            }
        });
}

#[cfg(target_os = "linux")]
fn run() -> Result<aivmm_protocol::ExitStatus, Error> {
    let args = parse_args(std::env::args().skip(1))?;
    if let Some(mode) = &args.hostile {
        hostile::run(mode, &args.addr, args.connect_timeout).map_err(Error::Usage)?;
        return Ok(aivmm_protocol::ExitStatus::Code(0));
    }
    // Only in a VM: with a unix socket the agent runs beside its host, in tests.
    let in_vm = matches!(args.addr, Address::Vsock { .. });
    if in_vm {
        boot_trace("agent started");
        power::watch();
        clock::enable();
        if let Err(e) = child::protect_from_oom_killer() {
            eprintln!("aivmm-agent: the OOM killer may pick the agent: setting its OOM score failed: {e}");
        }
    }
    if let Some(l) = args.exec.clone() {
        spawn_exec_listener(l);
    }
    let sock =
        transport::connect(&args.addr, args.connect_timeout).map_err(|source| Error::Connect {
            addr: args.addr.clone(),
            source,
        })?;
    if in_vm {
        boot_trace("agent connected");
    }
    relay::serve(sock, true)
}

/// Appends `UPTIME STEP` to the guest init's boot trace (`/run/aivmm/boot-trace`,
/// see guest-image/debian/init), if there is one: where boot time goes.
#[cfg(target_os = "linux")]
fn boot_trace(step: &str) {
    use std::io::Write;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return;
    }
    let line = format!("{}.{:02} {step}\n", ts.tv_sec, ts.tv_nsec / 10_000_000);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .open("/run/aivmm/boot-trace")
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    match run() {
        // Statuses wrap to a byte, as they do for any process.
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(e) => {
            eprintln!("aivmm-agent: {e}");
            ExitCode::from(AGENT_FAILURE)
        }
    }
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn parse(a: &[&str]) -> Result<Args, Error> {
        parse_args(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = parse(&[]).unwrap();
        assert_eq!(
            a.addr,
            Address::Vsock {
                cid: 2,
                port: AGENT_PORT
            }
        );
        assert_eq!(a.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(a.exec, Some(Listen::Vsock(EXEC_PORT)));
        let a = parse(&["--connect", "unix:/tmp/x", "--connect-timeout", "0.5"]).unwrap();
        assert_eq!(
            a,
            Args {
                addr: Address::Unix("/tmp/x".into()),
                connect_timeout: Duration::from_millis(500),
                exec: None,
                hostile: None,
            }
        );
        let a = parse(&["--connect", "unix:/tmp/x", "--exec-listen", "unix:/tmp/e"]).unwrap();
        assert_eq!(a.exec, Some(Listen::Unix("/tmp/e".into())));
        let a = parse(&["--exec-listen", "none"]).unwrap();
        assert_eq!(a.exec, None);
        let a = parse(&["--hostile", "flood"]).unwrap();
        assert_eq!(a.hostile.as_deref(), Some("flood"));
        for bad in [
            &["--connect"][..],
            &["--connect", "tcp:1"],
            &["--connect-timeout", "-1"],
            &["--what"],
            &["--exec-listen", "tcp:1"],
        ] {
            assert!(matches!(parse(bad), Err(Error::Usage(_))), "{bad:?}");
        }
    }
}

/// The agent is a program for the Linux guest (vsock, ptys, mounts); on any other
/// host the workspace still builds, and this binary only says where it belongs.
#[cfg(not(target_os = "linux"))]
fn main() -> std::process::ExitCode {
    eprintln!("aivmm-agent runs inside aivmm's Linux guest; build it for a Linux target");
    std::process::ExitCode::from(125)
}
