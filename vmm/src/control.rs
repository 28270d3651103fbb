//! The control socket of a running VM, and `aivmm balloon`.
//!
//! A VM run on a workdir listens on `control.sock` in its state directory (the
//! user's own, mode 0700); `aivmm run --kernel` does on `--control PATH`. A
//! thread of aivmm answers one request per connection: a line of JSON
//! ([`Request`]) in, a line of JSON ([`Reply`]) out. Only the host user reaches
//! it: the guest has no path to the host's file system, and the socket lives
//! outside the workdir. Today it drives the memory balloon
//! (`aivmm_devices::virtio::balloon`): its size, its counters and the guest's
//! statistics.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aivmm_devices::virtio::balloon::{BalloonHandle, GuestStats};
use serde::{Deserialize, Serialize};

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be set up.
    #[error("control socket {0}: {1}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// Something other than a stale socket is in the way.
    #[error("control socket {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another VM answers there.
    #[error("control socket {0}: another aivmm is listening there")]
    InUse(PathBuf),
    /// The VM could not be reached.
    #[error("cannot reach the VM's control socket {0}: {1}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// The VM's answer could not be read.
    #[error("the VM's control socket {0} gave no answer: {1}")]
    Answer(PathBuf, String),
    /// The VM refused the request.
    #[error("{0}")]
    Refused(String),
}

/// `Result` of the control socket.
pub type Result<T> = std::result::Result<T, Error>;

/// A request to a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The balloon's state and the guest's statistics.
    Status,
    /// Sets the balloon to `size` bytes (memory taken from the guest; 0 deflates).
    Balloon {
        /// Bytes.
        size: u64,
    },
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Why the request failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The balloon, if the VM has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonReport>,
}

/// The balloon as `aivmm balloon` shows it (bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonReport {
    /// Whether the guest's driver runs it.
    pub driver: bool,
    /// The guest's memory.
    pub memory: u64,
    /// The size asked for.
    pub target: u64,
    /// The size the driver reports.
    pub actual: u64,
    /// Given back by inflating (total).
    pub inflated: u64,
    /// Taken back by deflating (total).
    pub deflated: u64,
    /// Free memory reported by the guest and discarded (total).
    pub reported: u64,
    /// The guest's statistics, by the spec's names.
    pub stats: Vec<(String, u64)>,
    /// How old they are, in milliseconds (`None`: the guest never sent any).
    pub stats_age_ms: Option<u64>,
}

/// How long the server waits for a request line, and the client for a reply.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a status request waits for the guest's fresh statistics.
const STATS_WAIT: Duration = Duration::from_secs(2);
/// The longest request line read.
const MAX_REQUEST: u64 = 4096;

/// Listens on `path` (replacing a stale socket, refusing anything else) and
/// answers requests on a thread of its own for as long as the process runs.
pub fn serve(path: &Path, balloon: Option<BalloonHandle>) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(Error::NotASocket(path.into())),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.into()));
            }
            std::fs::remove_file(path).map_err(|e| Error::Listen(path.into(), e))?;
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::Listen(path.into(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::Listen(path.into(), e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, balloon.as_ref()) {
                            tracing::debug!("control: {e}");
                        }
                    }
                    Err(e) => {
                        tracing::warn!("control: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| Error::Listen(path.into(), e))?;
    Ok(())
}

/// Reads one request from `conn` and writes its reply.
fn answer(conn: UnixStream, balloon: Option<&BalloonHandle>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(req) => handle(&req, balloon),
        Err(e) => Reply {
            error: Some(format!("a request this aivmm does not understand: {e}")),
            ..Default::default()
        },
    };
    let mut out = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
    out.push('\n');
    (&conn).write_all(out.as_bytes())
}

/// What `req` does.
pub fn handle(req: &Request, balloon: Option<&BalloonHandle>) -> Reply {
    let Some(b) = balloon else {
        return Reply {
            error: Some("this VM has no balloon (it was started with --no-balloon)".into()),
            ..Default::default()
        };
    };
    let stats = match req {
        Request::Status => b.guest_stats(STATS_WAIT),
        Request::Balloon { size } => {
            if let Err(e) = b.set_size(*size) {
                return Reply {
                    error: Some(e.to_string()),
                    ..Default::default()
                };
            }
            tracing::info!("balloon: set to {} MiB by aivmm balloon", size >> 20);
            b.last_stats()
        }
    };
    Reply {
        error: None,
        balloon: Some(report(b, &stats)),
    }
}

fn report(b: &BalloonHandle, stats: &GuestStats) -> BalloonReport {
    let s = b.status();
    BalloonReport {
        driver: s.driver,
        memory: s.memory,
        target: s.target,
        actual: s.actual,
        inflated: s.inflated,
        deflated: s.deflated,
        reported: s.reported,
        stats: stats.values.iter().map(|&(t, v)| (GuestStats::name(t), v)).collect(),
        stats_age_ms: stats.age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// Sends `req` to the VM listening on `path`; its reply, or its refusal as an error.
pub fn request(path: &Path, req: &Request) -> Result<Reply> {
    let conn = UnixStream::connect(path).map_err(|e| Error::Connect(path.into(), e))?;
    let io = |e: std::io::Error| Error::Answer(path.into(), e.to_string());
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| Error::Answer(path.into(), e.to_string()))?;
    line.push('\n');
    (&conn).write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(io)?;
    let reply: Reply = serde_json::from_str(answer.trim()).map_err(|e| Error::Answer(path.into(), e.to_string()))?;
    match reply.error {
        Some(e) => Err(Error::Refused(e)),
        None => Ok(reply),
    }
}

/// `12.3 MiB`, `1.50 GiB`.
fn size(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
    }
}

/// The report as `aivmm balloon` prints it.
pub fn describe(r: &BalloonReport) -> String {
    let mut out = format!(
        "balloon: {} of the guest's {} (asked: {}){}\n",
        size(r.actual),
        size(r.memory),
        size(r.target),
        if r.driver { "" } else { "; the guest has no balloon driver running" }
    );
    out += &format!(
        "given back to the host: {} by inflating, {} of free memory the guest reported (taken back by deflating: {})\n",
        size(r.inflated),
        size(r.reported),
        size(r.deflated)
    );
    match r.stats_age_ms {
        None => out += "guest statistics: none yet\n",
        Some(age) => {
            out += &format!("guest statistics ({:.1} s old):\n", age as f64 / 1000.0);
            for (name, v) in &r.stats {
                let memory = name.ends_with("_memory") || name == "disk_caches";
                let v = if memory { size(*v) } else { v.to_string() };
                out += &format!("  {name}: {v}\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use aivmm_devices::virtio::balloon::Balloon;

    #[test]
    fn requests_and_replies_over_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("control.sock");
        let (_dev, handle) = Balloon::new(1 << 30).unwrap();
        serve(&path, Some(handle.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let r = request(&path, &Request::Balloon { size: 256 << 20 }).unwrap();
        let b = r.balloon.unwrap();
        assert_eq!((b.target, b.memory, b.driver), (256 << 20, 1 << 30, false));
        assert_eq!(handle.status().target, 256 << 20);
        // Too large: refused with the device's reason, nothing changes.
        let e = request(&path, &Request::Balloon { size: 2 << 30 }).unwrap_err();
        assert!(e.to_string().contains("larger than the guest's"), "{e}");
        assert_eq!(handle.status().target, 256 << 20);
        let text = describe(&request(&path, &Request::Status).unwrap().balloon.unwrap());
        assert!(text.contains("asked: 256.0 MiB") && text.contains("no balloon driver"), "{text}");
        // Garbage gets an answer, and the server goes on.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"{\"op\":\"format_disk\"}\n").unwrap();
        let mut got = String::new();
        BufReader::new(&c).read_line(&mut got).unwrap();
        assert!(got.contains("does not understand"), "{got}");
        assert!(request(&path, &Request::Status).is_ok());
        // A second server on the same path is refused while the first answers.
        assert!(matches!(serve(&path, None), Err(Error::InUse(_))));
    }

    #[test]
    fn a_vm_without_a_balloon_says_so_and_paths_are_checked() {
        let r = handle(&Request::Status, None);
        assert!(r.error.unwrap().contains("--no-balloon"));
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(serve(&file, None), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A stale socket (nobody listening) is replaced.
        let stale = d.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        serve(&stale, None).unwrap();
        assert!(request(&stale, &Request::Status).is_err());
    }
}
