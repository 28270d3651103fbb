//! The KVM backend (Linux), on kvm-ioctls.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
    CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::x86_64::{CpuIdEntry, Segment, SpecialRegisters, StandardRegisters, X86Vcpu};
use super::{Error, Hypervisor, IoEventAddress, Result, Vcpu, VcpuExit, Vm};

/// Where KVM lives.
pub const KVM_PATH: &str = "/dev/kvm";

/// KVM's address for the TSS it needs on Intel (three pages below the BIOS area).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity-map page on Intel, just below the TSS.
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// The KVM hypervisor.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm`.
    pub fn new() -> Result<Self> {
        Self::with_path(KVM_PATH)
    }

    /// Opens the KVM device at `path`.
    pub fn with_path(path: &str) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| {
                let hint = match source.kind() {
                    std::io::ErrorKind::NotFound => {
                        " (is KVM enabled? load kvm-intel or kvm-amd, or enable virtualization in firmware)"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        " (add your user to the 'kvm' group, or ask for access to it)"
                    }
                    _ => "",
                };
                Error::Open { path: path.to_string(), source, hint }
            })?;
        // SAFETY: the fd was just opened, is valid, and its ownership moves to Kvm.
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        let v = kvm.get_api_version();
        if v != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion(v));
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Box<dyn Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::call("KVM_CREATE_VM", e))?;
        Ok(Box::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::call("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuIdEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }
}

struct KvmVm {
    fd: VmFd,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped for the VM's life.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::call("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_irq_controller(&self) -> Result<()> {
        self.fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(|e| Error::call("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::call("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| Error::call("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| Error::call("KVM_CREATE_PIT2", e))
    }

    fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| Error::call("KVM_IRQFD", e))
    }

    fn register_ioevent(
        &self,
        evt: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
        };
        match datamatch {
            Some(v) => self.fd.register_ioevent(evt, &addr, v),
            None => self
                .fd
                .register_ioevent(evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(|e| Error::call("KVM_IOEVENTFD", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::call("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu { fd }))
    }
}

struct KvmVcpu {
    fd: VcpuFd,
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        use kvm_ioctls::VcpuExit as K;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(Error::call("KVM_RUN", e)),
        };
        Ok(match exit {
            K::IoOut(port, data) => VcpuExit::IoOut(port, data),
            K::IoIn(port, data) => VcpuExit::IoIn(port, data),
            K::MmioRead(addr, data) => VcpuExit::MmioRead(addr, data),
            K::MmioWrite(addr, data) => VcpuExit::MmioWrite(addr, data),
            K::Hlt => VcpuExit::Hlt,
            K::Shutdown => VcpuExit::Shutdown,
            K::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                other => VcpuExit::Unhandled(format!("system event {other}")),
            },
            K::Intr => VcpuExit::Interrupted,
            K::FailEntry(reason, cpu) => VcpuExit::Failed(format!(
                "entry failed on cpu {cpu}: hardware reason {reason:#x}"
            )),
            K::InternalError => VcpuExit::Failed("KVM internal error (emulation failed)".into()),
            other => VcpuExit::Unhandled(format!("{other:?}")),
        })
    }

    fn x86(&self) -> &dyn X86Vcpu {
        self
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: u8::from(s.present == 0),
        padding: 0,
    }
}

/// Local APIC register offsets and delivery modes for LINT set-up.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl X86Vcpu for KvmVcpu {
    fn set_regs(&self, r: &StandardRegisters) -> Result<()> {
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::call("KVM_SET_REGS", e))
    }

    fn set_sregs(&self, s: &SpecialRegisters) -> Result<()> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::call("KVM_GET_SREGS", e))?;
        sregs.cs = to_kvm_segment(&s.cs);
        sregs.ds = to_kvm_segment(&s.ds);
        sregs.es = to_kvm_segment(&s.es);
        sregs.fs = to_kvm_segment(&s.fs);
        sregs.gs = to_kvm_segment(&s.gs);
        sregs.ss = to_kvm_segment(&s.ss);
        sregs.tr = to_kvm_segment(&s.tr);
        sregs.gdt.base = s.gdt.base;
        sregs.gdt.limit = s.gdt.limit;
        sregs.idt.base = s.idt.base;
        sregs.idt.limit = s.idt.limit;
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::call("KVM_SET_SREGS", e))
    }

    fn init_fpu(&self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| Error::call("KVM_SET_FPU", e))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let wrapped = Msrs::from_entries(&entries)
            .map_err(|e| Error::call("KVM_SET_MSRS", std::io::Error::other(format!("{e:?}"))))?;
        let n = self
            .fd
            .set_msrs(&wrapped)
            .map_err(|e| Error::call("KVM_SET_MSRS", e))?;
        if n != entries.len() {
            let bad = entries.get(n).map_or(0, |e| e.index);
            return Err(Error::call(
                "KVM_SET_MSRS",
                std::io::Error::other(format!("MSR {bad:#x} was refused")),
            ));
        }
        Ok(())
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|e| Error::call("KVM_SET_CPUID2", std::io::Error::other(format!("{e:?}"))))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::call("KVM_SET_CPUID2", e))
    }

    fn init_lapic(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::call("KVM_GET_LAPIC", e))?;
        let set_mode = |regs: &mut [libc::c_char], off: usize, mode: u32| {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = regs[off + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                regs[off + i] = *x as libc::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::call("KVM_SET_LAPIC", e))
    }
}
