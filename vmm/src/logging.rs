//! Logging: one line per record on stderr, filtered by `-q`/`-v`/`AIVMM_LOG`, and
//! every record of aivmm's own modules at info level or above (debug with `-vv` or
//! `AIVMM_LOG`) in a per-VM log file once a workdir run has opened its state
//! (`<state dir>/aivmm.log`).
//!
//! The stderr filter uses env_logger's syntax (`AIVMM_LOG=debug`,
//! `AIVMM_LOG=aivmm::vmm=debug`); without `AIVMM_LOG` it is `error` with `-q`,
//! `warn` by default, `info` with `-v` and `debug` with `-vv`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{LevelFilter, Log, Metadata, Record};

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

struct Tee {
    stderr: env_logger::Logger,
    file_level: LevelFilter,
}

/// Whether a record comes from aivmm itself (not a dependency).
fn ours(target: &str) -> bool {
    target.starts_with("aivmm")
}

impl Log for Tee {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        self.stderr.enabled(m) || (ours(m.target()) && m.level() <= self.file_level)
    }

    fn log(&self, r: &Record<'_>) {
        if self.stderr.matches(r) {
            self.stderr.log(r);
        }
        if !ours(r.target()) || r.level() > self.file_level {
            return;
        }
        if let Some(f) = FILE.get() {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            if let Ok(mut f) = f.lock() {
                let _ = writeln!(
                    f,
                    "{}.{:06} {:5} {}: {}",
                    t.as_secs(),
                    t.subsec_micros(),
                    r.level(),
                    r.target(),
                    r.args()
                );
            }
        }
    }

    fn flush(&self) {
        if let Some(Ok(mut f)) = FILE.get().map(Mutex::lock) {
            let _ = f.flush();
        }
    }
}

/// The stderr filter for `verbose` (`-v` count) and `quiet`.
pub fn default_filter(verbose: u8, quiet: bool) -> &'static str {
    match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn,virtio_queue=off",
        (false, 1) => "info,virtio_queue=off",
        (false, _) => "debug,virtio_queue=off",
    }
}

/// Installs the logger; call once, first thing.
pub fn init(verbose: u8, quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
    let stderr = env_logger::Builder::from_env(
        env_logger::Env::new().filter_or("AIVMM_LOG", default_filter(verbose, quiet)),
    )
    .format_timestamp_micros()
    .build();
    let file_level = if verbose >= 2 || stderr.filter() >= LevelFilter::Debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    log::set_max_level(stderr.filter().max(file_level));
    let _ = log::set_boxed_logger(Box::new(Tee { stderr, file_level }));
}

/// Sends aivmm's log records to `path` as well (truncated first), for the rest of
/// the process. Only the first call takes effect.
pub fn to_file(path: &Path) -> Result<(), Error> {
    let f = File::create(path).map_err(|source| Error::File {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = FILE.set(Mutex::new(f));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_follow_the_flags() {
        assert_eq!(default_filter(0, true), "error");
        assert!(default_filter(0, false).starts_with("warn"));
        assert!(default_filter(1, false).starts_with("info"));
        assert!(default_filter(5, false).starts_with("debug"));
        assert!(ours("aivmm::launch") && ours("aivmm_devices::virtio") && !ours("virtio_queue"));
    }
}
