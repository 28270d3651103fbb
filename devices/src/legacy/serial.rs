//! The 16550A UART at COM1, on vm-superio's `Serial`.
//!
//! Guest writes to the transmit register go to the output the VMM gives (stdout);
//! host input (stdin) enters through [`Serial::enqueue_input`] into the receive
//! FIFO. The UART's interrupt goes out through the crate's [`Interrupt`].

use std::io::{self, Write};
use std::sync::Arc;

use log::debug;
use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::Interrupt;

/// The number of ports the UART occupies.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Adapts [`Interrupt`] to vm-superio's `Trigger`.
pub struct SerialTrigger(Arc<dyn Interrupt>);

impl Trigger for SerialTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<SerialTrigger, NoEvents, Box<dyn Write + Send>>;

/// A 16550A serial port as a [`BusDevice`] of [`SERIAL_PORT_LEN`] ports.
pub struct Serial {
    uart: Uart,
}

impl Serial {
    /// A UART that writes guest output to `out` and raises `interrupt`.
    pub fn new(interrupt: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(SerialTrigger(interrupt), out),
        }
    }

    /// Puts host input into the receive FIFO and returns how many bytes it took;
    /// the rest must be offered again once the guest has read some.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let take = bytes.len().min(self.uart.fifo_capacity());
        if take == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..take]) {
            Ok(n) => n,
            // The bytes are in the FIFO; only the interrupt was lost.
            Err(SerialError::Trigger(e)) => {
                debug!("serial: raising the interrupt failed: {e}");
                take
            }
            Err(e) => {
                debug!("serial: input not taken: {e}");
                0
            }
        }
    }

    /// Free room in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (u8::try_from(offset), data.first_mut()) {
            (Ok(off), Some(b)) if in_range(offset) => *b = self.uart.read(off),
            _ => debug!("serial: read at {offset:#x} ignored"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data.first()) {
            (Ok(off), Some(&b)) if in_range(offset) => {
                if let Err(e) = self.uart.write(off, b) {
                    debug!("serial: write at {offset:#x} failed: {e}");
                }
            }
            _ => debug!("serial: write at {offset:#x} ignored"),
        }
    }
}

fn in_range(offset: u64) -> bool {
    offset < SERIAL_PORT_LEN
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;
    use crate::test_utils::RecordingInterrupt;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, SharedBuf, Arc<RecordingInterrupt>) {
        let out = SharedBuf::default();
        let irq = Arc::new(RecordingInterrupt::default());
        (Serial::new(irq.clone(), Box::new(out.clone())), out, irq)
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut s, out, _irq) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Odd accesses do nothing and never panic.
        s.write(0, &[]);
        s.write(9, b"x");
        s.write(u64::MAX, b"x");
        let mut b = [0xffu8; 2];
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_fills_the_fifo() {
        let (mut s, _out, irq) = serial();
        // Enable the received-data interrupt (IER bit 0).
        s.write(1, &[1]);
        let before = irq.count();
        let input: Vec<u8> = (0..100).collect();
        let taken = s.enqueue_input(&input);
        assert_eq!(taken, 64);
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_input(&input[taken..]), 0);
        assert!(irq.count() > before);
        // LSR bit 0: data ready.
        let mut b = [0u8; 1];
        s.read(5, &mut b);
        assert_eq!(b[0] & 1, 1);
        for want in 0..64u8 {
            s.read(0, &mut b);
            assert_eq!(b[0], want);
        }
        s.read(5, &mut b);
        assert_eq!(b[0] & 1, 0);
        assert_eq!(s.enqueue_input(&[]), 0);
        assert_eq!(s.enqueue_input(&input[taken..]), 36);
    }
}
