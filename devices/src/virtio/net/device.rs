//! The virtio-net device: features, configuration space, and the worker's life.
//!
//! The device owns the backend while it is idle. `activate` hands it, with both
//! queues, their `EventFd`s and the interrupt, to a worker thread ([`super::worker`]);
//! `reset` stops the thread and takes the backend back, so passt or the tap stay
//! open across a guest reboot of the driver.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::path::PathBuf;
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

use super::backend::{self, Backend, PortForward};
use super::worker::NetWorker;
use super::{format_mac, Error, Result, CONFIG_LEN, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_NET};
use crate::virtio::common::read_config_bytes;
use crate::virtio::{self, ActivateArgs, VirtioCommon, VirtioDevice, Workers};

/// What the VMM configures for one network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Where frames go on the host.
    pub backend: BackendConfig,
    /// The guest's MAC; a random locally administered one if `None`.
    pub mac: Option<[u8; 6]>,
}

/// Which backend a network device uses: plain data, parsed once from the CLI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendConfig {
    /// aivmm's own user-mode network, in a thread of this process.
    User {
        /// Forwards, egress policy and limits.
        config: super::usernet::UserNetConfig,
        /// Whether the gateway thread waits for `usernet::release_gated`.
        gated: bool,
    },
    /// User-mode networking through a passt child process (rootless, NAT).
    Passt {
        /// Host ports forwarded into the guest.
        forwards: Vec<PortForward>,
    },
    /// A TAP interface (created if missing, which needs CAP_NET_ADMIN).
    Tap {
        /// The interface name; `%d` lets the kernel pick a number.
        name: String,
    },
    /// A unix datagram socket, one datagram per frame (gvproxy, vmnet-helper).
    UnixDgram {
        /// The peer's socket path.
        path: PathBuf,
    },
}

/// Opens the backend `config` describes.
fn open_backend(config: &BackendConfig) -> Result<Box<dyn Backend>> {
    Ok(match config {
        BackendConfig::User { config, gated } => {
            Box::new(super::usernet::start(config, *gated).map_err(Error::UserNet)?)
        }
        #[cfg(target_os = "linux")]
        BackendConfig::Passt { forwards } => Box::new(backend::Passt::spawn(forwards)?),
        #[cfg(target_os = "linux")]
        BackendConfig::Tap { name } => Box::new(backend::Tap::open(name)?),
        #[cfg(not(target_os = "linux"))]
        BackendConfig::Passt { .. } => return Err(Error::Unsupported("passt")),
        #[cfg(not(target_os = "linux"))]
        BackendConfig::Tap { .. } => return Err(Error::Unsupported("a TAP device")),
        BackendConfig::UnixDgram { path } => Box::new(backend::UnixDgram::connect(path)?),
    })
}

/// The virtio-net device.
pub struct Net {
    backend: Option<Box<dyn Backend>>,
    mac: [u8; 6],
    common: VirtioCommon,
    link_up: Arc<AtomicBool>,
    wakeups: Arc<AtomicU64>,
    /// The worker, which hands the backend back when it stops.
    worker: Option<Workers<Box<dyn Backend>>>,
}

impl Net {
    /// Opens the configured backend (spawning passt, opening the tap or
    /// connecting the socket) and builds the device.
    pub fn new(config: NetConfig) -> Result<Self> {
        let backend = open_backend(&config.backend)?;
        Self::with_backend(backend, config.mac)
    }

    /// Builds the device around an already open backend.
    pub fn with_backend(backend: Box<dyn Backend>, mac: Option<[u8; 6]>) -> Result<Self> {
        let mac = match mac {
            Some(m) if m[0] & 1 != 0 => return Err(Error::MulticastMac(format_mac(&m))),
            Some(m) => m,
            None => random_mac()?,
        };
        let avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | backend.offload_features();
        debug!(
            "virtio-net: {} backend, MAC {}",
            backend.name(),
            format_mac(&mac)
        );
        Ok(Self {
            backend: Some(backend),
            mac,
            // The configuration space changes with the link: see `read_config`.
            common: VirtioCommon::new("virtio-net", VIRTIO_ID_NET, vec![QUEUE_SIZE; NUM_QUEUES], avail_features, Vec::new()),
            link_up: Arc::new(AtomicBool::new(true)),
            wakeups: Arc::new(AtomicU64::new(0)),
            worker: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the backend is still there (LINK_UP in the status field).
    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.common.acked_features()
    }

    /// The pid of the backend's helper process (passt), while the device is idle
    /// or running.
    pub fn backend_pid(&self) -> Option<u32> {
        self.backend.as_ref().and_then(|b| b.process_id())
    }

    /// How many times the worker woke up (a cheap liveness and no-spin metric).
    pub fn worker_wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::SeqCst)
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up() {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c
    }

    fn start(&mut self, args: ActivateArgs) -> Result<()> {
        if self.worker.is_some() {
            return Err(Error::AlreadyActive);
        }
        let ActivateArgs {
            mem,
            queues,
            queue_evts,
            interrupt,
            spawner,
        } = args;
        if queues.len() < NUM_QUEUES
            || queue_evts.len() < NUM_QUEUES
            || queues.iter().take(NUM_QUEUES).any(|q| !q.ready())
        {
            return Err(Error::NoQueue);
        }
        let mut queues = queues.into_iter();
        let mut evts = queue_evts.into_iter();
        let (Some(rx), Some(tx), Some(rx_evt), Some(tx_evt)) =
            (queues.next(), queues.next(), evts.next(), evts.next())
        else {
            return Err(Error::NoQueue);
        };
        let mut workers = Workers::new("virtio-net").map_err(Error::Event)?;
        let mut backend = self.backend.take().ok_or(Error::NoBackend)?;
        if let Err(e) = backend.set_offloads(self.common.acked_features()) {
            warn!("virtio-net: setting the backend's offloads failed: {e}");
        }
        let stop = match workers.stop_event().try_clone() {
            Ok(s) => s,
            Err(e) => {
                self.backend = Some(backend);
                return Err(Error::Event(e));
            }
        };
        let worker = NetWorker::new(
            mem,
            [rx, tx],
            [rx_evt, tx_evt],
            stop,
            interrupt,
            backend,
            self.common.acked_features(),
            self.link_up.clone(),
            self.wakeups.clone(),
        );
        let worker = match worker {
            Ok(w) => w,
            Err((e, backend)) => {
                self.backend = Some(backend);
                return Err(e);
            }
        };
        workers
            .spawn(&spawner, "aivmm-net", move || worker.run())
            .map_err(Error::Spawn)?;
        self.worker = Some(workers);
        Ok(())
    }

}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A random unicast, locally administered MAC.
fn random_mac() -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    crate::sys::random::fill(&mut mac).map_err(Error::Random)?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

impl VirtioDevice for Net {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    // The MAC is read-only for virtio 1.x drivers; status always is: the provided
    // write_config ignores every write.

    fn activate(&mut self, args: ActivateArgs) -> virtio::Result<()> {
        self.start(args)
            .map_err(|e| virtio::Error::activation(self.common.name(), e))
    }

    fn stop(&mut self) {
        if let Some(w) = self.worker.take() {
            match w.stop().pop().flatten() {
                Some(backend) => self.backend = Some(backend),
                None => error!("virtio-net: the worker thread panicked; the backend is lost"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::time::Duration;

    use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::sys::{EventFd, EFD_NONBLOCK};
    use crate::test_utils::*;
    use crate::virtio::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, QUEUE_NOTIFY_OFFSET};
    use crate::virtio::net::backend::{PortForward, Stream};
    use crate::virtio::net::{NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
    use crate::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

    const WAIT: Duration = Duration::from_secs(5);
    const MEM_SIZE: usize = 0x100_0000;
    const TXQ_ADDR: u64 = QUEUE_ADDR + 0x1_0000;
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

    /// A device's queues and notification handles, driver side.
    struct Rig<'a> {
        mem: &'a GuestMemoryMmap,
        rxq: MockSplitQueue<'a, GuestMemoryMmap>,
        txq: MockSplitQueue<'a, GuestMemoryMmap>,
        rx_evt: EventFd,
        tx_evt: EventFd,
        irq: Arc<RecordingVirtioInterrupt>,
    }

    impl<'a> Rig<'a> {
        fn start(net: &mut Net, mem: &'a GuestMemoryMmap, features: u64) -> Self {
            net.ack_features(features);
            let rxq = mock_queue(mem, 256);
            let txq = mock_queue_at(mem, TXQ_ADDR, 256);
            let rx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let tx_evt = EventFd::new(EFD_NONBLOCK).unwrap();
            let irq = Arc::new(RecordingVirtioInterrupt::default());
            net.activate(ActivateArgs {
                mem: mem.clone(),
                queues: vec![
                    rxq.create_queue::<Queue>().unwrap(),
                    txq.create_queue::<Queue>().unwrap(),
                ],
                queue_evts: vec![rx_evt.try_clone().unwrap(), tx_evt.try_clone().unwrap()],
                interrupt: irq.clone(),
                spawner: Default::default(),
            })
            .unwrap();
            Self {
                mem,
                rxq,
                txq,
                rx_evt,
                tx_evt,
                irq,
            }
        }

        /// Queues `hdr` + `payload` on tx at descriptor `first` (header in its own
        /// buffer, payload in two) and notifies.
        fn send(&self, first: u16, hdr: &[u8; VNET_HDR_LEN], payload: &[u8]) {
            let base = DATA_ADDR + 0x40_0000 + u64::from(first) * 0x2_0000;
            self.mem.write_slice(hdr, GuestAddress(base)).unwrap();
            let half = payload.len() / 2;
            self.mem
                .write_slice(&payload[..half], GuestAddress(base + 0x100))
                .unwrap();
            self.mem
                .write_slice(&payload[half..], GuestAddress(base + 0x1_0000))
                .unwrap();
            add_chain(
                &self.txq,
                first,
                &[
                    Buf::read(base, VNET_HDR_LEN as u32),
                    Buf::read(base + 0x100, half as u32),
                    Buf::read(base + 0x1_0000, (payload.len() - half) as u32),
                ],
            );
            self.tx_evt.write(1).unwrap();
        }

        /// Posts an rx chain of one writable buffer per entry of `lens`.
        fn post_rx(&self, first: u16, lens: &[u32]) {
            let bufs: Vec<Buf> = lens
                .iter()
                .enumerate()
                .map(|(i, &l)| Buf::write(rx_addr(first + i as u16), l))
                .collect();
            add_chain(&self.rxq, first, &bufs);
            self.rx_evt.write(1).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    /// Where rx descriptor `i`'s buffer goes.
    fn rx_addr(i: u16) -> u64 {
        DATA_ADDR + u64::from(i) * 0x1000
    }

    fn stream_net() -> (Net, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(WAIT)).unwrap();
        let net = Net::with_backend(Box::new(Stream::new(a).unwrap()), Some(MAC)).unwrap();
        (net, b)
    }

    fn write_framed(peer: &mut UnixStream, frame: &[u8]) {
        peer.write_all(&(frame.len() as u32).to_be_bytes()).unwrap();
        peer.write_all(frame).unwrap();
    }

    fn read_framed(peer: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        peer.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        peer.read_exact(&mut f).unwrap();
        f
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    #[test]
    fn tx_frame_reaches_the_backend_without_header() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, 0);
        let payload = frame(1514, 1);
        rig.send(0, &[0xee; VNET_HDR_LEN], &payload);
        assert_eq!(read_framed(&mut peer), payload);
        assert!(wait_until(WAIT, || used_idx(&rig.txq) == 1));
        assert_eq!(used_elem(&rig.txq, 0), (0, 0));
        assert!(wait_until(WAIT, || rig.irq.count() >= 1));
        assert_eq!(
            rig.irq.status() & VIRTIO_MMIO_INT_VRING,
            VIRTIO_MMIO_INT_VRING
        );
        // Back to back frames keep their order.
        for i in 1..4u16 {
            rig.send(
                i * 3,
                &[0; VNET_HDR_LEN],
                &frame(60 + usize::from(i), i as u8),
            );
        }
        for i in 1..4u16 {
            assert_eq!(read_framed(&mut peer), frame(60 + usize::from(i), i as u8));
        }
        assert!(net.reset());
    }

    #[test]
    fn rx_frame_lands_with_header() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, 0);
        rig.post_rx(0, &[2048]);
        let payload = frame(100, 9);
        write_framed(&mut peer, &payload);
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 1));
        assert_eq!(used_elem(&rig.rxq, 0), (0, 112));
        let got = rig.read(rx_addr(0), 112);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[NUM_BUFFERS_OFFSET] = 1;
        assert_eq!(got[..VNET_HDR_LEN], hdr);
        assert_eq!(got[VNET_HDR_LEN..], payload[..]);
        assert!(wait_until(WAIT, || rig.irq.count() >= 1));
        // Without mergeable buffers a frame that does not fit is dropped, and the
        // next one that fits still arrives.
        rig.post_rx(1, &[200]);
        write_framed(&mut peer, &frame(500, 1));
        write_framed(&mut peer, &frame(150, 2));
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 2));
        assert_eq!(used_elem(&rig.rxq, 1), (1, 162));
        assert_eq!(rig.read(rx_addr(1) + 12, 150), frame(150, 2));
        assert!(net.reset());
    }

    #[test]
    fn rx_frame_spans_mergeable_buffers() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG);
        for i in 0..3 {
            rig.post_rx(i, &[1000]);
        }
        let payload = frame(2500, 3);
        write_framed(&mut peer, &payload);
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 3));
        assert_eq!(used_elem(&rig.rxq, 0), (0, 1000));
        assert_eq!(used_elem(&rig.rxq, 1), (1, 1000));
        assert_eq!(used_elem(&rig.rxq, 2), (2, 512));
        let mut got = rig.read(rx_addr(0), 1000);
        got.extend(rig.read(rx_addr(1), 1000));
        got.extend(rig.read(rx_addr(2), 512));
        assert_eq!(&got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &3u16.to_le_bytes());
        assert_eq!(got[..NUM_BUFFERS_OFFSET], [0; NUM_BUFFERS_OFFSET]);
        assert_eq!(got[VNET_HDR_LEN..], payload[..]);
        // A chain whose first buffer splits the header; a small frame takes one buffer.
        rig.post_rx(10, &[4, 3000]);
        write_framed(&mut peer, &frame(40, 4));
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 4));
        assert_eq!(used_elem(&rig.rxq, 3), (10, 52));
        let mut got = rig.read(rx_addr(10), 4);
        got.extend(rig.read(rx_addr(11), 48));
        assert_eq!(&got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &1u16.to_le_bytes());
        assert_eq!(got[VNET_HDR_LEN..], frame(40, 4)[..]);
        // A 64 KiB frame takes 16 of 17 4 KiB buffers; the last one stays posted.
        for i in 0..17 {
            rig.post_rx(20 + i, &[4096]);
        }
        let big = frame(65_000, 5);
        write_framed(&mut peer, &big);
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 20));
        let mut got = Vec::new();
        for i in 0..16u16 {
            let (id, len) = used_elem(&rig.rxq, 4 + i);
            assert_eq!(id, u32::from(20 + i));
            got.extend(rig.read(rx_addr(20 + i), len as usize));
        }
        assert_eq!(&got[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &16u16.to_le_bytes());
        assert_eq!(got[VNET_HDR_LEN..], big[..]);
        // The spare buffer takes the next frame.
        write_framed(&mut peer, &frame(10, 6));
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 21));
        assert_eq!(used_elem(&rig.rxq, 20), (36, 22));
        assert!(net.reset());
    }

    #[test]
    fn frames_wait_for_rx_buffers_without_spinning() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, 0);
        for i in 0..6u8 {
            write_framed(&mut peer, &frame(64, i));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(used_idx(&rig.rxq), 0);
        let w0 = net.worker_wakeups();
        std::thread::sleep(Duration::from_millis(300));
        assert!(net.worker_wakeups() <= w0 + 1, "the worker spins");
        for i in 0..6u16 {
            rig.post_rx(i, &[256]);
        }
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 6));
        for i in 0..6u16 {
            assert_eq!(used_elem(&rig.rxq, i), (u32::from(i), 76));
            assert_eq!(rig.read(rx_addr(i) + 12, 64), frame(64, i as u8));
        }
        assert!(net.reset());
    }

    #[test]
    fn hostile_tx_chains_are_dropped() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, 0);
        let q = &rig.txq;
        add_chain(q, 0, &[Buf::write(DATA_ADDR, 100)]);
        add_chain(q, 1, &[Buf::read(0x1000_0000, 100)]);
        add_chain(q, 2, &[Buf::read(DATA_ADDR, 70_000)]);
        add_chain(q, 3, &[Buf::read(DATA_ADDR, 8)]);
        add_chain(q, 4, &[Buf::read(u64::MAX - 4, 64)]);
        // A descriptor that chains to itself.
        let next = VRING_DESC_F_NEXT as u16;
        q.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                DATA_ADDR, 1000, next, 5,
            ))],
            5,
        )
        .unwrap();
        // And one whose next index is out of the table.
        add_chain(q, 6, &[Buf::read(DATA_ADDR, 20), Buf::read(DATA_ADDR, 20)]);
        let mut d = RawDescriptor::from(SplitDescriptor::new(DATA_ADDR, 2, next, 999));
        q.desc_table().store(7, d).unwrap();
        d = RawDescriptor::from(SplitDescriptor::new(DATA_ADDR, 6, 0, 0));
        q.desc_table().store(8, d).unwrap();
        rig.tx_evt.write(1).unwrap();
        assert!(wait_until(WAIT, || used_idx(q) == 7));
        for i in 0..7u16 {
            assert_eq!(used_elem(q, i).1, 0);
        }
        // The worker is alive, and the only frame to arrive is a good one.
        rig.send(10, &[0; VNET_HDR_LEN], b"good frame");
        assert_eq!(read_framed(&mut peer), b"good frame");
        assert!(net.reset());
    }

    #[test]
    fn hostile_rx_chains_are_returned_unused() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG);
        let q = &rig.rxq;
        add_chain(q, 0, &[Buf::read(rx_addr(0), 2048)]);
        add_chain(q, 1, &[Buf::write(0x1000_0000, 2048)]);
        add_chain(q, 2, &[Buf::write(rx_addr(2), 0)]);
        add_chain(q, 3, &[Buf::write(MEM_SIZE as u64 - 8, 64)]);
        let flags = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16;
        q.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                rx_addr(4),
                64,
                flags,
                4,
            ))],
            4,
        )
        .unwrap();
        add_chain(q, 5, &[Buf::write(rx_addr(5), 2048)]);
        rig.rx_evt.write(1).unwrap();
        write_framed(&mut peer, &frame(300, 7));
        assert!(wait_until(WAIT, || used_idx(q) == 6));
        for i in 0..5u16 {
            assert_eq!(used_elem(q, i), (u32::from(i), 0));
        }
        assert_eq!(used_elem(q, 5), (5, 312));
        assert_eq!(rig.read(rx_addr(5) + 12, 300), frame(300, 7));
        // A bogus avail index must not hang or spin the worker.
        q.avail().idx().store(1000);
        rig.rx_evt.write(1).unwrap();
        write_framed(&mut peer, &frame(300, 8));
        std::thread::sleep(Duration::from_millis(50));
        assert!(net.reset());
    }

    #[test]
    fn reset_keeps_the_backend() {
        let (mut net, mut peer) = stream_net();
        let mem = guest_memory(MEM_SIZE);
        {
            let _rig = Rig::start(&mut net, &mem, 0);
        }
        assert!(net.reset());
        assert!(net.reset(), "reset of an idle device");
        let rig = Rig::start(&mut net, &mem, 0);
        rig.send(0, &[0; VNET_HDR_LEN], b"after reset");
        assert_eq!(read_framed(&mut peer), b"after reset");
        // Activating twice is refused.
        let again = net.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![],
            queue_evts: vec![],
            interrupt: rig.irq.clone(),
            spawner: Default::default(),
        });
        assert!(again.is_err());
        assert!(net.reset());
        // Missing queues are an error, and the backend survives it.
        let r = net.activate(ActivateArgs {
            mem: mem.clone(),
            queues: vec![mock_queue(&mem, 16).create_queue::<Queue>().unwrap()],
            queue_evts: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: rig.irq.clone(),
            spawner: Default::default(),
        });
        assert!(r.is_err());
        assert!(net.backend.is_some());
    }

    #[test]
    fn mac_and_features() {
        let (net, _peer) = stream_net();
        assert_eq!(net.mac(), MAC);
        let f = net.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_RING_F_EVENT_IDX,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        // A header-less backend gets no offloads.
        assert_eq!(
            f & ((1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM)),
            0
        );
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c[..6], MAC);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        let mut past = [0xffu8; 4];
        net.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
        let (a, _b) = UnixStream::pair().unwrap();
        let random = Net::with_backend(Box::new(Stream::new(a).unwrap()), None).unwrap();
        let m = random.mac();
        assert_eq!(m[0] & 3, 2, "unicast, locally administered");
        let (a, _b) = UnixStream::pair().unwrap();
        let e = Net::with_backend(Box::new(Stream::new(a).unwrap()), Some([1, 0, 0, 0, 0, 1]));
        assert!(matches!(e, Err(Error::MulticastMac(_))));
    }

    /// A backend carrying a vnet header over a datagram socketpair, as TAP does.
    struct HdrBackend(UnixDatagram);

    impl Backend for HdrBackend {
        fn name(&self) -> &'static str {
            "test-hdr"
        }
        fn vnet_hdr_len(&self) -> usize {
            VNET_HDR_LEN
        }
        fn offload_features(&self) -> u64 {
            (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_GUEST_CSUM)
        }
        fn send(&mut self, frame: &[u8]) -> std::io::Result<bool> {
            self.0.send(frame).map(|_| true)
        }
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
            match self.0.recv(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            }
        }
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    #[test]
    fn header_backends_see_the_guest_header() {
        let (a, peer) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let mut net = Net::with_backend(Box::new(HdrBackend(a)), Some(MAC)).unwrap();
        assert_ne!(net.features() & (1 << VIRTIO_NET_F_CSUM), 0);
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG | (1 << VIRTIO_NET_F_CSUM));
        let hdr: [u8; VNET_HDR_LEN] = [1, 0, 0, 0, 0, 0, 14, 0, 16, 0, 0, 0];
        rig.send(0, &hdr, &frame(80, 1));
        let mut buf = [0u8; 200];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(buf[..VNET_HDR_LEN], hdr);
        assert_eq!(buf[VNET_HDR_LEN..n], frame(80, 1)[..]);
        // Received: the backend's header is kept, num_buffers is ours.
        rig.post_rx(0, &[1024]);
        let mut wire = vec![2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb];
        wire.extend(frame(60, 2));
        peer.send(&wire).unwrap();
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 1));
        assert_eq!(used_elem(&rig.rxq, 0), (0, 72));
        let got = rig.read(rx_addr(0), 72);
        assert_eq!(got[..10], wire[..10]);
        assert_eq!(got[10..12], 1u16.to_le_bytes());
        assert_eq!(got[12..], wire[12..]);
        assert!(net.reset());
    }

    #[test]
    fn unix_datagram_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gvproxy.sock");
        let peer = UnixDatagram::bind(&path).unwrap();
        peer.set_read_timeout(Some(WAIT)).unwrap();
        let e = Net::new(NetConfig {
            backend: BackendConfig::UnixDgram {
                path: dir.path().join("missing.sock"),
            },
            mac: None,
        });
        assert!(e.err().unwrap().to_string().contains("missing.sock"));
        let mut net = Net::new(NetConfig {
            backend: BackendConfig::UnixDgram { path: path.clone() },
            mac: Some(MAC),
        })
        .unwrap();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG);
        rig.send(0, &[0x11; VNET_HDR_LEN], &frame(1500, 3));
        let mut buf = vec![0u8; 4096];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(buf[..n], frame(1500, 3)[..]);
        rig.post_rx(0, &[2048]);
        peer.send_to_addr(&frame(99, 4), &from).unwrap();
        assert!(wait_until(WAIT, || used_idx(&rig.rxq) == 1));
        assert_eq!(used_elem(&rig.rxq, 0), (0, 111));
        assert_eq!(rig.read(rx_addr(0) + 12, 99), frame(99, 4));
        assert!(net.reset());
        let local = from.as_pathname().unwrap().to_path_buf();
        drop(net);
        assert!(!local.exists(), "the local socket is removed");
    }

    #[test]
    fn through_the_mmio_transport() {
        let (net, mut peer) = stream_net();
        let features = net.features();
        let mem = guest_memory(MEM_SIZE);
        let rxq = mock_queue(&mem, 256);
        let txq = mock_queue_at(&mem, TXQ_ADDR, 256);
        let irq = Arc::new(RecordingInterrupt::default());
        let mut t = MmioTransport::new(Box::new(net), mem.clone(), irq.clone(), Default::default()).unwrap();
        assert_eq!(read32(&mut t, 0x08), VIRTIO_ID_NET);
        let lo = read32(&mut t, CONFIG_SPACE_OFFSET).to_le_bytes();
        let hi = read32(&mut t, CONFIG_SPACE_OFFSET + 4).to_le_bytes();
        assert_eq!([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]], MAC);
        assert_eq!(u16::from_le_bytes([hi[2], hi[3]]), 1);
        assert_eq!(mmio_init(&mut t, features, &[&rxq, &txq]), 0xf);
        mem.write_slice(&[0u8; 12], GuestAddress(DATA_ADDR))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(DATA_ADDR + 12))
            .unwrap();
        add_chain(&txq, 0, &[Buf::read(DATA_ADDR, 17)]);
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
        assert_eq!(read_framed(&mut peer), b"hello");
        add_chain(&rxq, 0, &[Buf::write(DATA_ADDR + 0x1000, 1526)]);
        write32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        write_framed(&mut peer, b"world");
        assert!(wait_until(WAIT, || used_idx(&rxq) == 1));
        assert!(wait_until(WAIT, || irq.count() >= 1));
        let mut got = [0u8; 17];
        mem.read_slice(&mut got, GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        assert_eq!(&got[12..], b"world");
        write32(&mut t, 0x70, 0);
        assert!(!t.is_activated());
    }

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        l.local_addr().unwrap().port()
    }

    fn process_alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            // passt re-executes itself as passt.avx2 where it can.
            .map(|s| s.contains("(passt") && !s.contains(") Z "))
            .unwrap_or(false)
    }

    #[test]
    fn passt_starts_and_stops_with_the_device() {
        let port = free_port();
        let mut net = Net::new(NetConfig {
            backend: BackendConfig::Passt {
                forwards: vec![PortForward {
                    host_port: port,
                    guest_port: 8080,
                    udp: false,
                }],
            },
            mac: None,
        })
        .unwrap();
        let pid = net.backend_pid().unwrap();
        assert!(process_alive(pid));
        // passt listens on the forwarded port, on 127.0.0.1.
        assert!(wait_until(WAIT, || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()));
        let mem = guest_memory(MEM_SIZE);
        {
            let _rig = Rig::start(&mut net, &mem, MRG);
        }
        assert!(net.reset());
        assert_eq!(net.backend_pid(), Some(pid));
        assert!(process_alive(pid), "passt survives a device reset");
        drop(net);
        assert!(
            !process_alive(pid),
            "passt is killed and reaped with the device"
        );
    }

    #[test]
    fn passt_exit_takes_the_link_down() {
        let mut net = Net::new(NetConfig {
            backend: BackendConfig::Passt { forwards: vec![] },
            mac: None,
        })
        .unwrap();
        let pid = net.backend_pid().unwrap();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG);
        // SAFETY: signalling our own child, which has not been reaped (the monitor
        // thread only reaps it after it exits).
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        assert!(wait_until(WAIT, || !net.link_up()));
        assert!(wait_until(WAIT, || rig.irq.status()
            & VIRTIO_MMIO_INT_CONFIG
            != 0));
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c[6..8], [0, 0]);
        // Frames the guest sends now are dropped and returned.
        rig.send(0, &[0; VNET_HDR_LEN], b"into the void");
        assert!(wait_until(WAIT, || used_idx(&rig.txq) == 1));
        assert!(net.reset());
    }

    #[test]
    fn passt_port_in_use() {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let e = Net::new(NetConfig {
            backend: BackendConfig::Passt {
                forwards: vec![PortForward {
                    host_port: port,
                    guest_port: 22,
                    udp: false,
                }],
            },
            mac: None,
        })
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            format!("port {port} (tcp) is already in use on 127.0.0.1")
        );
    }

    /// Internet checksum of an IPv4 header.
    fn ip_checksum(h: &[u8]) -> u16 {
        let mut sum: u32 = h
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A broadcast DHCPDISCOVER from `mac` with transaction id `xid`.
    fn dhcp_discover(mac: [u8; 6], xid: [u8; 4]) -> Vec<u8> {
        let mut bootp = vec![0u8; 236];
        bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
        bootp[4..8].copy_from_slice(&xid);
        bootp[10] = 0x80; // broadcast flag
        bootp[28..34].copy_from_slice(&mac);
        bootp.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
        bootp.extend_from_slice(&[53, 1, 1]); // DHCPDISCOVER
        bootp.extend_from_slice(&[55, 3, 1, 3, 6]); // ask for mask, router, DNS
        bootp.push(255);
        bootp.resize(300, 0);
        let udp_len = 8 + bootp.len();
        let mut udp = Vec::new();
        udp.extend_from_slice(&68u16.to_be_bytes());
        udp.extend_from_slice(&67u16.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
        udp.extend(bootp);
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255,
        ];
        ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        let c = ip_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend(ip);
        f.extend(udp);
        f
    }

    /// The DHCP message type if `f` is a DHCP reply for `xid`.
    fn dhcp_reply_type(f: &[u8], xid: [u8; 4]) -> Option<u8> {
        if f.get(12..14)? != [0x08, 0x00] || *f.get(23)? != 17 {
            return None;
        }
        let ihl = usize::from(f.get(14)? & 0xf) * 4;
        let udp = 14 + ihl;
        if f.get(udp..udp + 4)? != [0, 67, 0, 68] {
            return None;
        }
        let bootp = f.get(udp + 8..)?;
        if bootp.first()? != &2
            || bootp.get(4..8)? != xid
            || bootp.get(236..240)? != [99, 130, 83, 99]
        {
            return None;
        }
        let mut opts = bootp.get(240..)?;
        while let [code, rest @ ..] = opts {
            match *code {
                255 => return None,
                0 => opts = rest,
                _ => {
                    let len = usize::from(*rest.first()?);
                    if *code == 53 {
                        return rest.get(1).copied();
                    }
                    opts = rest.get(1 + len..)?;
                }
            }
        }
        None
    }

    #[test]
    fn passt_answers_dhcp() {
        let mut net = Net::new(NetConfig {
            backend: BackendConfig::Passt { forwards: vec![] },
            mac: Some(MAC),
        })
        .unwrap();
        let mem = guest_memory(MEM_SIZE);
        let rig = Rig::start(&mut net, &mem, MRG);
        for i in 0..32u16 {
            rig.post_rx(i, &[4096]);
        }
        let xid = [0xa1, 0x7e, 0x55, 0x01];
        let discover = dhcp_discover(MAC, xid);
        rig.send(0, &[0; VNET_HDR_LEN], &discover);
        let mut seen = 0;
        let offered = wait_until(Duration::from_secs(10), || {
            while seen < used_idx(&rig.rxq) {
                let (id, len) = used_elem(&rig.rxq, seen);
                seen += 1;
                let f = rig.read(rx_addr(id as u16), len as usize);
                assert_eq!(&f[NUM_BUFFERS_OFFSET..VNET_HDR_LEN], &1u16.to_le_bytes());
                if dhcp_reply_type(&f[VNET_HDR_LEN..], xid) == Some(2) {
                    return true;
                }
            }
            false
        });
        assert!(offered, "no DHCPOFFER from passt");
        assert!(net.reset());
    }
}
