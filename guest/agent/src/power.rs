//! The power button: `aivmm stop` presses the VM's ACPI power button (a Generic
//! Event Device notifying a `PNP0C0C` button), Linux's ACPI button driver reports
//! `KEY_POWER` on its input device, and this module acts on it.
//!
//! A thread finds the input device named "Power Button" (`/sys/class/input/event*`,
//! rescanned until it appears, and again if it goes away) and reads its events.
//! On a press:
//! - while the main command runs, one byte goes down a pipe the relay polls; the
//!   relay then stops the command as for the host's `Shutdown` (SIGHUP and
//!   SIGTERM, SIGKILL after a grace), reports its status and returns, and the
//!   agent exits; the guest's init then shuts down cleanly (unmounts, powers off).
//! - before it runs (the guest is still starting), the agent exits at once with
//!   128 + SIGTERM, which ends in the same shutdown.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// `EV_KEY` in `linux/input-event-codes.h`.
const EV_KEY: u16 = 0x01;
/// `KEY_POWER`.
const KEY_POWER: u16 = 116;
/// The name Linux's ACPI button driver gives the power button's input device.
const DEVICE_NAME: &str = "Power Button";
/// Size of `struct input_event` on 64-bit Linux: a timeval, type, code, value.
const EVENT_SIZE: usize = 24;
/// How often the thread looks again for a button that is not there (yet).
const RESCAN: Duration = Duration::from_millis(500);
/// What the command gets between SIGTERM and SIGKILL after a press.
pub const GRACE: Duration = Duration::from_secs(5);

/// The read end of the press pipe, for the relay to poll.
static PRESSES: OnceLock<OwnedFd> = OnceLock::new();
/// Set while the main command runs: a press then goes to the relay.
static COMMAND_RUNNING: AtomicBool = AtomicBool::new(false);

/// Whether an input event (the bytes of one `struct input_event`) is a press of
/// the power button.
pub fn is_power_press(event: &[u8]) -> bool {
    if event.len() != EVENT_SIZE {
        return false;
    }
    let u16_at = |at: usize| u16::from_ne_bytes([event[at], event[at + 1]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    u16_at(16) == EV_KEY && u16_at(18) == KEY_POWER && value == 1
}

/// The `/dev/input/eventN` whose device is named [`DEVICE_NAME`], from the
/// input class directory `class` (`/sys/class/input`).
pub fn find_button(class: &Path) -> Option<PathBuf> {
    let mut found: Vec<String> = std::fs::read_dir(class)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("event"))
        .filter(|n| {
            std::fs::read_to_string(class.join(n).join("device/name"))
                .is_ok_and(|name| name.trim_end() == DEVICE_NAME)
        })
        .collect();
    found.sort();
    found.first().map(|n| Path::new("/dev/input").join(n))
}

/// Starts the watcher thread (once). Returns the descriptor the relay polls for
/// presses, or `None` if the pipe could not be made.
pub fn watch() -> Option<RawFd> {
    if let Some(fd) = PRESSES.get() {
        return Some(fd.as_raw_fd());
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("aivmm-agent: power button: pipe: {}", io::Error::last_os_error());
        return None;
    }
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let raw = rd.as_raw_fd();
    let _ = PRESSES.set(rd);
    let _ = std::thread::Builder::new()
        .name("power-button".into())
        .spawn(move || watch_loop(Path::new("/sys/class/input"), wr));
    Some(raw)
}

/// The descriptor the relay polls for presses, once [`watch`] started the watcher.
pub fn presses() -> Option<RawFd> {
    PRESSES.get().map(AsRawFd::as_raw_fd)
}

/// Marks whether the main command runs (presses then go to the relay).
pub fn set_command_running(running: bool) {
    COMMAND_RUNNING.store(running, Ordering::SeqCst);
}

/// Drains the press pipe; true if there was a press.
pub fn take_presses(fd: RawFd) -> bool {
    let mut buf = [0u8; 64];
    // SAFETY: reads into a local buffer of the given length; the pipe is ours.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    n > 0
}

fn watch_loop(class: &Path, mut presses: File) {
    let mut told_missing = false;
    loop {
        let Some(dev) = find_button(class) else {
            if !told_missing && std::env::var_os("AIVMM_DEBUG").is_some() {
                eprintln!("aivmm-agent: no power button input device yet");
            }
            told_missing = true;
            std::thread::sleep(RESCAN);
            continue;
        };
        let mut f = match File::open(&dev) {
            Ok(f) => f,
            Err(_) => {
                std::thread::sleep(RESCAN);
                continue;
            }
        };
        let mut ev = [0u8; EVENT_SIZE];
        // The device goes away (driver unbound) with an error: look for it again.
        while f.read_exact(&mut ev).is_ok() {
            if is_power_press(&ev) {
                pressed(&mut presses);
            }
        }
        std::thread::sleep(RESCAN);
    }
}

fn pressed(presses: &mut File) {
    if COMMAND_RUNNING.load(Ordering::SeqCst) {
        eprintln!("aivmm-agent: power button pressed: stopping the command");
        let _ = presses.write_all(&[1]);
    } else {
        eprintln!("aivmm-agent: power button pressed before the command started: shutting down");
        // SAFETY: sync has no arguments.
        unsafe { libc::sync() };
        std::process::exit(128 + libc::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        // Release, autorepeat, another key, a sync event, a short read.
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 2)));
        assert!(!is_power_press(&event(EV_KEY, 142, 1)));
        assert!(!is_power_press(&event(0, 0, 0)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 1)[..20]));
    }

    #[test]
    fn the_button_is_found_by_name() {
        let class = tempfile::tempdir().unwrap();
        assert_eq!(find_button(class.path()), None);
        for (n, name) in [("event0", "AT Translated Set 2 keyboard\n"), ("event3", "Power Button\n"), ("mouse0", "Power Button\n")] {
            let d = class.path().join(n).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        std::fs::create_dir_all(class.path().join("input1")).unwrap();
        assert_eq!(find_button(class.path()), Some(PathBuf::from("/dev/input/event3")));
        assert_eq!(find_button(Path::new("/no/such/class")), None);
    }

    #[test]
    fn presses_travel_through_the_pipe() {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: as in `watch`.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) }, 0);
        // SAFETY: new descriptors owned here.
        let (rd, mut wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        assert!(!take_presses(rd.as_raw_fd()), "nothing pressed yet");
        set_command_running(true);
        pressed(&mut wr);
        pressed(&mut wr);
        set_command_running(false);
        assert!(take_presses(rd.as_raw_fd()));
        assert!(!take_presses(rd.as_raw_fd()), "both presses drained at once");
    }
}
