//! Boot-time vCPU state: the GDT, the identity-mapped page tables, the registers,
//! MSRs and CPUID that put a vCPU at a 64-bit kernel entry point.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::hypervisor::x86_64::{
    CpuIdEntry, DescriptorTable, Segment, SpecialRegisters, StandardRegisters, X86Vcpu,
};

/// Errors of vCPU set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing a boot structure into guest memory failed.
    #[error("writing the {0} into guest memory failed")]
    Write(&'static str),
    /// A hypervisor call failed.
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::Error),
}

/// `Result` of vCPU set-up.
pub type Result<T> = std::result::Result<T, Error>;

/// The boot GDT: null, 64-bit code, data, TSS.
const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Packs a GDT descriptor from its flags (access byte and the flags nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The hidden part of a segment register loaded from `entry` with `selector`.
fn segment(entry: u64, selector: u16) -> Segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    Segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
    }
}

/// Writes the GDT, an empty IDT and page tables that identity-map the first 4 GiB
/// with 2 MiB pages, and returns the system registers that use them.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<SpecialRegisters> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| Error::Write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::Write("IDT"))?;

    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPTE_START | PRESENT_RW, GuestAddress(PML4_START))
        .map_err(|_| Error::Write("page tables"))?;
    let mut pd = vec![0u8; 4 * 4096];
    for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | PRESENT_RW | HUGE).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(|_| Error::Write("page tables"))?;
    for i in 0..4u64 {
        mem.write_obj(
            (PDE_START + i * 4096) | PRESENT_RW,
            GuestAddress(PDPTE_START + i * 8),
        )
        .map_err(|_| Error::Write("page tables"))?;
    }

    let code = segment(GDT[1], CODE_SELECTOR);
    let data = segment(GDT[2], DATA_SELECTOR);
    Ok(SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment(GDT[3], TSS_SELECTOR),
        ldt: Segment::default(),
        gdt: DescriptorTable {
            base: BOOT_GDT_START,
            limit: (GDT.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: BOOT_IDT_START,
            limit: 7,
        },
        cr0: X86_CR0_PE | X86_CR0_PG | X86_CR0_ET,
        cr3: PML4_START,
        cr4: X86_CR4_PAE,
        efer: EFER_LME | EFER_LMA,
    })
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// The registers at a 64-bit Linux entry: `rsi` points at the zero page.
pub fn boot_regs(entry: u64) -> StandardRegisters {
    StandardRegisters {
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// The MSRs every vCPU starts with: syscall MSRs cleared, fast strings on, and
/// write-back as the default memory type.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
}

const CPUID_HYPERVISOR_BIT: u32 = 1 << 31;
const CPUID_TSC_DEADLINE_BIT: u32 = 1 << 24;

/// Adapts the hypervisor's supported CPUID to vCPU `id` of `count`: its APIC id,
/// the logical processor count, the hypervisor bit, and the x2APIC topology leaves.
pub fn vcpu_cpuid(supported: &[CpuIdEntry], id: u32, count: u32) -> Vec<CpuIdEntry> {
    let mut out = supported.to_vec();
    for e in &mut out {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                // HTT: more than one logical processor in the package.
                if count > 1 {
                    e.edx |= 1 << 28;
                }
                e.ecx |= CPUID_HYPERVISOR_BIT;
                // KVM's in-kernel LAPIC emulates the TSC-deadline timer, but the
                // supported CPUID does not advertise it; the guest's cheapest timer.
                e.ecx |= CPUID_TSC_DEADLINE_BIT;
            }
            0xb | 0x1f => {
                // One thread per core; all cores in one package.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        e.eax = 32 - count.saturating_sub(1).leading_zeros();
                        e.ebx = count;
                        e.ecx = 0x201;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Sets up vCPU `id` of `count`. Only the boot vCPU (id 0) gets registers at
/// `entry`; the others wait for the guest to start them with INIT/SIPI.
pub fn setup_vcpu(
    vcpu: &dyn X86Vcpu,
    id: u32,
    count: u32,
    supported_cpuid: &[CpuIdEntry],
    boot: Option<(&SpecialRegisters, u64)>,
) -> Result<()> {
    vcpu.set_cpuid(&vcpu_cpuid(supported_cpuid, id, count))?;
    vcpu.set_msrs(&boot_msrs())?;
    vcpu.init_fpu()?;
    vcpu.init_lapic()?;
    if let Some((sregs, entry)) = boot {
        vcpu.set_sregs(sregs)?;
        vcpu.set_regs(&boot_regs(entry))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        assert_eq!(GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT[2], 0x00cf_9300_0000_ffff);
        let cs = segment(GDT[1], CODE_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g, cs.type_, cs.present),
            (0, 0xffff_ffff, 1, 0, 1, 0xb, 1)
        );
        let ds = segment(GDT[2], DATA_SELECTOR);
        assert_eq!((ds.limit, ds.db, ds.type_, ds.s), (0xffff_ffff, 1, 0x3, 1));
        let tr = segment(GDT[3], TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let sregs = write_boot_tables(&mem).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        for gib in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            let pd = pdpte & !0xfff;
            let last: u64 = mem.read_obj(GuestAddress(pd + 511 * 8)).unwrap();
            assert_eq!(last & !0xfff, (gib << 30) + (511 << 21));
            assert_eq!(last & 0x83, 0x83);
        }
    }

    #[test]
    fn cpuid_sets_apic_id_and_topology() {
        let sup = vec![
            CpuIdEntry {
                function: 1,
                ebx: 0xffff_1234,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let out = vcpu_cpuid(&sup, 3, 4);
        assert_eq!(out[0].ebx, 0x0304_1234);
        assert_ne!(out[0].ecx & CPUID_HYPERVISOR_BIT, 0);
        assert_ne!(out[0].ecx & CPUID_TSC_DEADLINE_BIT, 0);
        assert_eq!((out[1].eax, out[1].ebx, out[1].edx), (2, 4, 3));
    }

    /// Nested virtualization: KVM reports SVM (leaf 0x8000_0001 ECX bit 2) or VMX
    /// (leaf 1 ECX bit 5) in its supported CPUID when the host allows nested KVM;
    /// the guest must see them so it can load kvm_amd / kvm_intel.
    #[test]
    fn cpuid_keeps_svm_and_vmx_for_nested_kvm() {
        const VMX: u32 = 1 << 5;
        const SVM: u32 = 1 << 2;
        let sup = vec![
            CpuIdEntry {
                function: 1,
                ecx: VMX,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0x8000_0001,
                ecx: SVM,
                ..Default::default()
            },
            CpuIdEntry {
                function: 0x8000_000a,
                eax: 1,
                ebx: 8,
                edx: 0x1_bcff,
                ..Default::default()
            },
        ];
        let out = vcpu_cpuid(&sup, 0, 2);
        assert_ne!(out[0].ecx & VMX, 0);
        assert_ne!(out[1].ecx & SVM, 0);
        assert_eq!((out[2].eax, out[2].ebx, out[2].edx), (1, 8, 0x1_bcff), "SVM features leaf");
    }
}
