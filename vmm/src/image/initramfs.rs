//! The initramfs: busybox-static, the boot modules in dependency order, and the
//! stage-1 `/init`. Written as an uncompressed newc cpio (decompressing costs
//! real time under nested TCG), entries sorted and stamped with one mtime so the
//! same inputs give the same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{Error, Result};

/// The modules the boot needs (Debian's cloud kernel builds them as modules);
/// their dependencies are added from each module's `.modinfo`.
pub const BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "virtio_console",
    "fuse",
    "virtiofs",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "overlay",
    // The ACPI power button (`aivmm stop`) and evdev, through which the agent sees
    // it: here, not in stage 2, where finding them in the text modules.dep cost
    // most of a second of every boot under nested virtualization.
    "button",
    "evdev",
];

/// Stage 1, run by busybox as `/init` in the initramfs.
pub const INIT: &str = include_str!("../../../guest-image/debian/init");
/// Stage 2, `/usr/lib/aivmm/init2` in the root filesystem.
pub const INIT2: &str = include_str!("../../../guest-image/debian/init2");
/// udhcpc's hook, `/etc/udhcpc.script` in the initramfs.
pub const UDHCPC_SCRIPT: &str = include_str!("../../../guest-image/debian/udhcpc.script");

/// Fills `@NAME@` placeholders in a script template. Unknown placeholders are
/// an error, so a template and its caller cannot drift apart silently.
pub fn render(template: &str, vars: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('@') {
            Some(end)
                if after[..end]
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_')
                    && end > 0 =>
            {
                let key = &after[..end];
                let value = vars
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| Error::Template(key.to_string()))?;
                out.push_str(value);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('@');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The module name of a file: `kernel/drivers/char/hw_random/virtio-rng.ko` → `virtio_rng`.
pub fn module_name(path: &Path) -> String {
    let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

fn le16(b: &[u8], at: usize) -> Option<u64> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?) as u64)
}
fn le32(b: &[u8], at: usize) -> Option<u64> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as u64)
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The `depends=` list from a 64-bit little-endian kernel module's `.modinfo`
/// section (what depmod reads). `None` if the file is not such an ELF object.
pub fn modinfo_depends(elf: &[u8]) -> Option<Vec<String>> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(le64(elf, 0x28)?).ok()?;
    let shentsize = usize::try_from(le16(elf, 0x3a)?).ok()?;
    let shnum = usize::try_from(le16(elf, 0x3c)?).ok()?;
    let shstrndx = usize::try_from(le16(elf, 0x3e)?).ok()?;
    let section = |i: usize| -> Option<(u64, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = le32(elf, h)?;
        let off = usize::try_from(le64(elf, h + 0x18)?).ok()?;
        let size = usize::try_from(le64(elf, h + 0x20)?).ok()?;
        Some((name, off, size))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf.get(stroff..stroff.checked_add(strsize)?)?;
    for i in 0..shnum {
        let (name, off, size) = section(i)?;
        let name = strtab.get(usize::try_from(name).ok()?..)?;
        if !name.starts_with(b".modinfo\0") {
            continue;
        }
        let data = elf.get(off..off.checked_add(size)?)?;
        for field in data.split(|&b| b == 0) {
            if let Some(v) = field.strip_prefix(b"depends=") {
                let v = std::str::from_utf8(v).ok()?;
                return Some(
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| s.replace('-', "_"))
                        .collect(),
                );
            }
        }
        return Some(Vec::new());
    }
    Some(Vec::new())
}

/// Orders `wanted` and everything they depend on so each module comes after its
/// dependencies. `deps` maps a module name to its `depends=`; `builtin` are the
/// names the kernel has built in (skipped). Ties break by the order of `wanted`.
pub fn module_order(
    wanted: &[&str],
    deps: &BTreeMap<String, Vec<String>>,
    builtin: &BTreeSet<String>,
) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        builtin: &BTreeSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if out.iter().any(|o| o == m) || builtin.contains(m) {
            return Ok(());
        }
        if stack.iter().any(|s| s == m) {
            return Err(Error::Module(format!("dependency loop through {m}")));
        }
        let d = deps
            .get(m)
            .ok_or_else(|| Error::Module(format!("{m} is neither a module nor built in")))?;
        stack.push(m.to_string());
        for dep in d {
            visit(dep, deps, builtin, stack, out)?;
        }
        stack.pop();
        out.push(m.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    for m in wanted {
        visit(m, deps, builtin, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// One entry of a cpio archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file with its mode bits and contents.
    File(u32, Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// An initramfs under construction: path (no leading `/`) → entry.
#[derive(Debug, Default)]
pub struct Cpio {
    entries: BTreeMap<String, Entry>,
}

impl Cpio {
    /// Adds an entry and its missing parent directories.
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry::Dir);
            parent = p.parent();
        }
        self.entries.insert(path.to_string(), entry);
    }

    /// The newc archive: entries in path order (parents sort before children),
    /// owned by root, every mtime `mtime`, then the trailer.
    pub fn to_bytes(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 1u32;
        let mut push = |out: &mut Vec<u8>,
                        name: &str,
                        mode: u32,
                        data: &[u8],
                        rdev: (u32, u32),
                        nlink: u32| {
            let header = format!(
                "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                ino,
                mode,
                0,
                0,
                nlink,
                mtime,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            );
            ino += 1;
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (path, e) in &self.entries {
            match e {
                Entry::Dir => push(&mut out, path, 0o040755, &[], (0, 0), 2),
                Entry::File(mode, data) => {
                    push(&mut out, path, 0o100000 | (mode & 0o7777), data, (0, 0), 1)
                }
                Entry::Symlink(t) => push(&mut out, path, 0o120777, t.as_bytes(), (0, 0), 1),
                Entry::CharDev(maj, min) => push(&mut out, path, 0o020600, &[], (*maj, *min), 1),
            }
        }
        push(&mut out, "TRAILER!!!", 0, &[], (0, 0), 1);
        out
    }
}

/// What goes into the initramfs besides the fixed scripts.
#[derive(Debug)]
pub struct Inputs {
    /// The busybox-static binary.
    pub busybox: PathBuf,
    /// The kernel's module tree (`…/lib/modules/<version>`).
    pub module_dir: PathBuf,
    /// Identifies the image; stage 1 records it on the state disk.
    pub image_id: String,
}

/// Reads every module's dependencies under `module_dir` (name → (path, depends)).
fn scan_modules(module_dir: &Path) -> Result<BTreeMap<String, (PathBuf, Vec<String>)>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![module_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let p = e.path();
            let ft = e.file_type().map_err(|e| Error::io(&p, e))?;
            if ft.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ko") {
                let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
                let deps = modinfo_depends(&bytes).ok_or_else(|| {
                    Error::Module(format!("{} is not a kernel module", p.display()))
                })?;
                found.insert(module_name(&p), (p, deps));
            }
        }
    }
    Ok(found)
}

/// The kernel's built-in module names (`modules.builtin`, shipped in the package).
fn builtin_modules(module_dir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(module_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|l| module_name(Path::new(l)))
        .collect()
}

/// Writes `modules.dep` (depmod's text format) for the module tree, so busybox's
/// or kmod's modprobe in the guest can find dependencies; returns the boot order.
pub fn write_modules_dep(module_dir: &Path) -> Result<()> {
    let found = scan_modules(module_dir)?;
    let rel = |p: &Path| {
        p.strip_prefix(module_dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    let mut text = String::new();
    for (path, deps) in found.values() {
        let d: Vec<String> = deps
            .iter()
            .filter_map(|d| found.get(d))
            .map(|(p, _)| rel(p))
            .collect();
        text.push_str(&format!("{}: {}\n", rel(path), d.join(" ")));
    }
    let out = module_dir.join("modules.dep");
    std::fs::write(&out, text).map_err(|e| Error::io(&out, e))
}

/// Builds the initramfs bytes.
pub fn build(inputs: &Inputs, mtime: u32) -> Result<(Vec<u8>, Vec<String>)> {
    let found = scan_modules(&inputs.module_dir)?;
    let deps: BTreeMap<String, Vec<String>> = found
        .iter()
        .map(|(k, (_, d))| (k.clone(), d.clone()))
        .collect();
    let order = module_order(BOOT_MODULES, &deps, &builtin_modules(&inputs.module_dir))?;

    let mut cpio = Cpio::default();
    let bb = std::fs::read(&inputs.busybox).map_err(|e| Error::io(&inputs.busybox, e))?;
    cpio.add("bin/busybox", Entry::File(0o755, bb));
    cpio.add("bin/sh", Entry::Symlink("busybox".into()));
    for d in ["dev", "proc", "sys", "lower", "state", "newroot", "etc"] {
        cpio.add(d, Entry::Dir);
    }
    cpio.add("sbin", Entry::Symlink("bin".into()));
    cpio.add("dev/console", Entry::CharDev(5, 1));
    cpio.add("dev/null", Entry::CharDev(1, 3));
    let mut names = Vec::new();
    for m in &order {
        let Some((path, _)) = found.get(m) else {
            continue;
        };
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file = format!("{m}.ko");
        cpio.add(&format!("lib/modules/{file}"), Entry::File(0o644, data));
        names.push(file);
    }
    cpio.add(
        "lib/modules/order",
        Entry::File(0o644, (names.join("\n") + "\n").into_bytes()),
    );
    let init = render(INIT, &[("IMAGE_ID", &inputs.image_id)])?;
    cpio.add("init", Entry::File(0o755, init.into_bytes()));
    cpio.add(
        "etc/udhcpc.script",
        Entry::File(0o755, UDHCPC_SCRIPT.as_bytes().to_vec()),
    );
    Ok((cpio.to_bytes(mtime), order))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn render_fills_and_refuses_unknown() {
        assert_eq!(
            render("a @X@ b@Y_Z@ c@d @", &[("X", "1"), ("Y_Z", "2")]).unwrap(),
            "a 1 b2 c@d @"
        );
        assert!(matches!(render("@NOPE@", &[]), Err(Error::Template(k)) if k == "NOPE"));
        // Shell text with lone @ or e-mail-like text passes through.
        assert_eq!(render("x@y.z $@", &[]).unwrap(), "x@y.z $@");
    }

    #[test]
    fn init_scripts_keep_the_contract() {
        let init = render(INIT, &[("IMAGE_ID", "test-id")]).unwrap();
        for must in [
            "/lib/modules/order",
            "mount -t ext4 -o ro /dev/vda /lower",
            "lowerdir=/lower,upperdir=/state/upper,workdir=/state/work",
            "mount -t virtiofs work work",
            "udhcpc -i eth0",
            "aivmm.uid=*",
            "aivmm.gid=*",
            "aivmm.cmd=*",
            "/home/user",
            "switch_root /newroot /usr/lib/aivmm/init2",
            "test-id",
        ] {
            assert!(init.contains(must), "stage 1 lacks {must:?}");
        }
        for must in [
            "/usr/local/bin/aivmm-agent",
            "base64 -d",
            "AIVMM-EXIT status=",
            "poweroff -f",
        ] {
            assert!(INIT2.contains(must), "stage 2 lacks {must:?}");
        }
        assert!(init.starts_with("#!/bin/busybox sh\n") && INIT2.starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn module_names_and_order() {
        assert_eq!(
            module_name(Path::new("kernel/drivers/char/hw_random/virtio-rng.ko")),
            "virtio_rng"
        );
        assert_eq!(module_name(Path::new("fuse.ko.xz")), "fuse");
        let deps: BTreeMap<String, Vec<String>> = [
            ("virtio_blk", vec!["virtio", "virtio_ring"]),
            ("virtio_ring", vec!["virtio"]),
            ("virtio", vec![]),
            ("virtiofs", vec!["fuse", "virtio_ring", "virtio"]),
            ("fuse", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let builtin = BTreeSet::from(["ext4".to_string()]);
        let order = module_order(&["virtio_blk", "ext4", "virtiofs"], &deps, &builtin).unwrap();
        assert_eq!(
            order,
            ["virtio", "virtio_ring", "virtio_blk", "fuse", "virtiofs"]
        );
        assert!(module_order(&["nope"], &deps, &builtin).is_err());
        let mut looped = deps.clone();
        looped.insert("virtio".into(), vec!["virtio_blk".into()]);
        assert!(module_order(&["virtio_blk"], &looped, &builtin).is_err());
    }

    /// A minimal ELF64 object with a `.modinfo` section.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let info_off = elf.len();
        elf.extend_from_slice(modinfo);
        let str_off = elf.len();
        elf.extend_from_slice(shstr);
        while elf.len() % 8 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        let headers = [
            sh(0, 0, 0),
            sh(1, info_off, modinfo.len()),
            sh(10, str_off, shstr.len()),
        ]
        .concat();
        elf.extend_from_slice(&headers);
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_is_read_from_elf() {
        let m =
            fake_module(b"license=GPL\0depends=virtio,virtio_ring,failover-x\0name=virtio_net\0");
        assert_eq!(
            modinfo_depends(&m).unwrap(),
            ["virtio", "virtio_ring", "failover_x"]
        );
        assert_eq!(
            modinfo_depends(&fake_module(b"depends=\0")).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(modinfo_depends(b"not an elf"), None);
        let mut truncated = fake_module(b"depends=a\0");
        truncated.truncate(100);
        assert_eq!(modinfo_depends(&truncated), None);
    }

    #[test]
    fn cpio_is_sorted_padded_and_stable() {
        let mut c = Cpio::default();
        c.add("init", Entry::File(0o755, b"#!/bin/sh\n".to_vec()));
        c.add("lib/modules/a.ko", Entry::File(0o644, vec![1, 2, 3]));
        c.add("bin/sh", Entry::Symlink("busybox".into()));
        let bytes = c.to_bytes(1_700_000_000);
        assert_eq!(bytes, c.to_bytes(1_700_000_000));
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        let order: Vec<usize> = [
            "bin\0",
            "bin/sh\0",
            "init\0",
            "lib\0",
            "lib/modules\0",
            "lib/modules/a.ko\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap_or_else(|| panic!("{n} missing")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }
}
