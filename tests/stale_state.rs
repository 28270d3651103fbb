//! A workdir run killed with SIGKILL leaves its lock, record and sockets behind;
//! the next run on the workdir must find the lock free and clean the rest.
//!
//! The killed "run" is this test binary, re-run as a child process that opens the
//! workdir state as `aivmm run --workdir` does, binds the vsock socket and a
//! guest-connection socket, records itself, and waits to be killed.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use aivmm::workdir::{self, Meta, WorkdirState};

const CHILD_ENV: &str = "AIVMM_STALE_TEST_CHILD";

/// The child: lock the workdir, make what a run makes, say so, and wait.
#[test]
#[ignore = "run by killed_run_leaves_nothing_that_blocks_the_next in a child process"]
fn stale_child() {
    let Ok(dirs) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (root, work) = dirs.split_once('|').expect("root|work");
    let state = WorkdirState::open(&PathBuf::from(root), &PathBuf::from(work)).expect("open");
    state
        .write_meta(&Meta::now(&state.workdir, vec![]))
        .expect("meta");
    let _vsock = UnixListener::bind(state.vsock_path()).expect("bind vsock");
    let _port = UnixListener::bind(state.dir.join("vsock.sock_1024")).expect("bind port");
    println!("READY {}", state.dir.display());
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn killed_run_leaves_nothing_that_blocks_the_next() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "stale_child", "--nocapture"])
        .env(
            CHILD_ENV,
            format!("{}|{}", root.path().display(), work.path().display()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    while !line.starts_with("READY ") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the child ended early"
        );
    }
    let dir = PathBuf::from(line.trim_start_matches("READY ").trim());
    // While the child lives, the workdir is busy and `ps` lists it.
    let busy = WorkdirState::open(root.path(), work.path()).unwrap_err();
    assert!(busy.to_string().contains("already running"), "{busy}");
    assert_eq!(workdir::running(root.path()).len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    for stale in ["vsock.sock", "vsock.sock_1024", "vm.json", "lock"] {
        assert!(
            dir.join(stale).exists(),
            "{stale} should be left behind by SIGKILL"
        );
    }
    // The dead run's record is not listed as running.
    assert!(workdir::running(root.path()).is_empty());
    // The next run gets the lock and finds no stale socket or record.
    let next = WorkdirState::open(root.path(), work.path()).unwrap();
    assert_eq!(next.dir, dir);
    for stale in ["vsock.sock", "vsock.sock_1024", "vm.json"] {
        assert!(!dir.join(stale).exists(), "{stale} not cleaned");
    }
    assert!(workdir::read_meta(&next.dir).is_none());
    // So the vsock socket can be bound again.
    UnixListener::bind(next.vsock_path()).unwrap();
}
