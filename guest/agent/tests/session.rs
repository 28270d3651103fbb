#![cfg(target_os = "linux")]
//! The agent and the host-side session together, on the host, without a VM: the
//! agent binary connects to the session over a unix socket instead of vsock.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aivmm::session::{self, Control, Io, Session, Spec};
use aivmm_protocol::{self as proto, ToGuest, ToHost};

/// A `Write` whose bytes the test can watch.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the output holds `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.text().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The agent, started as `nohup` would start it: with SIGHUP ignored, which its
/// commands must not inherit (the shutdown tests count on SIGHUP ending them).
fn spawn_agent(path: &std::path::Path) -> Child {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(env!("CARGO_BIN_EXE_aivmm-agent"));
    c.args([
        "--connect",
        &format!("unix:{}", path.display()),
        "--connect-timeout",
        "10",
    ]);
    // SAFETY: between fork and exec, only signal(2), which is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    c.spawn().unwrap()
}

/// A session running in a thread, with its agent.
struct Live {
    _dir: tempfile::TempDir,
    control: Control,
    out: Shared,
    err: Shared,
    /// The test's end of the command's input.
    input: Option<UnixStream>,
    session: JoinHandle<session::Result<i32>>,
    agent: Child,
}

impl Live {
    fn start(spec: Spec) -> Self {
        Self::start_with(spec, None)
    }

    /// `terminal`: a host pty slave to act as the session's terminal.
    fn start_with(spec: Spec, terminal: Option<OwnedFd>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let session = Session::listen(&dir.path().join("vsock")).unwrap();
        let agent = spawn_agent(session.path());
        let control = session.control();
        let (out, err) = (Shared::default(), Shared::default());
        let (mut o, mut e) = (out.clone(), err.clone());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let session = std::thread::spawn(move || {
            let io = Io {
                input: Some(theirs.as_fd()),
                terminal: terminal.as_ref().map(|t| t.as_fd()),
                output: &mut o,
                errors: &mut e,
            };
            session.run(&spec, io)
        });
        Self {
            _dir: dir,
            control,
            out,
            err,
            input: Some(ours),
            session,
            agent,
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.input.as_mut().unwrap().write_all(b).unwrap();
    }

    fn close_input(&mut self) {
        self.input = None;
    }

    /// The session's result and the agent's own exit status.
    fn finish(mut self) -> (i32, i32, Shared, Shared) {
        let code = self.session.join().unwrap().unwrap();
        let agent = self.agent.wait().unwrap().code().unwrap();
        (code, agent, self.out, self.err)
    }
}

fn cmd(argv: &[&str]) -> Spec {
    Spec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Spec::default()
    }
}

fn tty(argv: &[&str], rows: u16, cols: u16) -> Spec {
    Spec {
        tty: true,
        rows,
        cols,
        term: Some("xterm".into()),
        ..cmd(argv)
    }
}

/// Runs a command to the end with `input`; returns (status, agent status, stdout, stderr).
fn run(spec: Spec, input: &[u8]) -> (i32, i32, String, String) {
    let mut live = Live::start(spec);
    live.send(input);
    live.close_input();
    let (code, agent, out, err) = live.finish();
    (code, agent, out.text(), err.text())
}

#[test]
fn echo_hi() {
    let (code, agent, out, err) = run(cmd(&["echo", "hi"]), b"");
    assert_eq!(
        (code, agent, out.as_str(), err.as_str()),
        (0, 0, "hi\n", "")
    );
}

#[test]
fn exit_status_is_passed_through() {
    let (code, agent, _, _) = run(cmd(&["sh", "-c", "exit 3"]), b"");
    assert_eq!((code, agent), (3, 3));
    let (code, _, _, _) = run(tty(&["sh", "-c", "exit 42"], 24, 80), b"");
    assert_eq!(code, 42);
}

#[test]
fn stderr_is_separate_in_pipe_mode() {
    let (code, _, out, err) = run(cmd(&["sh", "-c", "echo out; echo err >&2"]), b"");
    assert_eq!((code, out.as_str(), err.as_str()), (0, "out\n", "err\n"));
}

#[test]
fn a_missing_program_is_127() {
    let (code, agent, out, err) = run(cmd(&["/no/such/program"]), b"");
    assert_eq!((code, agent, out.as_str()), (127, 127, ""));
    assert!(err.contains("cannot run /no/such/program"), "{err}");
    let spec = Spec {
        cwd: Some("/no/such/dir".into()),
        ..cmd(&["true"])
    };
    let (code, _, _, err) = run(spec, b"");
    assert_eq!(code, 127);
    assert!(err.contains("/no/such/dir"), "{err}");
}

#[test]
fn input_reaches_cat() {
    let (code, _, out, _) = run(cmd(&["cat"]), b"hello\nworld");
    assert_eq!((code, out.as_str()), (0, "hello\nworld"));
    // On a pty, end of input is the EOF character; echo shows the input twice.
    let (code, _, out, _) = run(tty(&["cat"], 24, 80), b"abc\n");
    assert_eq!(code, 0);
    assert_eq!(out.matches("abc").count(), 2, "{out:?}");
    // A partial last line still ends.
    let (code, _, out, _) = run(tty(&["cat"], 24, 80), b"xyz");
    assert_eq!(code, 0);
    assert!(out.contains("xyz"), "{out:?}");
}

#[test]
fn big_transfers_both_ways() {
    let (code, _, out, _) = run(cmd(&["head", "-c", "5000000", "/dev/zero"]), b"");
    assert_eq!((code, out.len()), (0, 5_000_000));
    // Input and output at once, larger than every buffer on the way.
    let mut live = Live::start(cmd(&["cat"]));
    let mut input = live.input.take().unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || input.write_all(&d2).unwrap());
    writer.join().unwrap();
    let (code, _, out, _) = live.finish();
    assert_eq!(code, 0);
    assert!(*out.0.lock().unwrap() == data);
}

#[test]
fn the_tty_has_the_given_size_and_follows_resizes() {
    let mut live = Live::start(tty(&["sh", "-c", "stty size; read x; stty size"], 33, 101));
    live.out.wait_for("33 101", 1);
    live.control.resize(40, 120);
    // Resize and input travel in order on one connection.
    live.send(b"\n");
    live.out.wait_for("40 120", 1);
    let (code, _, _, _) = live.finish();
    assert_eq!(code, 0);
}

fn host_pty(rows: u16, cols: u16) -> (File, OwnedFd) {
    let (mut m, mut s) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out pointers; null name and termios are allowed; `ws` outlives the call.
    let r = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(r, 0);
    // SAFETY: openpty made two new descriptors that nothing else owns.
    unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

#[test]
fn host_terminal_size_and_sigwinch() {
    let (master, slave) = host_pty(20, 70);
    // rows and cols 0: taken from the host terminal.
    let mut live = Live::start_with(
        tty(&["sh", "-c", "stty size; read x; stty size"], 0, 0),
        Some(slave),
    );
    live.out.wait_for("20 70", 1);
    let ws = libc::winsize {
        ws_row: 25,
        ws_col: 90,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&master),
            libc::TIOCSWINSZ,
            &ws,
        )
    };
    assert_eq!(
        r,
        0
    );
    // The host pty is not this process's controlling terminal: deliver the signal
    // by hand, as the kernel would.
    // SAFETY: kill has no memory arguments.
    unsafe { libc::kill(libc::getpid(), libc::SIGWINCH) };
    std::thread::sleep(Duration::from_millis(200));
    live.send(b"\n");
    live.out.wait_for("25 90", 1);
    let (code, _, _, _) = live.finish();
    assert_eq!(code, 0);
    drop(master);
}

#[test]
fn ctrl_c_interrupts_sleep() {
    let mut live = Live::start(tty(&["sh", "-c", "echo ready; exec sleep 100"], 24, 80));
    live.out.wait_for("ready", 1);
    let t = Instant::now();
    live.send(&[3]);
    let (code, agent, _, _) = live.finish();
    assert_eq!((code, agent), (130, 130));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn signals_reach_the_command() {
    let live = Live::start(cmd(&["sh", "-c", "echo ready; exec sleep 100"]));
    live.out.wait_for("ready", 1);
    live.control.signal(libc::SIGTERM);
    let (code, _, _, _) = live.finish();
    assert_eq!(code, 143);
    // On a tty the signal goes to the foreground job of a shell.
    let live = Live::start(tty(
        &[
            "sh",
            "-c",
            "trap 'echo got-int' INT; echo ready; while :; do sleep 0.05; done",
        ],
        24,
        80,
    ));
    live.out.wait_for("ready", 1);
    live.control.signal(libc::SIGINT);
    live.out.wait_for("got-int", 1);
    live.control.signal(libc::SIGKILL);
    let (code, _, _, _) = live.finish();
    assert_eq!(code, 137);
}

#[test]
fn environment_and_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        env: vec![
            ("FOO".into(), "bar baz".into()),
            ("TERM".into(), "overridden".into()),
        ],
        cwd: Some(dir.path().to_str().unwrap().into()),
        home: Some("/home/agent".into()),
        term: Some("dumb".into()),
        ..cmd(&["sh", "-c", "echo \"$FOO|$HOME|$TERM|$(pwd)|$PATH\""])
    };
    let (code, _, out, _) = run(spec, b"");
    let want = format!(
        "bar baz|/home/agent|overridden|{}|/usr/local/sbin:",
        dir.path().display()
    );
    assert_eq!(code, 0);
    assert!(out.starts_with(&want), "{out:?} vs {want:?}");
    // In tty mode TERM comes from the spec.
    let (_, _, out, _) = run(tty(&["sh", "-c", "echo $TERM; tty"], 24, 80), b"");
    assert!(out.starts_with("xterm\r\n/dev/pts/"), "{out:?}");
}

#[test]
fn user_and_group() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: skipped");
        return;
    }
    let spec = Spec {
        uid: Some(65534),
        gid: Some(65533),
        ..cmd(&["sh", "-c", "id -u; id -g; id -G"])
    };
    let (code, _, out, _) = run(spec, b"");
    assert_eq!((code, out.as_str()), (0, "65534\n65533\n65533\n"));
    // An agent shielded from the OOM killer (it inherits this process's score here)
    // gives its command the default score, whatever user it runs as. (Where even
    // root may not lower its score, a raised one stands in for it.)
    if std::fs::write("/proc/self/oom_score_adj", "-1000").is_err() {
        std::fs::write("/proc/self/oom_score_adj", "500").unwrap();
    }
    for uid in [None, Some(65534)] {
        let spec = Spec {
            uid,
            gid: uid,
            ..cmd(&["cat", "/proc/self/oom_score_adj"])
        };
        let (code, _, out, _) = run(spec, b"");
        assert_eq!((code, out.as_str()), (0, "0\n"), "uid {uid:?}");
    }
    std::fs::write("/proc/self/oom_score_adj", "0").unwrap();
}

/// A host that breaks the protocol: the agent reports an error and exits, it does
/// not panic or allocate what the peer asks for.
#[test]
fn the_agent_survives_a_hostile_host() {
    for evil in [
        u32::MAX.to_le_bytes().to_vec(),
        ((proto::MAX_FRAME + 1) as u32).to_le_bytes().to_vec(),
        vec![1, 0, 0, 0, 0x42],
        vec![0, 0, 0, 0],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut agent = Command::new(env!("CARGO_BIN_EXE_aivmm-agent"))
            .args(["--connect", &format!("unix:{}", path.display())])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let ready: ToHost = proto::read_message(&mut s).unwrap().unwrap();
        assert_eq!(
            ready,
            ToHost::Ready {
                version: proto::VERSION
            }
        );
        s.write_all(&evil).unwrap();
        let status = agent.wait().unwrap();
        let mut err = String::new();
        agent
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(125), "{err}");
        assert!(err.contains("protocol error"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // The same after Start, in the relay loop: the command is hung up on.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut agent = spawn_agent(&path);
    let (mut s, _) = listener.accept().unwrap();
    let _: Option<ToHost> = proto::read_message(&mut s).unwrap();
    proto::write_message(&mut s, &ToGuest::Start(cmd(&["sleep", "100"]))).unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let t = Instant::now();
    assert_eq!(agent.wait().unwrap().code(), Some(125));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_agent_stops_when_the_host_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut agent = spawn_agent(&path);
    let (mut s, _) = listener.accept().unwrap();
    let _: Option<ToHost> = proto::read_message(&mut s).unwrap();
    proto::write_message(&mut s, &ToGuest::Start(tty(&["sleep", "100"], 24, 80))).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    let t = Instant::now();
    assert_eq!(agent.wait().unwrap().code(), Some(125));
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn output_written_just_before_exit_is_not_lost() {
    for _ in 0..20 {
        let (code, _, out, _) = run(tty(&["sh", "-c", "seq 1 2000; exit 7"], 24, 80), b"");
        assert_eq!(code, 7);
        assert!(
            out.ends_with("2000\r\n"),
            "{:?}",
            &out[out.len().saturating_sub(40)..]
        );
    }
}

#[test]
fn a_background_process_does_not_hold_the_session() {
    let t = Instant::now();
    let (code, _, out, _) = run(tty(&["sh", "-c", "sleep 6 & echo done"], 24, 80), b"");
    assert_eq!(code, 0);
    assert!(out.contains("done"));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn shutdown_stops_even_a_shell_that_ignores_sigterm() {
    // `trap '' TERM` is what an interactive shell does; SIGHUP still ends it, and
    // SIGKILL after the grace time ends anything.
    let live = Live::start(cmd(&["sh", "-c", "trap '' TERM; echo up; sleep 100"]));
    live.out.wait_for("up", 1);
    let t = Instant::now();
    live.control.shutdown(2000);
    let (code, agent, _, _) = live.finish();
    assert_eq!((code, agent), (128 + 1, 128 + 1), "SIGHUP ends it");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let live = Live::start(cmd(&["sh", "-c", "trap '' TERM HUP; echo up; while :; do sleep 0.1; done"]));
    live.out.wait_for("up", 1);
    let t = Instant::now();
    live.control.shutdown(300);
    let (code, _, _, _) = live.finish();
    assert_eq!(code, 128 + 9, "killed after the grace time");
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
}

#[test]
fn shutdown_before_the_agent_connects_stops_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let session = Session::listen(&dir.path().join("vsock")).unwrap();
    session.control().shutdown(1000);
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let r = session.run(
        &cmd(&["true"]),
        Io {
            input: None,
            terminal: None,
            output: &mut o,
            errors: &mut e,
        },
    );
    assert!(matches!(r, Err(session::Error::StoppedEarly)), "{r:?}");
}

/// Plays the VM's hybrid vsock socket for `aivmm exec`: takes the `CONNECT 1025`
/// line, answers `OK`, and joins the connection to the agent's exec socket.
fn fake_hybrid_vsock(front: std::path::PathBuf, agent_exec: std::path::PathBuf) -> JoinHandle<String> {
    let l = std::os::unix::net::UnixListener::bind(front).unwrap();
    std::thread::spawn(move || {
        let (mut host, _) = l.accept().unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while host.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let guest = loop {
            match UnixStream::connect(&agent_exec) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("agent exec socket: {e}"),
            }
        };
        host.write_all(b"OK 5000\n").unwrap();
        let (mut h2, g2) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
        let a = std::thread::spawn(move || std::io::copy(&mut h2, &mut g2.try_clone().unwrap()));
        let _ = std::io::copy(&mut guest.try_clone().unwrap(), &mut host);
        let _ = host.shutdown(std::net::Shutdown::Both);
        let _ = guest.shutdown(std::net::Shutdown::Both);
        let _ = a.join();
        String::from_utf8_lossy(&line).into_owned()
    })
}

#[test]
fn exec_runs_a_second_command_beside_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let session = Session::listen(&dir.path().join("vsock")).unwrap();
    let exec_sock = dir.path().join("exec");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_aivmm-agent"))
        .arg("--connect")
        .arg(format!("unix:{}", session.path().display()))
        .arg("--exec-listen")
        .arg(format!("unix:{}", exec_sock.display()))
        .spawn()
        .unwrap();
    let control = session.control();
    // The main command says when it runs: a shutdown before that is a different
    // outcome (StoppedEarly), which a slow machine would otherwise reach.
    let ready = dir.path().join("main-ready");
    let main_cmd = format!("touch {}; exec sleep 100", ready.display());
    let main = std::thread::spawn(move || {
        let (mut o, mut e) = (Vec::new(), Vec::new());
        session.run(
            &cmd(&["sh", "-c", &main_cmd]),
            Io {
                input: None,
                terminal: None,
                output: &mut o,
                errors: &mut e,
            },
        )
    });
    let front = dir.path().join("front.sock");
    let proxy = fake_hybrid_vsock(front.clone(), exec_sock);
    let exec = Session::exec(&front).unwrap();
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = exec
        .run(
            &cmd(&["sh", "-c", "echo from-exec; exit 5"]),
            Io {
                input: None,
                terminal: None,
                output: &mut o,
                errors: &mut e,
            },
        )
        .unwrap();
    assert_eq!((code, o.as_slice()), (5, &b"from-exec\n"[..]));
    assert_eq!(proxy.join().unwrap(), "CONNECT 1025");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the main command never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    control.shutdown(1000);
    assert_eq!(main.join().unwrap().unwrap(), 128 + 1);
    agent.wait().unwrap();
    // Nothing listening: a clear error, not a hang.
    let e = Session::exec(&dir.path().join("none")).unwrap();
    let r = e.run(
        &cmd(&["true"]),
        Io {
            input: None,
            terminal: None,
            output: &mut o,
            errors: &mut Vec::new(),
        },
    );
    assert!(matches!(r, Err(session::Error::Exec { .. })), "{r:?}");
}

#[test]
fn setup_problems_are_reported_and_the_command_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut session = Session::listen(&dir.path().join("vsock")).unwrap();
    let link = dir.path().join("home/.claude.json");
    session.set_setup(session::Setup {
        mounts: vec![session::Mount {
            tag: "no-such-share".into(),
            path: dir.path().join("m").display().to_string(),
            read_only: false,
        }],
        links: vec![(link.display().to_string(), "/run/aivmm/claude/.claude.json".into())],
        ssh_key: None,
        // SAFETY: getuid and getgid cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        home: dir.path().display().to_string(),
    });
    let mut agent = spawn_agent(session.path());
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let code = session
        .run(
            &cmd(&["echo", "ran"]),
            Io {
                input: None,
                terminal: None,
                output: &mut o,
                errors: &mut e,
            },
        )
        .unwrap();
    agent.wait().unwrap();
    let err = String::from_utf8_lossy(&e);
    assert_eq!((code, o.as_slice()), (0, &b"ran\n"[..]));
    assert!(err.contains("cannot mount share 'no-such-share'"), "{err}");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        std::path::Path::new("/run/aivmm/claude/.claude.json")
    );
}

/// Counts bytes.
#[derive(Default)]
struct Count(usize);

impl Write for Count {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len();
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `aivmm-agent --hostile MODE` against the real session: every bad mode ends
/// the session with an error the guest caused (and the hostile agent sees the
/// host close); the flood is relayed whole and ends with its status.
#[test]
fn hostile_agents_are_refused_and_a_flood_is_relayed() {
    for mode in [
        "oversized",
        "unknown",
        "truncated",
        "early-exit",
        "double-ready",
        "bad-exit",
        "bad-utf8",
        "flood",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let session = Session::listen(&dir.path().join("vsock")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_aivmm-agent"))
            .args([
                "--connect",
                &format!("unix:{}", session.path().display()),
                "--connect-timeout",
                "10",
                "--hostile",
                mode,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (mut out, mut err) = (Count::default(), Count::default());
        let r = session.run(
            &Spec {
                argv: vec!["true".into()],
                ..Spec::default()
            },
            Io {
                input: None,
                terminal: None,
                output: &mut out,
                errors: &mut err,
            },
        );
        let done = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&done.stderr);
        assert!(done.status.success(), "{mode}: {report}");
        if mode == "flood" {
            assert_eq!(r.unwrap(), 0, "{report}");
            assert!(out.0 >= 255 << 20, "{}", out.0);
        } else {
            let e = r.unwrap_err();
            assert!(e.is_guest_fault(), "{mode}: {e:?}");
            assert!(report.contains("host closed"), "{mode}: {e:?} {report}");
        }
        assert!(report.contains(&format!("hostile {mode}: ")), "{report}");
    }
}
