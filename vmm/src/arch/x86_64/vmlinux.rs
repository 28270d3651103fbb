//! Booting a bzImage without its in-guest decompressor.
//!
//! A bzImage carries the kernel (an ELF vmlinux) compressed; its first guest code
//! is a decompressor that unpacks it, applies relocations and jumps in. In a VM
//! that code runs on every boot, and under nested virtualization it is the
//! largest single cost before the kernel's own clock starts. So aivmm unpacks the
//! payload once on the host, keeps the vmlinux in its cache (`<cache>/kernels/`),
//! and from then on loads the ELF directly at its link address, as Firecracker
//! does with a vmlinux. `--no-kernel-cache` boots the bzImage as it is.
//!
//! In the nested harness (`tests/e2e/run qemu-compare`) a boot of Debian's cloud
//! kernel through the cache reaches its init ~120 ms (6%) sooner than through its
//! decompressor. (Earlier figures of ~2.5 s saved, and of cached boots that lost
//! ~1.5 s after a QEMU boot, were an artifact of the harness: L0's TCG invalidating
//! its translations of recycled pages, at random points of whichever boot wrote
//! them first. tests/e2e/README.md, "Fair timing", has the story.)
//!
//! The cache entry is keyed by the bzImage's path, size, mtime, ctime, inode and
//! device, so a rebuilt or replaced kernel gets a new entry. The ctime matters:
//! a same-size rewrite in place keeps the inode, and `touch -r` or `utimensat`
//! can restore the mtime, but nothing but the kernel's clock sets the ctime. Anything unexpected (another
//! compression, a corrupt payload, an unwritable cache) falls back to booting the
//! bzImage as it is; only a kernel the fallback also rejects is an error. The
//! cache keeps the [`KEEP`] most recently used entries.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a bzImage's payload could not be turned into a vmlinux.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file has no bzImage setup header.
    #[error("not a bzImage (no HdrS setup header)")]
    NotBzImage,
    /// The payload offset or length points outside the file.
    #[error("the bzImage payload lies outside the file")]
    PayloadOutOfRange,
    /// A compression aivmm does not unpack.
    #[error("{0}-compressed payload (aivmm unpacks LZ4 only)")]
    Unsupported(&'static str),
    /// The compressed data is damaged.
    #[error("corrupt LZ4 payload: {0}")]
    Corrupt(String),
    /// The unpacked payload is not an ELF file.
    #[error("the unpacked payload is not an ELF vmlinux")]
    NotElf,
    /// Reading the kernel or writing the cache failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The module's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// The magic of the LZ4 "legacy" format the kernel's build uses.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Each legacy block unpacks to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// No kernel is this large unpacked; a payload that claims more is corrupt.
const MAX_VMLINUX: usize = 1 << 30;
/// Bumped when the cache's content or naming changes.
const CACHE_VERSION: &str = "aivmm-vmlinux-v3";

fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Whether `head` (the file's first bytes) starts a bzImage.
pub fn is_bzimage(head: &[u8]) -> bool {
    head.get(0x202..0x206) == Some(b"HdrS")
}

/// The compressed payload of the bzImage `bz`.
pub fn payload(bz: &[u8]) -> Result<&[u8]> {
    if !is_bzimage(bz) {
        return Err(Error::NotBzImage);
    }
    let sects = match bz.get(0x1f1) {
        Some(0) => 4,
        Some(&n) => usize::from(n),
        None => return Err(Error::NotBzImage),
    };
    let offset = le32(bz, 0x248).ok_or(Error::NotBzImage)? as usize;
    let length = le32(bz, 0x24c).ok_or(Error::NotBzImage)? as usize;
    let start = (sects + 1) * 512 + offset;
    start
        .checked_add(length)
        .and_then(|end| bz.get(start..end))
        .ok_or(Error::PayloadOutOfRange)
}

/// The name of the compression `payload` starts with.
pub fn compression(payload: &[u8]) -> &'static str {
    const MAGICS: [(&[u8], &str); 7] = [
        (&[0x02, 0x21, 0x4c, 0x18], "lz4"),
        (&[0x1f, 0x8b], "gzip"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
        (b"BZh", "bzip2"),
        (&[0x5d, 0, 0], "lzma"),
        (&[0x89, b'L', b'Z', b'O'], "lzo"),
    ];
    MAGICS
        .iter()
        .find(|(m, _)| payload.starts_with(m))
        .map_or("unknown", |(_, n)| n)
}

/// Unpacks LZ4 legacy data: the magic, then blocks each preceded by its
/// compressed size. The kernel's build appends the unpacked size (4 bytes) after
/// the last block; it is checked when present.
pub fn decompress_lz4_legacy(input: &[u8]) -> Result<Vec<u8>> {
    if le32(input, 0) != Some(LZ4_LEGACY_MAGIC) {
        return Err(Error::Corrupt("no LZ4 legacy magic".into()));
    }
    let mut out = Vec::new();
    let mut pos = 4;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while let Some(size) = le32(input, pos) {
        if size == LZ4_LEGACY_MAGIC {
            // Concatenated archives restart with the magic.
            pos += 4;
            continue;
        }
        let size = size as usize;
        let body = pos + 4;
        let Some(data) = body.checked_add(size).and_then(|e| input.get(body..e)) else {
            // Not a block: the trailing unpacked size, when it is all that is left.
            if input.len() - pos == 4 {
                if size != out.len() {
                    return Err(Error::Corrupt(format!(
                        "unpacked {} bytes, the trailer says {size}",
                        out.len()
                    )));
                }
                break;
            }
            return Err(Error::Corrupt(format!(
                "block of {size} bytes at offset {pos} runs past the end"
            )));
        };
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| Error::Corrupt(format!("block at offset {pos}: {e}")))?;
        if out.len() + n > MAX_VMLINUX {
            return Err(Error::Corrupt("unpacks to more than 1 GiB".into()));
        }
        out.extend_from_slice(&block[..n]);
        pos = body + size;
    }
    Ok(out)
}

/// The vmlinux inside the bzImage `bz`.
pub fn extract(bz: &[u8]) -> Result<Vec<u8>> {
    let p = payload(bz)?;
    let vmlinux = match compression(p) {
        "lz4" => decompress_lz4_legacy(p)?,
        other => return Err(Error::Unsupported(other)),
    };
    if !vmlinux.starts_with(b"\x7fELF") {
        return Err(Error::NotElf);
    }
    let mut vmlinux = vmlinux;
    trim_zero_tails(&mut vmlinux);
    Ok(vmlinux)
}

/// Shortens each loadable segment's file size (`p_filesz`) to end at its last
/// non-zero byte; its memory size (`p_memsz`) stays. The unpacked kernel carries
/// its `.bss`, `.brk` and early scratch space as file data, ~12 MB of zeros in
/// Debian's; guest RAM is fresh and zero, so the loader need not copy them (in
/// the nested harness that is ~25% of the kernel's load time). Headers it cannot
/// read (not ELF64 little-endian, out of the file) are left as they are.
pub fn trim_zero_tails(elf: &mut [u8]) {
    const PT_LOAD: u32 = 1;
    const PHDR_LEN: usize = 56;
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(4..6) != Some(&[2, 1]) {
        return;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return;
    };
    let (Ok(phoff), phentsize) = (usize::try_from(phoff), usize::from(phentsize)) else {
        return;
    };
    if phentsize < PHDR_LEN {
        return;
    }
    for i in 0..usize::from(phnum) {
        let Some(ph) = i.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)) else {
            return;
        };
        let (Some(kind), Some(off), Some(filesz)) =
            (u32_at(elf, ph), u64_at(elf, ph + 8), u64_at(elf, ph + 32))
        else {
            return;
        };
        if kind != PT_LOAD {
            continue;
        }
        let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(filesz)) else {
            continue;
        };
        let Some(data) = off.checked_add(len).and_then(|end| elf.get(off..end)) else {
            continue;
        };
        // At least one word: a loader skips a segment with no file data, and then
        // its memory would not count towards the kernel's end (where the initrd
        // may start).
        let used = data.iter().rposition(|&b| b != 0).map_or(1, |last| last + 1);
        // Whole 8-byte words, never past the original size.
        let trimmed = used.next_multiple_of(8).min(len) as u64;
        elf[ph + 32..ph + 40].copy_from_slice(&trimmed.to_le_bytes());
    }
}

/// The cache file for the kernel at `path` under `cache_dir`.
fn cache_path(path: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let io = |what, source| Error::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let canon = fs::canonicalize(path).map_err(|e| io("cannot resolve kernel", e))?;
    let m = fs::metadata(&canon).map_err(|e| io("cannot stat kernel", e))?;
    let mut h = Sha256::new();
    h.update(CACHE_VERSION);
    h.update(canon.as_os_str().as_encoded_bytes());
    for v in [m.len(), m.ino(), m.dev()] {
        h.update(v.to_le_bytes());
    }
    for t in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
        h.update(t.to_le_bytes());
    }
    let key: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(cache_dir.join(format!("{key}.vmlinux")))
}

/// The cached vmlinux of the bzImage at `path`, made now if missing. Only
/// complete files are ever visible under their final name (written to a
/// temporary name, synced, then renamed).
pub fn cached_vmlinux(path: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let target = cache_path(path, cache_dir)?;
    if fs::metadata(&target).is_ok_and(|m| m.len() > 0) {
        // Marks it recently used, for pruning; a read-only cache still works.
        let _ = File::options()
            .append(true)
            .open(&target)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        return Ok(target);
    }
    let mut bz = Vec::new();
    aivmm_devices::host_file::open_regular(path)
        .and_then(|mut f| f.read_to_end(&mut bz))
        .map_err(|source| Error::Io {
            what: "cannot read kernel",
            path: path.display().to_string(),
            source,
        })?;
    let vmlinux = extract(&bz)?;
    let cache_io = |what, source| Error::Io {
        what,
        path: cache_dir.display().to_string(),
        source,
    };
    fs::create_dir_all(cache_dir).map_err(|e| cache_io("cannot create cache directory", e))?;
    let tmp = cache_dir.join(format!(".{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&vmlinux)?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        cache_io("cannot write the vmlinux cache in", e)
    })?;
    prune(cache_dir, &target);
    Ok(target)
}

/// How many cached vmlinux files are kept (each is tens of MB).
pub const KEEP: usize = 4;

/// Removes all but the [`KEEP`] most recently used `*.vmlinux` files in
/// `cache_dir`, never `keep`. Best effort: a file another process is booting
/// stays readable through its open descriptor.
fn prune(cache_dir: &Path, keep: &Path) {
    let Ok(dir) = fs::read_dir(cache_dir) else {
        return;
    };
    let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "vmlinux") && p != keep)
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in entries.into_iter().skip(KEEP - 1) {
        if let Err(e) = fs::remove_file(&p) {
            tracing::debug!("cannot prune {}: {e}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Packs `data` in LZ4 legacy blocks of `block` bytes, with the size trailer.
    fn lz4_legacy(data: &[u8], block: usize, trailer: bool) -> Vec<u8> {
        let mut v = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for c in data.chunks(block) {
            let z = lz4_flex::block::compress(c);
            v.extend_from_slice(&(z.len() as u32).to_le_bytes());
            v.extend_from_slice(&z);
        }
        if trailer {
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        }
        v
    }

    /// A bzImage-shaped file: setup sectors with the header fields this module
    /// reads, then `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let sects = 3u8;
        let mut v = vec![0u8; (usize::from(sects) + 1) * 512];
        v[0x1f1] = sects;
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        v[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&[0xee; 16]);
        v.extend_from_slice(payload);
        v
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        let mut e: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        e[..4].copy_from_slice(b"\x7fELF");
        e
    }

    /// An ELF64 header and program headers `(type, offset, filesz, memsz)`, in a
    /// zeroed file of `len` bytes.
    fn elf_with(phdrs: &[(u32, u64, u64, u64)], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..6].copy_from_slice(b"\x7fELF\x02\x01");
        v[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, &(kind, off, filesz, memsz)) in phdrs.iter().enumerate() {
            let ph = 64 + i * 56;
            v[ph..ph + 4].copy_from_slice(&kind.to_le_bytes());
            v[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
            v[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
            v[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        v
    }

    fn phdr_field(elf: &[u8], i: usize, at: usize) -> u64 {
        let o = 64 + i * 56 + at;
        u64::from_le_bytes(elf[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn zero_tails_of_loadable_segments_are_not_copied() {
        // 0: data to 0x1003, then zeros. 1: all zeros (keeps one word). 2: a NOTE.
        // 3: reaches past the end of the file, left alone.
        let phdrs = [
            (1, 0x1000, 0x1000, 0x3000),
            (1, 0x2000, 0x800, 0x800),
            (4, 0x1000, 0x100, 0x100),
            (1, 0x2000, 0x10000, 0x10000),
        ];
        let mut elf = elf_with(&phdrs, 0x3000);
        elf[0x1000] = 1;
        elf[0x1002] = 7;
        trim_zero_tails(&mut elf);
        let filesz: Vec<u64> = (0..4).map(|i| phdr_field(&elf, i, 32)).collect();
        assert_eq!(filesz, [8, 8, 0x100, 0x10000]);
        let memsz: Vec<u64> = (0..4).map(|i| phdr_field(&elf, i, 40)).collect();
        assert_eq!(memsz, [0x3000, 0x800, 0x100, 0x10000]);
        // Truncated or foreign headers: no panic, nothing changed.
        for mut bad in [elf[..0x50].to_vec(), b"\x7fELF\x01\x01".to_vec(), Vec::new()] {
            let before = bad.clone();
            trim_zero_tails(&mut bad);
            assert_eq!(bad, before);
        }
    }

    #[test]
    fn unpacks_multi_block_payload_with_trailer() {
        let elf = fake_elf(3 * LZ4_LEGACY_BLOCK / 2 + 123);
        let bz = bzimage(&lz4_legacy(&elf, LZ4_LEGACY_BLOCK, true));
        assert_eq!(compression(payload(&bz).unwrap()), "lz4");
        assert_eq!(extract(&bz).unwrap(), elf);
    }

    #[test]
    fn unpacks_without_trailer() {
        let elf = fake_elf(10_000);
        let bz = bzimage(&lz4_legacy(&elf, 4096, false));
        assert_eq!(extract(&bz).unwrap(), elf);
    }

    #[test]
    fn wrong_trailer_truncation_and_garbage_are_errors_not_panics() {
        let elf = fake_elf(20_000);
        let mut z = lz4_legacy(&elf, 8192, true);
        let n = z.len();
        z[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        assert!(matches!(extract(&bzimage(&z)), Err(Error::Corrupt(_))));
        let z = lz4_legacy(&elf, 8192, false);
        for cut in [5, 9, z.len() / 2, z.len() - 1] {
            assert!(extract(&bzimage(&z[..cut])).is_err(), "cut at {cut}");
        }
        let mut bad = z.clone();
        for b in bad[8..].iter_mut().step_by(3) {
            *b ^= 0x5a;
        }
        assert!(extract(&bzimage(&bad)).is_err());
    }

    #[test]
    fn other_formats_are_reported_by_name() {
        let bz = bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
        assert!(matches!(extract(&bz), Err(Error::Unsupported("zstd"))));
        assert!(matches!(extract(b"\x7fELF...."), Err(Error::NotBzImage)));
        let mut bz = bzimage(b"x");
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(payload(&bz), Err(Error::PayloadOutOfRange)));
        let not_elf = bzimage(&lz4_legacy(&[0u8; 5000], 4096, true));
        assert!(matches!(extract(&not_elf), Err(Error::NotElf)));
    }

    #[test]
    fn cache_is_reused_and_keyed_by_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("bzImage");
        let cache = dir.path().join("cache");
        let elf = fake_elf(50_000);
        fs::write(&k, bzimage(&lz4_legacy(&elf, 16384, true))).unwrap();
        let p1 = cached_vmlinux(&k, &cache).unwrap();
        assert_eq!(fs::read(&p1).unwrap(), elf);
        assert_eq!(cached_vmlinux(&k, &cache).unwrap(), p1);
        // A different kernel at the same path gets its own entry.
        let elf2 = fake_elf(60_000);
        fs::remove_file(&k).unwrap();
        fs::write(&k, bzimage(&lz4_legacy(&elf2, 16384, true))).unwrap();
        let p2 = cached_vmlinux(&k, &cache).unwrap();
        assert_ne!(p1, p2);
        assert_eq!(fs::read(&p2).unwrap(), elf2);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A kernel rewritten in place with the same size, and its mtime put back
    /// (as `cp --preserve` or `touch -r` would), is not served from the cache:
    /// its ctime moved.
    #[test]
    fn same_size_rewrite_with_the_mtime_restored_misses_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("bzImage");
        let cache = dir.path().join("cache");
        let elf1 = fake_elf(50_000);
        let mut elf2 = elf1.clone();
        elf2[1000..1010].copy_from_slice(b"rewritten!");
        let mut bz1 = bzimage(&lz4_legacy(&elf1, 16384, true));
        let mut bz2 = bzimage(&lz4_legacy(&elf2, 16384, true));
        // Bytes past the payload are ignored: pad both to one size.
        let len = bz1.len().max(bz2.len());
        bz1.resize(len, 0);
        bz2.resize(len, 0);
        fs::write(&k, &bz1).unwrap();
        let before = fs::metadata(&k).unwrap();
        let p1 = cached_vmlinux(&k, &cache).unwrap();
        assert_eq!(fs::read(&p1).unwrap(), elf1);
        // The ctime has a clock tick to move by (coarse on some filesystems).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = fs::OpenOptions::new().write(true).open(&k).unwrap();
        f.write_all(&bz2).unwrap();
        f.set_modified(before.modified().unwrap()).unwrap();
        drop(f);
        let after = fs::metadata(&k).unwrap();
        assert_eq!(
            (after.len(), after.ino(), after.dev(), after.modified().unwrap()),
            (before.len(), before.ino(), before.dev(), before.modified().unwrap()),
            "the rewrite must look the same to the old key"
        );
        let p2 = cached_vmlinux(&k, &cache).unwrap();
        assert_ne!(p1, p2, "a stale vmlinux was served");
        assert_eq!(fs::read(&p2).unwrap(), elf2);
    }

    #[test]
    fn prune_keeps_the_most_recently_used_entries() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let mut paths = Vec::new();
        for i in 0..7u64 {
            let p = dir.path().join(format!("{i}.vmlinux"));
            fs::write(&p, b"x").unwrap();
            let f = File::options().append(true).open(&p).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(100 * (7 - i))).unwrap();
            paths.push(p);
        }
        fs::write(dir.path().join("other.txt"), b"y").unwrap();
        // The oldest entry is the one just used: it stays, with the KEEP - 1 newest.
        prune(dir.path(), &paths[0]);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["0.vmlinux", "4.vmlinux", "5.vmlinux", "6.vmlinux", "other.txt"]);
    }

    /// The kernel the e2e harness boots, when this machine has it: its payload
    /// unpacks to an ELF whose size matches the trailer.
    #[test]
    fn unpacks_the_debian_cloud_kernel_if_present() {
        let Some(k) = fs::read_dir("/boot").ok().and_then(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                p.to_string_lossy().contains("vmlinuz-")
                    && p.to_string_lossy().ends_with("-cloud-amd64")
            })
        }) else {
            eprintln!("no /boot/vmlinuz-*-cloud-amd64 here; skipped");
            return;
        };
        let bz = fs::read(&k).unwrap();
        match extract(&bz) {
            Ok(elf) => assert!(elf.len() > 10 << 20, "{} bytes", elf.len()),
            Err(Error::Unsupported(c)) => eprintln!("{}: {c}; skipped", k.display()),
            Err(e) => panic!("{}: {e}", k.display()),
        }
    }
}
