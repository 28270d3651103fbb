//! A guest kernel built from Debian's `linux-source` with `guest-image/kernel.config`
//! (`aivmm image build --kernel-from-source`), in place of Debian's cloud kernel.
//!
//! Without root, like the rest of the builder:
//! 1. the `linux-source-<major>` package comes through the builder's private apt
//!    ([`super::apt`]), and `dpkg-deb -x` + `tar` unpack its tarball into a work
//!    tree under `<cache>/kernel-build/`;
//! 2. `make tinyconfig` gives the small base, the fragment is applied on top
//!    ([`apply_fragment`]), `make olddefconfig` fills in the rest, and a result that
//!    lost any option of the fragment (an unmet dependency) is refused
//!    ([`unmet_settings`]): the fragment says exactly what the kernel has;
//! 3. `make bzImage modules` runs under `nice`, with a progress display counting
//!    the objects built, and `make modules_install` writes the module tree (just
//!    `modules.builtin` and friends: everything the boot needs is built in);
//! 4. the result lands in `<cache>/kernel-build/<version>-<config hash>/`, so the
//!    same source version and config never build twice. The work tree stays if a
//!    build fails or is interrupted, and the next run resumes where make stopped.
//!
//! The build is reproducible for the same source, config and compiler: the
//! timestamp, user, host and build number kbuild would stamp in are fixed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{apt, packages::Package, tools, Error, Progress, Result};

/// The config fragment (see the file for what it holds and why).
pub const KERNEL_CONFIG: &str = include_str!("../../../guest-image/kernel.config");
/// The metapackage whose dependency is the versioned source package.
pub const SOURCE_META: &str = "linux-source";
/// Bumped whenever the way the kernel is built changes.
pub const KERNEL_BUILD_VERSION: &str = "1";
/// kbuild's architecture.
const ARCH: &str = "ARCH=x86_64";

/// Host programs the build runs, with the Debian package that has each.
pub const BUILD_TOOLS: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("xz", "xz-utils"),
    ("tar", "tar"),
    ("nice", "coreutils"),
];
/// Headers the build compiles host tools against (objtool, sign-file), with
/// the Debian package that has each.
pub const BUILD_HEADERS: &[(&str, &str)] = &[
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
];

/// The Debian packages missing for a kernel build, given how to look for a
/// program and for a file. Sorted, without repeats.
pub fn missing_build_packages(
    has_tool: impl Fn(&str) -> bool,
    has_file: impl Fn(&str) -> bool,
) -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = BUILD_TOOLS
        .iter()
        .filter(|(t, _)| !has_tool(t))
        .map(|(_, p)| *p)
        .chain(
            BUILD_HEADERS
                .iter()
                .filter(|(f, _)| !has_file(f))
                .map(|(_, p)| *p),
        )
        .collect();
    missing.sort_unstable();
    missing.dedup();
    missing
}

/// Fails with one error naming every missing package, if any is missing.
pub fn check_build_tools() -> Result<()> {
    let missing = missing_build_packages(|t| tools::find(t).is_ok(), |f| Path::new(f).is_file());
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::KernelTools(missing.join(" ")))
    }
}

/// One line of a config fragment: an option set to a value, or explicitly unset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// `CONFIG_X=value` (`y`, `m`, a number or a quoted string, as written).
    Value(String),
    /// `# CONFIG_X is not set` (or `CONFIG_X=n`).
    Unset,
}

/// Parses a Kconfig fragment: `CONFIG_X=v` lines, `# CONFIG_X is not set`
/// lines, comments and blank lines. Anything else, or an option given twice, is
/// an error naming the line.
pub fn parse_fragment(text: &str) -> Result<Vec<(String, Setting)>> {
    let mut out: Vec<(String, Setting)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let bad = |why: &str| Error::KernelConfig(format!("line {}: {why}: {line}", n + 1));
        let (name, setting) = if let Some(rest) = line.strip_prefix("# CONFIG_") {
            match rest.strip_suffix(" is not set") {
                Some(name) => (format!("CONFIG_{name}"), Setting::Unset),
                None => continue,
            }
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some((name, value)) = line.split_once('=') {
            if !name.starts_with("CONFIG_") {
                return Err(bad("not a CONFIG_ option"));
            }
            if value.is_empty() {
                return Err(bad("no value"));
            }
            let setting = if value == "n" {
                Setting::Unset
            } else {
                Setting::Value(value.to_string())
            };
            (name.to_string(), setting)
        } else {
            return Err(bad(
                "expected CONFIG_NAME=value or '# CONFIG_NAME is not set'",
            ));
        };
        let valid = name.strip_prefix("CONFIG_").is_some_and(|s| {
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
        if !valid {
            return Err(bad("bad option name"));
        }
        if out.iter().any(|(o, _)| *o == name) {
            return Err(bad("option given twice"));
        }
        out.push((name, setting));
    }
    Ok(out)
}

/// The option a `.config` line sets, and how.
fn config_line(line: &str) -> Option<(&str, Setting)> {
    if let Some(rest) = line.strip_prefix("# ") {
        let name = rest.strip_suffix(" is not set")?;
        return name
            .starts_with("CONFIG_")
            .then_some((name, Setting::Unset));
    }
    let (name, value) = line.split_once('=')?;
    name.starts_with("CONFIG_").then(|| {
        (
            name,
            if value == "n" {
                Setting::Unset
            } else {
                Setting::Value(value.to_string())
            },
        )
    })
}

fn render(name: &str, s: &Setting) -> String {
    match s {
        Setting::Value(v) => format!("{name}={v}"),
        Setting::Unset => format!("# {name} is not set"),
    }
}

/// `base` (a `.config`) with every option of `fragment` set as the fragment
/// says: the base's lines for those options are dropped and the fragment's are
/// appended, as the kernel's `merge_config.sh` does. Appending matters for
/// choices: Kconfig keeps the last `=y` of a choice group it reads, so the
/// fragment's `CONFIG_SLUB=y` beats tinyconfig's `CONFIG_SLOB=y` only after it.
/// `make olddefconfig` then resolves the rest.
pub fn apply_fragment(base: &str, fragment: &[(String, Setting)]) -> String {
    let mut out = String::with_capacity(base.len() + fragment.len() * 32);
    for line in base.lines() {
        let overridden =
            config_line(line).is_some_and(|(name, _)| fragment.iter().any(|(n, _)| n == name));
        if !overridden {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (name, s) in fragment {
        out.push_str(&render(name, s));
        out.push('\n');
    }
    out
}

/// The fragment's options that the final `.config` does not have as asked,
/// each as `CONFIG_X: wanted …, got …`. An unset option is met by absence.
pub fn unmet_settings(config: &str, fragment: &[(String, Setting)]) -> Vec<String> {
    let have: std::collections::BTreeMap<&str, Setting> =
        config.lines().filter_map(config_line).collect();
    fragment
        .iter()
        .filter_map(|(name, want)| {
            let got = have.get(name.as_str()).cloned().unwrap_or(Setting::Unset);
            (got != *want).then(|| {
                let show = |s: &Setting| match s {
                    Setting::Value(v) => v.clone(),
                    Setting::Unset => "unset".into(),
                };
                format!("{name}: wanted {}, got {}", show(want), show(&got))
            })
        })
        .collect()
}

/// The cache key of a build: the source package and the fragment, so a changed
/// config or a new source version builds anew.
pub fn build_key(source: &Package, config: &str) -> String {
    super::digest(&[
        ("kernel-build".into(), KERNEL_BUILD_VERSION.into()),
        (
            format!("deb {}", source.name),
            format!("{} {}", source.version, source.sha256),
        ),
        ("config".into(), config.into()),
    ])
}

/// The name of a build's directory: `<version>-<key>`, the version made safe
/// for a file name.
pub fn build_dir_name(source: &Package, config: &str) -> String {
    let v: String = source
        .version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".+-~".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{v}-{}", build_key(source, config))
}

/// Whether a line of kbuild's output (without V=1) reports one built object.
pub fn is_object_line(line: &str) -> bool {
    let mut w = line.split_whitespace();
    matches!(
        w.next(),
        Some("CC" | "AS" | "AR" | "LD" | "HOSTCC" | "HOSTLD" | "OBJCOPY" | "GEN" | "UPD")
    ) && w.next().is_some()
}

/// A finished kernel build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>`: `modules.builtin` and friends, modules if any.
    pub module_dir: PathBuf,
    /// `make kernelrelease`, e.g. `6.1.192-aivmm`.
    pub release: String,
    /// The source package.
    pub source: String,
    /// Its version.
    pub version: String,
    /// The build's key ([`build_key`]).
    pub key: String,
}

impl Built {
    fn in_dir(dir: &Path, source: &Package, key: &str) -> Option<Self> {
        let release = std::fs::read_to_string(dir.join("release")).ok()?;
        let release = release.trim().to_string();
        let b = Built {
            vmlinuz: dir.join("vmlinuz"),
            module_dir: dir.join("lib/modules").join(&release),
            release,
            source: source.name.clone(),
            version: source.version.clone(),
            key: key.to_string(),
        };
        (b.vmlinuz.is_file() && b.module_dir.join("modules.builtin").is_file()).then_some(b)
    }
}

/// The versioned source package (`linux-source-6.1`) that [`SOURCE_META`] names.
pub fn source_package(index: &super::packages::Index) -> Result<&Package> {
    let meta = index
        .packages
        .get(SOURCE_META)
        .ok_or_else(|| Error::UnknownPackage(SOURCE_META.into()))?;
    let name = meta
        .depends
        .iter()
        .flatten()
        .find(|d| d.starts_with("linux-source-"))
        .ok_or_else(|| Error::BadPackage(format!("{SOURCE_META} names no source package")))?;
    index
        .packages
        .get(name)
        .ok_or_else(|| Error::UnknownPackage(name.clone()))
}

/// Fixed kbuild stamps, so the same inputs give the same kernel.
fn kbuild_env(epoch: u64) -> Vec<(String, String)> {
    vec![
        ("KBUILD_BUILD_TIMESTAMP".into(), format!("@{epoch}")),
        ("KBUILD_BUILD_USER".into(), "aivmm".into()),
        ("KBUILD_BUILD_HOST".into(), "aivmm".into()),
        ("KBUILD_BUILD_VERSION".into(), "1".into()),
        ("LC_ALL".into(), "C".into()),
    ]
}

/// Runs make in `tree`, reporting each built object to `on_object`; a failure
/// carries the end of make's output.
fn make(tree: &Path, args: &[String], epoch: u64, mut on_object: impl FnMut()) -> Result<()> {
    let nice = tools::find("nice")?;
    let mut cmd = Command::new(nice);
    cmd.args(["-n", "10", "make", ARCH])
        .args(args)
        .current_dir(tree)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in kbuild_env(epoch) {
        cmd.env(k, v);
    }
    tracing::debug!("running {cmd:?}");
    let mut child = cmd.spawn().map_err(|e| Error::Tool {
        tool: "make".into(),
        detail: e.to_string(),
    })?;
    // stderr is drained on its own thread so a chatty compiler cannot block make.
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut tail = std::collections::VecDeque::new();
        if let Some(s) = stderr {
            for line in BufReader::new(s).lines().map_while(std::result::Result::ok) {
                if tail.len() == 12 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        tail
    });
    let mut out_tail = std::collections::VecDeque::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if is_object_line(&line) {
                on_object();
            }
            if out_tail.len() == 4 {
                out_tail.pop_front();
            }
            out_tail.push_back(line);
        }
    }
    let status = child.wait().map_err(|e| Error::Tool {
        tool: "make".into(),
        detail: e.to_string(),
    })?;
    let err_tail = err_thread.join().unwrap_or_default();
    if !status.success() {
        let lines: Vec<String> = out_tail.into_iter().chain(err_tail).collect();
        return Err(Error::Tool {
            tool: format!("make {}", args.join(" ")),
            detail: format!("{status}: {}", lines.join("\n")),
        });
    }
    Ok(())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Unpacks the source package's tarball into `work`, unless an earlier
/// (interrupted) run already did; returns the source tree.
fn unpack_source(deb: &Path, work: &Path) -> Result<PathBuf> {
    if let Some(tree) = find_tree(work) {
        return Ok(tree);
    }
    let debdir = work.join("deb");
    std::fs::create_dir_all(&debdir).map_err(|e| Error::io(&debdir, e))?;
    tools::run(
        "dpkg-deb",
        [
            std::ffi::OsStr::new("-x"),
            deb.as_os_str(),
            debdir.as_os_str(),
        ],
        None,
        &[],
    )?;
    let src = debdir.join("usr/src");
    let tarball = std::fs::read_dir(&src)
        .map_err(|e| Error::io(&src, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
        })
        .ok_or_else(|| {
            Error::BadPackage(format!("{} holds no linux-source tarball", deb.display()))
        })?;
    let unpacking = work.join("unpacking");
    std::fs::create_dir_all(&unpacking).map_err(|e| Error::io(&unpacking, e))?;
    tools::run(
        "tar",
        [
            std::ffi::OsStr::new("-xJf"),
            tarball.as_os_str(),
            std::ffi::OsStr::new("--no-same-owner"),
            std::ffi::OsStr::new("-C"),
            unpacking.as_os_str(),
        ],
        None,
        &[],
    )?;
    // Only a complete unpack gets the name find_tree looks for.
    std::fs::rename(&unpacking, work.join("source")).map_err(|e| Error::io(&unpacking, e))?;
    super::remove_tree(&debdir)?;
    find_tree(work)
        .ok_or_else(|| Error::BadPackage("the source tarball holds no kernel tree".into()))
}

fn find_tree(work: &Path) -> Option<PathBuf> {
    let source = work.join("source");
    std::fs::read_dir(&source)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("Makefile").is_file() && p.join("Kconfig").is_file())
}

/// Writes `tree/.config`: `make tinyconfig`, the fragment on top, `make
/// olddefconfig`; an option of the fragment the result lacks is an error.
/// Returns the final config.
pub fn configure(tree: &Path, fragment: &[(String, Setting)], epoch: u64) -> Result<String> {
    let config_path = tree.join(".config");
    make(tree, &["-s".into(), "tinyconfig".into()], epoch, || {})?;
    let base = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    std::fs::write(&config_path, apply_fragment(&base, fragment))
        .map_err(|e| Error::io(&config_path, e))?;
    make(tree, &["-s".into(), "olddefconfig".into()], epoch, || {})?;
    let config = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let unmet = unmet_settings(&config, fragment);
    if !unmet.is_empty() {
        return Err(Error::KernelConfig(format!(
            "make olddefconfig did not keep {} option(s) of guest-image/kernel.config (a dependency is missing from it): {}",
            unmet.len(),
            unmet.join("; ")
        )));
    }
    Ok(config)
}

/// Builds the kernel for `source` with [`KERNEL_CONFIG`] (or finds it built).
pub fn build(
    apt: &apt::Apt,
    source: &Package,
    cache: &Path,
    epoch: u64,
    progress: &Progress,
) -> Result<Built> {
    let fragment = parse_fragment(KERNEL_CONFIG)?;
    let root = cache.join("kernel-build");
    let name = build_dir_name(source, KERNEL_CONFIG);
    let key = build_key(source, KERNEL_CONFIG);
    let dest = root.join(&name);
    if let Some(b) = Built::in_dir(&dest, source, &key) {
        return Ok(b);
    }
    check_build_tools()?;
    let _lock = super::Lock::take(&root.join(".lock"))?;
    if let Some(b) = Built::in_dir(&dest, source, &key) {
        return Ok(b);
    }

    let step = progress.step(&format!("downloading {}", source.name), Some(source.size));
    let deb = apt
        .download(&[source], |n| step.inc(n))?
        .pop()
        .ok_or_else(|| Error::BadPackage(source.name.clone()))?;
    step.finish(&format!(
        "{} {}, {} MiB",
        source.name,
        source.version,
        source.size >> 20
    ));

    let work = root.join(format!(".work-{name}"));
    let step = progress.step(&format!("unpacking {}", source.name), None);
    let tree = unpack_source(&deb, &work)?;
    step.finish("");

    let step = progress.step("configuring the kernel", None);
    let config = configure(&tree, &fragment, epoch)?;
    step.finish(&format!(
        "{} options on",
        config.lines().filter(|l| l.ends_with("=y")).count()
    ));

    // The number of objects the last build of this config made, for the bar.
    let estimate_file = root.join("objects-estimate");
    let estimate: u64 = std::fs::read_to_string(&estimate_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_OBJECTS);
    let jobs = nproc();
    let step = progress.step(&format!("building the kernel (make -j{jobs})"), None);
    let started = Instant::now();
    let mut objects = 0u64;
    let mut shown = Instant::now();
    make(
        &tree,
        &[format!("-j{jobs}"), "bzImage".into(), "modules".into()],
        epoch,
        || {
            objects += 1;
            if shown.elapsed() >= Duration::from_secs(5) {
                shown = Instant::now();
                let pct = (objects * 100 / estimate.max(1)).min(99);
                step.set_message(&format!("{objects} objects, ~{pct}%"));
            }
        },
    )?;
    step.finish(&format!(
        "{objects} objects in {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    if objects > 0 {
        let _ = std::fs::write(&estimate_file, format!("{objects}\n"));
    }

    let step = progress.step("installing the kernel", None);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        super::remove_tree(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let release = tools::run("make", ["-s", ARCH, "kernelrelease"], Some(&tree), &[])?;
    let release = String::from_utf8_lossy(&release.stdout).trim().to_string();
    if release.is_empty() || release.contains('/') {
        return Err(Error::BadPackage(format!("odd kernel release {release:?}")));
    }
    let tmp_s = tmp.to_string_lossy().into_owned();
    make(
        &tree,
        &[
            "-s".into(),
            "modules_install".into(),
            format!("INSTALL_MOD_PATH={tmp_s}"),
            "DEPMOD=true".into(),
        ],
        epoch,
        || {},
    )?;
    // The initramfs builder walks `kernel/`; with everything built in it is empty.
    let mods = tmp.join("lib/modules").join(&release);
    std::fs::create_dir_all(mods.join("kernel")).map_err(|e| Error::io(&mods, e))?;
    // modules_install links `build` back into the work tree, which is about to go.
    let _ = std::fs::remove_file(mods.join("build"));
    let _ = std::fs::remove_file(mods.join("source"));
    let bz = tree.join("arch/x86/boot/bzImage");
    std::fs::copy(&bz, tmp.join("vmlinuz")).map_err(|e| Error::io(&bz, e))?;
    std::fs::write(tmp.join("config"), &config).map_err(|e| Error::io(&tmp, e))?;
    std::fs::write(tmp.join("release"), format!("{release}\n")).map_err(|e| Error::io(&tmp, e))?;
    if dest.exists() {
        super::remove_tree(&dest)?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    super::remove_tree(&work)?;
    let built = Built::in_dir(&dest, source, &key)
        .ok_or_else(|| Error::BadPackage(format!("{} is incomplete", dest.display())))?;
    let size = std::fs::metadata(&built.vmlinuz).map_or(0, |m| m.len());
    step.finish(&format!("{release}, bzImage {} KiB", size >> 10));
    Ok(built)
}

/// Objects a build of `guest-image/kernel.config` makes (1864 counted lines for
/// 6.1.192's bzImage), for the progress estimate before a build has counted them.
const DEFAULT_OBJECTS: u64 = 1900;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_fragment_parses_and_has_what_the_contract_needs() {
        let f = parse_fragment(KERNEL_CONFIG).unwrap();
        let get = |n: &str| f.iter().find(|(k, _)| k == n).map(|(_, s)| s.clone());
        let y = Some(Setting::Value("y".into()));
        for must in [
            "CONFIG_64BIT",
            "CONFIG_KERNEL_LZ4",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_ACPI",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VIRTIO_CONSOLE",
            "CONFIG_HW_RANDOM_VIRTIO",
            "CONFIG_FUSE_FS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_DEVTMPFS",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_PARAVIRT",
            "CONFIG_KVM_GUEST",
            "CONFIG_KVM",
            "CONFIG_KVM_AMD",
            "CONFIG_KVM_INTEL",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_PACKET",
            "CONFIG_UNIX",
            "CONFIG_CGROUPS",
            "CONFIG_USER_NS",
        ] {
            assert_eq!(get(must), y, "{must} must be built in");
        }
        // PCI stays configured (6.1's ACPICA needs it to load the DSDT), unused.
        assert_eq!(get("CONFIG_PCI"), y);
        assert_eq!(get("CONFIG_RTC_CLASS"), Some(Setting::Unset));
        // Nothing in the fragment is a module: the guest boots without any.
        assert!(f.iter().all(|(_, s)| *s != Setting::Value("m".into())));
    }

    /// The Kconfig option of each module Debian's kernel needs at boot.
    fn boot_module_option(module: &str) -> Option<&'static str> {
        Some(match module {
            "virtio_mmio" => "CONFIG_VIRTIO_MMIO",
            "virtio_blk" => "CONFIG_VIRTIO_BLK",
            "virtio_net" => "CONFIG_VIRTIO_NET",
            "virtio_rng" => "CONFIG_HW_RANDOM_VIRTIO",
            "virtio_balloon" => "CONFIG_VIRTIO_BALLOON",
            "virtio_console" => "CONFIG_VIRTIO_CONSOLE",
            "fuse" => "CONFIG_FUSE_FS",
            "virtiofs" => "CONFIG_VIRTIO_FS",
            "vsock" => "CONFIG_VSOCKETS",
            "vmw_vsock_virtio_transport_common" | "vmw_vsock_virtio_transport" => {
                "CONFIG_VIRTIO_VSOCKETS"
            }
            "overlay" => "CONFIG_OVERLAY_FS",
            "button" => "CONFIG_ACPI_BUTTON",
            "evdev" => "CONFIG_INPUT_EVDEV",
            _ => return None,
        })
    }

    #[test]
    fn every_boot_module_is_built_in() {
        let f = parse_fragment(KERNEL_CONFIG).unwrap();
        for m in super::super::initramfs::BOOT_MODULES {
            let opt = boot_module_option(m).unwrap_or_else(|| {
                panic!("boot module {m} has no option here: add it and to kernel.config")
            });
            assert!(
                f.iter()
                    .any(|(n, s)| n == opt && *s == Setting::Value("y".into())),
                "{opt} (module {m}) must be =y in kernel.config"
            );
        }
        // With them all built in, the initramfs loads nothing.
        let builtin = super::super::initramfs::BOOT_MODULES
            .iter()
            .map(|m| m.to_string())
            .collect();
        let order = super::super::initramfs::module_order(
            super::super::initramfs::BOOT_MODULES,
            &Default::default(),
            &builtin,
        )
        .unwrap();
        assert!(order.is_empty(), "{order:?}");
    }

    #[test]
    fn bad_fragments_are_refused_with_the_line() {
        for (text, why) in [
            ("CONFIG_A=y\nFOO=y\n", "line 2: not a CONFIG_ option"),
            ("CONFIG_A=\n", "line 1: no value"),
            ("CONFIG_A=y\nCONFIG_A=n\n", "line 2: option given twice"),
            ("CONFIG_A y\n", "line 1: expected"),
            ("CONFIG_=y\n", "line 1: bad option name"),
            ("CONFIG_A-B=y\n", "line 1: bad option name"),
        ] {
            let e = parse_fragment(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        // Comments, blank lines and "not set" lines are fine; =n means unset.
        let f =
            parse_fragment("# a comment\n\n# CONFIG_B is not set\nCONFIG_C=n\nCONFIG_S=\"x y\"\n")
                .unwrap();
        assert_eq!(
            f,
            vec![
                ("CONFIG_B".into(), Setting::Unset),
                ("CONFIG_C".into(), Setting::Unset),
                ("CONFIG_S".into(), Setting::Value("\"x y\"".into())),
            ]
        );
    }

    #[test]
    fn the_fragment_replaces_the_base_and_comes_last() {
        let base =
            "#\n# head\n#\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"old\"\nCONFIG_D=y\n";
        let f = parse_fragment("# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_C=\"new\"\nCONFIG_E=y\n")
            .unwrap();
        assert_eq!(
            apply_fragment(base, &f),
            "#\n# head\n#\nCONFIG_D=y\n# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_C=\"new\"\nCONFIG_E=y\n"
        );
        // A choice (SLOB/SLUB): the fragment's pick is the last =y Kconfig reads.
        let base = "# CONFIG_SLUB is not set\nCONFIG_SLOB=y\n";
        let f = parse_fragment("CONFIG_SLUB=y\n").unwrap();
        assert_eq!(apply_fragment(base, &f), "CONFIG_SLOB=y\nCONFIG_SLUB=y\n");
    }

    #[test]
    fn unmet_settings_name_what_olddefconfig_dropped() {
        let f = parse_fragment(
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_N=64\n",
        )
        .unwrap();
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_N=32\n";
        assert_eq!(
            unmet_settings(config, &f),
            vec![
                "CONFIG_B: wanted y, got unset",
                "CONFIG_C: wanted unset, got y",
                "CONFIG_N: wanted 64, got 32",
            ]
        );
        assert!(unmet_settings("CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n", &f).is_empty());
    }

    #[test]
    fn missing_tools_become_one_list_of_packages() {
        let none = missing_build_packages(|_| true, |_| true);
        assert!(none.is_empty());
        let m = missing_build_packages(|t| t != "flex" && t != "bison", |f| !f.ends_with("gelf.h"));
        assert_eq!(m, vec!["bison", "flex", "libelf-dev"]);
        let all = missing_build_packages(|_| false, |_| false);
        for p in [
            "make",
            "gcc",
            "flex",
            "bison",
            "bc",
            "libelf-dev",
            "libssl-dev",
        ] {
            assert!(all.contains(&p), "{p} not named");
        }
        let e = Error::KernelTools(m.join(" ")).to_string();
        assert!(e.contains("apt-get install bison flex libelf-dev"), "{e}");
    }

    fn pkg(version: &str, sha: &str) -> Package {
        Package {
            name: "linux-source-6.1".into(),
            version: version.into(),
            sha256: sha.into(),
            ..Package::default()
        }
    }

    #[test]
    fn the_build_key_follows_the_source_and_the_config() {
        let a = pkg("6.1.192-2", "aa");
        let k = build_key(&a, KERNEL_CONFIG);
        assert_eq!(k, build_key(&a.clone(), KERNEL_CONFIG));
        assert_ne!(k, build_key(&pkg("6.1.193-1", "aa"), KERNEL_CONFIG));
        assert_ne!(k, build_key(&pkg("6.1.192-2", "bb"), KERNEL_CONFIG));
        assert_ne!(k, build_key(&a, &format!("{KERNEL_CONFIG}CONFIG_X=y\n")));
        assert_eq!(build_dir_name(&a, KERNEL_CONFIG), format!("6.1.192-2-{k}"));
        assert!(build_dir_name(&pkg("1:2/3", "aa"), "").starts_with("1_2_3-"));
    }

    /// A .deb shaped like linux-source-X: usr/src/linux-source-9.9.tar.xz holding
    /// a tree with a Makefile and Kconfig (`with_tree` false: no tarball at all).
    fn fake_source_deb(dir: &Path, with_tree: bool) -> PathBuf {
        let pkg = dir.join("pkg");
        std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(pkg.join("usr/src")).unwrap();
        std::fs::write(
            pkg.join("DEBIAN/control"),
            "Package: linux-source-9.9\nVersion: 9.9-1\nArchitecture: all\n\
             Maintainer: t <t@t>\nDescription: test\n",
        )
        .unwrap();
        if with_tree {
            let t = dir.join("t/linux-source-9.9");
            std::fs::create_dir_all(t.join("arch")).unwrap();
            std::fs::write(t.join("Makefile"), "all:\n").unwrap();
            std::fs::write(t.join("Kconfig"), "").unwrap();
            let tarball = pkg.join("usr/src/linux-source-9.9.tar.xz");
            let (tb, td) = (
                tarball.to_string_lossy().into_owned(),
                dir.join("t").to_string_lossy().into_owned(),
            );
            tools::run(
                "tar",
                ["-cJf", &tb, "-C", &td, "linux-source-9.9"],
                None,
                &[],
            )
            .unwrap();
        }
        let deb = dir.join("src.deb");
        let (p, d) = (
            pkg.to_string_lossy().into_owned(),
            deb.to_string_lossy().into_owned(),
        );
        tools::run("dpkg-deb", ["--root-owner-group", "-b", &p, &d], None, &[]).unwrap();
        deb
    }

    #[test]
    fn the_source_unpacks_once_and_an_unpacked_tree_is_reused() {
        if tools::find("dpkg-deb").is_err() || tools::find("xz").is_err() {
            eprintln!("skipped: needs dpkg-deb and xz");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let deb = fake_source_deb(dir.path(), true);
        let work = dir.path().join("work");
        let tree = unpack_source(&deb, &work).unwrap();
        assert_eq!(tree, work.join("source/linux-source-9.9"));
        assert!(tree.join("Makefile").is_file());
        assert!(!work.join("deb").exists(), "the unpacked .deb is removed");
        // A resumed build finds the tree without the package.
        std::fs::remove_file(&deb).unwrap();
        assert_eq!(unpack_source(&deb, &work).unwrap(), tree);

        let empty = fake_source_deb(&dir.path().join("e"), false);
        let e = unpack_source(&empty, &dir.path().join("work2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no linux-source tarball"), "{e}");
    }

    /// The fragment against a real kernel tree (no compile, ~20 s):
    /// `AIVMM_KERNEL_TREE=/path/to/linux-source-6.1 cargo test kernel_build::tests::real_tree`.
    /// The tree's `.config` is overwritten.
    #[test]
    fn real_tree_keeps_every_option_of_the_fragment() {
        let Some(tree) = std::env::var_os("AIVMM_KERNEL_TREE") else {
            eprintln!("skipped: set AIVMM_KERNEL_TREE to an unpacked linux-source tree");
            return;
        };
        let f = parse_fragment(KERNEL_CONFIG).unwrap();
        let config = configure(Path::new(&tree), &f, super::super::DEFAULT_EPOCH).unwrap();
        assert!(unmet_settings(&config, &f).is_empty());
        assert!(config.lines().any(|l| l == "CONFIG_KERNEL_LZ4=y"));
        // Nothing the boot needs became a module.
        assert!(
            !config.lines().any(|l| l.ends_with("=m")),
            "modules in the config"
        );
        // And a fragment asking for the impossible is refused with the option named.
        let mut bad = f.clone();
        // (the CMOS RTC driver needs RTC_CLASS, which the fragment turns off)
        bad.push(("CONFIG_RTC_DRV_CMOS".into(), Setting::Value("y".into())));
        let e = configure(Path::new(&tree), &bad, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CONFIG_RTC_DRV_CMOS: wanted y, got unset"),
            "{e}"
        );
    }

    #[test]
    fn object_lines_are_counted_and_others_not() {
        assert!(is_object_line("  CC      kernel/fork.o"));
        assert!(is_object_line("  LD      vmlinux.o"));
        assert!(is_object_line("  HOSTCC  scripts/kconfig/conf.o"));
        assert!(!is_object_line(
            "Kernel: arch/x86/boot/bzImage is ready  (#1)"
        ));
        assert!(!is_object_line("  CC"));
        assert!(!is_object_line(""));
    }
}
