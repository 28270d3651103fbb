//! Building and running a VM: memory, kernel, devices, vCPU threads.
//!
//! [`Vmm::build`] lays out guest RAM and maps it, loads the kernel and initrd,
//! attaches the devices to the port and MMIO buses (with their irqfds and
//! ioeventfds), writes the ACPI tables and boot parameters, and creates the vCPUs.
//! [`Vmm::run`] starts one thread per vCPU and waits for the first exit: a guest
//! power-off or reset, or a vCPU failure.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use aivmm_devices::bus::Bus;
use aivmm_devices::legacy::{
    acpi_pm::AcpiPm, boot_timer::BootTimer, ged::Ged, i8042::I8042, serial::Serial, ExitHandler,
};
use aivmm_devices::virtio::mmio::MmioTransport;
use aivmm_devices::virtio::Spawner;
use aivmm_devices::{EventFdInterrupt, ExitReason, Interrupt};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{acpi, boot, layout, regs};
use crate::config::VmConfig;
use crate::devices_setup::virtio_devices;
use crate::hypervisor::{self, Hypervisor, IoEventAddress, Vcpu, VcpuExit, Vm};

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size} bytes of guest memory: {reason}")]
    Memory {
        /// Size asked for.
        size: u64,
        /// Why.
        reason: String,
    },
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// vCPU set-up failed.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// The ACPI tables could not be written.
    #[error("building ACPI tables: {0}")]
    Acpi(String),
    /// A device could not be created or attached.
    #[error("device {name}: {reason}")]
    Device {
        /// The device.
        name: String,
        /// Why.
        reason: String,
    },
    /// There are more virtio devices than free IRQs.
    #[error("too many devices: no interrupt line left")]
    OutOfIrqs,
    /// A virtio device could not be created.
    #[error(transparent)]
    Devices(#[from] crate::devices_setup::Error),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    /// The user-mode network's thread could not take its seccomp filter.
    #[error("the user-mode network: {0}")]
    UserNet(std::io::Error),
    /// The guest kernel panicked (seen on its serial console) and then reset or stopped.
    #[error("guest kernel panic: {0}")]
    GuestPanic(String),
    /// A vCPU stopped on an error.
    #[error("vCPU {id}: {reason}")]
    Vcpu {
        /// The vCPU.
        id: u32,
        /// What happened.
        reason: String,
    },
}

/// `Result` of VM operations.
pub type Result<T> = std::result::Result<T, Error>;

pub use crate::machine::VmExit;

/// Where console output and the VM's exit go.
type ExitSender = mpsc::Sender<std::result::Result<VmExit, Error>>;

/// A built VM, ready to run.
pub struct Vmm {
    _vm: Box<dyn Vm>,
    mem: GuestMemoryMmap,
    vcpus: Vec<Box<dyn Vcpu>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    /// The ACPI Generic Event Device: the guest's power button.
    ged: Arc<Mutex<Ged>>,
    exit_tx: ExitSender,
    exit_rx: mpsc::Receiver<std::result::Result<VmExit, Error>>,
    /// Set once the guest asked to stop: vCPUs run no more guest code after it.
    stopping: Arc<AtomicBool>,
    started: Instant,
    /// The seccomp filters, unless `--seccomp=off`.
    seccomp: Option<Arc<crate::seccomp::Filters>>,
    /// What the device workers may reach (Landlock), unless `--landlock=off`.
    landlock: Option<crate::landlock::Rules>,
    /// Where the devices start their workers (routed in [`Vmm::run`]).
    spawner: Spawner,
    /// The memory balloon's handle (for the control socket).
    balloon: Option<aivmm_devices::virtio::balloon::BalloonHandle>,
    /// The first kernel panic line the guest printed on its console, and when.
    panic_line: Arc<Mutex<Option<(String, Instant)>>>,
}

/// What a Linux guest prints when it panics.
const PANIC_MARKER: &str = "Kernel panic - not syncing";

/// How long a guest that panicked may go on (printing its backtrace, resetting)
/// before aivmm stops it: a guest with `panic=0`, or whose reset never arrives,
/// would otherwise hang for ever.
const PANIC_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The serial console's output: passed on unchanged, and scanned line by line for
/// a guest kernel panic, whose line is kept (the guest then resets: `panic=-1`).
struct PanicWatch {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    found: Arc<Mutex<Option<(String, Instant)>>>,
}

impl PanicWatch {
    /// Longest console line kept for the check.
    const MAX_LINE: usize = 512;

    fn scan(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < Self::MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        if let Some(at) = text.find(PANIC_MARKER) {
            if let Ok(mut found) = self.found.lock() {
                if found.is_none() {
                    // Shown to the user: the guest's control characters escaped.
                    let shown: String = text[at..]
                        .trim_end()
                        .chars()
                        .flat_map(|c| {
                            let plain = !c.is_control();
                            c.escape_default()
                                .take(if plain { 0 } else { usize::MAX })
                                .chain(plain.then_some(c))
                        })
                        .collect();
                    *found = Some((shown, Instant::now()));
                }
            }
        }
        self.line.clear();
    }
}

impl Write for PanicWatch {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(data)?;
        self.scan(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

fn device_err(name: &str, e: impl std::fmt::Display) -> Error {
    Error::Device {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

fn irqfd(vm: &dyn Vm, gsi: u32, name: &str) -> Result<Arc<dyn Interrupt>> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| device_err(name, e))?;
    vm.register_irqfd(&evt, gsi)?;
    Ok(Arc::new(EventFdInterrupt(evt)))
}

impl Vmm {
    /// Builds the VM described by `config` on `hv`. `started` is the moment the
    /// process began, for the boot timer; `console` receives the serial output.
    pub fn build(
        hv: &dyn Hypervisor,
        config: &VmConfig,
        started: Instant,
        console: Box<dyn Write + Send>,
    ) -> Result<Self> {
        config.validate()?;
        let mut phase = Phases::new(started);
        let seccomp = match config.seccomp {
            crate::seccomp::SeccompMode::On => Some(Arc::new(crate::seccomp::Filters::build()?)),
            crate::seccomp::SeccompMode::Off => None,
        };
        phase.done("seccomp filters");
        let vm = hv.create_vm()?;
        vm.create_irq_controller()?;
        phase.done("VM and interrupt controller");

        let mem = allocate_guest_memory(&boot::ram_ranges(config.memory))
            .map_err(|reason| Error::Memory { size: config.memory, reason })?;
        for (slot, region) in mem.iter().enumerate() {
            // SAFETY: the region belongs to `mem`, which the Vmm keeps alive for as
            // long as the VM (and its vCPUs) exist.
            unsafe {
                vm.map_memory(
                    slot as u32,
                    region.start_addr().0,
                    region.len(),
                    region.as_ptr() as u64,
                )?;
            }
        }

        phase.done("guest memory");
        // The initrd's place depends on the kernel's header only, so a second thread
        // copies it while the kernel loads (under nested virtualization the two take
        // ~55 and ~115 ms).
        let plan = config
            .initrd
            .as_deref()
            .map(|p| boot::plan_initrd(&mem, &config.kernel, p))
            .transpose()?;
        let (kernel, copied) = thread::scope(|s| {
            let copier = plan.as_ref().map(|p| s.spawn(|| boot::copy_initrd(&mem, p)));
            let kernel =
                boot::load_kernel_cached(&mem, &config.kernel, config.kernel_cache.as_deref());
            let copied = copier.map_or(Ok(()), |t| {
                t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
            (kernel, copied)
        });
        let kernel = kernel?;
        copied?;
        let initrd = plan.map(|p| boot::check_initrd(&kernel, &p)).transpose()?;
        phase.done("kernel and initrd");

        let (exit_tx, exit_rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let on_exit: ExitHandler = {
            let tx = Mutex::new(exit_tx.clone());
            let stopping = stopping.clone();
            Arc::new(move |r: ExitReason| {
                stopping.store(true, Ordering::SeqCst);
                let exit = match r {
                    ExitReason::PowerOff => VmExit::PowerOff,
                    ExitReason::Reset => VmExit::Reset,
                };
                let _ = tx.lock().map(|t| t.send(Ok(exit)));
            })
        };

        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let panic_line = Arc::new(Mutex::new(None));
        let console = Box::new(PanicWatch {
            out: console,
            line: Vec::new(),
            found: panic_line.clone(),
        });
        let serial = Arc::new(Mutex::new(Serial::new(
            irqfd(&*vm, layout::SERIAL_IRQ, "serial")?,
            console,
        )));
        io_bus
            .insert(serial.clone(), layout::SERIAL_PORT, 8)
            .map_err(|e| device_err("serial", e))?;
        io_bus
            .insert(
                Arc::new(Mutex::new(I8042::new(on_exit.clone()))),
                layout::I8042_PORT,
                5,
            )
            .map_err(|e| device_err("i8042", e))?;
        io_bus
            .insert(
                Arc::new(Mutex::new(AcpiPm::new(on_exit))),
                layout::ACPI_PM_PORT,
                layout::ACPI_PM_LEN,
            )
            .map_err(|e| device_err("acpi-pm", e))?;
        let ged = Arc::new(Mutex::new(Ged::new(irqfd(&*vm, layout::GED_IRQ, "ged")?)));
        io_bus
            .insert(ged.clone(), layout::GED_PORT, layout::GED_LEN)
            .map_err(|e| device_err("ged", e))?;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(BootTimer::new(started))),
                layout::BOOT_TIMER_ADDR,
                layout::BOOT_TIMER_SIZE,
            )
            .map_err(|e| device_err("boot-timer", e))?;

        let virtio = virtio_devices(config)?;
        let balloon = virtio.balloon;
        let spawner = Spawner::default();
        let mut placed = Vec::new();
        for (i, (name, dev)) in virtio.list.into_iter().enumerate() {
            let name = name.as_str();
            let addr = layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE;
            let irq = layout::VIRTIO_IRQ_START + i as u32;
            if irq > layout::VIRTIO_IRQ_MAX {
                return Err(Error::OutOfIrqs);
            }
            let transport = MmioTransport::new(dev, mem.clone(), irqfd(&*vm, irq, name)?, spawner.clone())
                .map_err(|e| device_err(name, e))?;
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm.register_ioevent(
                    evt,
                    IoEventAddress::Mmio(addr + aivmm_devices::virtio::mmio::QUEUE_NOTIFY_OFFSET),
                    Some(q as u32),
                )?;
            }
            mmio_bus
                .insert(
                    Arc::new(Mutex::new(transport)),
                    addr,
                    layout::VIRTIO_MMIO_SIZE,
                )
                .map_err(|e| device_err(name, e))?;
            placed.push(acpi::MmioDevice {
                addr,
                len: layout::VIRTIO_MMIO_SIZE,
                irq,
            });
        }

        phase.done("devices");
        let mut cmdline_text = config.cmdline.clone();
        let rsdp = if config.acpi {
            let cpus =
                u8::try_from(config.cpus).map_err(|_| Error::Acpi("too many CPUs".into()))?;
            let rsdp = acpi::create_acpi_tables(&mem, cpus, &placed)
                .map_err(|e| Error::Acpi(e.to_string()))?;
            Some(rsdp.0)
        } else {
            cmdline_text.push(' ');
            cmdline_text.push_str(&acpi::cmdline_devices(&placed));
            if !cmdline_text.contains("acpi=") {
                cmdline_text.push_str(" acpi=off");
            }
            None
        };
        let cmdline = boot::build_cmdline(cmdline_text.trim())?;
        boot::write_boot_params(&mem, &kernel, &cmdline, initrd, rsdp)?;
        let sregs = regs::write_boot_tables(&mem)?;

        let cpuid = hv.supported_cpuid()?;
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus {
            let vcpu = vm.create_vcpu(id)?;
            let boot = (id == 0).then_some((&sregs, kernel.entry));
            regs::setup_vcpu(vcpu.x86(), id, config.cpus, &cpuid, boot)?;
            vcpus.push(vcpu);
        }
        phase.done("boot tables and vCPUs");

        Ok(Self {
            _vm: vm,
            mem,
            vcpus,
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            ged,
            exit_tx,
            exit_rx,
            stopping,
            started,
            seccomp,
            spawner,
            balloon,
            landlock: (config.landlock == crate::landlock::LandlockMode::On)
                .then(|| crate::landlock::Rules::for_vm(config)),
            panic_line,
        })
    }

    /// The serial console, for feeding it input.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// The power button (an ACPI Generic Event Device): pressing it asks an ACPI
    /// guest to shut down; the guest then powers off through the PM block.
    pub fn power_button(&self) -> Arc<Mutex<Ged>> {
        self.ged.clone()
    }

    /// The memory balloon, if the VM has one.
    pub fn balloon(&self) -> Option<aivmm_devices::virtio::balloon::BalloonHandle> {
        self.balloon.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Starts the vCPUs and waits until the guest powers off or resets, or a
    /// vCPU fails. vCPU threads still running are left to end with the process.
    ///
    /// With seccomp on, every thread of the process gets the process filter first,
    /// the device worker spawner its Landlock domain (see [`crate::landlock`]) and
    /// the device filter, each vCPU thread the vCPU filter
    /// before it runs guest code, and then every other thread the API filter (see
    /// [`crate::seccomp`]).
    pub fn run(mut self) -> Result<VmExit> {
        log::debug!("setup took {:?} since exec", self.started.elapsed());
        if let Some(filters) = &self.seccomp {
            filters.install_process()?;
            // The user-mode network's thread waited for this: it now takes the
            // network filter, before the API filter goes to every thread left.
            let f = filters.clone();
            aivmm_devices::virtio::net::usernet::release_gated(std::sync::Arc::new(move || {
                f.apply(crate::seccomp::ThreadKind::Net)
                    .map_err(std::io::Error::other)
            }))
            .map_err(Error::UserNet)?;
        }
        // Read once here: the workers' Landlock domain does not reach /proc.
        let _ = aivmm_devices::virtio::fs::filesystem::host_umask();
        if self.seccomp.is_some() || self.landlock.is_some() {
            crate::seccomp::start_worker_spawner(&self.spawner, self.seccomp.clone(), self.landlock.clone())?;
        }
        // A vCPU thread that ends hands its bus references back instead of dropping
        // them: whoever drops the last reference runs the devices' Drop (passt
        // teardown, socket and file cleanup), whose system calls the vCPU filter
        // forbids. The main thread takes them below; if it is gone, they are leaked
        // (the process is ending).
        let (bus_tx, bus_rx) = mpsc::channel::<(Arc<Bus>, Arc<Bus>)>();
        let n_vcpus = self.vcpus.len();
        install_kick_handler()?;
        let mut threads = Vec::with_capacity(n_vcpus);
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let bus_tx = bus_tx.clone();
            let io = self.io_bus.clone();
            let mmio = self.mmio_bus.clone();
            let tx = self.exit_tx.clone();
            let stopping = self.stopping.clone();
            let filters = self.seccomp.clone();
            thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Some(f) = filters {
                        if let Err(e) = f.apply(crate::seccomp::ThreadKind::Vcpu) {
                            let _ = tx.send(Err(e.into()));
                            return;
                        }
                    }
                    let r = run_vcpu(id as u32, vcpu, &io, &mmio, &stopping);
                    let _ = tx.send(r);
                    if let Err(mpsc::SendError(buses)) = bus_tx.send((io, mmio)) {
                        std::mem::forget(buses);
                    }
                })
                .map(|t| threads.push(t))
                .map_err(Error::Thread)?;
        }
        if let Some(filters) = &self.seccomp {
            let n = filters.restrict_api_threads(n_vcpus)?;
            log::debug!("seccomp: the API filter is on this thread and {n} other(s)");
        }
        let panic = || self.panic_line.lock().ok().and_then(|p| p.clone());
        let exit = loop {
            match self.exit_rx.recv_timeout(std::time::Duration::from_millis(250)) {
                Ok(exit) => break exit,
                Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(VmExit::PowerOff),
                Err(mpsc::RecvTimeoutError::Timeout) => match panic() {
                    Some((line, at)) if at.elapsed() >= PANIC_GRACE => {
                        log::warn!("no guest reset within {PANIC_GRACE:?} of its kernel panic; stopping it");
                        self.stopping.store(true, Ordering::SeqCst);
                        return Err(Error::GuestPanic(line));
                    }
                    _ => {}
                },
            }
        };
        // The bench's exit latency starts here (guest power-off or reset to exit).
        log::debug!("the guest stopped: {exit:?}; stopping the vCPUs");
        // Stop the other vCPUs (a halted one sits in KVM_RUN until kicked out by a
        // signal) and take back the references of their threads, so the devices are
        // dropped here, on this thread, when `self` goes. The kick is repeated: one
        // that lands just before a thread enters KVM_RUN is lost.
        self.stopping.store(true, Ordering::SeqCst);
        drop(bus_tx);
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        let mut returned = Vec::with_capacity(n_vcpus);
        while returned.len() < n_vcpus {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                kick(t);
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "{} vCPU thread(s) did not stop within {VCPU_STOP_TIMEOUT:?}",
                    n_vcpus - returned.len()
                );
                break;
            }
            match bus_rx.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(buses) => returned.push(buses),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // A guest that panicked resets (`panic=-1`) or stops: report the panic instead.
        match (exit, panic()) {
            (Ok(_), Some((line, _))) => Err(Error::GuestPanic(line)),
            (exit, _) => exit,
        }
    }
}

/// Debug log of where set-up time goes: one line per phase, and the time since exec.
struct Phases {
    started: Instant,
    last: Instant,
}

impl Phases {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last: Instant::now(),
        }
    }

    fn done(&mut self, what: &str) {
        let now = Instant::now();
        log::debug!(
            "setup: {what} took {:.1} ms ({:.1} ms since exec)",
            (now - self.last).as_secs_f64() * 1e3,
            (now - self.started).as_secs_f64() * 1e3
        );
        self.last = now;
    }
}

/// How many of a vCPU's first port and MMIO exits the debug log shows one by one.
const FIRST_EXITS_SHOWN: u32 = 12;

/// How long [`Vmm::run`] keeps kicking vCPU threads after the VM's exit.
const VCPU_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The signal that interrupts a vCPU thread's `KVM_RUN` (it then sees `stopping`).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the do-nothing handler of [`kick_signal`], without `SA_RESTART`, so
/// the signal makes `KVM_RUN` return `EINTR` instead of killing the process.
fn install_kick_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| {
        Error::Thread(std::io::Error::other(format!(
            "cannot install the vCPU kick signal handler: {e}"
        )))
    })
}

/// Interrupts the vCPU thread `t` (a no-op if it has already ended).
fn kick(t: &thread::JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the handle is alive, so its pthread_t is valid; the signal's handler
    // does nothing.
    unsafe {
        libc::pthread_kill(t.as_pthread_t(), kick_signal());
    }
}

/// Alignment of guest RAM in the host's address space: the huge-page size.
const RAM_ALIGN: usize = 2 << 20;

/// Maps anonymous guest RAM for `ranges`, each region 2 MiB-aligned in the host.
///
/// The hypervisor can back guest memory with huge pages only where the guest
/// physical address and the host virtual address agree modulo the huge-page size;
/// a plain `mmap` is only page-aligned, which would leave every guest access on
/// 4 KiB mappings. The mappings are never unmapped: guest RAM lives as long as the
/// process.
pub fn allocate_guest_memory(
    ranges: &[(vm_memory::GuestAddress, usize)],
) -> std::result::Result<GuestMemoryMmap, String> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::GuestRegionMmap;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(base, size) in ranges {
        let len = size.checked_add(RAM_ALIGN).ok_or("guest RAM size overflows")?;
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let start = raw as usize;
        let aligned = (start + RAM_ALIGN - 1) & !(RAM_ALIGN - 1);
        let head = aligned - start;
        let tail = len - head - size;
        // SAFETY: both trimmed ranges lie inside the mapping just made and outside
        // the part kept; madvise is only a hint about how to back the kept part.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail);
            }
            libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
        // SAFETY: `aligned..aligned+size` is a live read-write mapping, owned by
        // guest memory from now on and never unmapped.
        let builder = unsafe {
            MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(aligned as *mut u8)
        };
        let region = builder.build().map_err(|e| e.to_string())?;
        regions.push(GuestRegionMmap::new(region, base).ok_or("guest RAM range overflows")?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}

/// Runs one vCPU until the guest stops it or it fails. Once `stopping` is set
/// (a device saw a power-off or reset) the vCPU does not enter the guest again.
fn run_vcpu(
    id: u32,
    vcpu: Box<dyn Vcpu>,
    io: &Bus,
    mmio: &Bus,
    stopping: &AtomicBool,
) -> Result<VmExit> {
    let mut exits = ExitCounts::new();
    let r = vcpu_loop(id, vcpu, io, mmio, stopping, &mut exits);
    exits.log(id);
    r
}

/// How many port and MMIO exits a vCPU took, by port and by 4 KiB page: where
/// exits cost (each is a round trip through aivmm) shows in the debug log. Counts
/// only when that log is on, so the exit path pays nothing otherwise.
struct ExitCounts {
    on: bool,
    /// Exits logged one by one so far: the first few, whose timestamps show when
    /// the guest first reached each device.
    shown: u32,
    io: std::collections::HashMap<u16, u32>,
    mmio: std::collections::HashMap<u64, u32>,
}

impl ExitCounts {
    fn new() -> Self {
        Self {
            on: log::log_enabled!(log::Level::Debug),
            shown: 0,
            io: Default::default(),
            mmio: Default::default(),
        }
    }

    fn port(&mut self, port: u16) {
        if self.on {
            *self.io.entry(port).or_default() += 1;
            self.show(|| format!("port {port:#x}"));
        }
    }

    fn mmio(&mut self, addr: u64) {
        if self.on {
            *self.mmio.entry(addr & !0xfff).or_default() += 1;
            self.show(|| format!("MMIO {addr:#x}"));
        }
    }

    fn show(&mut self, what: impl FnOnce() -> String) {
        if self.shown < FIRST_EXITS_SHOWN {
            self.shown += 1;
            log::debug!("exit {}: {}", self.shown, what());
        }
    }

    fn log(&self, id: u32) {
        if !self.on {
            return;
        }
        let top = |mut m: Vec<(String, u32)>| {
            m.sort_by_key(|e| std::cmp::Reverse(e.1));
            m.iter()
                .take(8)
                .map(|(k, n)| format!("{k}:{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let io: u32 = self.io.values().sum();
        let mmio: u32 = self.mmio.values().sum();
        log::debug!(
            "vcpu{id} exits: {io} port ({}), {mmio} MMIO ({})",
            top(self.io.iter().map(|(p, n)| (format!("{p:#x}"), *n)).collect()),
            top(self.mmio.iter().map(|(a, n)| (format!("{a:#x}"), *n)).collect()),
        );
    }
}

fn vcpu_loop(
    id: u32,
    mut vcpu: Box<dyn Vcpu>,
    io: &Bus,
    mmio: &Bus,
    stopping: &AtomicBool,
    exits: &mut ExitCounts,
) -> Result<VmExit> {
    log::debug!("vcpu{id}: entering the guest");
    loop {
        if stopping.load(Ordering::SeqCst) {
            // The device that set the flag has already sent the VM's exit.
            return Ok(VmExit::PowerOff);
        }
        match vcpu.run().map_err(|e| Error::Vcpu {
            id,
            reason: e.to_string(),
        })? {
            VcpuExit::IoIn(port, data) => {
                exits.port(port);
                if !io.read(u64::from(port), data) {
                    log::trace!("vcpu{id}: read of unhandled port {port:#x}");
                }
            }
            VcpuExit::IoOut(port, data) => {
                exits.port(port);
                if !io.write(u64::from(port), data) {
                    log::trace!("vcpu{id}: write to unhandled port {port:#x}");
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                exits.mmio(addr);
                if !mmio.read(addr, data) {
                    log::debug!("vcpu{id}: read of unhandled MMIO {addr:#x}");
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                exits.mmio(addr);
                if !mmio.write(addr, data) {
                    log::debug!("vcpu{id}: write to unhandled MMIO {addr:#x}");
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::Hlt => {
                return Err(Error::Vcpu {
                    id,
                    reason: "the guest halted with interrupts off".into(),
                })
            }
            VcpuExit::PowerOff => return Ok(VmExit::PowerOff),
            VcpuExit::Reset => return Ok(VmExit::Reset),
            VcpuExit::Shutdown => {
                return Err(Error::Vcpu {
                    id,
                    reason: "the guest triple-faulted (shutdown exit)".into(),
                })
            }
            VcpuExit::Failed(reason) => return Err(Error::Vcpu { id, reason }),
            VcpuExit::Unhandled(what) => {
                return Err(Error::Vcpu {
                    id,
                    reason: format!("unhandled exit: {what}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn panic_lines_are_seen_on_the_console() {
        let found = Arc::new(Mutex::new(None));
        let mut w = PanicWatch {
            out: Box::new(std::io::sink()),
            line: Vec::new(),
            found: found.clone(),
        };
        w.write_all(b"[    1.0] ok\r\n[    2.0] Kernel panic - not sync").unwrap();
        assert!(found.lock().unwrap().is_none());
        w.write_all(b"ing: Attempted to kill init! exitcode=0x00000300\r\n").unwrap();
        w.write_all(b"---[ end Kernel panic - not syncing: x ]---\r\n").unwrap();
        assert_eq!(
            found.lock().unwrap().as_ref().map(|f| f.0.as_str()),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000300")
        );
        // Escape sequences in the line are escaped.
        *found.lock().unwrap() = None;
        w.write_all(b"Kernel panic - not syncing\x1b[2Jx\r\n").unwrap();
        assert_eq!(
            found.lock().unwrap().as_ref().map(|f| f.0.as_str()),
            Some("Kernel panic - not syncing\\u{1b}[2Jx")
        );
        // A long line without a newline is bounded.
        w.write_all(&[b'x'; 100_000]).unwrap();
        assert!(w.line.len() <= PanicWatch::MAX_LINE);
    }

    #[test]
    fn guest_ram_is_huge_page_aligned_and_usable() {
        let mem = allocate_guest_memory(&boot::ram_ranges(5 << 30)).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        for r in &regions {
            assert_eq!(r.as_ptr() as usize % RAM_ALIGN, 0);
        }
        assert_eq!(regions[1].start_addr(), GuestAddress(layout::HIGH_RAM_START));
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(7u8, GuestAddress(layout::HIGH_RAM_START + (2 << 30) - 1)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert!(mem.write_obj(1u8, GuestAddress(layout::MMIO_HOLE_START)).is_err());
    }
}
