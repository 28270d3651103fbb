//! Logging with `tracing`: one line per event on stderr, filtered by
//! `-q`/`-v`/`AIVMM_LOG`, and every event of aivmm's own crates at info level or
//! above (debug with `-vv` or a debug `AIVMM_LOG`) in a per-VM log file once a
//! workdir run has opened its state (`<state dir>/aivmm.log`).
//!
//! ```text
//! tracing::info!(…) ─────────────┐
//! log::info!(…) ── LogTracer ────┴─► Registry ─┬─ stderr layer (EnvFilter: AIVMM_LOG or -q/-v)
//!  (aivmm-devices, dependencies)               └─ file layer (aivmm* targets; writes once to_file ran)
//! ```
//!
//! The stderr filter uses `tracing-subscriber`'s `EnvFilter` syntax, which reads
//! env_logger's too (`AIVMM_LOG=debug`, `AIVMM_LOG=aivmm::vmm=debug`); without
//! `AIVMM_LOG` it is `error` with `-q`, `warn` by default, `info` with `-v` and
//! `debug` with `-vv`. File lines start with the Unix time in seconds and
//! microseconds, then the level, the target and the message.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::{format::Writer, time::FormatTime, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Errors of log set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log file could not be created.
    #[error("log file {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

static QUIET: AtomicBool = AtomicBool::new(false);
static FILE: OnceLock<Mutex<File>> = OnceLock::new();

/// Whether `-q` was given: print nothing but errors (no progress, no notes).
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// The target prefix of aivmm's own crates (`aivmm::…`, `aivmm_devices::…`).
const OURS: &str = "aivmm";

/// The stderr filter for `verbose` (`-v` count) and `quiet`.
pub fn default_filter(verbose: u8, quiet: bool) -> &'static str {
    match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn,virtio_queue=off",
        (false, 1) => "info,virtio_queue=off",
        (false, _) => "debug,virtio_queue=off",
    }
}

/// The most detailed level the per-VM file keeps.
fn file_level(verbose: u8, stderr: &EnvFilter) -> LevelFilter {
    match stderr.max_level_hint() {
        _ if verbose >= 2 => LevelFilter::DEBUG,
        Some(l) if l >= LevelFilter::DEBUG => LevelFilter::DEBUG,
        _ => LevelFilter::INFO,
    }
}

/// Seconds.micros since the epoch, the per-VM file's time stamps.
struct EpochMicros;

impl FormatTime for EpochMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        write!(w, "{}.{:06}", t.as_secs(), t.subsec_micros())
    }
}

/// Writes to the per-VM file once [`to_file`] has opened it; until then, nowhere.
/// The layer's filter keeps the events of aivmm's crates ([`OURS`]) only.
struct VmFile;

/// One event's bytes for the per-VM file, written whole when dropped.
struct VmFileLine(Vec<u8>);

impl Write for VmFileLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for VmFileLine {
    fn drop(&mut self) {
        if let Some(Ok(mut f)) = FILE.get().map(Mutex::lock) {
            let _ = f.write_all(&self.0);
        }
    }
}

impl<'a> MakeWriter<'a> for VmFile {
    type Writer = VmFileLine;

    fn make_writer(&'a self) -> Self::Writer {
        VmFileLine(Vec::new())
    }
}

/// Installs the subscriber (and the `log` bridge); call once, first thing.
pub fn init(verbose: u8, quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    let filter = || {
        // An empty AIVMM_LOG (`AIVMM_LOG= aivmm …`) means the default, not "errors only".
        let set = std::env::var("AIVMM_LOG").is_ok_and(|v| !v.trim().is_empty());
        set.then(|| EnvFilter::builder().with_env_var("AIVMM_LOG").try_from_env().ok())
            .flatten()
            .unwrap_or_else(|| EnvFilter::new(default_filter(verbose, quiet)))
    };
    let stderr_filter = filter();
    let file_level = file_level(verbose, &stderr_filter);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(stderr_filter);
    let file = tracing_subscriber::fmt::layer()
        .with_writer(VmFile)
        .with_ansi(false)
        .with_timer(EpochMicros)
        // A prefix: `aivmm` covers `aivmm::…`, `aivmm_devices::…` and the rest.
        .with_filter(Targets::new().with_target(OURS, file_level));
    // `try_init` also routes the `log` records of the devices crate and of
    // dependencies into tracing.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
}

/// Sends aivmm's log events to `path` as well (truncated first), for the rest of
/// the process. Only the first call takes effect.
pub fn to_file(path: &Path) -> Result<(), Error> {
    // aivmm.log sits in the state dir: 0600, and a planted symlink is refused.
    let f = crate::state_fs::create(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = FILE.set(Mutex::new(f));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn filters_follow_the_flags() {
        assert_eq!(default_filter(0, true), "error");
        assert!(default_filter(0, false).starts_with("warn"));
        assert!(default_filter(1, false).starts_with("info"));
        assert!(default_filter(5, false).starts_with("debug"));
        for f in [0, 1, 2].map(|v| default_filter(v, false)) {
            assert!(f.parse::<EnvFilter>().is_ok(), "{f}");
        }
        let warn = EnvFilter::new(default_filter(0, false));
        assert_eq!(file_level(0, &warn), LevelFilter::INFO);
        assert_eq!(file_level(2, &warn), LevelFilter::DEBUG);
        let debug = EnvFilter::new("aivmm::vmm=debug");
        assert_eq!(file_level(0, &debug), LevelFilter::DEBUG);
    }

    /// tracing events and `log` records from aivmm's crates reach the file, with a
    /// time stamp first; other crates' do not.
    #[test]
    fn events_and_log_records_reach_the_vm_file() {
        init(0, false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aivmm.log");
        tracing::info!("before the file");
        to_file(&path).unwrap();
        tracing::info!(answer = 42, "a tracing event");
        log::info!("a log record");
        log::info!(target: "aivmm_devices::legacy::ged", "from the devices crate");
        log::info!(target: "virtio_queue", "a dependency");
        tracing::debug!("below the file's level");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(!text.contains("before the file"), "{text}");
        assert!(!text.contains("a dependency") && !text.contains("below the file"), "{text}");
        for want in ["a tracing event answer=42", "a log record", "from the devices crate"] {
            let l = lines.iter().find(|l| l.contains(want)).unwrap_or_else(|| panic!("{want}: {text}"));
            let stamp: f64 = l.split_whitespace().next().unwrap().parse().unwrap();
            assert!(stamp > 1.6e9, "{l}");
            assert!(l.contains("INFO"), "{l}");
        }
    }
}
