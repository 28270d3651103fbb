//! x86_64 vCPU state in aivmm's own types, set through [`X86Vcpu`].

use super::Result;

/// The general-purpose registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The system registers a boot vCPU needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// One CPUID leaf/subleaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flags (on KVM, `KVM_CPUID_FLAG_*`), kept as given.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// x86-specific vCPU set-up.
pub trait X86Vcpu {
    /// Sets the general-purpose registers.
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    /// Sets the segment, table and control registers; others keep their reset values.
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// Sets the FPU control word and MXCSR to their power-on defaults.
    fn init_fpu(&self) -> Result<()>;
    /// Writes model-specific registers.
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()>;
    /// Sets the CPUID table the guest sees.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    /// Routes the local APIC's LINT0 to ExtINT and LINT1 to NMI, as firmware does.
    fn init_lapic(&self) -> Result<()>;
}
