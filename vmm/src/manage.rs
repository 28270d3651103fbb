//! Managing running VMs from another process: `aivmm ps`, `aivmm stop` and
//! `aivmm exec`.
//!
//! A running VM is a state directory whose lock is held ([`crate::workdir::running`]);
//! its `vm.json` says which workdir, which process, since when, its phase and its
//! ports. `stop` sends that process SIGTERM, which it turns into presses of the
//! guest's ACPI power button (a clean guest shutdown and power-off), and kills it
//! if the guest is still up after a timeout; `exec` opens a new session through the
//! VM's vsock socket ([`Session::exec`]).

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cli::ExecArgs;
use crate::launch;
use crate::session::{self, Io, Session};
use crate::workdir::{self, Meta, Phase};

/// Errors of VM management.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No running VM matches.
    #[error("no running VM for '{0}' (see `aivmm ps`)")]
    NotRunning(String),
    /// The VM is still booting: exec has nobody to talk to yet.
    #[error("the VM on {0} is still booting; try again in a few seconds")]
    Booting(PathBuf),
    /// A bad `--env`.
    #[error(transparent)]
    Launch(#[from] launch::Error),
    /// The session failed.
    #[error(transparent)]
    Session(#[from] session::Error),
    /// The state directory cannot be located.
    #[error(transparent)]
    Workdir(#[from] workdir::Error),
    /// The control socket failed.
    #[error(transparent)]
    Control(#[from] crate::control::Error),
    /// The process could not be signalled.
    #[error("cannot signal aivmm (pid {0}): {1}")]
    Signal(u32, std::io::Error),
}

/// `Result` of VM management.
pub type Result<T> = std::result::Result<T, Error>;

/// The running VM that `target` names: a workdir (any path to it) or an aivmm pid.
pub fn find(target: &str) -> Result<(PathBuf, Meta)> {
    let running = workdir::running(&workdir::state_root()?);
    let canon = std::fs::canonicalize(target).ok();
    running
        .into_iter()
        .find(|(_, m)| {
            target.parse::<u32>().ok() == Some(m.pid) || canon.as_deref() == Some(m.workdir.as_path())
        })
        .ok_or_else(|| Error::NotRunning(target.to_string()))
}

/// `H:MM:SS`.
fn uptime(secs: u64) -> String {
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The `aivmm ps` table.
pub fn ps_table(vms: &[(PathBuf, Meta)], now: u64) -> String {
    let mut out = format!(
        "{:<8} {:>9}  {:<10} {:>4} {:>6}  {:<18} WORKDIR\n",
        "PID", "UPTIME", "STATE", "CPUS", "MEM", "PORTS"
    );
    for (_, m) in vms {
        let ports = if m.forwards.is_empty() {
            "-".to_string()
        } else {
            m.forwards.join(",")
        };
        let mem = match m.memory {
            0 => "-".to_string(),
            b if b % (1 << 30) == 0 => format!("{}G", b >> 30),
            b => format!("{}M", b >> 20),
        };
        let cpus = match m.cpus {
            0 => "-".to_string(),
            n => n.to_string(),
        };
        out.push_str(&format!(
            "{:<8} {:>9}  {:<10} {:>4} {:>6}  {:<18} {}\n",
            m.pid,
            uptime(now.saturating_sub(m.started)),
            m.phase.as_str(),
            cpus,
            mem,
            ports,
            m.workdir.display()
        ));
    }
    out
}

/// `aivmm ps`.
pub fn ps() -> Result<i32> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let vms = workdir::running(&workdir::state_root()?);
    print!("{}", ps_table(&vms, now));
    for (_, m) in &vms {
        if let Some(cfg) = &m.ssh {
            println!("ssh into {}: ssh -F {} aivmm", m.workdir.display(), cfg.display());
        }
    }
    let _ = std::io::stdout().flush();
    Ok(0)
}

/// Whether `pid` is still a process that holds anything. A zombie (exited, its
/// parent has not reaped it yet) has released its VM, memory and lock: it counts
/// as gone, so a slow parent does not make `stop` kill what already ended.
fn alive(pid: libc::pid_t) -> bool {
    match proc_state(pid) {
        Some((state, _)) => !matches!(state, 'Z' | 'X'),
        // No /proc (macOS): signal 0 only checks that the process exists.
        // SAFETY: signal 0 sends nothing.
        None => unsafe { libc::kill(pid, 0) == 0 },
    }
}

/// The scheduler state of `pid` (`R`, `S`, `D`, `Z`...) and where it waits
/// (`wchan`), from /proc; `None` where there is no /proc or no such process.
fn proc_state(pid: libc::pid_t) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold anything: the state follows the last ')'.
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    Some((state, wchan))
}

/// How long `stop` waits, past its timeout, for an aivmm whose guest has already
/// powered off (`vm.json` says `ended`): the host kernel is freeing the guest's
/// memory, which is quick on a real machine and took 7 s for a 512 MiB guest in
/// the nested test harness (L1 under TCG, zeroing freed pages).
const EXIT_GRACE: Duration = Duration::from_secs(120);

/// `aivmm stop`: SIGTERM (aivmm presses the guest's ACPI power button; the guest
/// stops its command, unmounts and powers off), then SIGKILL after `timeout`
/// seconds if the guest is still up. Returns 0 when the guest powered off, 1 when
/// aivmm had to be killed.
pub fn stop(target: &str, timeout: u64) -> Result<i32> {
    let (dir, m) = find(target)?;
    let pid = libc::pid_t::try_from(m.pid).map_err(|_| Error::NotRunning(target.into()))?;
    // SAFETY: kill only sends a signal to the recorded aivmm process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(Error::Signal(m.pid, std::io::Error::last_os_error()));
    }
    let t = Instant::now();
    let deadline = t + Duration::from_secs(timeout);
    let mut told = false;
    while alive(pid) {
        let now = Instant::now();
        if now >= deadline {
            let ended = workdir::read_meta(&dir).is_some_and(|x| x.pid == m.pid && x.phase == Phase::Ended);
            if ended && now < deadline + EXIT_GRACE {
                if !told && !crate::logging::quiet() {
                    eprintln!(
                        "aivmm: the guest on {} has powered off; aivmm (pid {pid}) is still exiting",
                        m.workdir.display()
                    );
                    told = true;
                }
            } else {
                let how = proc_state(pid).map_or(String::new(), |(s, w)| match w.as_str() {
                    "" | "0" => format!("; it was in state {s}"),
                    w => format!("; it was in state {s} ({w})"),
                });
                if ended {
                    eprintln!(
                        "aivmm: the guest on {} powered off but aivmm did not exit within {} s; killing it (pid {pid}){how}",
                        m.workdir.display(),
                        (now - t).as_secs()
                    );
                } else {
                    eprintln!(
                        "aivmm: the VM on {} did not power off within {timeout} s of the power button; killing it (pid {pid}){how}",
                        m.workdir.display()
                    );
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return Ok(1);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !crate::logging::quiet() {
        eprintln!(
            "aivmm: the VM on {} powered off after the power button ({:.1} s)",
            m.workdir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

/// `aivmm balloon TARGET [SIZE]`: sets the balloon of the VM on a workdir (or
/// pid, or `--control` socket) and prints what it and the guest say.
pub fn balloon(args: &crate::cli::BalloonArgs) -> Result<i32> {
    use crate::control::{self, Request};
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::metadata(&args.target).is_ok_and(|m| m.file_type().is_socket());
    let path = if is_socket {
        PathBuf::from(&args.target)
    } else {
        find(&args.target)?.0.join("control.sock")
    };
    let req = match args.size {
        Some(size) => Request::Balloon { size },
        None => Request::Status,
    };
    let reply = control::request(&path, &req)?;
    if args.json {
        println!("{}", serde_json::to_string(&reply).unwrap_or_default());
    } else if let Some(b) = &reply.balloon {
        print!("{}", control::describe(b));
    }
    Ok(0)
}

/// `aivmm exec DIR -- CMD`: runs CMD in the VM on DIR, as this user in /work (or
/// as root), on a pty when this is a terminal; returns its status.
pub fn exec(args: &ExecArgs) -> Result<i32> {
    let (dir, m) = find(&args.target)?;
    if matches!(m.phase, Phase::Booting | Phase::FirstBoot) {
        return Err(Error::Booting(m.workdir));
    }
    let env = launch::command_env(&args.env)?;
    // SAFETY: getuid and getgid cannot fail.
    let ids = unsafe { (libc::getuid(), libc::getgid()) };
    let ids = if args.root { (0, 0) } else { ids };
    let spec = launch::command_spec(&args.command, "bash", env, ids);
    let tty = spec.tty;
    let mut sess = Session::exec(&dir.join("vsock.sock"))?;
    sess.set_connect_timeout(Duration::from_secs(10));
    let stdin = std::io::stdin();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let io = Io {
        input: Some(stdin.as_fd()),
        terminal: tty.then(|| stdin.as_fd()),
        output: &mut out,
        errors: &mut err,
    };
    Ok(sess.run(&spec, io)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_zombie_is_not_alive() {
        assert!(alive(std::process::id() as libc::pid_t));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as libc::pid_t;
        // Not reaped: it stays a zombie until we wait for it.
        let t = Instant::now();
        while proc_state(pid).is_some_and(|(s, _)| s != 'Z') {
            assert!(t.elapsed() < Duration::from_secs(10), "`true` did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: signal 0 sends nothing.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "a zombie still answers signal 0");
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(!alive(pid));
    }

    #[test]
    fn the_table_shows_each_vm() {
        let m = Meta {
            workdir: "/home/me/proj".into(),
            pid: 4242,
            started: 1000,
            forwards: vec!["40022:22".into()],
            phase: Phase::FirstBoot,
            cpus: 4,
            memory: 4 << 30,
            ssh: None,
        };
        let small = Meta {
            workdir: "/w2".into(),
            memory: 512 << 20,
            forwards: vec![],
            phase: Phase::Running,
            ..m.clone()
        };
        let t = ps_table(&[("/s".into(), m), ("/s2".into(), small)], 1000 + 3725);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("PID") && lines[0].ends_with("WORKDIR"));
        for want in ["4242", "1:02:05", "first-boot", " 4 ", "4G", "40022:22", "/home/me/proj"] {
            assert!(lines[1].contains(want), "{want} missing in {:?}", lines[1]);
        }
        assert!(lines[2].contains("512M") && lines[2].contains("running") && lines[2].contains(" - "));
    }

    #[test]
    fn unknown_targets_are_a_clear_error() {
        let e = find("/no/such/workdir/at/all").unwrap_err().to_string();
        assert!(e.contains("no running VM") && e.contains("aivmm ps"), "{e}");
    }
}
