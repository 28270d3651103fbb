//! `vmmrun`: the stopwatch and watchdog that the L1 init wraps around every VMM run.
//!
//! Built on the host with plain `rustc` (std only) and copied into L1's initramfs.
//! It takes the time just before it spawns the VMM, reads the VMM's stdout (the
//! guest console) and stderr on two threads, and stamps each line with the
//! milliseconds since that spawn. A third thread prints them as they come, so a
//! hung VMM still shows its output, and a slow console write never delays a
//! reader's timestamp. The host parses:
//!
//! ```text
//! @@O <tag> <ms> <line>        a line the VMM wrote to stdout (the guest console)
//! @@E <tag> <ms> <line>        a line the VMM wrote to stderr
//! @@X <tag> exit=<n|sig<n>> timeout=<0|1> wall_ms=<ms>
//! ```
//!
//! Usage: `vmmrun <tag> <timeout-secs> -- <program> [args...]`.
//! After the timeout the VMM gets SIGKILL and the report says `timeout=1`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

type Line = (u128, char, String);

fn reader(stream: impl Read + Send + 'static, kind: char, start: Instant, tx: Sender<Line>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let ms = start.elapsed().as_millis();
                    let text = String::from_utf8_lossy(&buf);
                    let text = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send((ms, kind, text)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn status_text(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("sig{s}"),
        _ => "unknown".to_string(),
    }
}

/// Prints `@@E <tag> <ms> vmmrun: thread ...` lines for each thread of `pid`.
fn threads_of(pid: u32, tag: &str) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let d = t.path();
        let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
        let stat = read("stat");
        // After the ")" that closes comm: state, then (fields 14, 15) utime and stime.
        let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let field = |i: usize| rest.get(i).copied().unwrap_or("?");
        let stack: Vec<String> = read("stack").lines().take(6).map(|l| l.split_whitespace().last().unwrap_or("").to_string()).collect();
        println!(
            "@@E {tag} 0 vmmrun: thread {} {} state={} utime={} stime={} wchan={} stack={}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            field(0),
            field(11),
            field(12),
            read("wchan").trim(),
            stack.join("<")
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || args[3] != "--" {
        eprintln!("usage: vmmrun <tag> <timeout-secs> -- <program> [args...]");
        std::process::exit(2);
    }
    let tag = args[1].clone();
    let timeout = Duration::from_secs_f64(args[2].parse::<f64>().unwrap_or(60.0));

    let start = Instant::now();
    let spawned = Command::new(&args[4])
        .args(&args[5..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            println!("@@E {tag} 0 vmmrun: cannot spawn {}: {e}", args[4]);
            println!("@@X {tag} exit=spawn-failed timeout=0 wall_ms=0");
            return;
        }
    };

    let (tx, rx) = channel::<Line>();
    let mut readers = Vec::new();
    if let Some(s) = child.stdout.take() {
        readers.push(reader(s, 'O', start, tx.clone()));
    }
    if let Some(s) = child.stderr.take() {
        readers.push(reader(s, 'E', start, tx.clone()));
    }
    drop(tx);
    let done = Arc::new(AtomicBool::new(false));
    let printer = {
        let (tag, done) = (tag.clone(), done.clone());
        thread::spawn(move || {
            let stdout = std::io::stdout();
            loop {
                match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok((ms, kind, text)) => {
                        let mut o = stdout.lock();
                        let _ = writeln!(o, "@@{kind} {tag} {ms} {text}");
                        let _ = o.flush();
                    }
                    Err(RecvTimeoutError::Timeout) if !done.load(Ordering::Relaxed) => {}
                    Err(_) => break,
                }
            }
        })
    };

    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(_) => break None,
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            // Where the VMM was when its time ran out: every thread's name, state,
            // CPU time and kernel wait channel and stack (hung means hung: say where).
            threads_of(child.id(), &tag);
            let _ = child.kill();
            // A VMM stuck in the kernel (D state) ignores SIGKILL: don't hang with it.
            let kill_deadline = Instant::now() + Duration::from_secs(5);
            break loop {
                match child.try_wait() {
                    Ok(Some(st)) => break Some(st),
                    Ok(None) if Instant::now() < kill_deadline => thread::sleep(Duration::from_millis(20)),
                    _ => break None,
                }
            };
        }
        thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed().as_millis();
    // A grandchild could keep the pipes open; don't wait on the readers forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    for r in readers {
        while !r.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
    done.store(true, Ordering::Relaxed);
    let _ = printer.join();

    let exit = match (&status, timed_out) {
        (Some(st), _) => status_text(st),
        (None, true) => "unkillable".into(),
        (None, false) => "unknown".into(),
    };
    println!("@@X {tag} exit={exit} timeout={} wall_ms={wall}", timed_out as u8);
}
