//! Loading a Linux kernel for the 64-bit boot protocol: guest RAM layout, the
//! kernel (ELF vmlinux or bzImage, through linux-loader), the initrd, the command
//! line and the zero page with its e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

// A FIFO as --kernel or --initrd is refused instead of blocking the open.
use aivmm_devices::host_file::open_regular;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::*;

/// Errors of kernel loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is neither an x86_64 ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel: neither an x86_64 ELF ({elf}) nor a bzImage ({bz})")]
    NotAKernel {
        /// The path given.
        path: String,
        /// Why the ELF loader refused it.
        elf: String,
        /// Why the bzImage loader refused it.
        bz: String,
    },
    /// The kernel, by its own headers, reaches past the end of guest memory.
    #[error("the kernel {path} needs guest memory up to {need:#x}, but the VM's memory ends at {have:#x}; give the VM more memory")]
    KernelTooBig {
        /// The path given.
        path: String,
        /// Where the kernel's image (with its bss or decompression space) ends.
        need: u64,
        /// Where the guest's low memory ends.
        have: u64,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry(String),
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory.
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel; give the VM more memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("bad kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data into guest memory failed.
    #[error("writing the {0} into guest memory failed")]
    Write(&'static str),
}

/// `Result` of kernel loading.
pub type Result<T> = std::result::Result<T, Error>;

/// The guest RAM ranges for `size` bytes of memory: below the 32-bit MMIO hole,
/// and the rest from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(HIGH_RAM_START),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// What the loader put in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The 64-bit entry point.
    pub entry: u64,
    /// The first byte after the kernel image.
    pub end: u64,
    /// Where the bzImage header ends up: the zero page copies it.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry of a bzImage sits 0x200 bytes into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Loads the kernel at `path` as [`load_kernel`] does, except that a bzImage is
/// booted through its unpacked vmlinux, cached under `cache_dir` (see
/// [`super::vmlinux`]). Any trouble with the cache falls back to the bzImage.
pub fn load_kernel_cached(
    mem: &GuestMemoryMmap,
    path: &Path,
    cache_dir: Option<&Path>,
) -> Result<LoadedKernel> {
    if let Some(dir) = cache_dir {
        let mut head = [0u8; 0x280];
        let is_bz = open_regular(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && super::vmlinux::is_bzimage(&head);
        if is_bz {
            match super::vmlinux::cached_vmlinux(path, dir) {
                Ok(elf) => match load_kernel(mem, &elf) {
                    Ok(mut k) => {
                        tracing::debug!("booting {} through {}", path.display(), elf.display());
                        // The zero page gets the bzImage's own header, as a bootloader
                        // would give it: the kernel reads fields by protocol version
                        // (0x20e and up: the RSDP address) and would otherwise see 0.
                        k.setup_header = Some(bzimage_header(&head));
                        return Ok(k);
                    }
                    Err(e) => tracing::warn!(
                        "the cached vmlinux {} did not load ({e}); booting the bzImage",
                        elf.display()
                    ),
                },
                Err(e) => tracing::info!(
                    "booting {} with its own decompressor: {e}",
                    path.display()
                ),
            }
        }
    }
    load_kernel(mem, path)
}

/// The setup header of a bzImage whose first bytes are `head` (at least 0x206
/// long; the header's remaining bytes, if `head` is shorter, stay zero).
fn bzimage_header(head: &[u8]) -> linux_loader::loader::bootparam::setup_header {
    use vm_memory::ByteValued;
    let mut h = linux_loader::loader::bootparam::setup_header::default();
    let dst = h.as_mut_slice();
    let src = head.get(0x1f1..).unwrap_or(&[]);
    let n = dst.len().min(src.len());
    dst[..n].copy_from_slice(&src[..n]);
    h
}

/// Loads the kernel at `path`: an ELF vmlinux (entered at its ELF entry) or a
/// bzImage (entered at its 64-bit entry).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let shown = path.display().to_string();
    let mut f = open_regular(path).map_err(|source| Error::KernelFile {
        path: shown.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|source| Error::KernelFile {
        path: shown.clone(),
        source,
    })?;
    // A kernel too large for the VM would otherwise fail in the loaders as an
    // unreadable image, or load and crash the guest (an ELF bss past the end).
    if let Some(need) = kernel_end_from_headers(&mut f) {
        let have = low_ram_end(mem);
        if need > have {
            return Err(Error::KernelTooBig {
                path: shown,
                need,
                have,
            });
        }
    }
    f.seek(SeekFrom::Start(0))
        .map_err(|source| Error::KernelFile {
            path: shown.clone(),
            source,
        })?;
    let elf_err = if n == 4 && magic == *b"\x7fELF" {
        match Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => {
                return Ok(LoadedKernel {
                    entry: r.kernel_load.raw_value(),
                    end: r.kernel_end,
                    setup_header: None,
                })
            }
            Err(e) => loader_reason(&e),
        }
    } else {
        "no ELF magic".to_string()
    };
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let hdr = r
                .setup_header
                .ok_or_else(|| Error::No64BitEntry(shown.clone()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry(shown));
            }
            // The protected-mode part is `syssize` 16-byte units after the setup
            // sectors; a shorter file is cut off and would crash the guest.
            let sects = if hdr.setup_sects == 0 { 4 } else { hdr.setup_sects };
            let setup = (u64::from(sects) + 1) * 512;
            let want = setup + u64::from(hdr.syssize) * 16;
            let have = f.metadata().map_or(0, |m| m.len());
            if have < want {
                return Err(Error::NotAKernel {
                    path: shown,
                    elf: elf_err,
                    bz: format!("truncated bzImage: {have} bytes, its header says {want}"),
                });
            }
            Ok(LoadedKernel {
                entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r
                    .kernel_end
                    .max(r.kernel_load.raw_value() + u64::from(hdr.init_size)),
                setup_header: Some(hdr),
            })
        }
        Err(e) => Err(Error::NotAKernel {
            path: shown,
            elf: elf_err,
            bz: loader_reason(&e),
        }),
    }
}

/// Where guest RAM below the 32-bit hole ends (the kernel and initrd live there).
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map_or(0, |r| r.len())
}

/// Where the kernel in `f` ends in guest memory by its own headers: the highest
/// end of an ELF64's `PT_LOAD` segments (their memory size, bss included), or for
/// a bzImage 1 MiB plus the larger of its payload and `init_size` (the space it
/// decompresses in). `None` when the headers do not say (the loaders then tell
/// what is wrong with the file).
fn kernel_end_from_headers(f: &mut File) -> Option<u64> {
    let u16_at = |b: &[u8], o: usize| b.get(o..o + 2).map(|x| u16::from_le_bytes([x[0], x[1]]));
    let u32_at = |b: &[u8], o: usize| {
        b.get(o..o + 4)
            .and_then(|x| x.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |b: &[u8], o: usize| {
        b.get(o..o + 8)
            .and_then(|x| x.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let mut head = vec![0u8; 0x264];
    f.seek(SeekFrom::Start(0)).ok()?;
    let n = f.read(&mut head).ok()?;
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        // ELFCLASS64, little-endian.
        if head.get(4..6) != Some(&[2, 1]) {
            return None;
        }
        let phoff = u64_at(&head, 0x20)?;
        let phentsize = usize::from(u16_at(&head, 0x36)?);
        let phnum = usize::from(u16_at(&head, 0x38)?);
        if phentsize < 0x38 || phnum == 0 || phnum > 256 {
            return None;
        }
        let mut table = vec![0u8; phentsize * phnum];
        f.seek(SeekFrom::Start(phoff)).ok()?;
        f.read_exact(&mut table).ok()?;
        const PT_LOAD: u32 = 1;
        return table
            .chunks(phentsize)
            .filter(|ph| u32_at(ph, 0) == Some(PT_LOAD))
            .map(|ph| Some(u64_at(ph, 0x18)?.saturating_add(u64_at(ph, 0x28)?)))
            .try_fold(0u64, |end, e| e.map(|e| end.max(e)));
    }
    if super::vmlinux::is_bzimage(&head) {
        let payload = u64::from(u32_at(&head, 0x1f4)?) * 16;
        // `init_size` exists from boot protocol 2.10 on.
        let init_size = if u16_at(&head, 0x206)? >= 0x20a {
            u64::from(u32_at(&head, 0x260)?)
        } else {
            0
        };
        return Some(HIMEM_START + payload.max(init_size));
    }
    None
}

/// The innermost reason of a linux-loader error, without its "Kernel Loader:" prefixes.
fn loader_reason(e: &linux_loader::loader::Error) -> String {
    use linux_loader::loader::{bzimage, Error as L};
    match e {
        // The header promised more than the file holds.
        L::Bzimage(bzimage::Error::Underflow | bzimage::Error::Overflow)
        | L::Bzimage(bzimage::Error::ReadBzImageCompressedKernel) => {
            "truncated or corrupt bzImage".to_string()
        }
        _ => {
            let s = e.to_string();
            s.rsplit("Kernel Loader: ").next().unwrap_or(&s).trim().to_string()
        }
    }
}

/// Where an initrd goes, chosen from the kernel's header alone (see
/// [`plan_initrd`]), so that it can be copied while the kernel loads.
#[derive(Debug)]
pub struct InitrdPlan<'a> {
    path: &'a Path,
    file: File,
    /// Its guest address: page-aligned at the top of low RAM.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
    limit: u64,
}

/// The highest address an initrd may reach for the kernel at `kernel_path`: a
/// bzImage's `initrd_addr_max` (which a cached vmlinux inherits), else 2 GiB.
fn initrd_addr_max(kernel_path: &Path) -> u64 {
    let mut head = [0u8; 0x230];
    let read = open_regular(kernel_path).and_then(|mut f| f.read_exact(&mut head));
    match read {
        Ok(()) if super::vmlinux::is_bzimage(&head) => {
            u64::from(u32::from_le_bytes([head[0x22c], head[0x22d], head[0x22e], head[0x22f]]))
        }
        _ => 0x7fff_ffff,
    }
}

/// Where an initrd of `size` bytes goes under `addr_max`: page-aligned at the top
/// of low RAM. Returns the address and the limit it was placed under.
fn initrd_slot(mem: &GuestMemoryMmap, addr_max: u64, size: u64) -> Result<(u64, u64)> {
    let low_end = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map_or(0, |r| r.len());
    let limit = addr_max.min(low_end.saturating_sub(1)) + 1;
    match limit.checked_sub(size) {
        Some(a) => Ok((a & !0xfff, limit)),
        None => Err(Error::InitrdTooBig { size, limit }),
    }
}

/// Opens the initrd at `path` and chooses its place for the kernel at
/// `kernel_path`; [`copy_initrd`] copies it, [`check_initrd`] checks it against
/// the loaded kernel.
pub fn plan_initrd<'a>(
    mem: &GuestMemoryMmap,
    kernel_path: &Path,
    path: &'a Path,
) -> Result<InitrdPlan<'a>> {
    let err = |source| Error::InitrdFile {
        path: path.display().to_string(),
        source,
    };
    let file = open_regular(path).map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    let (addr, limit) = initrd_slot(mem, initrd_addr_max(kernel_path), size)?;
    Ok(InitrdPlan {
        path,
        file,
        addr,
        size,
        limit,
    })
}

/// Copies the planned initrd into guest memory.
pub fn copy_initrd(mem: &GuestMemoryMmap, plan: &InitrdPlan) -> Result<()> {
    let mut f = &plan.file;
    mem.read_exact_volatile_from(GuestAddress(plan.addr), &mut f, plan.size as usize)
        .map_err(|e| Error::InitrdFile {
            path: plan.path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })
}

/// The initrd's address and size, once sure it lies above the loaded kernel.
pub fn check_initrd(kernel: &LoadedKernel, plan: &InitrdPlan) -> Result<(u64, u64)> {
    if plan.addr < kernel.end {
        return Err(Error::InitrdTooBig {
            size: plan.size,
            limit: plan.limit,
        });
    }
    Ok((plan.addr, plan.size))
}

/// Builds the kernel command line from the user's text.
pub fn build_cmdline(text: &str) -> Result<Cmdline> {
    Cmdline::try_from(text, CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))
}

/// The e820 map for guest RAM: low RAM below the EBDA, the rest above 1 MiB, and
/// the RAM above 4 GiB. The ACPI area is reserved.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    const E820_RESERVED: u32 = 2;
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            type_: E820_RAM,
        },
        boot_e820_entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            type_: E820_RESERVED,
        },
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                type_: E820_RAM,
            });
        }
    }
    map
}

/// Writes the command line and the zero page for `kernel`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<()> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|_| Error::Write("command line"))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| Error::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(h) = kernel.setup_header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = 0x5372_6448;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| Error::Write("zero page"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ram_ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(16 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(HIGH_RAM_START),
                ((16u64 << 30) - MMIO_HOLE_START) as usize
            )
        );
    }

    #[test]
    fn e820_covers_ram_and_reserves_acpi() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(4 << 30)).unwrap();
        let map = e820_map(&mem);
        let ram: u64 = map.iter().filter(|e| e.type_ == 1).map(|e| e.size).sum();
        assert_eq!(
            ram,
            EBDA_START + (MMIO_HOLE_START - HIMEM_START) + (1 << 30)
        );
        assert!(map.iter().any(|e| e.type_ == 2 && e.addr == ACPI_START));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[0x5a; 8192]).unwrap();
        let e = load_kernel(&mem, f.path()).unwrap_err();
        assert!(matches!(e, Error::NotAKernel { .. }), "{e}");
        let e = load_kernel(&mem, Path::new("/nonexistent/kernel")).unwrap_err();
        assert!(matches!(e, Error::KernelFile { .. }), "{e}");
    }

    /// An ELF64 kernel with one PT_LOAD segment at 1 MiB: `filesz` bytes of it in
    /// the file (zeros), `memsz` in memory.
    fn elf_kernel(filesz: u64, memsz: u64) -> tempfile::NamedTempFile {
        let mut e = b"\x7fELF\x02\x01\x01".to_vec();
        e.resize(16, 0);
        for v in [2u16, 62] {
            e.extend_from_slice(&v.to_le_bytes()); // ET_EXEC, EM_X86_64
        }
        e.extend_from_slice(&1u32.to_le_bytes());
        for v in [HIMEM_START, 64, 0] {
            e.extend_from_slice(&v.to_le_bytes()); // entry, phoff, shoff
        }
        e.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        e.extend_from_slice(&5u32.to_le_bytes());
        for v in [120u64, HIMEM_START, HIMEM_START, filesz, memsz, 16] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &e).unwrap();
        f.as_file().set_len(120 + filesz).unwrap();
        f
    }

    #[test]
    fn a_kernel_larger_than_guest_memory_is_refused_as_such() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        // Fits: 4 MiB of image and 8 MiB of bss.
        let k = load_kernel(&mem, elf_kernel(4 << 20, 12 << 20).path()).unwrap();
        assert_eq!(k.entry, HIMEM_START);
        // 100 MiB of image, and 4 KiB of image with a 1 GiB bss, in 64 MiB.
        for (filesz, memsz) in [(100 << 20, 100 << 20), (4096, 1 << 30)] {
            let e = load_kernel(&mem, elf_kernel(filesz, memsz).path()).unwrap_err();
            match &e {
                Error::KernelTooBig { need, have, .. } => {
                    assert_eq!((*need, *have), (HIMEM_START + memsz, 64 << 20));
                }
                _ => panic!("{e}"),
            }
            assert!(e.to_string().contains("give the VM more memory"), "{e}");
        }
        // A bzImage whose decompression space (init_size) is larger than RAM.
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 1;
        bz[0x1f4..0x1f8].copy_from_slice(&0x40u32.to_le_bytes());
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x260..0x264].copy_from_slice(&(80u32 << 20).to_le_bytes());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &bz).unwrap();
        let e = load_kernel(&mem, f.path()).unwrap_err();
        assert!(
            matches!(e, Error::KernelTooBig { need, .. } if need == HIMEM_START + (80 << 20)),
            "{e}"
        );
        // Headers that say nothing are left to the loaders.
        let mut short = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut short, b"\x7fELF\x02\x01").unwrap();
        assert!(matches!(
            load_kernel(&mem, short.path()).unwrap_err(),
            Error::NotAKernel { .. }
        ));
    }

    #[test]
    fn initrd_goes_at_top_of_low_ram_above_the_kernel() {
        let mem = GuestMemoryMmap::from_ranges(&ram_ranges(64 << 20)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, vec![0x5a; 0x1001]).unwrap();
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01").unwrap();
        let plan = plan_initrd(&mem, &elf, &initrd).unwrap();
        assert_eq!((plan.addr, plan.size), ((64 << 20) - 0x2000, 0x1001));
        copy_initrd(&mem, &plan).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(plan.addr + 0x1000)).unwrap(), 0x5a);
        let kernel = |end| LoadedKernel {
            entry: HIMEM_START,
            end,
            setup_header: None,
        };
        assert_eq!(check_initrd(&kernel(0x80_0000), &plan).unwrap(), (plan.addr, 0x1001));
        // Overlapping the kernel, or larger than low RAM.
        assert!(matches!(
            check_initrd(&kernel(64 << 20), &plan),
            Err(Error::InitrdTooBig { .. })
        ));
        std::fs::write(&initrd, vec![0; 65 << 20]).unwrap();
        assert!(matches!(
            plan_initrd(&mem, &elf, &initrd),
            Err(Error::InitrdTooBig { .. })
        ));
        // A bzImage's initrd_addr_max is the ceiling.
        let mut bz = vec![0u8; 0x400];
        bz[0x1f1] = 1;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x22c..0x230].copy_from_slice(&0x1ff_ffffu32.to_le_bytes());
        std::fs::write(dir.path().join("bz"), &bz).unwrap();
        std::fs::write(&initrd, vec![0; 0x1000]).unwrap();
        let plan = plan_initrd(&mem, &dir.path().join("bz"), &initrd).unwrap();
        assert_eq!(plan.addr, (32 << 20) - 0x1000);
        // A missing initrd names itself.
        let gone = dir.path().join("gone");
        assert!(matches!(plan_initrd(&mem, &elf, &gone), Err(Error::InitrdFile { .. })));
    }
}
