//! Landlock for the device threads: a file system sandbox under their seccomp
//! filter (Linux only; only [`LandlockMode`] is built elsewhere, so `--landlock`
//! parses on every host).
//!
//! Seccomp decides which system calls a device worker may make; Landlock decides
//! which files those calls may reach. [`Rules::for_vm`] lists what the workers of
//! one VM need, from its `VmConfig`:
//! - each share: read-write shares everything but executing, device nodes and
//!   device ioctls; read-only shares reading files and listing directories;
//! - each disk image (the file alone): read, and write and truncate unless `:ro`;
//! - the directory of the vsock socket: only `connect` to the sockets in it
//!   (`LANDLOCK_ACCESS_FS_RESOLVE_UNIX`, ABI 9), which is where the guest's
//!   connections to host port P go (`<uds_path>_P`);
//! - with a share, `/proc/self/mountinfo`, read only: fuse-backend-rs opens it
//!   when it makes a share's file system, which a worker does.
//!
//! [`Rules::restrict_this_thread`] is called once, on the thread that starts the
//! device workers (`seccomp::start_worker_spawner`), before its seccomp filter:
//! a Landlock domain holds for the thread that makes it and every thread it starts
//! later, so every worker is inside it and no other thread is.
//!
//! # What Landlock cannot do, and what holds then
//! - It only checks what a path resolves to when it is opened, made, removed,
//!   renamed or linked; walking through a directory is never refused. So
//!   `/proc/self/fd/N` re-opens of the share's own `O_PATH` descriptors work (the
//!   file they name is inside a share), and `/proc` itself is not granted: a worker
//!   cannot read `/proc/self/status` (the fs device reads the umask once, before).
//! - Descriptors opened before the restriction (the disk images, the vsock
//!   listener, passt's socket pair) keep the access they were opened with.
//! - `connect` to a pathname unix socket is a file system access only from ABI 9
//!   (Linux 7.1, `RESOLVE_UNIX`). Before it, Landlock does not see it at all: a
//!   worker may connect to any socket the user may. What holds then is that the
//!   only `connect` a worker makes is the vsock muxer's, to `<uds_path>_P`, a path
//!   the host builds from the guest's port number alone. Abstract unix sockets are
//!   scoped from ABI 6 (a worker cannot connect to one made outside its domain).
//! - Without Landlock in the kernel (before 5.13, or not in `lsm=`) nothing is
//!   restricted: one line is logged and the workers run under seccomp alone.
//!   Restrictions newer than the kernel's ABI are left out the same way
//!   (best effort), and [`Status`] says what was enforced.
//! - `--landlock off` leaves it out, for debugging only.

#[cfg(target_os = "linux")]
pub use linux::*;

/// Whether the device threads are confined with Landlock (`--landlock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LandlockMode {
    /// Confined, as far as the kernel can (the default).
    #[default]
    On,
    /// Not confined: for debugging only.
    Off,
}

#[cfg(target_os = "linux")]
mod linux {
    use std::path::PathBuf;

    use ::landlock::{
        Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };

    use crate::config::VmConfig;

    /// The newest Landlock ABI whose rights aivmm asks for (older kernels get the
    /// subset they know).
    const ABI_TARGET: ABI = ABI::V9;

    /// fuse-backend-rs opens it when a share's file system is made (on a worker); the
    /// rule holds for this process's own file, as `/proc/self` names it at restriction.
    pub const MOUNTINFO: &str = "/proc/self/mountinfo";

    /// Why the sandbox could not be set up.
    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        /// A Landlock call failed (not for lack of kernel support, which is not an error).
        #[error("landlock: {0}")]
        Ruleset(#[from] ::landlock::RulesetError),
    }

    /// `Result` with this module's [`Error`].
    pub type Result<T> = std::result::Result<T, Error>;

    /// What a path is opened to the workers for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Grant {
        /// Read files and list directories.
        ReadOnly,
        /// Everything a share or image needs: read, write, make, remove, rename, link.
        ReadWrite,
        /// Only connect to the unix sockets beneath it.
        Connect,
    }

    impl Grant {
        fn access(self) -> BitFlags<AccessFs> {
            let all = AccessFs::from_all(ABI_TARGET);
            match self {
                Grant::ReadOnly => AccessFs::ReadFile | AccessFs::ReadDir,
                Grant::ReadWrite => {
                    all & !(AccessFs::Execute
                        | AccessFs::MakeChar
                        | AccessFs::MakeBlock
                        | AccessFs::IoctlDev
                        | AccessFs::ResolveUnix)
                }
                Grant::Connect => AccessFs::ResolveUnix.into(),
            }
        }
    }

    /// The paths the device workers may reach, and how.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Rules {
        /// Each path with its grant; a file's grant is cut down to what a file can have.
        pub paths: Vec<(PathBuf, Grant)>,
    }

    /// What [`Rules::restrict_this_thread`] achieved.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Status {
        /// Every right aivmm asks for is enforced.
        Full,
        /// Enforced with the rights the kernel's ABI knows (the version).
        Partial(i32),
        /// The kernel has no Landlock: nothing is restricted.
        Unsupported,
    }

    impl Rules {
        /// What the device workers of the VM `config` describes need.
        pub fn for_vm(config: &VmConfig) -> Self {
            let mut paths = Vec::new();
            for s in &config.shares {
                let grant = if s.read_only {
                    Grant::ReadOnly
                } else {
                    Grant::ReadWrite
                };
                paths.push((s.root.clone(), grant));
            }
            if !config.shares.is_empty() {
                paths.push((PathBuf::from(MOUNTINFO), Grant::ReadOnly));
            }
            for d in &config.disks {
                let grant = if d.read_only {
                    Grant::ReadOnly
                } else {
                    Grant::ReadWrite
                };
                paths.push((d.path.clone(), grant));
            }
            if let Some(v) = &config.vsock {
                if let Some(dir) = v.uds_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    paths.push((dir.to_path_buf(), Grant::Connect));
                }
            }
            Self { paths }
        }

        /// Puts the calling thread, and every thread it starts from now on, in a
        /// Landlock domain that reaches only [`Rules::paths`]. A path that cannot be
        /// opened is left out (logged): the device that needs it has already failed.
        pub fn restrict_this_thread(&self) -> Result<Status> {
            let mut ruleset = Ruleset::default()
                .handle_access(AccessFs::from_all(ABI_TARGET))?
                .scope(Scope::AbstractUnixSocket)?
                .create()?;
            for (path, grant) in &self.paths {
                match PathFd::new(path) {
                    Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, grant.access()))?,
                    Err(e) => log::warn!("landlock: {} is left out: {e}", path.display()),
                }
            }
            let status = ruleset.restrict_self()?;
            Ok(match status.ruleset {
                RulesetStatus::FullyEnforced => Status::Full,
                RulesetStatus::PartiallyEnforced => Status::Partial(kernel_abi()),
                RulesetStatus::NotEnforced => Status::Unsupported,
            })
        }
    }

    /// The kernel's Landlock ABI version, or 0 (or a negative errno) without Landlock.
    pub fn kernel_abi() -> i32 {
        // SAFETY: LANDLOCK_CREATE_RULESET_VERSION takes no attribute: a NULL pointer and
        // size 0 are what it expects; it only returns a number.
        let r = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                1u32, // LANDLOCK_CREATE_RULESET_VERSION
            )
        };
        if r < 0 {
            -std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            r as i32
        }
    }

    /// The log line for what [`Rules::restrict_this_thread`] achieved (logged at
    /// info level when nothing could be enforced, else at debug level).
    pub fn describe(status: Status) -> String {
        match status {
            Status::Full => format!("landlock: device threads confined (ABI {})", kernel_abi()),
            Status::Partial(abi) => format!(
                "landlock: device threads confined with ABI {abi}{}",
                if abi < 9 {
                    "; connect to pathname unix sockets is not restricted"
                } else {
                    ""
                }
            ),
            Status::Unsupported => {
                "landlock: not supported by this kernel; device threads run under seccomp alone"
                    .into()
            }
        }
    }
}
