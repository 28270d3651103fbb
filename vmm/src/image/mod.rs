//! The Debian-built guest image and its builder (`aivmm image build`), without root.
//!
//! The guest contract (devices, command line, boot, users) is in
//! `guest-image/README.md`. The build, step by step:
//! 1. a private apt ([`apt`]) refreshes bookworm's lists and dumps every candidate;
//! 2. [`packages`] closes `guest-image/debian/packages.txt` (plus every
//!    Essential package) over Depends and Pre-Depends; the versions, the
//!    Claude Code version and the builder's own files give the image hash;
//! 3. if `$XDG_CACHE_HOME/aivmm/images/<name>-<hash>/` is complete, that is the
//!    answer; otherwise, under a lock, the .debs are downloaded and unpacked
//!    ([`deb`]) into a staging tree, configured ([`rootfs`]), Claude Code is
//!    added from npm, and `mke2fs -d` + debugfs make `rootfs.ext4`;
//! 4. [`initramfs`] packs busybox-static, the boot modules and `/init`
//!    (with `--kernel-from-source`, [`kernel_build`] makes the kernel from
//!    Debian's `linux-source` and `guest-image/kernel.config`, and since it has
//!    every boot module built in, the initramfs holds none);
//! 5. the finished directory is renamed into place, so readers never see half an image.

pub mod apt;
pub mod deb;
pub mod initramfs;
pub mod kernel_build;
pub mod packages;
pub mod progress;
pub mod rootfs;
pub mod tools;
pub mod variant;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use progress::Progress;
pub use variant::Variant;

/// Errors while building or finding a guest image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A host tool is not installed.
    #[error("'{0}' is needed to build the guest image and was not found (Debian: apt-get install apt dpkg e2fsprogs npm tar)")]
    MissingTool(String),
    /// A host tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The tool.
        tool: String,
        /// Its exit status and the end of its stderr.
        detail: String,
    },
    /// A package named in the list does not exist.
    #[error("no Debian package or provider named '{0}'")]
    UnknownPackage(String),
    /// A dependency has no candidate.
    #[error("{package} depends on '{dependency}', which no package satisfies")]
    Unsatisfiable {
        /// The package.
        package: String,
        /// The dependency group.
        dependency: String,
    },
    /// A package or download is not what the index promised.
    #[error("bad package: {0}")]
    BadPackage(String),
    /// A kernel module problem.
    #[error("kernel modules: {0}")]
    Module(String),
    /// A script template names an unknown placeholder.
    #[error("script template placeholder @{0}@ has no value")]
    Template(String),
    /// No cache directory.
    #[error("no cache directory: set XDG_CACHE_HOME or HOME, or AIVMM_CACHE_DIR")]
    NoCacheDir,
    /// Host programs or headers a kernel build needs are missing.
    #[error("building the kernel needs more host packages (Debian: apt-get install {0})")]
    KernelTools(String),
    /// The kernel config fragment is malformed, or the kernel did not take it.
    #[error("kernel config: {0}")]
    KernelConfig(String),
    /// The guest image is only built for x86_64 so far.
    #[error("the Debian guest image is built for x86_64 only")]
    Arch,
}

impl Error {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `Result` of image operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Bumped whenever the builder changes what it puts in an image.
pub const BUILDER_VERSION: &str = "2";
/// The package list (see `guest-image/debian/packages.txt`).
pub const PACKAGES: &str = include_str!("../../../guest-image/debian/packages.txt");
/// The kernel metapackage; its dependency is the versioned kernel.
pub const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The npm package with the native `claude` binary.
pub const CLAUDE_NPM: &str = "@anthropic-ai/claude-code-linux-x64";
/// The base kernel command line; aivmm appends `aivmm.uid=U aivmm.gid=G`.
pub const CMDLINE: &str = "console=ttyS0 quiet panic=-1 pci=off";
/// Every timestamp in the image unless SOURCE_DATE_EPOCH says otherwise (2024-01-01).
pub const DEFAULT_EPOCH: u64 = 1_704_067_200;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    /// Install Claude Code from npm (about 381 MB).
    pub with_claude: bool,
    /// Debian packages beyond `packages.txt`.
    pub extra_packages: Vec<String>,
    /// Build into this directory instead of the cache.
    pub out: Option<PathBuf>,
    /// Rebuild even if the image exists.
    pub force: bool,
    /// What the image is for (the agent's or the Nix builder's).
    pub variant: Variant,
    /// Build the kernel from Debian's `linux-source` with `guest-image/kernel.config`
    /// instead of using Debian's cloud kernel.
    pub kernel_from_source: bool,
}

impl BuildOptions {
    /// The builder image (`aivmm builder serve`): no Claude Code.
    pub fn builder() -> Self {
        BuildOptions {
            with_claude: false,
            variant: Variant::Builder,
            ..BuildOptions::default()
        }
    }

    fn claude(&self) -> bool {
        self.with_claude && self.variant.wants_claude()
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            with_claude: true,
            extra_packages: Vec::new(),
            out: None,
            force: false,
            variant: Variant::Agent,
            kernel_from_source: false,
        }
    }
}

/// A built guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// The root filesystem (ext4), attached read-only as vda.
    pub rootfs: PathBuf,
    /// The base command line (no uid, gid or command).
    pub cmdline: String,
}

impl GuestImage {
    fn in_dir(dir: &Path) -> Self {
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
            rootfs: dir.join("rootfs.ext4"),
            cmdline: CMDLINE.to_string(),
        }
    }

    /// Whether every file of the image exists (the manifest is written last).
    fn complete(dir: &Path) -> bool {
        let i = Self::in_dir(dir);
        [i.kernel, i.initrd, i.rootfs, dir.join("manifest.txt")]
            .iter()
            .all(|p| p.is_file())
    }
}

/// The argument that hands the guest a command for the no-agent fallback:
/// `aivmm.cmd=` and the command in base64.
pub fn cmd_arg(command: &str) -> String {
    format!("aivmm.cmd={}", base64(command.as_bytes()))
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The root of aivmm's cache: `AIVMM_CACHE_DIR`, else `$XDG_CACHE_HOME/aivmm`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("AIVMM_CACHE_DIR") {
        return Ok(PathBuf::from(d));
    }
    dirs::cache_dir()
        .map(|d| d.join("aivmm"))
        .ok_or(Error::NoCacheDir)
}

/// Everything that decides an image's bytes, before package versions are known.
fn recipe(opts: &BuildOptions) -> Vec<(String, String)> {
    let mut r = vec![
        ("builder".to_string(), BUILDER_VERSION.to_string()),
        ("packages".to_string(), PACKAGES.to_string()),
        ("extra".to_string(), opts.extra_packages.join(" ")),
        ("claude".to_string(), opts.claude().to_string()),
        ("init".to_string(), initramfs::INIT.to_string()),
        ("init2".to_string(), initramfs::INIT2.to_string()),
        ("udhcpc".to_string(), initramfs::UDHCPC_SCRIPT.to_string()),
        ("alternatives".to_string(), rootfs::ALTERNATIVES.to_string()),
        ("modules".to_string(), initramfs::BOOT_MODULES.join(" ")),
        ("cmdline".to_string(), CMDLINE.to_string()),
    ];
    for (p, data, mode) in rootfs::STATIC_FILES {
        r.push((format!("file {p} {mode:o}"), data.to_string()));
    }
    // Debian's kernel leaves the recipe as it was; a built one adds its config.
    if opts.kernel_from_source {
        r.push((
            "kernel-config".to_string(),
            kernel_build::KERNEL_CONFIG.to_string(),
        ));
        r.push((
            "kernel-build".to_string(),
            kernel_build::KERNEL_BUILD_VERSION.to_string(),
        ));
    }
    // The agent's recipe stays what it was before variants existed.
    if opts.variant != Variant::Agent {
        r.push(("variant".to_string(), opts.variant.name().to_string()));
        r.push(("variant packages".to_string(), opts.variant.packages().join(" ")));
        for (p, data, mode) in opts.variant.files() {
            r.push((format!("variant file {p} {mode:o}"), data.to_string()));
        }
    }
    r
}

/// A stable digest of key/value pairs (length-prefixed, so no two lists collide).
pub fn digest(items: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (k, v) in items {
        for part in [k, v] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    hex(&h.finalize())[..16].to_string()
}

fn image_name(opts: &BuildOptions) -> &'static str {
    if opts.variant == Variant::Builder {
        "debian-bookworm-builder"
    } else if opts.claude() {
        "debian-bookworm"
    } else {
        "debian-bookworm-noclaude"
    }
}

/// An exclusive `flock` on a file, released on drop.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        // SAFETY: the fd is owned by `f`, which lives as long as the lock; flock
        // touches no memory.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(path, std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: f })
    }
}

/// The cached image for `opts` if one was built before (no network), else a
/// fresh build. `opts.force` always builds. Where the same image was also built
/// with aivmm's own kernel (`image build --kernel-from-source`, which boots
/// faster), that one is used: building the kernel is the slow part, so it is
/// never started here, only picked up once the user has built it.
pub fn default_image(opts: &BuildOptions, progress: &Progress) -> Result<GuestImage> {
    if !opts.force && opts.out.is_none() {
        if let Some(img) = cached_default(&cache_root()?.join("images"), opts) {
            return Ok(img);
        }
    }
    build(opts, progress)
}

/// [`default_image`]'s pick from the cache `images`: `opts`' image with aivmm's
/// own kernel, else `opts`' image as asked.
fn cached_default(images: &Path, opts: &BuildOptions) -> Option<GuestImage> {
    if !opts.kernel_from_source {
        let own_kernel = BuildOptions {
            kernel_from_source: true,
            ..opts.clone()
        };
        if let Some(img) = cached_image(images, &own_kernel) {
            tracing::info!(
                "using the image built with aivmm's own kernel ({})",
                img.kernel.display()
            );
            return Some(img);
        }
    }
    cached_image(images, opts)
}

/// The file in the cache `images` that names the directory of `opts`' latest
/// complete build, whose recipe hashes to `recipe_hash`.
fn current_pointer(images: &Path, opts: &BuildOptions, recipe_hash: &str) -> PathBuf {
    images.join(format!("{}-{recipe_hash}.current", image_name(opts)))
}

/// The complete image for `opts` in the cache `images`, if there is one.
fn cached_image(images: &Path, opts: &BuildOptions) -> Option<GuestImage> {
    let pointer = current_pointer(images, opts, &digest(&recipe(opts)));
    let dir = images.join(std::fs::read_to_string(&pointer).ok()?.trim());
    GuestImage::complete(&dir).then(|| GuestImage::in_dir(&dir))
}

fn epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_EPOCH)
}

/// Builds the image (or finds it already built for the same inputs) and returns it.
pub fn build(opts: &BuildOptions, progress: &Progress) -> Result<GuestImage> {
    if std::env::consts::ARCH != "x86_64" {
        return Err(Error::Arch);
    }
    let cache = cache_root()?;
    let recipe_items = recipe(opts);
    let recipe_hash = digest(&recipe_items);

    let step = progress.step("refreshing Debian package lists", None);
    let apt = apt::Apt::new(&cache.join("apt"), "amd64")?;
    apt.update()?;
    let index = apt.index()?;
    step.finish("");

    let step = progress.step("resolving packages", None);
    let mut roots = packages::parse_list(PACKAGES);
    roots.extend(opts.extra_packages.iter().cloned());
    roots.extend(opts.variant.packages());
    roots.extend(index.essential());
    let rootfs_pkgs = index.resolve(&roots)?;
    let meta = index
        .packages
        .get(KERNEL_META)
        .ok_or_else(|| Error::UnknownPackage(KERNEL_META.into()))?;
    let kernel_name = meta
        .depends
        .iter()
        .flatten()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| Error::BadPackage(format!("{KERNEL_META} names no kernel")))?;
    let kernel_pkg = index
        .packages
        .get(kernel_name)
        .ok_or_else(|| Error::UnknownPackage(kernel_name.clone()))?;
    let busybox_pkg = index
        .packages
        .get("busybox-static")
        .ok_or_else(|| Error::UnknownPackage("busybox-static".into()))?;
    let source_pkg = if opts.kernel_from_source {
        Some(kernel_build::source_package(&index)?)
    } else {
        None
    };
    let claude_version = if opts.claude() {
        Some(claude_version()?)
    } else {
        None
    };
    let mut key = recipe_items.clone();
    let kernel_dep = source_pkg.unwrap_or(kernel_pkg);
    for p in rootfs_pkgs.iter().chain([&kernel_dep, &busybox_pkg]) {
        key.push((
            format!("deb {}", p.name),
            format!("{} {}", p.version, p.sha256),
        ));
    }
    if let Some(v) = &claude_version {
        key.push(("claude-version".into(), v.clone()));
    }
    let hash = digest(&key);
    let name = format!("{}-{hash}", image_name(opts));
    step.finish(&format!("{} packages, image {name}", rootfs_pkgs.len()));

    let images = cache.join("images");
    let dest = opts.out.clone().unwrap_or_else(|| images.join(&name));
    let lock_path = match &opts.out {
        Some(o) => o.with_extension("lock"),
        None => images.join(".lock"),
    };
    let _lock = Lock::take(&lock_path)?;
    let stamp_ok = std::fs::read_to_string(dest.join("manifest.txt"))
        .is_ok_and(|m| m.contains(&format!("image {name}\n")));
    if !opts.force && GuestImage::complete(&dest) && stamp_ok {
        if opts.out.is_none() {
            write_pointer(&images, opts, &recipe_hash, &name)?;
        }
        return Ok(GuestImage::in_dir(&dest));
    }

    let parent = dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let kernel = match source_pkg {
        Some(src) => Kernel::Built(kernel_build::build(&apt, src, &cache, epoch(), progress)?),
        None => Kernel::Debian(kernel_pkg),
    };
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        remove_tree(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = build_into(
        &tmp,
        &name,
        &apt,
        &rootfs_pkgs,
        &kernel,
        busybox_pkg,
        claude_version.as_deref(),
        opts.variant,
        progress,
    );
    if let Err(e) = result {
        let _ = remove_tree(&tmp);
        return Err(e);
    }
    if dest.exists() {
        remove_tree(&dest)?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
    if opts.out.is_none() {
        write_pointer(&images, opts, &recipe_hash, &name)?;
    }
    Ok(GuestImage::in_dir(&dest))
}

fn write_pointer(images: &Path, opts: &BuildOptions, recipe_hash: &str, name: &str) -> Result<()> {
    let pointer = current_pointer(images, opts, recipe_hash);
    let tmp = pointer.with_extension("tmp");
    std::fs::write(&tmp, format!("{name}\n")).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &pointer).map_err(|e| Error::io(&pointer, e))
}

fn remove_tree(p: &Path) -> Result<()> {
    // Unpacked trees can hold read-only directories; make them writable first.
    if let Ok(entries) = rootfs::walk(p) {
        for (rel, md) in entries {
            if md.is_dir() {
                let _ = std::fs::set_permissions(
                    p.join(rel),
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                );
            }
        }
    }
    std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))
}

/// The Claude Code version to install: `AIVMM_CLAUDE_VERSION`, else npm's latest.
fn claude_version() -> Result<String> {
    if let Ok(v) = std::env::var("AIVMM_CLAUDE_VERSION") {
        return Ok(v);
    }
    let out = tools::run("npm", ["view", CLAUDE_NPM, "version"], None, &[])?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c))
    {
        return Err(Error::BadPackage(format!(
            "npm gave an odd version for {CLAUDE_NPM}: {v:?}"
        )));
    }
    Ok(v)
}

/// Fetches the Claude Code tarball into the cache (once) and unpacks it into
/// `root/usr/local/lib/claude`, with `usr/local/bin/claude` pointing at it.
fn install_claude(root: &Path, version: &str, cache: &Path) -> Result<()> {
    let dir = cache.join("npm");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tgz = dir.join(format!("anthropic-ai-claude-code-linux-x64-{version}.tgz"));
    if !tgz.is_file() {
        let spec = format!("{CLAUDE_NPM}@{version}");
        let d = dir.to_string_lossy().into_owned();
        tools::run(
            "npm",
            ["pack", spec.as_str(), "--pack-destination", d.as_str()],
            Some(&dir),
            &[],
        )?;
    }
    let dest = root.join("usr/local/lib/claude");
    std::fs::create_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
    let (t, d) = (
        tgz.to_string_lossy().into_owned(),
        dest.to_string_lossy().into_owned(),
    );
    tools::run(
        "tar",
        [
            "-xzf",
            t.as_str(),
            "-C",
            d.as_str(),
            "--strip-components=1",
            "--no-same-owner",
        ],
        None,
        &[],
    )?;
    if !dest.join("claude").is_file() {
        return Err(Error::BadPackage(format!(
            "{CLAUDE_NPM}@{version} has no 'claude' binary"
        )));
    }
    let link = root.join("usr/local/bin/claude");
    std::fs::create_dir_all(root.join("usr/local/bin")).map_err(|e| Error::io(&link, e))?;
    std::os::unix::fs::symlink("../lib/claude/claude", &link).map_err(|e| Error::io(&link, e))
}

/// Where the image's kernel comes from.
enum Kernel<'a> {
    /// Debian's cloud kernel package.
    Debian(&'a packages::Package),
    /// Built from `linux-source` ([`kernel_build`]).
    Built(kernel_build::Built),
}

impl Kernel<'_> {
    /// The package to download with the root filesystem's, if any.
    fn package(&self) -> Option<&packages::Package> {
        match self {
            Kernel::Debian(p) => Some(p),
            Kernel::Built(_) => None,
        }
    }

    /// The manifest's `kernel` line.
    fn describe(&self) -> String {
        match self {
            Kernel::Debian(p) => format!("{} {}", p.name, p.version),
            Kernel::Built(b) => format!(
                "{} built from {} {} (config {})",
                b.release, b.source, b.version, b.key
            ),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_into(
    tmp: &Path,
    name: &str,
    apt: &apt::Apt,
    rootfs_pkgs: &[&packages::Package],
    kernel: &Kernel<'_>,
    busybox_pkg: &packages::Package,
    claude_version: Option<&str>,
    variant: Variant,
    progress: &Progress,
) -> Result<()> {
    let started = std::time::Instant::now();
    let all: Vec<&packages::Package> = rootfs_pkgs
        .iter()
        .copied()
        .chain([busybox_pkg])
        .chain(kernel.package())
        .collect();
    let total: u64 = all.iter().map(|p| p.size).sum();
    let step = progress.step("downloading packages", Some(total));
    let debs = apt.download(&all, |n| step.inc(n))?;
    step.finish(&format!("{} MiB", total >> 20));

    let step = progress.step("unpacking packages", Some(rootfs_pkgs.len() as u64));
    let staging = tmp.join("staging");
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    rootfs::prepare(&staging)?;
    let mut meta = BTreeMap::new();
    let mut status = String::new();
    let mut lists = Vec::new();
    for (p, deb) in rootfs_pkgs.iter().zip(&debs) {
        let u = deb::unpack(deb, &staging, true, &mut meta)?;
        let control = tools::run(
            "dpkg-deb",
            [std::ffi::OsStr::new("-f"), deb.as_os_str()],
            None,
            &[],
        )?;
        let control = String::from_utf8_lossy(&control.stdout).into_owned();
        let same = control.lines().any(|l| l.trim() == "Multi-Arch: same");
        let list_name = if same {
            format!("{}:{}", p.name, p.arch)
        } else {
            p.name.clone()
        };
        status.push_str(&rootfs::status_stanza(&control));
        lists.push((list_name, u.listed));
        step.inc(1);
    }
    let kernel_dir = tmp.join("kernel");
    let bdeb = &debs[rootfs_pkgs.len()];
    let kver = match kernel {
        Kernel::Debian(p) => {
            deb::unpack(
                &debs[rootfs_pkgs.len() + 1],
                &kernel_dir,
                false,
                &mut BTreeMap::new(),
            )?;
            p.name.trim_start_matches("linux-image-").to_string()
        }
        Kernel::Built(b) => {
            // The same layout as the package's: boot/vmlinuz-V and lib/modules/V.
            let boot = kernel_dir.join("boot");
            std::fs::create_dir_all(&boot).map_err(|e| Error::io(&boot, e))?;
            let v = boot.join(format!("vmlinuz-{}", b.release));
            std::fs::copy(&b.vmlinuz, &v).map_err(|e| Error::io(&b.vmlinuz, e))?;
            let mods = kernel_dir.join("lib/modules");
            std::fs::create_dir_all(&mods).map_err(|e| Error::io(&mods, e))?;
            let (from, to) = (
                b.module_dir.to_string_lossy().into_owned(),
                mods.to_string_lossy().into_owned(),
            );
            tools::run("cp", ["-R", from.as_str(), to.as_str()], None, &[])?;
            b.release.clone()
        }
    };
    let bb_dir = tmp.join("busybox-static");
    deb::unpack(bdeb, &bb_dir, false, &mut BTreeMap::new())?;
    step.finish("");

    if let Some(v) = claude_version {
        let step = progress.step(&format!("adding Claude Code {v}"), None);
        install_claude(&staging, v, &cache_root()?)?;
        step.finish("");
    }

    let step = progress.step("building the initramfs", None);
    let module_dir = kernel_dir.join("lib/modules").join(&kver);
    let vmlinuz = kernel_dir.join("boot").join(format!("vmlinuz-{kver}"));
    let (cpio, order) = initramfs::build(
        &initramfs::Inputs {
            busybox: bb_dir.join("bin/busybox"),
            module_dir: module_dir.clone(),
            image_id: name.to_string(),
        },
        epoch() as u32,
    )?;
    let initrd = tmp.join("initrd.cpio");
    std::fs::write(&initrd, &cpio).map_err(|e| Error::io(&initrd, e))?;
    std::fs::rename(&vmlinuz, tmp.join("vmlinuz")).map_err(|e| Error::io(&vmlinuz, e))?;
    step.finish(&format!(
        "{} KiB, {} modules",
        cpio.len() >> 10,
        order.len()
    ));

    let step = progress.step("making the root filesystem", None);
    initramfs::write_modules_dep(&module_dir)?;
    // modprobe (kmod) reads modules.dep.bin and the other binary indexes, which
    // only depmod writes: the host's, on the module tree before it moves in.
    let indexed = tools::run("depmod", ["-b".as_ref(), kernel_dir.as_os_str(), kver.as_ref()], None, &[])
        .map_err(|e| e.to_string())
        .and_then(|_| {
            module_dir
                .join("modules.dep.bin")
                .exists()
                .then_some(())
                .ok_or_else(|| format!("depmod wrote no modules.dep.bin in {}", module_dir.display()))
        });
    if let Err(e) = indexed {
        tracing::warn!("{e}: modprobe will not work in the guest (Debian: apt-get install kmod)");
    }
    let staged_modules = staging.join("usr/lib/modules");
    std::fs::create_dir_all(&staged_modules).map_err(|e| Error::io(&staged_modules, e))?;
    std::fs::rename(&module_dir, staged_modules.join(&kver))
        .map_err(|e| Error::io(&module_dir, e))?;
    rootfs::configure(&staging, &mut meta, &status, &lists, variant.files())?;
    let uuid = {
        let h = hex(&Sha256::digest(name.as_bytes()));
        format!(
            "{}-{}-4{}-8{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[17..20],
            &h[20..32]
        )
    };
    let rootfs_path = tmp.join("rootfs.ext4");
    let size = rootfs::make_ext4(
        &staging,
        &meta,
        &rootfs_path,
        &rootfs::Ext4 {
            label: "aivmm-root".into(),
            uuid,
            epoch: epoch(),
        },
    )?;
    step.finish(&format!("{} MiB", size >> 20));

    let mut manifest = format!(
        "image {name}\nbuilder {BUILDER_VERSION}\nkernel {}\ncmdline {CMDLINE}\nclaude {}\nboot-modules {}\n",
        kernel.describe(),
        claude_version.unwrap_or("none"),
        order.join(" ")
    );
    for p in rootfs_pkgs {
        manifest.push_str(&format!("deb {} {}\n", p.name, p.version));
    }
    manifest.push_str(&format!(
        "build-seconds {:.0}\n",
        started.elapsed().as_secs_f64()
    ));
    for d in [staging, kernel_dir, bb_dir] {
        remove_tree(&d)?;
    }
    let m = tmp.join("manifest.txt");
    std::fs::write(&m, manifest).map_err(|e| Error::io(&m, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        let v = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (i, o) in v {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(cmd_arg("git --version"), "aivmm.cmd=Z2l0IC0tdmVyc2lvbg==");
    }

    #[test]
    fn the_recipe_hash_tracks_its_inputs() {
        let a = BuildOptions::default();
        let b = BuildOptions {
            with_claude: false,
            ..BuildOptions::default()
        };
        let c = BuildOptions {
            extra_packages: vec!["vim".into()],
            ..BuildOptions::default()
        };
        let d = BuildOptions {
            kernel_from_source: true,
            ..BuildOptions::default()
        };
        let h = |o: &BuildOptions| digest(&recipe(o));
        assert_eq!(h(&a), h(&a.clone()));
        // A kernel built from kernel.config is part of the recipe.
        assert_ne!(h(&a), h(&d));
        assert!(recipe(&d)
            .iter()
            .any(|(k, v)| k == "kernel-config" && v == kernel_build::KERNEL_CONFIG));
        assert_ne!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
        assert_eq!(h(&a).len(), 16);
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert_ne!(
            digest(&[("ab".into(), "c".into())]),
            digest(&[("a".into(), "bc".into())])
        );
    }

    #[test]
    fn a_built_own_kernel_image_is_preferred() {
        let images = tempfile::tempdir().unwrap();
        let debian = BuildOptions {
            with_claude: false,
            ..BuildOptions::default()
        };
        let own = BuildOptions {
            kernel_from_source: true,
            ..debian.clone()
        };
        // `opts`' image in dir `name`, complete or not.
        let put = |opts: &BuildOptions, name: &str, complete: bool| {
            let dir = images.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let files: &[&str] = if complete {
                &["vmlinuz", "initrd.cpio", "rootfs.ext4", "manifest.txt"]
            } else {
                &["vmlinuz", "initrd.cpio", "rootfs.ext4"]
            };
            for f in files {
                std::fs::write(dir.join(f), b"x").unwrap();
            }
            let pointer = current_pointer(images.path(), opts, &digest(&recipe(opts)));
            std::fs::write(pointer, format!("{name}\n")).unwrap();
        };
        let dir_of = |img: Option<GuestImage>| img.map(|i| i.kernel.parent().unwrap().to_path_buf());
        assert_eq!(dir_of(cached_default(images.path(), &debian)), None);
        put(&debian, "deb", true);
        assert_eq!(
            dir_of(cached_default(images.path(), &debian)),
            Some(images.path().join("deb"))
        );
        // An own-kernel build that did not finish is not used...
        put(&own, "own", false);
        assert_eq!(
            dir_of(cached_default(images.path(), &debian)),
            Some(images.path().join("deb"))
        );
        // ...a finished one is, for both.
        put(&own, "own", true);
        for o in [&debian, &own] {
            assert_eq!(
                dir_of(cached_default(images.path(), o)),
                Some(images.path().join("own"))
            );
        }
        // Another image's own kernel is not this one's.
        let claude = BuildOptions::default();
        assert_eq!(dir_of(cached_default(images.path(), &claude)), None);
    }

    #[test]
    fn the_package_list_has_the_contract_packages() {
        let list = packages::parse_list(PACKAGES);
        for p in [
            "libc6",
            "bash",
            "coreutils",
            "busybox",
            "git",
            "ca-certificates",
            "openssh-client",
            "procps",
            "less",
            "nodejs",
            "e2fsprogs",
        ] {
            assert!(list.iter().any(|l| l == p), "{p} missing from packages.txt");
        }
    }

    /// A full build without Claude Code into a temp dir (needs the network and
    /// a few minutes): `AIVMM_IMAGE_TESTS=1 cargo test image::tests::full_build -- --nocapture`.
    #[test]
    fn full_build() {
        if std::env::var("AIVMM_IMAGE_TESTS").as_deref() != Ok("1") {
            eprintln!("skipped: set AIVMM_IMAGE_TESTS=1 to run the full image build");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // AIVMM_IMAGE_TEST_OUT keeps the image for a boot test by hand.
        let out = std::env::var_os("AIVMM_IMAGE_TEST_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.path().join("img"));
        let t = std::time::Instant::now();
        // AIVMM_IMAGE_TEST_CLAUDE=1 includes Claude Code (a 381 MB download).
        let with_claude = std::env::var("AIVMM_IMAGE_TEST_CLAUDE").as_deref() == Ok("1");
        let opts = BuildOptions {
            with_claude,
            out: Some(out.clone()),
            ..BuildOptions::default()
        };
        let img = build(&opts, &Progress::lines()).unwrap();
        eprintln!(
            "full build (claude: {with_claude}): {:.1}s",
            t.elapsed().as_secs_f64()
        );

        // The kernel is a bzImage: "HdrS" at 0x202 and the 0x55AA boot signature.
        let k = std::fs::read(&img.kernel).unwrap();
        assert_eq!(&k[0x202..0x206], b"HdrS");
        assert_eq!(&k[0x1fe..0x200], &[0x55, 0xaa]);

        // The initrd is a newc cpio holding /init.
        let list = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::fs::File::open(&img.initrd).unwrap())
            .output()
            .unwrap();
        let names = String::from_utf8_lossy(&list.stdout);
        for n in [
            "init",
            "bin/busybox",
            "lib/modules/order",
            "lib/modules/virtio_blk.ko",
            "lib/modules/virtiofs.ko",
        ] {
            assert!(
                names.lines().any(|l| l == n),
                "{n} missing from the initrd: {names}"
            );
        }

        // The root filesystem holds root-owned files with their real modes.
        let rootfs = img.rootfs.to_string_lossy().into_owned();
        let ls = |p: &str| {
            let o =
                tools::run("debugfs", ["-R", &format!("stat {p}"), &rootfs], None, &[]).unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };
        let git = ls("/usr/bin/git");
        assert!(git.contains("User:     0   Group:     0"), "{git}");
        assert!(git.contains("Mode:  0755"), "{git}");
        let sudo = ls("/usr/bin/sudo");
        assert!(sudo.contains("Mode:  04755"), "{sudo}");
        let bin = ls("/bin");
        assert!(bin.contains("Type: symlink"), "{bin}");
        let size = std::fs::metadata(&img.rootfs).unwrap().len();
        let used = std::process::Command::new("du")
            .args(["-k", &rootfs])
            .output()
            .unwrap();
        eprintln!(
            "rootfs {} MiB apparent, du {}",
            size >> 20,
            String::from_utf8_lossy(&used.stdout).trim()
        );

        // The same inputs find the same image.
        let again = build(&opts, &Progress::quiet()).unwrap();
        assert_eq!(again, img);
    }
}
