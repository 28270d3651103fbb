//! Hypervisor.framework declarations for Apple silicon, only those `darwin.rs`
//! calls, checked against `<Hypervisor/hv_vm.h>`, `hv_vcpu.h`, `hv_vcpu_types.h`
//! and `hv_gic.h`. The GIC functions exist from macOS 15 on and are looked up at
//! run time ([`GicFns`]) so that the binary still starts on older systems.
#![allow(non_camel_case_types)]

use std::ffi::{c_void, CStr};

/// `hv_return_t` (a `mach_error_t`, an `int`).
pub type hv_return_t = i32;
/// `hv_vcpu_t`.
pub type hv_vcpu_t = u64;
/// `hv_ipa_t`.
pub type hv_ipa_t = u64;
/// `hv_memory_flags_t`.
pub type hv_memory_flags_t = u64;
/// `hv_reg_t` (`OS_ENUM(hv_reg, uint32_t, ...)`).
pub type hv_reg_t = u32;
/// `hv_sys_reg_t` (`OS_ENUM(hv_sys_reg, uint16_t, ...)`).
pub type hv_sys_reg_t = u16;
/// `hv_gic_redistributor_reg_t` (register offsets, 32-bit).
pub type hv_gic_redistributor_reg_t = u32;
/// `hv_vm_config_t`, `hv_vcpu_config_t`, `hv_gic_config_t`: os_object pointers.
pub type os_object_t = *mut c_void;

/// `hv_vcpu_exit_exception_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hv_vcpu_exit_exception_t {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: hv_ipa_t,
}

/// `hv_vcpu_exit_t`: a 32-bit reason, then (8-aligned) the exception.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hv_vcpu_exit_t {
    pub reason: u32,
    pub exception: hv_vcpu_exit_exception_t,
}

const _: () = assert!(std::mem::size_of::<hv_vcpu_exit_t>() == 32);
const _: () = assert!(std::mem::offset_of!(hv_vcpu_exit_t, exception) == 8);

/// `mach_timebase_info_data_t`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct mach_timebase_info_data_t {
    pub numer: u32,
    pub denom: u32,
}

#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_create(config: os_object_t) -> hv_return_t;
    pub fn hv_vm_destroy() -> hv_return_t;
    pub fn hv_vm_map(
        addr: *mut c_void,
        ipa: hv_ipa_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;
    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *mut hv_vcpu_exit_t,
        config: os_object_t,
    ) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, vtimer_is_masked: bool) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: *mut u64) -> hv_return_t;
    pub fn hv_vcpus_exit(vcpus: *mut hv_vcpu_t, vcpu_count: u32) -> hv_return_t;
}

extern "C" {
    pub fn mach_absolute_time() -> u64;
    pub fn mach_timebase_info(info: *mut mach_timebase_info_data_t) -> i32;
    /// `os_release` (os/object.h), for the GIC configuration object.
    pub fn os_release(object: *mut c_void);
}

type GetSize = unsafe extern "C" fn(*mut usize) -> hv_return_t;
type SetBase = unsafe extern "C" fn(os_object_t, hv_ipa_t) -> hv_return_t;

/// The macOS 15 GIC functions, resolved with `dlsym`.
#[derive(Clone, Copy)]
pub struct GicFns {
    pub config_create: unsafe extern "C" fn() -> os_object_t,
    pub config_set_distributor_base: SetBase,
    pub config_set_redistributor_base: SetBase,
    pub create: unsafe extern "C" fn(os_object_t) -> hv_return_t,
    pub set_spi: unsafe extern "C" fn(u32, bool) -> hv_return_t,
    pub set_redistributor_reg:
        unsafe extern "C" fn(hv_vcpu_t, hv_gic_redistributor_reg_t, u64) -> hv_return_t,
    pub get_distributor_size: GetSize,
    pub get_distributor_base_alignment: GetSize,
    pub get_redistributor_region_size: GetSize,
    pub get_redistributor_size: GetSize,
    pub get_redistributor_base_alignment: GetSize,
    pub get_spi_interrupt_range: unsafe extern "C" fn(*mut u32, *mut u32) -> hv_return_t,
}

fn sym(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads them.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

macro_rules! load {
    ($name:literal, $ty:ty) => {{
        let p = sym($name)?;
        // SAFETY: the symbol is Hypervisor.framework's function of that name, whose
        // C prototype (hv_gic.h) is `$ty`.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

impl GicFns {
    /// Looks the functions up; `None` before macOS 15.
    pub fn load() -> Option<Self> {
        Some(Self {
            config_create: load!(
                c"hv_gic_config_create",
                unsafe extern "C" fn() -> os_object_t
            ),
            config_set_distributor_base: load!(c"hv_gic_config_set_distributor_base", SetBase),
            config_set_redistributor_base: load!(c"hv_gic_config_set_redistributor_base", SetBase),
            create: load!(
                c"hv_gic_create",
                unsafe extern "C" fn(os_object_t) -> hv_return_t
            ),
            set_spi: load!(
                c"hv_gic_set_spi",
                unsafe extern "C" fn(u32, bool) -> hv_return_t
            ),
            set_redistributor_reg: load!(
                c"hv_gic_set_redistributor_reg",
                unsafe extern "C" fn(hv_vcpu_t, hv_gic_redistributor_reg_t, u64) -> hv_return_t
            ),
            get_distributor_size: load!(c"hv_gic_get_distributor_size", GetSize),
            get_distributor_base_alignment: load!(
                c"hv_gic_get_distributor_base_alignment",
                GetSize
            ),
            get_redistributor_region_size: load!(c"hv_gic_get_redistributor_region_size", GetSize),
            get_redistributor_size: load!(c"hv_gic_get_redistributor_size", GetSize),
            get_redistributor_base_alignment: load!(
                c"hv_gic_get_redistributor_base_alignment",
                GetSize
            ),
            get_spi_interrupt_range: load!(
                c"hv_gic_get_spi_interrupt_range",
                unsafe extern "C" fn(*mut u32, *mut u32) -> hv_return_t
            ),
        })
    }
}
