//! Per-workdir state for `aivmm run --workdir DIR`.
//!
//! Each workdir gets a directory under the user's state dir
//! (`$XDG_STATE_HOME/aivmm/vms/<name>-<hash>`), holding:
//! - `lock`: held (flock) while a VM runs on the workdir, so a second run is refused
//!   and a crashed run leaves nothing stale behind (the kernel drops the lock);
//! - `vm.json`: what `aivmm ps` shows (workdir, pid, start time, ports);
//! - `state.img`: the guest's persistent disk (home, installed tools), sparse;
//! - `vsock.sock` and `vsock.sock_<port>`: the host side of the guest channel;
//! - `console.log`: the guest's serial console;
//! - `aivmm.log`: aivmm's own log of the run ([`crate::logging`]);
//! - `ssh/`: with `--ssh`, the key pair and an `ssh -F` config.
//!
//! All of it is the user's alone ([`crate::state_fs`]): the directories are
//! 0700 (older, wider ones are tightened), files 0600, opened with `O_NOFOLLOW`.

use std::fs::{self, File, OpenOptions};

use crate::state_fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of workdir state handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workdir cannot be used.
    #[error("workdir {path}: {source} (give an existing project directory)")]
    Workdir {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The workdir is not a directory.
    #[error("workdir {0}: not a directory (give the project directory, not a file in it)")]
    NotADirectory(PathBuf),
    /// A file or directory could not be made or read.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No state directory can be located.
    #[error(transparent)]
    NoStateDir(#[from] crate::state_fs::Error),
    /// Another aivmm runs on the workdir.
    #[error("aivmm is already running on {workdir}{pid}; stop it with `aivmm stop {workdir}` or use another workdir")]
    Busy {
        /// The workdir.
        workdir: String,
        /// " (pid N)" when known.
        pid: String,
    },
}

/// `Result` of workdir state handling.
pub type Result<T> = std::result::Result<T, Error>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where aivmm keeps per-workdir state: `$XDG_STATE_HOME/aivmm/vms`, or
/// `~/.local/state/aivmm/vms`; an error without either variable.
pub fn state_root() -> Result<PathBuf> {
    Ok(crate::state_fs::base()?.join("aivmm").join("vms"))
}

/// A short, stable name for a workdir: its last component and a hash of its path.
pub fn state_name(workdir: &Path) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in workdir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let base: String = workdir
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .take(32)
                .collect()
        })
        .unwrap_or_default();
    let base = if base.is_empty() {
        "root".to_string()
    } else {
        base
    };
    format!("{base}-{:08x}", h as u32)
}

/// The state of one workdir, locked for the life of this value.
#[derive(Debug)]
pub struct WorkdirState {
    /// The workdir, canonical.
    pub workdir: PathBuf,
    /// Its state directory.
    pub dir: PathBuf,
    _lock: File,
}

impl WorkdirState {
    /// Opens (creating if needed) and locks the state of `workdir` under `root`.
    pub fn open(root: &Path, workdir: &Path) -> Result<Self> {
        let workdir = fs::canonicalize(workdir).map_err(|source| Error::Workdir {
            path: workdir.to_path_buf(),
            source,
        })?;
        if !workdir.is_dir() {
            return Err(Error::NotADirectory(workdir));
        }
        let dir = root.join(state_name(&workdir));
        state_fs::dir(root).map_err(io_err(root))?;
        state_fs::dir(&dir).map_err(io_err(&dir))?;
        let lock_path = dir.join("lock");
        let lock = state_fs::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        state_fs::tighten(&lock).map_err(io_err(&lock_path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = read_meta(&dir)
                .map(|m| format!(" (pid {})", m.pid))
                .unwrap_or_default();
            return Err(Error::Busy {
                workdir: workdir.display().to_string(),
                pid,
            });
        }
        // The lock is ours: whatever a killed run left behind is stale.
        let stale = |p: PathBuf| {
            if fs::remove_file(&p).is_ok() {
                tracing::info!("removed {} left by an aivmm run that did not exit cleanly", p.display());
            }
        };
        for name in ["vsock.sock", "vm.json"] {
            stale(dir.join(name));
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("vsock.sock_") {
                    stale(e.path());
                }
            }
        }
        Ok(Self {
            workdir,
            dir,
            _lock: lock,
        })
    }

    /// The vsock socket path.
    pub fn vsock_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The control socket (`aivmm balloon`).
    pub fn control_path(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// aivmm's log file for this run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("aivmm.log")
    }

    /// Records what `aivmm ps` shows.
    pub fn write_meta(&self, meta: &Meta) -> Result<()> {
        write_meta_at(&self.dir, meta)
    }

    /// Whether the persistent disk exists (it does after the first run).
    pub fn has_state_disk(&self) -> bool {
        self.dir.join("state.img").exists()
    }

    /// The persistent state disk, created sparse with `size` bytes the first
    /// time, grown to `size` later (never shrunk; a smaller size that was
    /// `asked` for is refused): [`state_fs::sparse_disk`]. It starts all zeros:
    /// the guest formats a blank disk itself and grows its filesystem to a grown
    /// disk (see guest-image/README.md), so the host needs no mkfs.
    pub fn state_disk(&self, size: u64, asked: bool) -> Result<PathBuf> {
        let path = self.dir.join("state.img");
        state_fs::sparse_disk(&path, size, asked).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Copies the guest agent into `agent/` of the state directory, which aivmm
    /// shares read-only with the guest (tag `aivmm`); returns that directory.
    pub fn stage_agent(&self, agent: &Path) -> Result<PathBuf> {
        let dir = self.dir.join("agent");
        state_fs::dir(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(".aivmm-agent.new");
        fs::copy(agent, &tmp).map_err(io_err(agent))?;
        let dst = dir.join("aivmm-agent");
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        Ok(dir)
    }
}

/// Writes `meta` as the record in state directory `dir` (atomically).
///
/// It runs under aivmm's seccomp filter while the VM runs (phase changes), which
/// allows `renameat2` but not `rename`, hence the direct call.
pub fn write_meta_at(dir: &Path, meta: &Meta) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join("vm.json");
    let tmp = dir.join("vm.json.tmp");
    let mut f = state_fs::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(meta.to_json().as_bytes())
        .map_err(io_err(&tmp))?;
    drop(f);
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io_err(p)(std::io::Error::other("path contains NUL")))
    };
    let (from, to) = (c(&tmp)?, c(&path)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    #[cfg(target_os = "linux")]
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), 0)
    };
    // SAFETY: as above (macOS has no renameat2, and no seccomp filter).
    #[cfg(not(target_os = "linux"))]
    let r = unsafe { libc::renameat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr()) };
    if r != 0 {
        return Err(io_err(&path)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where a VM is in its life, as `aivmm ps` shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// The first boot on this workdir (the guest formats its state disk).
    FirstBoot,
    /// Booting: the guest agent has not connected yet.
    Booting,
    /// The command runs.
    #[default]
    Running,
    /// `aivmm stop` (or a closed terminal) asked the guest to power off.
    Stopping,
    /// The guest has powered off (or stopped); aivmm is releasing the VM, which
    /// takes as long as the host kernel needs to free the guest's memory.
    Ended,
}

impl Phase {
    /// The name in `vm.json` and `aivmm ps`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstBoot => "first-boot",
            Self::Booting => "booting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Ended => "ended",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "first-boot" => Self::FirstBoot,
            "booting" => Self::Booting,
            "stopping" => Self::Stopping,
            "ended" => Self::Ended,
            _ => Self::Running,
        }
    }
}

/// What a running VM records about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The workdir.
    pub workdir: PathBuf,
    /// The aivmm process.
    pub pid: u32,
    /// Start time, seconds since the Unix epoch.
    pub started: u64,
    /// Forwarded ports, as given (`HOST:GUEST[/udp]`).
    pub forwards: Vec<String>,
    /// Where the VM is in its life.
    pub phase: Phase,
    /// vCPUs (0 if not recorded).
    pub cpus: u32,
    /// Guest memory in bytes (0 if not recorded).
    pub memory: u64,
    /// With `--ssh`: the `ssh -F` config file.
    pub ssh: Option<PathBuf>,
}

impl Meta {
    /// A record for this process, now.
    pub fn now(workdir: &Path, forwards: Vec<String>) -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            workdir: workdir.to_path_buf(),
            pid: std::process::id(),
            started,
            forwards,
            phase: Phase::Running,
            cpus: 0,
            memory: 0,
            ssh: None,
        }
    }

    fn to_json(&self) -> String {
        // `"` becomes \u0022, so a key pattern (`"name":`) never occurs inside a value.
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\u0022");
        let fwd: Vec<String> = self
            .forwards
            .iter()
            .map(|f| format!("\"{}\"", esc(f)))
            .collect();
        let ssh = match &self.ssh {
            Some(p) => format!(",\"ssh\":\"{}\"", esc(&p.to_string_lossy())),
            None => String::new(),
        };
        format!(
            "{{\"workdir\":\"{}\",\"pid\":{},\"started\":{},\"forwards\":[{}],\"phase\":\"{}\",\"cpus\":{},\"memory\":{}{ssh}}}\n",
            esc(&self.workdir.to_string_lossy()),
            self.pid,
            self.started,
            fwd.join(","),
            self.phase.as_str(),
            self.cpus,
            self.memory,
        )
    }

    fn from_json(s: &str) -> Option<Self> {
        let field = |name: &str| -> Option<&str> {
            let key = format!("\"{name}\":");
            let start = s.find(&key)? + key.len();
            Some(&s[start..])
        };
        let string = |rest: &str| -> Option<String> {
            let rest = rest.strip_prefix('"')?;
            let mut out = String::new();
            let mut chars = rest.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next()? {
                        'u' => {
                            let hex: String = chars.by_ref().take(4).collect();
                            out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                        }
                        c => out.push(c),
                    },
                    '"' => return Some(out),
                    c => out.push(c),
                }
            }
            None
        };
        let number = |rest: &str| -> Option<u64> {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let fwd_text = field("forwards")?.strip_prefix('[')?;
        let fwd_text = &fwd_text[..fwd_text.find(']')?];
        let forwards = fwd_text
            .split(',')
            .filter(|f| !f.trim().is_empty())
            .filter_map(|f| string(f.trim()))
            .collect();
        Some(Self {
            workdir: PathBuf::from(string(field("workdir")?)?),
            pid: u32::try_from(number(field("pid")?)?).ok()?,
            started: number(field("started")?)?,
            forwards,
            phase: field("phase")
                .and_then(string)
                .map_or(Phase::Running, |p| Phase::parse(&p)),
            cpus: field("cpus")
                .and_then(number)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            memory: field("memory").and_then(number).unwrap_or(0),
            ssh: field("ssh").and_then(string).map(PathBuf::from),
        })
    }
}

/// Reads the record in a state directory.
pub fn read_meta(dir: &Path) -> Option<Meta> {
    Meta::from_json(&fs::read_to_string(dir.join("vm.json")).ok()?)
}

/// The running VMs: state directories whose lock is held, with their records.
pub fn running(root: &Path) -> Vec<(PathBuf, Meta)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(lock) = OpenOptions::new().write(true).open(dir.join("lock")) else {
            continue;
        };
        // SAFETY: flock on a descriptor we own; a held lock means a live VM.
        let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if free {
            continue;
        }
        if let Some(m) = read_meta(&dir) {
            out.push((dir, m));
        }
    }
    out.sort_by(|a, b| a.1.workdir.cmp(&b.1.workdir));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_are_stable_and_distinct() {
        let a = state_name(Path::new("/home/u/proj"));
        assert_eq!(a, state_name(Path::new("/home/u/proj")));
        assert!(a.starts_with("proj-"));
        assert_ne!(a, state_name(Path::new("/srv/proj")));
        assert!(state_name(Path::new("/")).starts_with("root-"));
        assert!(state_name(Path::new("/x/we ird\n")).starts_with("weird-"));
    }

    #[test]
    fn meta_round_trips() {
        let m = Meta {
            workdir: "/a \"b\"\\c \"phase\":\"stopping\"".into(),
            pid: 42,
            started: 1_700_000_000,
            forwards: vec!["2222:22".into(), "53:53/udp".into()],
            phase: Phase::FirstBoot,
            cpus: 4,
            memory: 4 << 30,
            ssh: Some("/s/ssh/config".into()),
        };
        assert_eq!(Meta::from_json(&m.to_json()), Some(m.clone()));
        // A record of an older aivmm (no phase, cpus, memory, ssh) still reads.
        let old = "{\"workdir\":\"/w\",\"pid\":7,\"started\":1,\"forwards\":[]}";
        let o = Meta::from_json(old).unwrap();
        assert_eq!((o.phase, o.cpus, o.memory, o.ssh), (Phase::Running, 0, 0, None));
        for p in [Phase::Booting, Phase::Running, Phase::Stopping, Phase::Ended] {
            let x = Meta { phase: p, ..m.clone() };
            assert_eq!(Meta::from_json(&x.to_json()).unwrap().phase, p);
        }
        let none = Meta {
            forwards: vec![],
            ssh: None,
            ..m
        };
        assert_eq!(Meta::from_json(&none.to_json()), Some(none));
        assert_eq!(Meta::from_json("{garbage"), None);
    }

    #[test]
    fn a_second_open_is_refused_until_the_first_ends() {
        let root = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let first = WorkdirState::open(root.path(), work.path()).unwrap();
        first
            .write_meta(&Meta::now(&first.workdir, vec!["8080:80".into()]))
            .unwrap();
        let err = WorkdirState::open(root.path(), work.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        let listed = running(root.path());
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].1.forwards, vec!["8080:80".to_string()]);
        drop(first);
        assert!(running(root.path()).is_empty());
        let again = WorkdirState::open(root.path(), work.path()).unwrap();
        assert!(read_meta(&again.dir).is_none(), "stale record not cleaned");
    }

    #[test]
    fn state_disk_is_sparse_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let st = WorkdirState::open(root.path(), work.path()).unwrap();
        let disk = st.state_disk(1 << 30, false).unwrap();
        let md = fs::metadata(&disk).unwrap();
        assert_eq!(md.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.blocks(), 0, "not sparse");
        let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all(b"guest data").unwrap();
        drop(f);
        assert_eq!(st.state_disk(1 << 30, false).unwrap(), disk);
        let mut head = [0u8; 10];
        std::io::Read::read_exact(&mut fs::File::open(&disk).unwrap(), &mut head).unwrap();
        assert_eq!(&head, b"guest data", "second call must reuse the disk");
        assert_eq!(fs::metadata(&disk).unwrap().len(), 1 << 30);
        let agent = work.path().join("agent-bin");
        fs::write(&agent, b"\x7fELF").unwrap();
        let dir = st.stage_agent(&agent).unwrap();
        assert_eq!(fs::read(dir.join("aivmm-agent")).unwrap(), b"\x7fELF");
    }

    /// The state directory and what is in it are the user's alone, and an older
    /// aivmm's world-readable state is narrowed.
    #[test]
    fn state_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let root = root.path().join("vms");
        let work = tempfile::tempdir().unwrap();
        let st = WorkdirState::open(&root, work.path()).unwrap();
        let disk = st.state_disk(1 << 20, false).unwrap();
        st.write_meta(&Meta::now(&st.workdir, vec![])).unwrap();
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&st.dir), 0o700);
        for f in ["state.img", "vm.json", "lock"] {
            assert_eq!(mode(&st.dir.join(f)), 0o600, "{f}");
        }
        let dir = st.dir.clone();
        drop(st);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o644)).unwrap();
        let st = WorkdirState::open(&root, work.path()).unwrap();
        st.state_disk(1 << 20, false).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&disk), 0o600);
    }
}
