//! Device worker threads: where they start ([`Spawner`]), and the worker of a
//! single queue.
//!
//! [`spawn_queue_worker`] starts a thread that waits on the queue's notification
//! `EventFd` and its stop event, and calls the device's `process` closure once at
//! start (buffers posted before activation) and on every notification; stopping
//! its [`Workers`] joins it, so the device can be reset and activated again. The
//! loop itself, [`run_worker`] over an epoll set from [`worker_epoll`], also
//! serves devices with a worker per queue (virtio-fs).
//!
//! Every device worker thread (blk, rng, fs, net, vsock) starts through the
//! [`Spawner`] its transport hands it with the activation arguments. A device is
//! activated by a guest register write, on a vCPU thread, and a thread inherits
//! its parent's seccomp filter; so the VMM routes its spawner ([`Spawner::route`])
//! to a thread of its own, which carries the device filter rather than the vCPU
//! one. Until then (and in tests) workers start from the calling thread.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use log::error;

use super::event_loop;
use super::Workers;
use crate::sys::{ControlOperation, Epoll, EpollEvent, EventFd, EventSet};

/// Epoll token of the queue's notification `EventFd`.
const PROCESS_QUEUE: u64 = 0;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating the kill `EventFd` or the epoll set failed.
    #[error("setting up the worker's events: {0}")]
    Event(#[source] io::Error),
    /// The thread could not be started.
    #[error("starting the worker thread: {0}")]
    Spawn(#[source] io::Error),
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

/// Starts thread `thread` of device `device` serving `queue_evt` with `process`
/// (see [`run_worker`]).
pub fn spawn_queue_worker(
    spawner: &Spawner,
    device: &'static str,
    thread: &'static str,
    queue_evt: EventFd,
    mut process: impl FnMut() + Send + 'static,
) -> Result<Workers<()>, Error> {
    let mut workers = Workers::new(device).map_err(Error::Event)?;
    let epoll = worker_epoll(&queue_evt, workers.stop_event()).map_err(Error::Event)?;
    workers
        .spawn(spawner, thread, move || run_worker(thread, &epoll, &queue_evt, &mut process))
        .map_err(Error::Spawn)?;
    Ok(workers)
}

/// The epoll set of a worker: `queue_evt` (a notification) and `kill` (stop).
pub fn worker_epoll(queue_evt: &EventFd, kill: &EventFd) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        queue_evt.as_raw_fd(),
        EpollEvent::new(EventSet::IN, PROCESS_QUEUE),
    )?;
    event_loop::add_stop(&epoll, kill)?;
    Ok(epoll)
}

/// One queue's worker, as the event loop drives it.
struct QueueHandler<'a> {
    epoll: &'a Epoll,
    queue_evt: &'a EventFd,
    process: &'a mut dyn FnMut(),
    notified: bool,
}

impl event_loop::EventHandler for QueueHandler<'_> {
    fn epoll(&self) -> &Epoll {
        self.epoll
    }

    fn handle(&mut self, _token: u64, _events: EventSet) {
        // A notification count of zero (EAGAIN) is harmless: process anyway.
        let _ = self.queue_evt.read();
        self.notified = true;
    }

    fn after_wake(&mut self) {
        if std::mem::take(&mut self.notified) {
            (self.process)();
        }
    }
}

/// A worker thread's loop over an epoll set from [`worker_epoll`]: `process` once at
/// start (buffers posted before the worker started), then after every notification,
/// until the kill `EventFd` is readable (see [`event_loop::run`]: the kill wins over
/// a notification in the same wake).
pub fn run_worker(name: &str, epoll: &Epoll, queue_evt: &EventFd, process: &mut dyn FnMut()) {
    let mut handler = QueueHandler {
        epoll,
        queue_evt,
        process,
        notified: true,
    };
    if let Err(e) = event_loop::run(&mut handler, 2) {
        error!("{name}: epoll_wait failed, worker exits: {e}");
    }
}
