//! A minimal i8042 keyboard controller: enough for the guest to reset the machine.
//!
//! It sits at ports 0x60 (data, offset 0) and 0x64 (command/status, offset 4).
//! Nothing is ever pending, so status and data read 0. The command 0xFE pulses
//! the CPU reset line, which ends the VM through the [`ExitHandler`].

use log::debug;

use super::ExitHandler;
use crate::bus::BusDevice;
use crate::ExitReason;

/// The bus range length from the data port: 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command (write) and status (read) port.
pub const COMMAND_OFFSET: u64 = 4;
/// The command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
pub struct I8042 {
    exit: ExitHandler,
}

impl I8042 {
    /// A controller that reports a reset to `exit`.
    pub fn new(exit: ExitHandler) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (COMMAND_OFFSET, Some(&CMD_RESET_CPU)) => (self.exit)(ExitReason::Reset),
            _ => debug!("i8042: write {data:x?} at {offset:#x} ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn reset_command_exits() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |r| s.lock().unwrap().push(r)));
        let mut b = [0xffu8; 1];
        dev.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b, [0]);
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b, [0]);
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0x20]);
        dev.write(COMMAND_OFFSET, &[]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(seen.lock().unwrap().as_slice(), &[ExitReason::Reset]);
    }
}
