//! What every virtio device shares: [`VirtioCommon`] (its identity, queue sizes,
//! features and configuration space, behind the provided methods of
//! [`VirtioDevice`](super::VirtioDevice)) and [`Workers`] (its worker threads
//! and the one stop event they share).
//!
//! Every device worker thread (blk, rng, fs, net, vsock) starts through the
//! [`Spawner`] its transport hands it with the activation arguments. A device is
//! activated by a guest register write, on a vCPU thread, and a thread inherits
//! its parent's seccomp filter; so the VMM routes its spawner ([`Spawner::route`])
//! to a thread of its own, which carries the device filter rather than the vCPU
//! one. Until then (and in tests) workers start from the calling thread.

use std::io;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use log::error;

use crate::sys::{EventFd, EFD_NONBLOCK};

/// A device's identity, queues, features and configuration space.
#[derive(Debug)]
pub struct VirtioCommon {
    name: &'static str,
    device_type: u32,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    config: Vec<u8>,
}

impl VirtioCommon {
    /// A device called `name` in logs ("virtio-net"), of virtio type
    /// `device_type`, with one queue per entry of `queue_sizes` (each its
    /// maximum size), offering `avail_features`, with a read-only `config` space.
    pub fn new(
        name: &'static str,
        device_type: u32,
        queue_sizes: Vec<u16>,
        avail_features: u64,
        config: Vec<u8>,
    ) -> Self {
        Self {
            name,
            device_type,
            queue_sizes,
            avail_features,
            acked_features: 0,
            config,
        }
    }

    /// The name logs use.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Each queue's maximum size.
    pub fn queue_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// The features offered.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// The features the driver accepted (never more than offered).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Records what the driver accepted, cut to what was offered.
    pub fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Forgets the driver's features (device reset).
    pub fn reset_features(&mut self) {
        self.acked_features = 0;
    }

    /// The configuration space, for a device that changes it (the transport
    /// reads it on every access).
    pub fn config_mut(&mut self) -> &mut [u8] {
        &mut self.config
    }

    /// Reads the configuration space at `offset`; bytes past its end read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
}

/// Copies `config` from `offset` into `data`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|start| config.get(start..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A job for a routed spawner: the thread's name and what it runs.
pub type WorkerJob = (String, Box<dyn FnOnce() + Send>);
/// Starts a worker thread for a job (see [`Spawner::route`]).
pub type WorkerSpawner = dyn Fn(WorkerJob) -> io::Result<JoinHandle<()>> + Send + Sync;

/// Where a VM's device workers start: a handle the VMM shares with every
/// transport, which passes it to its device on activation. Clones share the
/// route.
#[derive(Clone, Default)]
pub struct Spawner(Arc<RwLock<Option<Arc<WorkerSpawner>>>>);

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routed = self.0.read().map(|s| s.is_some()).unwrap_or(true);
        f.debug_struct("Spawner").field("routed", &routed).finish()
    }
}

impl Spawner {
    /// Makes every later [`Spawner::spawn`] through this handle (and its
    /// clones) start its thread through `spawner`.
    pub fn route(&self, spawner: Arc<WorkerSpawner>) {
        match self.0.write() {
            Ok(mut s) => *s = Some(spawner),
            Err(p) => *p.into_inner() = Some(spawner),
        }
    }

    /// Starts device worker thread `name` running `f`, through the route if
    /// there is one, else from the calling thread.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: impl Into<String>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<WorkerHandle<T>> {
        let name = name.into();
        let result = Arc::new(Mutex::new(None));
        let slot = result.clone();
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let r = f();
            match slot.lock() {
                Ok(mut s) => *s = Some(r),
                Err(p) => *p.into_inner() = Some(r),
            }
        });
        let route = match self.0.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let handle = match route {
            Some(spawn) => spawn((name, job))?,
            None => std::thread::Builder::new().name(name).spawn(job)?,
        };
        Ok(WorkerHandle { handle, result })
    }
}

/// A device worker thread started by [`Spawner::spawn`]; `join` gives what it returned.
#[derive(Debug)]
pub struct WorkerHandle<T> {
    handle: JoinHandle<()>,
    result: Arc<Mutex<Option<T>>>,
}

impl<T> WorkerHandle<T> {
    /// Waits for the thread; `Err` if it panicked.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join()?;
        let taken = match self.result.lock() {
            Ok(mut r) => r.take(),
            Err(p) => p.into_inner().take(),
        };
        taken.ok_or_else(|| Box::new("the worker left no result") as Box<dyn std::any::Any + Send>)
    }
}

/// A device's running workers: their threads, and the one stop event (see
/// [`super::event_loop::add_stop`]) that ends them all.
#[derive(Debug)]
pub struct Workers<T> {
    name: &'static str,
    stop: EventFd,
    handles: Vec<WorkerHandle<T>>,
}

impl<T: Send + 'static> Workers<T> {
    /// No workers yet, and their stop event; `name` is the device's, for logs.
    pub fn new(name: &'static str) -> io::Result<Self> {
        Ok(Self {
            name,
            stop: EventFd::new(EFD_NONBLOCK)?,
            handles: Vec::new(),
        })
    }

    /// The stop event, to add to each worker's epoll set.
    pub fn stop_event(&self) -> &EventFd {
        &self.stop
    }

    /// Starts worker thread `thread` through `spawner`.
    pub fn spawn(
        &mut self,
        spawner: &Spawner,
        thread: impl Into<String>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<()> {
        self.handles.push(spawner.spawn(thread, f)?);
        Ok(())
    }

    /// Stops every worker and waits for it: what each returned, in start order,
    /// `None` for one that panicked.
    pub fn stop(self) -> Vec<Option<T>> {
        if let Err(e) = self.stop.write(1) {
            error!("{}: signalling the workers to stop failed: {e}", self.name);
        }
        self.handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(r) => Some(r),
                Err(_) => {
                    error!("{}: a worker thread panicked", self.name);
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn features_are_cut_to_the_offer_and_reset() {
        let mut c = VirtioCommon::new("virtio-x", 9, vec![8, 8], 0b1010, vec![1, 2, 3]);
        c.ack_features(0b1111);
        assert_eq!(c.acked_features(), 0b1010);
        c.reset_features();
        assert_eq!(c.acked_features(), 0);
        assert_eq!((c.name(), c.device_type(), c.queue_sizes()), ("virtio-x", 9, &[8, 8][..]));
    }

    #[test]
    fn config_reads_any_width_and_zero_past_the_end() {
        let c = VirtioCommon::new("virtio-x", 9, vec![8], 0, vec![1, 2, 3]);
        let mut d = [0xff; 4];
        c.read_config(1, &mut d);
        assert_eq!(d, [2, 3, 0, 0]);
        c.read_config(3, &mut d);
        assert_eq!(d, [0; 4]);
        c.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn stop_ends_every_worker_and_hands_back_their_results() {
        let mut w = Workers::new("virtio-x").unwrap();
        let spawner = Spawner::default();
        for i in 0..3u32 {
            let stop = w.stop_event().try_clone().unwrap();
            w.spawn(&spawner, format!("w{i}"), move || {
                // Wait for the stop event (never read, so all three see it).
                let epoll = crate::sys::Epoll::new().unwrap();
                super::super::event_loop::add_stop(&epoll, &stop).unwrap();
                let mut ev = [crate::sys::EpollEvent::default(); 1];
                while epoll.wait(-1, &mut ev).unwrap_or(0) == 0 {}
                i * 10
            })
            .unwrap();
        }
        assert_eq!(w.stop(), vec![Some(0), Some(10), Some(20)]);
    }
}
