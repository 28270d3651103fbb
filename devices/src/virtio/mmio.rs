//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), as a [`BusDevice`].
//!
//! The guest driver programs the registers of one window: it negotiates features,
//! describes each queue and walks the status machine. The transport keeps that
//! state; when the driver sets DRIVER_OK it builds `virtio_queue::Queue`s from it
//! and hands them to the [`VirtioDevice`], with a clone of each queue's `EventFd`
//! and the interrupt. A QUEUE_NOTIFY write is turned into a write of that queue's
//! `EventFd` here, so a KVM ioeventfd on the same address is only a fast path.
//! The interrupt status register lives in [`MmioInterrupt`], shared with the
//! device, which sets bits through [`VirtioInterrupt::signal`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::Spawner;
use super::{ActivateArgs, VirtioDevice, VirtioInterrupt, VIRTIO_MMIO_INT_CONFIG};
use crate::bus::BusDevice;
use crate::sys::{EventFd, EFD_NONBLOCK};
use crate::Interrupt;

/// "virt", little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version: 2 is the modern (virtio 1.x) layout.
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID: "AIVM" in ASCII (the spec lets devices pick any value).
pub const MMIO_VENDOR_ID: u32 = 0x4149_564d;
/// Offset of QueueNotify, where an ioeventfd with datamatch = queue index goes.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset where the device-specific configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_LEN_HIGH: u64 = 0x0b4;
const CONFIG_GENERATION: u64 = 0x0fc;

/// The bits of the status register a driver may set, in the order it sets them.
const STATUS_SEQUENCE: [u32; 4] = [
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_DRIVER_OK,
];

/// Errors of the MMIO transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device has no queues, or more than the transport can select.
    #[error("the device declares {0} queues")]
    QueueCount(usize),
    /// A queue's maximum size is zero, above 32768, or not a power of two.
    #[error("queue {0} has an invalid maximum size {1}")]
    QueueMaxSize(usize, u16),
    /// Creating a queue's EventFd failed.
    #[error("creating a queue EventFd failed: {0}")]
    EventFd(#[source] std::io::Error),
}

/// `Result` of the MMIO transport.
pub type Result<T> = std::result::Result<T, Error>;

/// The interrupt status register shared between the transport and its device,
/// and the configuration generation: a device that changes its configuration
/// space signals `VIRTIO_MMIO_INT_CONFIG`, which also moves the generation on (so
/// a driver reading several fields sees they changed under it).
pub struct MmioInterrupt {
    status: AtomicU32,
    generation: AtomicU32,
    irq: Arc<dyn Interrupt>,
}

impl MmioInterrupt {
    /// The current INTERRUPT_STATUS bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal(&self, status: u32) -> std::io::Result<()> {
        if status & VIRTIO_MMIO_INT_CONFIG != 0 {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.status.fetch_or(status, Ordering::SeqCst);
        self.irq.trigger()
    }
}

/// What the driver wrote about one queue.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ..Default::default()
        }
    }

    /// Builds the queue the device will use, or `None` if the driver's values are
    /// out of range or the rings lie outside guest memory.
    fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        if !self.ready {
            return Some(q);
        }
        q.try_set_size(u16::try_from(self.size).ok()?).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q.is_valid(mem).then_some(q)
    }
}

/// Sets the low or high half of a 64-bit register.
fn set_half(reg: &mut u64, high: bool, v: u32) {
    *reg = if high {
        (*reg & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (*reg & !0xffff_ffff) | u64::from(v)
    };
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    /// The device refused a reset: it stays in DEVICE_NEEDS_RESET for good.
    broken: bool,
    /// Where the device starts its workers (handed over on activation).
    spawner: Spawner,
}

impl MmioTransport {
    /// Wraps `device`, which will work on `mem`, raise `interrupt` and start its
    /// workers through `spawner`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        spawner: Spawner,
    ) -> Result<Self> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > usize::from(u16::MAX) {
            return Err(Error::QueueCount(max_sizes.len()));
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (i, &max) in max_sizes.iter().enumerate() {
            if Queue::new(max).is_err() {
                return Err(Error::QueueMaxSize(i, max));
            }
            queues.push(QueueConfig::new(max));
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                generation: AtomicU32::new(0),
                irq: interrupt,
            }),
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            broken: false,
            spawner,
        })
    }

    /// One `EventFd` per queue; register each as an ioeventfd at
    /// base + [`QUEUE_NOTIFY_OFFSET`] with datamatch = its index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt the device raises (for the VMM to signal config changes).
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.interrupt.clone()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is running (DRIVER_OK accepted and activation succeeded).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Tells the driver the device's configuration changed.
    pub fn config_changed(&mut self) {
        self.signal_config();
    }

    fn signal_config(&self) {
        if let Err(e) = self.interrupt.signal(VIRTIO_MMIO_INT_CONFIG) {
            warn!("virtio-mmio: raising the config interrupt failed: {e}");
        }
    }

    fn device_features(&self) -> u64 {
        // A version 2 transport only speaks to modern drivers.
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only while the driver is setting up.
    fn queue_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            && self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) == 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => MMIO_VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: a length of all ones says so.
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            CONFIG_GENERATION => self.interrupt.generation.load(Ordering::SeqCst),
            _ => {
                debug!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = v,
            DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            DRIVER_FEATURES => {
                let negotiating = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if !negotiating {
                    debug!("virtio-mmio: driver features written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => set_half(&mut self.driver_features, false, v),
                    1 => set_half(&mut self.driver_features, true, v),
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = v,
            QUEUE_NOTIFY_OFFSET => self.notify(v),
            INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!v, Ordering::SeqCst);
            }
            STATUS => self.write_status(v),
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                if !self.queue_writable() {
                    debug!("virtio-mmio: queue register {offset:#x} written after setup");
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    debug!("virtio-mmio: queue register {offset:#x} written for a missing queue");
                    return;
                };
                match offset {
                    // Checked against the maximum when the queue is built.
                    QUEUE_NUM => q.size = v,
                    QUEUE_READY => q.ready = v == 1,
                    QUEUE_DESC_LOW => set_half(&mut q.desc, false, v),
                    QUEUE_DESC_HIGH => set_half(&mut q.desc, true, v),
                    QUEUE_DRIVER_LOW => set_half(&mut q.driver, false, v),
                    QUEUE_DRIVER_HIGH => set_half(&mut q.driver, true, v),
                    QUEUE_DEVICE_LOW => set_half(&mut q.device, false, v),
                    _ => set_half(&mut q.device, true, v),
                }
            }
            SHM_SEL => {}
            _ => debug!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: writing the notify EventFd of queue {index} failed: {e}");
                }
            }
            None => debug!("virtio-mmio: notify for missing queue {index}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if self.broken {
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set; ignore it in what the driver writes.
        let v = v & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let old = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if v & old != old {
            debug!("virtio-mmio: status {v:#x} clears bits of {old:#x}; ignored");
            return;
        }
        if v & !(old | VIRTIO_CONFIG_S_FAILED) == 0 {
            // Only FAILED (or nothing) added.
            self.status |= v;
            return;
        }
        if self.status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) != 0 {
            debug!("virtio-mmio: status {v:#x} written to a failed device; ignored");
            return;
        }
        // The driver bits must form a prefix of the init sequence.
        let mut prefix = 0;
        for bit in STATUS_SEQUENCE {
            if v & bit == 0 {
                break;
            }
            prefix |= bit;
        }
        if v & !VIRTIO_CONFIG_S_FAILED != prefix {
            debug!("virtio-mmio: status {v:#x} skips a step from {old:#x}; ignored");
            return;
        }
        let added = v & !old;
        let new = v;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device_features();
            let accepted = self.driver_features;
            if accepted & !offered != 0 || accepted & (1 << VIRTIO_F_VERSION_1) == 0 {
                debug!(
                    "virtio-mmio: FEATURES_OK refused: driver {accepted:#x}, device {offered:#x}"
                );
                self.status = new & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
                return;
            }
            self.device.ack_features(accepted);
        }
        self.status = new;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, cfg) in self.queues.iter().enumerate() {
            match cfg.build(&self.mem, event_idx) {
                Some(q) => queues.push(q),
                None => {
                    debug!("virtio-mmio: queue {i} is invalid: {cfg:?}");
                    return self.needs_reset();
                }
            }
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for evt in &self.queue_evts {
            match evt.try_clone() {
                Ok(e) => queue_evts.push(e),
                Err(e) => {
                    error!("virtio-mmio: cloning a queue EventFd failed: {e}");
                    return self.needs_reset();
                }
            }
        }
        let args = ActivateArgs {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            spawner: self.spawner.clone(),
        };
        match self.device.activate(args) {
            Ok(()) => self.activated = true,
            Err(e) => {
                error!(
                    "virtio-mmio: activating device type {} failed: {e}",
                    self.device.device_type()
                );
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.signal_config();
    }

    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                error!(
                    "virtio-mmio: device type {} cannot be reset",
                    self.device.device_type()
                );
                self.broken = true;
                self.status = VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            self.activated = false;
        }
        self.broken = false;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for evt in &self.queue_evts {
            // Drop notifications from before the reset; EAGAIN just means none.
            let _ = evt.read();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(b) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(b)),
            _ => debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET;

    use super::*;
    use crate::virtio::VirtioCommon;
    use crate::test_utils::*;
    use crate::virtio::{Error as VirtioError, VIRTIO_MMIO_INT_VRING};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FOK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DOK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 1;

    /// What the mock device saw of one activation.
    struct Activation {
        queues: Vec<(u16, bool, u64, u64, u64, bool)>,
        evts: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    }

    #[derive(Default)]
    struct State {
        acked: Option<u64>,
        activations: Vec<Activation>,
        resets: usize,
        fail_activate: bool,
        refuse_reset: bool,
        config: [u8; 8],
    }

    struct Mock(Arc<Mutex<State>>, VirtioCommon);

    fn mock(state: Arc<Mutex<State>>) -> Mock {
        Mock(state, VirtioCommon::new("mock", 42, vec![16, 8], FEATURES, Vec::new()))
    }

    impl VirtioDevice for Mock {
        fn common(&self) -> &VirtioCommon {
            &self.1
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.1
        }
        fn stop(&mut self) {}
        fn ack_features(&mut self, features: u64) {
            self.0.lock().unwrap().acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let s = self.0.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = s.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let mut s = self.0.lock().unwrap();
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = s.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, args: ActivateArgs) -> crate::virtio::Result<()> {
            let mut s = self.0.lock().unwrap();
            if s.fail_activate {
                return Err(VirtioError::activation("mock", std::io::Error::other("mock")));
            }
            let queues = args
                .queues
                .iter()
                .map(|q| {
                    (
                        q.size(),
                        q.ready(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                        q.event_idx_enabled(),
                    )
                })
                .collect();
            s.activations.push(Activation {
                queues,
                evts: args.queue_evts,
                interrupt: args.interrupt,
            });
            Ok(())
        }
        fn reset(&mut self) -> bool {
            let mut s = self.0.lock().unwrap();
            s.resets += 1;
            !s.refuse_reset
        }
    }

    struct Fixture {
        mem: GuestMemoryMmap,
        state: Arc<Mutex<State>>,
        irq: Arc<RecordingInterrupt>,
        t: MmioTransport,
    }

    fn fixture() -> Fixture {
        let mem = guest_memory(0x20_0000);
        let state = Arc::new(Mutex::new(State {
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            ..Default::default()
        }));
        let irq = Arc::new(RecordingInterrupt::default());
        let t =
            MmioTransport::new(Box::new(mock(state.clone())), mem.clone(), irq.clone(), Default::default()).unwrap();
        Fixture { mem, state, irq, t }
    }

    fn set_driver_features(t: &mut MmioTransport, f: u64) {
        write32(t, DRIVER_FEATURES_SEL, 0);
        write32(t, DRIVER_FEATURES, f as u32);
        write32(t, DRIVER_FEATURES_SEL, 1);
        write32(t, DRIVER_FEATURES, (f >> 32) as u32);
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        assert_eq!(read32(&mut f.t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(&mut f.t, VERSION), 2);
        assert_eq!(read32(&mut f.t, DEVICE_ID), 42);
        assert_eq!(read32(&mut f.t, VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(read32(&mut f.t, CONFIG_GENERATION), 0);
        assert_eq!(read32(&mut f.t, SHM_LEN_LOW), u32::MAX);
        write32(&mut f.t, DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            read32(&mut f.t, DEVICE_FEATURES),
            (1 << VIRTIO_RING_F_EVENT_IDX) | 1
        );
        write32(&mut f.t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut f.t, DEVICE_FEATURES), 1);
        write32(&mut f.t, DEVICE_FEATURES_SEL, 7);
        assert_eq!(read32(&mut f.t, DEVICE_FEATURES), 0);
    }

    #[test]
    fn bad_widths_are_ignored() {
        let mut f = fixture();
        let mut b = [0xffu8; 2];
        f.t.read(MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 8];
        f.t.read(MAGIC_VALUE, &mut b);
        assert_eq!(b, [0; 8]);
        // Misaligned 4-byte read.
        let mut b = [0xffu8; 4];
        f.t.read(MAGIC_VALUE + 1, &mut b);
        assert_eq!(b, [0; 4]);
        f.t.write(STATUS, &[ACK as u8]);
        f.t.write(STATUS, &[]);
        assert_eq!(read32(&mut f.t, STATUS), 0);
    }

    #[test]
    fn config_space_any_width() {
        let mut f = fixture();
        let mut b = [0u8; 1];
        f.t.read(0x102, &mut b);
        assert_eq!(b, [3]);
        let mut b = [0u8; 2];
        f.t.read(0x104, &mut b);
        assert_eq!(b, [5, 6]);
        f.t.write(0x100, &[9, 9, 9]);
        assert_eq!(read32(&mut f.t, 0x100), u32::from_le_bytes([9, 9, 9, 4]));
        let mut b = [0xffu8; 8];
        f.t.read(0x106, &mut b);
        assert_eq!(b, [7, 8, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn feature_negotiation() {
        let mut f = fixture();
        // Before DRIVER, driver features are ignored.
        set_driver_features(&mut f.t, FEATURES);
        write32(&mut f.t, STATUS, ACK);
        write32(&mut f.t, STATUS, ACK | DRV);
        // A feature the device does not offer: FEATURES_OK refused.
        set_driver_features(&mut f.t, FEATURES | (1 << 40));
        write32(&mut f.t, STATUS, ACK | DRV | FOK);
        assert_eq!(read32(&mut f.t, STATUS), ACK | DRV);
        assert!(f.state.lock().unwrap().acked.is_none());
        // Without VERSION_1: refused too.
        set_driver_features(&mut f.t, 1);
        write32(&mut f.t, STATUS, ACK | DRV | FOK);
        assert_eq!(read32(&mut f.t, STATUS), ACK | DRV);
        // A subset: accepted and passed to the device.
        set_driver_features(&mut f.t, 1 | (1 << VIRTIO_F_VERSION_1));
        write32(&mut f.t, STATUS, ACK | DRV | FOK);
        assert_eq!(read32(&mut f.t, STATUS), ACK | DRV | FOK);
        assert_eq!(
            f.state.lock().unwrap().acked,
            Some(1 | (1 << VIRTIO_F_VERSION_1))
        );
        // Features are frozen after FEATURES_OK.
        set_driver_features(&mut f.t, FEATURES);
        assert_eq!(f.t.driver_features, 1 | (1 << VIRTIO_F_VERSION_1));
    }

    #[test]
    fn status_machine_rejects_skips_and_clears() {
        let mut f = fixture();
        write32(&mut f.t, STATUS, DRV);
        assert_eq!(read32(&mut f.t, STATUS), 0);
        write32(&mut f.t, STATUS, ACK);
        write32(&mut f.t, STATUS, ACK | DOK);
        assert_eq!(read32(&mut f.t, STATUS), ACK);
        write32(&mut f.t, STATUS, ACK | DRV);
        // Clearing a bit is not allowed.
        write32(&mut f.t, STATUS, DRV);
        assert_eq!(read32(&mut f.t, STATUS), ACK | DRV);
        // FAILED may be set any time; nothing advances after it.
        write32(&mut f.t, STATUS, ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        set_driver_features(&mut f.t, FEATURES);
        write32(&mut f.t, STATUS, ACK | DRV | FOK | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(read32(&mut f.t, STATUS), ACK | DRV | VIRTIO_CONFIG_S_FAILED);
        assert!(f.state.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn activation_hands_over_queues() {
        let mut f = fixture();
        let q0 = mock_queue_at(&f.mem, 0x1000, 16);
        let q1 = mock_queue_at(&f.mem, 0x8000, 4);
        write32(&mut f.t, QUEUE_SEL, 1);
        assert_eq!(read32(&mut f.t, QUEUE_NUM_MAX), 8);
        write32(&mut f.t, QUEUE_SEL, 2);
        assert_eq!(read32(&mut f.t, QUEUE_NUM_MAX), 0);
        let status = mmio_init(&mut f.t, FEATURES, &[&q0, &q1]);
        assert_eq!(status, ACK | DRV | FOK | DOK);
        assert!(f.t.is_activated());
        let s = f.state.lock().unwrap();
        assert_eq!(s.activations.len(), 1);
        let a = &s.activations[0];
        assert_eq!(
            a.queues[0],
            (
                16,
                true,
                q0.desc_table_addr().0,
                q0.avail_addr().0,
                q0.used_addr().0,
                true
            )
        );
        assert_eq!(
            a.queues[1],
            (
                4,
                true,
                q1.desc_table_addr().0,
                q1.avail_addr().0,
                q1.used_addr().0,
                true
            )
        );
        assert_eq!(a.evts.len(), 2);
    }

    #[test]
    fn unready_queues_are_passed_unready() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        assert_eq!(mmio_init(&mut f.t, FEATURES, &[&q0]), ACK | DRV | FOK | DOK);
        let s = f.state.lock().unwrap();
        assert!(!s.activations[0].queues[1].1);
    }

    #[test]
    fn queue_writes_after_driver_ok_are_ignored() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        mmio_init(&mut f.t, FEATURES, &[&q0]);
        write32(&mut f.t, QUEUE_SEL, 0);
        write32(&mut f.t, QUEUE_READY, 0);
        write32(&mut f.t, QUEUE_NUM, 2);
        assert_eq!(read32(&mut f.t, QUEUE_READY), 1);
        assert_eq!(f.t.queues[0].size, 16);
    }

    /// Walks the init sequence by hand with one queue of `size` at `desc`, `avail`,
    /// `used`, and returns the status afterwards.
    fn init_one_queue(t: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) -> u32 {
        write32(t, STATUS, 0);
        write32(t, STATUS, ACK);
        write32(t, STATUS, ACK | DRV);
        set_driver_features(t, FEATURES);
        write32(t, STATUS, ACK | DRV | FOK);
        write32(t, QUEUE_SEL, 0);
        write32(t, QUEUE_NUM, size);
        for (lo, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, avail),
            (QUEUE_DEVICE_LOW, used),
        ] {
            write32(t, lo, addr as u32);
            write32(t, lo + 4, (addr >> 32) as u32);
        }
        write32(t, QUEUE_READY, 1);
        write32(t, STATUS, ACK | DRV | FOK | DOK);
        read32(t, STATUS)
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let mut f = fixture();
        // The used ring past the end of guest memory.
        let status = init_one_queue(&mut f.t, 16, 0x1000, 0x2000, 0x20_0000);
        assert_ne!(status & NEEDS_RESET, 0);
        assert!(!f.t.is_activated());
        assert_ne!(
            read32(&mut f.t, INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
            0
        );
        assert!(f.irq.count() >= 1);
        assert!(f.state.lock().unwrap().activations.is_empty());
        // Addresses that overflow, misaligned rings, bad sizes.
        for (size, desc, avail, used) in [
            (16, u64::MAX - 8, 0x2000, 0x3000),
            (16, 0x1001, 0x2000, 0x3000),
            (16, 0x1000, 0x2001, 0x3000),
            (16, 0x1000, 0x2000, 0x3002),
            (32, 0x1000, 0x2000, 0x3000),
            (3, 0x1000, 0x2000, 0x3000),
            (0, 0x1000, 0x2000, 0x3000),
            (0x1_0010, 0x1000, 0x2000, 0x3000),
        ] {
            let status = init_one_queue(&mut f.t, size, desc, avail, used);
            assert_ne!(
                status & NEEDS_RESET,
                0,
                "{size} {desc:#x} {avail:#x} {used:#x}"
            );
        }
        assert!(f.state.lock().unwrap().activations.is_empty());
        // And a good one still works after all that.
        assert_eq!(
            init_one_queue(&mut f.t, 16, 0x1000, 0x2000, 0x3000),
            ACK | DRV | FOK | DOK
        );
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let mut f = fixture();
        f.state.lock().unwrap().fail_activate = true;
        let q0 = mock_queue(&f.mem, 16);
        let status = mmio_init(&mut f.t, FEATURES, &[&q0]);
        assert_eq!(status, ACK | DRV | FOK | DOK | NEEDS_RESET);
        assert_eq!(read32(&mut f.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        // Recovery: reset, then a working activation.
        f.state.lock().unwrap().fail_activate = false;
        let status = mmio_init(&mut f.t, FEATURES, &[&q0]);
        assert_eq!(status, ACK | DRV | FOK | DOK);
    }

    #[test]
    fn notify_writes_the_queue_eventfd() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        mmio_init(&mut f.t, FEATURES, &[&q0]);
        write32(&mut f.t, QUEUE_NOTIFY_OFFSET, 1);
        write32(&mut f.t, QUEUE_NOTIFY_OFFSET, 1);
        write32(&mut f.t, QUEUE_NOTIFY_OFFSET, 99);
        let s = f.state.lock().unwrap();
        // The device's clone shares the counter.
        assert_eq!(s.activations[0].evts[1].read().unwrap(), 2);
        assert!(f.t.queue_evts()[0].read().is_err());
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        mmio_init(&mut f.t, FEATURES, &[&q0]);
        let irq = f.state.lock().unwrap().activations[0].interrupt.clone();
        irq.signal(VIRTIO_MMIO_INT_VRING).unwrap();
        assert_eq!(f.irq.count(), 1);
        f.t.config_changed();
        assert_eq!(f.irq.count(), 2);
        assert_eq!(read32(&mut f.t, CONFIG_GENERATION), 1);
        assert_eq!(
            read32(&mut f.t, INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        write32(&mut f.t, INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read32(&mut f.t, INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        write32(&mut f.t, INTERRUPT_ACK, u32::MAX);
        assert_eq!(read32(&mut f.t, INTERRUPT_STATUS), 0);
    }

    #[test]
    fn reset_clears_state_and_allows_reactivation() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        mmio_init(&mut f.t, FEATURES, &[&q0]);
        f.t.interrupt().signal(VIRTIO_MMIO_INT_VRING).unwrap();
        write32(&mut f.t, QUEUE_NOTIFY_OFFSET, 0);
        write32(&mut f.t, STATUS, 0);
        assert_eq!(read32(&mut f.t, STATUS), 0);
        assert_eq!(read32(&mut f.t, INTERRUPT_STATUS), 0);
        assert_eq!(read32(&mut f.t, QUEUE_READY), 0);
        assert!(!f.t.is_activated());
        assert!(f.t.queue_evts()[0].read().is_err(), "stale notify dropped");
        assert_eq!(f.state.lock().unwrap().resets, 1);
        // Reset of an inactive device does not bother the device.
        write32(&mut f.t, STATUS, 0);
        assert_eq!(f.state.lock().unwrap().resets, 1);
        assert_eq!(mmio_init(&mut f.t, FEATURES, &[&q0]), ACK | DRV | FOK | DOK);
        assert_eq!(f.state.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn refused_reset_leaves_needs_reset() {
        let mut f = fixture();
        let q0 = mock_queue(&f.mem, 16);
        mmio_init(&mut f.t, FEATURES, &[&q0]);
        f.state.lock().unwrap().refuse_reset = true;
        write32(&mut f.t, STATUS, 0);
        assert_eq!(read32(&mut f.t, STATUS), NEEDS_RESET);
        write32(&mut f.t, STATUS, ACK);
        assert_eq!(read32(&mut f.t, STATUS), NEEDS_RESET);
        f.state.lock().unwrap().refuse_reset = false;
        write32(&mut f.t, STATUS, 0);
        assert_eq!(read32(&mut f.t, STATUS), 0);
    }

    #[test]
    fn rejects_bad_queue_max_sizes() {
        struct Bad(VirtioCommon);
        impl VirtioDevice for Bad {
            fn common(&self) -> &VirtioCommon {
                &self.0
            }
            fn common_mut(&mut self) -> &mut VirtioCommon {
                &mut self.0
            }
            fn stop(&mut self) {}
            fn activate(&mut self, _: ActivateArgs) -> crate::virtio::Result<()> {
                Ok(())
            }
            fn reset(&mut self) -> bool {
                true
            }
        }
        let mem = guest_memory(0x1000);
        let irq = Arc::new(RecordingInterrupt::default());
        for sizes in [vec![], vec![0], vec![3], vec![16, 65535]] {
            let r = MmioTransport::new(
                Box::new(Bad(VirtioCommon::new("bad", 1, sizes, 0, Vec::new()))),
                mem.clone(),
                irq.clone(),
                Default::default(),
            );
            assert!(r.is_err());
        }
    }

    #[test]
    fn arbitrary_register_traffic_never_panics() {
        let mut f = fixture();
        let values = [
            0u32,
            1,
            2,
            3,
            0xf,
            0x40,
            0x7f,
            0x80,
            0xff,
            0xffff,
            0x1_0000,
            u32::MAX,
        ];
        for round in 0..3u64 {
            for off in (0..0x110u64).step_by(2) {
                for &v in &values {
                    for w in [1usize, 2, 4, 8] {
                        let bytes = (u64::from(v) << round).to_le_bytes();
                        f.t.write(off, &bytes[..w]);
                        let mut r = vec![0u8; w];
                        f.t.read(off, &mut r);
                    }
                }
            }
        }
    }
}
