//! Running the host tools the builder needs (apt-get, dpkg-deb, mke2fs, debugfs,
//! npm, tar). Tools in /usr/sbin are not on an ordinary user's PATH on Debian,
//! so those directories are searched too.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{Error, Result};

/// Finds `name` on PATH, then in the sbin directories.
pub fn find(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/local/sbin", "/usr/sbin", "/sbin"]
            .iter()
            .map(PathBuf::from),
    );
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::MissingTool(name.to_string()))
}

/// Runs a tool to completion and returns its output; a non-zero exit is an
/// error that carries the tail of stderr.
pub fn run<I, S>(name: &str, args: I, cwd: Option<&Path>, env: &[(&str, &str)]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let exe = find(name)?;
    let mut cmd = Command::new(&exe);
    cmd.args(args).stdin(Stdio::null());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    tracing::debug!("running {cmd:?}");
    let out = cmd.output().map_err(|e| Error::Tool {
        tool: name.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        return Err(Error::Tool {
            tool: name.into(),
            detail: format!("{}: {}", out.status, tail.join("\n")),
        });
    }
    Ok(out)
}
