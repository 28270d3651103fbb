//! aivmm-agent: the guest side of `aivmm run`.
//!
//! The guest's init starts it once `/work` is mounted. It connects to the host
//! (vsock CID 2, port [`AGENT_PORT`] unless told otherwise), says `Ready`, runs the
//! command the host sends in `Start` (see [`aivmm_protocol`]) on a new pty or on
//! pipes, relays its input, output, terminal size and signals, reports how it
//! ended, and exits with the same status.
//!
//! ```text
//! aivmm-agent [--connect vsock:CID:PORT | --connect unix:PATH] [--connect-timeout SECS]
//! ```

mod child;
mod relay;
mod transport;

use std::io;
use std::process::ExitCode;
use std::time::Duration;

use aivmm_protocol::AGENT_PORT;
use transport::Address;

/// The host's vsock context id.
const HOST_CID: u32 = 2;
/// How long the agent keeps trying to reach the host.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The exit status for the agent's own failures.
const AGENT_FAILURE: u8 = 125;

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line is wrong.
    #[error(
        "{0}\nusage: aivmm-agent [--connect vsock:CID:PORT|unix:PATH] [--connect-timeout SECS]"
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
struct Args {
    addr: Address,
    connect_timeout: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, Error> {
    let mut a = Args {
        addr: Address::Vsock {
            cid: HOST_CID,
            port: AGENT_PORT,
        },
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| Error::Usage(format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--connect" => a.addr = value("--connect")?.parse().map_err(Error::Usage)?,
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
    Ok(a)
}

fn run() -> Result<aivmm_protocol::ExitStatus, Error> {
    let args = parse_args(std::env::args().skip(1))?;
    let sock =
        transport::connect(&args.addr, args.connect_timeout).map_err(|source| Error::Connect {
            addr: args.addr.clone(),
            source,
        })?;
    relay::serve(sock)
}

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
        let a = parse(&["--connect", "unix:/tmp/x", "--connect-timeout", "0.5"]).unwrap();
        assert_eq!(
            a,
            Args {
                addr: Address::Unix("/tmp/x".into()),
                connect_timeout: Duration::from_millis(500)
            }
        );
        for bad in [
            &["--connect"][..],
            &["--connect", "tcp:1"],
            &["--connect-timeout", "-1"],
            &["--what"],
        ] {
            assert!(matches!(parse(bad), Err(Error::Usage(_))), "{bad:?}");
        }
    }
}
