//! The builder's state directory and what it says about itself:
//! - `lock`: flock-ed by `serve` for its whole life (a second one is refused; a
//!   crashed one leaves nothing stale, the kernel drops the lock);
//! - `status`: `key=value` lines that `serve` rewrites on every change and
//!   `aivmm builder status` reads;
//! - `builder.log`: `serve`'s log, with the VM process's stderr;
//! - `console.log`: the guest's serial console of the last boot;
//! - `disk.img`: the VM's persistent disk (sparse); `vsock.sock*`: the vsock sockets;
//! - `guest/`, `ssh/`: the keys ([`super::keys`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{io_err, Error, Result};
use crate::state_fs;

/// The state directory, locked for the life of this value.
#[derive(Debug)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates (0700, or tightens to it) and locks `dir`.
    pub fn lock(dir: &Path) -> Result<Self> {
        state_fs::dir(dir).map_err(io_err(dir))?;
        let dir = fs::canonicalize(dir).map_err(io_err(dir))?;
        let path = dir.join("lock");
        let lock = state_fs::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        state_fs::tighten(&lock).map_err(io_err(&path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = read_status(&dir)
                .and_then(|s| s.get("pid").map(|p| format!(" (pid {p})")))
                .unwrap_or_default();
            return Err(Error::Busy { dir, pid });
        }
        Ok(StateDir { dir, _lock: lock })
    }

    /// The host end of the VM's vsock device.
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The guest's serial console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The VM's persistent disk, created sparse with `size` bytes the first time,
    /// grown to `size` later; a smaller size that was `asked` for is refused
    /// ([`state_fs::sparse_disk`]). The guest formats a blank disk itself, and
    /// grows its filesystem to a grown disk as it boots.
    pub fn disk(&self, size: u64, asked: bool) -> Result<PathBuf> {
        let path = self.dir.join("disk.img");
        state_fs::sparse_disk(&path, size, asked).map_err(io_err(&path))?;
        Ok(path)
    }
}

/// Whether a `serve` holds the lock of `dir`.
pub fn serving(dir: &Path) -> bool {
    let Ok(f) = OpenOptions::new().write(true).open(dir.join("lock")) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; the lock is dropped with `f`.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status `serve` publishes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The `serve` process.
    pub pid: u32,
    /// The address it listens on.
    pub listen: String,
    /// off, booting, running or stopping.
    pub state: String,
    /// When the running VM booted (epoch seconds), if it runs.
    pub vm_since: Option<u64>,
    /// When the last connection ended, or began if none ended yet.
    pub last_use: Option<u64>,
    /// Open connections.
    pub sessions: usize,
    /// VM boots since `serve` started.
    pub boots: u64,
    /// How the VM last came up, in ms (connection to `ready`).
    pub last_boot_ms: Option<u64>,
    /// The idle TTL in seconds, or None with --always-on.
    pub idle_secs: Option<u64>,
    /// The last boot failure, if any.
    pub error: Option<String>,
}

impl Status {
    /// The `key=value` text.
    pub fn to_text(&self) -> String {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "pid={}\nlisten={}\nstate={}\nvm_since={}\nlast_use={}\nsessions={}\nboots={}\nlast_boot_ms={}\nidle={}\nerror={}\n",
            self.pid,
            self.listen,
            self.state,
            opt(self.vm_since),
            opt(self.last_use),
            self.sessions,
            self.boots,
            opt(self.last_boot_ms),
            self.idle_secs.map_or_else(|| "always-on".to_string(), |v| v.to_string()),
            self.error.as_deref().unwrap_or("-").replace('\n', " "),
        )
    }

    /// Writes `dir/status` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("status.tmp");
        state_fs::create(&tmp)
            .and_then(|mut f| f.write_all(self.to_text().as_bytes()))
            .map_err(io_err(&tmp))?;
        let path = dir.join("status");
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }
}

/// The `key=value` pairs of `dir/status`.
pub fn read_status(dir: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    let text = fs::read_to_string(dir.join("status")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn ago(secs: u64) -> String {
    let h = secs / 3600;
    let m = secs / 60 % 60;
    let s = secs % 60;
    if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The text of `aivmm builder status`.
pub fn status_text(dir: &Path, alive: bool, now: u64) -> String {
    let mut out = String::new();
    let st = read_status(dir).unwrap_or_default();
    let get = |k: &str| st.get(k).map(String::as_str).filter(|v| *v != "-");
    if !alive {
        out.push_str(&format!(
            "state: not serving (no `aivmm builder serve` on {})\n",
            dir.display()
        ));
    } else {
        let state = get("state").unwrap_or("unknown");
        let mut line = format!("state: {state}");
        if let Some(since) = get("vm_since").and_then(|v| v.parse::<u64>().ok()) {
            line.push_str(&format!(", VM up {}", ago(now.saturating_sub(since))));
        }
        let sessions = get("sessions").unwrap_or("0");
        line.push_str(&format!(", {sessions} open connection(s)"));
        out.push_str(&line);
        out.push('\n');
        out.push_str(&format!(
            "serve: pid {}, listening on {}, idle stop: {}\n",
            get("pid").unwrap_or("?"),
            get("listen").unwrap_or("?"),
            match get("idle") {
                Some("always-on") | None => "never (always-on)".to_string(),
                Some(s) => s
                    .parse::<u64>()
                    .map(|v| super::cli::format_duration(std::time::Duration::from_secs(v)))
                    .unwrap_or_else(|_| s.to_string()),
            }
        ));
    }
    match get("last_use").and_then(|v| v.parse::<u64>().ok()) {
        Some(t) => out.push_str(&format!(
            "last use: {} ({} ago)\n",
            utc(t),
            ago(now.saturating_sub(t))
        )),
        None => out.push_str("last use: never\n"),
    }
    if let Some(b) = get("boots") {
        out.push_str(&format!(
            "boots: {b}{}\n",
            get("last_boot_ms").map_or(String::new(), |ms| format!(", last took {ms} ms"))
        ));
    }
    if let Some(e) = get("error") {
        out.push_str(&format!("last error: {e}\n"));
    }
    out.push_str(&format!("log: {}\n", dir.join("builder.log").display()));
    out
}

/// `aivmm builder status`.
pub fn print_status(dir: &Path) -> Result<()> {
    print!("{}", status_text(dir, serving(dir), now_secs()));
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS UTC` for epoch seconds (civil-from-days, no time crate).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `serve`'s log file: timestamped lines, shared by its threads.
pub struct Log {
    file: Mutex<Box<dyn Write + Send>>,
}

impl Log {
    /// Appends to `path`, or writes to stderr for `-`.
    pub fn open(path: &Path) -> Result<Self> {
        let w: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                state_fs::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io_err(path))?,
            )
        };
        Ok(Log {
            file: Mutex::new(w),
        })
    }

    /// Logs one line.
    pub fn line(&self, msg: impl std::fmt::Display) {
        let stamp = utc(now_secs());
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{stamp} {msg}");
            let _ = f.flush();
        }
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Log")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_704_067_199), "2023-12-31 23:59:59 UTC");
        assert_eq!(utc(4_102_444_800), "2100-01-01 00:00:00 UTC");
    }

    #[test]
    fn lock_status_and_text() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let st = StateDir::lock(&dir).unwrap();
        assert!(serving(&st.dir));
        let s = Status {
            pid: 4242,
            listen: "127.0.0.1:31022".into(),
            state: "running".into(),
            vm_since: Some(1000),
            last_use: Some(1100),
            sessions: 1,
            boots: 2,
            last_boot_ms: Some(5123),
            idle_secs: Some(10800),
            error: None,
        };
        s.write(&st.dir).unwrap();
        let err = StateDir::lock(&dir).unwrap_err().to_string();
        assert!(err.contains("(pid 4242)"), "{err}");
        let text = status_text(&st.dir, true, 1000 + 3725);
        assert!(
            text.contains("state: running, VM up 1h02m, 1 open connection(s)"),
            "{text}"
        );
        assert!(
            text.contains("listening on 127.0.0.1:31022, idle stop: 3h"),
            "{text}"
        );
        assert!(
            text.contains("last use: 1970-01-01 00:18:20 UTC (1h00m ago)"),
            "{text}"
        );
        assert!(text.contains("boots: 2, last took 5123 ms"), "{text}");
        drop(st);
        assert!(!serving(&dir));
        let text = status_text(&dir, false, 2000);
        assert!(text.starts_with("state: not serving"), "{text}");
        let d = StateDir::lock(&dir).unwrap();
        let disk = d.disk(1 << 30, false).unwrap();
        assert_eq!(fs::metadata(&disk).unwrap().len(), 1 << 30);
    }
}
