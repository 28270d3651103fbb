//! Loading a Linux arm64 `Image` and placing the initrd and device tree.
//!
//! The `Image` starts with a 64-byte header (Documentation/arch/arm64/booting.rst):
//! two code words, `text_offset`, `image_size`, `flags`, three reserved words, the
//! magic `ARM\x64` at byte 56 and the PE header offset. The kernel is copied to a
//! 2 MiB-aligned base plus `text_offset` and entered at its first byte, with x0 =
//! the device tree's address. `image_size` covers the BSS too, so nothing else may
//! be placed below `load + image_size`.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_WINDOW_END, DRAM_START, FDT_MAX_SIZE, KERNEL_ALIGN};
use super::{Error, Result};

/// Size of the arm64 `Image` header.
pub const HEADER_SIZE: usize = 64;
/// The header's magic, "ARM\x64" read as a little-endian u32.
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
/// `text_offset` that kernels before 3.17 (`image_size == 0`) assume.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// Flags bit 0: the kernel is big-endian.
const FLAG_BIG_ENDIAN: u64 = 1;
/// The initrd's start is page aligned (64 KiB covers every arm64 page size).
const INITRD_ALIGN: u64 = 0x1_0000;

/// The fields of an `Image` header aivmm uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the kernel from a 2 MiB-aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running (BSS included).
    pub image_size: u64,
    /// Kernel flags (endianness, page size, placement).
    pub flags: u64,
}

impl ImageHeader {
    /// Parses and checks the first [`HEADER_SIZE`] bytes of a kernel file.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
            return Err(Error::Kernel(
                "it is gzip-compressed (Image.gz); give the uncompressed Image".into(),
            ));
        }
        if bytes.len() < HEADER_SIZE {
            return Err(Error::Kernel(format!(
                "it is {} bytes, shorter than the {HEADER_SIZE}-byte arm64 Image header",
                bytes.len()
            )));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut m = [0u8; 4];
        m.copy_from_slice(&bytes[56..60]);
        let magic = u32::from_le_bytes(m);
        if magic != IMAGE_MAGIC {
            return Err(Error::Kernel(format!(
                "no arm64 Image magic (found {magic:#010x} at byte 56; is it an x86 bzImage or an ELF vmlinux?)"
            )));
        }
        let (mut text_offset, image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
        if image_size == 0 {
            // Pre-3.17 kernels: no size, and a fixed text offset.
            text_offset = LEGACY_TEXT_OFFSET;
        }
        if flags & FLAG_BIG_ENDIAN != 0 {
            return Err(Error::Kernel(
                "it is a big-endian kernel; aivmm runs little-endian guests".into(),
            ));
        }
        if text_offset >= KERNEL_ALIGN {
            return Err(Error::Kernel(format!(
                "text_offset {text_offset:#x} is not below 2 MiB"
            )));
        }
        Ok(Self {
            text_offset,
            image_size,
            flags,
        })
    }
}

/// Where a loaded kernel sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// The entry point: the first byte of the kernel.
    pub entry: u64,
    /// First byte after the kernel's memory footprint (image, BSS).
    pub end: u64,
}

/// Copies the kernel `Image` read from `src` into guest RAM.
pub fn load_image(mem: &GuestMemoryMmap, ram_size: u64, src: &mut dyn Read) -> Result<LoadedImage> {
    let mut bytes = Vec::new();
    src.read_to_end(&mut bytes)
        .map_err(|e| Error::Kernel(format!("cannot read it: {e}")))?;
    let header = ImageHeader::parse(&bytes)?;
    let entry = DRAM_START + header.text_offset;
    let footprint = header.image_size.max(bytes.len() as u64);
    let end = entry + footprint;
    if end > DRAM_START + ram_size {
        return Err(Error::Kernel(format!(
            "it needs {footprint} bytes at {entry:#x}, more than the guest's {ram_size} bytes of RAM"
        )));
    }
    mem.write_slice(&bytes, GuestAddress(entry))
        .map_err(|e| Error::Memory(format!("writing the kernel: {e}")))?;
    Ok(LoadedImage { entry, end })
}

/// The device tree's address: the last 2 MiB block of the boot window's RAM.
pub fn fdt_address(ram_size: u64) -> Result<u64> {
    let top = (DRAM_START + ram_size).min(BOOT_WINDOW_END);
    let addr = (top - FDT_MAX_SIZE.min(top)) & !(FDT_MAX_SIZE - 1);
    if addr < DRAM_START {
        return Err(Error::Layout(format!(
            "{ram_size} bytes of RAM leave no room for the device tree"
        )));
    }
    Ok(addr)
}

/// The initrd's address: just below the device tree, above the kernel.
pub fn initrd_address(kernel: &LoadedImage, fdt_addr: u64, size: u64) -> Result<u64> {
    let addr = fdt_addr
        .checked_sub(size)
        .map(|a| a & !(INITRD_ALIGN - 1))
        .filter(|&a| a >= kernel.end);
    addr.ok_or_else(|| {
        Error::Layout(format!(
            "the {size}-byte initrd does not fit between the kernel (ends at {:#x}) and the device tree at {fdt_addr:#x}; give the guest more memory",
            kernel.end
        ))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_SIZE];
        h[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // a branch, as real kernels have
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        h
    }

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(DRAM_START), size as usize)]).unwrap()
    }

    #[test]
    fn parses_a_modern_header() {
        let h = ImageHeader::parse(&header(0, 0x1234_0000, 0xa)).unwrap();
        assert_eq!(
            h,
            ImageHeader {
                text_offset: 0,
                image_size: 0x1234_0000,
                flags: 0xa
            }
        );
    }

    #[test]
    fn legacy_header_gets_the_fixed_text_offset() {
        let h = ImageHeader::parse(&header(0, 0, 0)).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
    }

    #[test]
    fn rejects_bad_kernels_with_a_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x1f, 0x8b, 8, 0], "gzip"),
            (vec![0; 10], "shorter"),
            (vec![0; 64], "magic"),
            (header(0, 0x1000, 1), "big-endian"),
            (header(0x20_0000, 0x1000, 0), "text_offset"),
        ];
        for (bytes, why) in cases {
            let err = ImageHeader::parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(why), "{err} lacks {why}");
        }
    }

    #[test]
    fn loads_at_text_offset_and_reports_the_footprint() {
        let m = mem(64 << 20);
        let mut img = header(0x8_0000, 0x10_0000, 0);
        img.extend_from_slice(b"kernel body");
        let loaded = load_image(&m, 64 << 20, &mut img.as_slice()).unwrap();
        assert_eq!(loaded.entry, DRAM_START + 0x8_0000);
        assert_eq!(loaded.end, DRAM_START + 0x8_0000 + 0x10_0000);
        let mut back = [0u8; 11];
        m.read_slice(&mut back, GuestAddress(loaded.entry + 64))
            .unwrap();
        assert_eq!(&back, b"kernel body");
    }

    #[test]
    fn kernel_larger_than_ram_is_refused() {
        let m = mem(4 << 20);
        let img = header(0, 8 << 20, 0);
        let err = load_image(&m, 4 << 20, &mut img.as_slice()).unwrap_err();
        assert!(err.to_string().contains("more than the guest's"), "{err}");
    }

    #[test]
    fn fdt_and_initrd_go_below_the_top_of_the_boot_window() {
        let fdt = fdt_address(256 << 20).unwrap();
        assert_eq!(fdt, DRAM_START + (256 << 20) - FDT_MAX_SIZE);
        // With more than 32 GiB the blobs stay inside the boot window.
        assert_eq!(
            fdt_address(64 << 30).unwrap(),
            BOOT_WINDOW_END - FDT_MAX_SIZE
        );
        let kernel = LoadedImage {
            entry: DRAM_START,
            end: DRAM_START + (32 << 20),
        };
        let initrd = initrd_address(&kernel, fdt, 10 << 20).unwrap();
        assert_eq!(initrd % INITRD_ALIGN, 0);
        assert!(initrd + (10 << 20) <= fdt && initrd >= kernel.end);
        let err = initrd_address(&kernel, fdt, 250 << 20).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(fdt_address(1 << 20).is_err());
    }
}
