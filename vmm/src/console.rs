//! The host side of the serial console for `aivmm run --kernel …` (KVM and
//! Hypervisor.framework alike): host stdin into the UART's receive FIFO.
//!
//! On a terminal, stdin is put in raw mode ([`RawTerminal`]) and Ctrl-A is an
//! escape: Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends one Ctrl-A, and Ctrl-A
//! followed by anything else sends both bytes. Off a terminal (a pipe, a file)
//! every byte goes to the guest unchanged. When the guest does not drain the
//! FIFO, the pump waits: input is never dropped.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aivmm_devices::legacy::Serial;
use vmm_sys_util::terminal::Terminal;

/// Ctrl-A, the escape key of the console.
pub const ESCAPE: u8 = 0x01;

/// How long the pump waits for room in a full receive FIFO.
const FULL_FIFO_WAIT: Duration = Duration::from_millis(2);

/// The console's escape handling, byte by byte across reads.
#[derive(Debug, Default)]
pub struct Escapes {
    tty: bool,
    escaped: bool,
}

impl Escapes {
    /// Escapes are on only for a terminal.
    pub fn new(tty: bool) -> Self {
        Self { tty, escaped: false }
    }

    /// The bytes of `input` meant for the guest, and whether the user asked to
    /// stop (Ctrl-A x; what follows it is dropped).
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if !self.tty {
                out.push(b);
            } else if self.escaped {
                self.escaped = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    _ => out.extend([ESCAPE, b]),
                }
            } else if b == ESCAPE {
                self.escaped = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// How a pump ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// The input ended or failed.
    Eof,
    /// The user typed Ctrl-A x.
    Stop,
}

/// Puts all of `bytes` into the UART's receive FIFO, waiting while it is full.
fn enqueue_all(serial: &Mutex<Serial>, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let taken = serial
            .lock()
            .map(|mut s| s.enqueue_input(rest))
            // A poisoned console drops its input rather than spin.
            .unwrap_or(rest.len());
        rest = &rest[taken..];
        if !rest.is_empty() {
            std::thread::sleep(FULL_FIFO_WAIT);
        }
    }
}

/// Copies `input` into `serial` until it ends or the user stops the VM.
pub fn pump(mut input: impl Read, serial: &Mutex<Serial>, tty: bool) -> PumpEnd {
    let mut escapes = Escapes::new(tty);
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return PumpEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return PumpEnd::Eof,
        };
        let (bytes, stop) = escapes.filter(&buf[..n]);
        enqueue_all(serial, &bytes);
        if stop {
            return PumpEnd::Stop;
        }
    }
}

/// Starts a thread copying stdin to `serial`. Ctrl-A x (on a terminal) restores
/// the terminal and ends the process.
pub fn spawn_stdin_pump(serial: Arc<Mutex<Serial>>, tty: bool) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            if pump(std::io::stdin(), &serial, tty) == PumpEnd::Stop {
                let _ = std::io::stdin().lock().set_canon_mode();
                eprintln!("\r\naivmm: stopped from the console");
                std::process::exit(0);
            }
        });
}

/// Stdin in raw mode while it lives (when stdin is a terminal); canonical mode
/// again when dropped.
pub struct RawTerminal(bool);

impl RawTerminal {
    /// Puts a terminal stdin in raw mode.
    pub fn enter() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
        Self(tty && std::io::stdin().lock().set_raw_mode().is_ok())
    }

    /// Whether stdin is a terminal in raw mode (escapes apply).
    pub fn is_raw(&self) -> bool {
        self.0
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use aivmm_devices::bus::BusDevice;
    use aivmm_devices::Interrupt;

    struct NoIrq;
    impl Interrupt for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn escapes_on_a_terminal_only() {
        let mut e = Escapes::new(true);
        assert_eq!(e.filter(b"ab\x01\x01c"), (b"ab\x01c".to_vec(), false));
        assert_eq!(e.filter(b"\x01q"), (b"\x01q".to_vec(), false));
        // An escape split across two reads.
        assert_eq!(e.filter(b"z\x01"), (b"z".to_vec(), false));
        assert_eq!(e.filter(b"xrest"), (Vec::new(), true));
        let mut e = Escapes::new(false);
        assert_eq!(e.filter(b"\x01x\x01"), (b"\x01x\x01".to_vec(), false));
    }

    /// Reads the UART's receive register until the data-ready bit clears.
    fn drain(serial: &Mutex<Serial>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut s = serial.lock().unwrap();
        loop {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return got;
            }
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn pump_feeds_the_uart_and_waits_for_room() {
        let serial = Arc::new(Mutex::new(Serial::new(
            Arc::new(NoIrq),
            Box::new(std::io::sink()),
        )));
        // More than a FIFO holds: the pump waits while a "guest" drains it.
        let input: Vec<u8> = (0..2000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let (s2, want) = (serial.clone(), input.clone());
        let guest = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < want.len() {
                got.extend(drain(&s2));
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        });
        assert_eq!(pump(&input[..], &serial, false), PumpEnd::Eof);
        assert_eq!(guest.join().unwrap(), input);
        // Ctrl-A x on a terminal ends the pump; what came before is delivered.
        assert_eq!(pump(&b"hi\x01xignored"[..], &serial, true), PumpEnd::Stop);
        assert_eq!(drain(&serial), b"hi");
    }
}
