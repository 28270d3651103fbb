//! FUSE operations per second through virtio-fs's request path, with no guest.
//!
//! Each request is written into guest memory as a real driver would: a readable
//! descriptor with the FUSE request and a writable one for the reply, published
//! on a split queue. The device side is the worker body itself,
//! `fs::worker::QueueWorker::process_queue` (pop, `handle_chain`, the FUSE server,
//! `ShareFs` over `PassthroughFs`, add_used), run synchronously on this thread
//! against a temporary directory. One request per wake, so every figure includes
//! the per-notification queue work a guest with queue depth 1 causes.
//!
//! It compares with fuse-backend-rs's server, which is Linux-only (a Linux-only
//! dev-dependency): elsewhere the bench is empty.
#![allow(clippy::unwrap_used)]

#[cfg(target_os = "linux")]
mod common;
#[cfg(target_os = "linux")]
include!("fs/linux.rs");

#[cfg(not(target_os = "linux"))]
fn main() {}
