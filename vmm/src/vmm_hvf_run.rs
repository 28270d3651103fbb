//! `aivmm run` on Hypervisor.framework: which backend a host uses, and the
//! parsed command line ([`RunArgs`] → [`VmConfig`]) as the HVF builder's
//! [`Parts`].
//!
//! On a Mac, `main.rs` sends `aivmm run` to `vmm_hvf_darwin::run_cli`, which is
//! [`run_cli`] on the real framework; everything here is generic over
//! [`HvfApi`] and tested on Linux against the fake. `aivmm builder` boots each
//! VM as a child `aivmm run --kernel …`, so it takes the same path.
//!
//! The translation keeps what an arm64 guest can use and refuses, in one line,
//! what it cannot: `--net tap` and `--net user` (no TAP, and passt is
//! Linux-only: `--net unix:PATH` with gvproxy or vmnet-helper is the macOS
//! route); the vmlinux cache (x86 bzImages only) does not apply. The devices are the
//! same list the KVM VMM builds (`devices_setup::virtio_devices`); on macOS a share is
//! served by the portable passthrough, the devices crate's default there.
//!
//! `--workdir` goes to the session layer ([`crate::launch`]) with the framework
//! as its [`crate::machine::MachineBuilder`]; there the network defaults to none
//! ([`crate::machine::default_net`]). The `--kernel` form feeds host stdin to
//! the UART ([`crate::console`]).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use crate::cli::RunArgs;
use crate::config::{NetMode, VmConfig};
use crate::hypervisor::hvf::{HvfApi, HvfHypervisor};
use crate::machine::VmExit;
use crate::vmm_hvf::{HvfConfig, HvfMachine, Parts};

/// Errors of the HVF command-line path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host has no backend aivmm drives.
    #[error(
        "aivmm cannot run VMs on {os}/{arch}: it needs Linux with KVM, or macOS on Apple silicon"
    )]
    Host {
        /// `std::env::consts::OS`.
        os: String,
        /// `std::env::consts::ARCH`.
        arch: String,
    },
    /// An option that has no meaning, or no implementation, on Hypervisor.framework.
    #[error("{0} is not available on macOS: {1}")]
    Unsupported(&'static str, &'static str),
    /// The command line does not describe a valid VM.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A boot file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    /// A device could not be created.
    #[error(transparent)]
    Device(#[from] crate::devices_setup::Error),
    /// Building or running the VM failed.
    #[error(transparent)]
    Vm(#[from] crate::vmm_hvf::Error),
    /// The workdir's `aivmm.toml` is invalid.
    #[error(transparent)]
    Settings(#[from] crate::settings::Error),
    /// The workdir session failed.
    #[error(transparent)]
    Launch(#[from] Box<crate::launch::Error>),
}

/// `Result` of the HVF command-line path.
pub type Result<T> = std::result::Result<T, Error>;

/// The hypervisor backend of a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// KVM (`vmm::Vmm`), on Linux.
    Kvm,
    /// Hypervisor.framework (`vmm_hvf::HvfMachine`), on macOS on Apple silicon.
    Hvf,
}

impl Backend {
    /// The backend for an OS and CPU, as `std::env::consts` names them.
    pub fn select(os: &str, arch: &str) -> Result<Self> {
        match (os, arch) {
            ("linux", _) => Ok(Backend::Kvm),
            ("macos", "aarch64") => Ok(Backend::Hvf),
            _ => Err(Error::Host {
                os: os.into(),
                arch: arch.into(),
            }),
        }
    }

    /// The backend of this host.
    pub fn host() -> Result<Self> {
        Self::select(std::env::consts::OS, std::env::consts::ARCH)
    }
}

/// The kernel parameters of aivmm's x86 command line that mean nothing on
/// arm64 (reboot goes through PSCI there).
const X86_ONLY_PARAMS: [&str; 1] = ["reboot=acpi"];

/// The HVF shape of `config`: vCPUs, RAM and the arm64 command line. Refuses
/// the options the HVF path cannot honour.
pub fn hvf_config(config: &VmConfig) -> Result<HvfConfig> {
    match config.net {
        NetMode::Tap(_) => {
            return Err(Error::Unsupported(
                "--net tap",
                "macOS has no TAP devices; use --net unix:PATH (gvproxy or vmnet-helper)",
            ))
        }
        NetMode::Passt => {
            return Err(Error::Unsupported(
                "--net passt",
                "passt is Linux-only; use --net user (aivmm's own) or --net unix:PATH",
            ))
        }
        NetMode::None | NetMode::User | NetMode::Unix(_) => {}
    }
    let cmdline = config
        .cmdline
        .split_whitespace()
        .filter(|p| !X86_ONLY_PARAMS.contains(p))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(HvfConfig {
        vcpus: config.cpus,
        memory: config.memory,
        cmdline,
    })
}

/// Builds the VM of `config` on `hyp`: the kernel `Image` and initrd from their
/// files, and the same virtio devices the KVM VMM would create.
pub fn build<A: HvfApi>(
    hyp: &HvfHypervisor<A>,
    config: &VmConfig,
    console: Box<dyn Write + Send>,
    started: Instant,
) -> Result<HvfMachine<A>> {
    let shape = hvf_config(config)?;
    // A FIFO (or anything but a regular file) is refused instead of blocking.
    use aivmm_devices::host_file::open_regular;
    let mut kernel =
        open_regular(&config.kernel).map_err(|e| Error::Read(config.kernel.clone(), e))?;
    let initrd = match &config.initrd {
        Some(p) => {
            let mut buf = Vec::new();
            open_regular(p)
                .and_then(|mut f| f.read_to_end(&mut buf))
                .map_err(|e| Error::Read(p.clone(), e))?;
            Some(buf)
        }
        None => None,
    };
    // No balloon on Hypervisor.framework yet: it could not give memory back there
    // (see `balloon::discard`).
    let virtio = crate::devices_setup::virtio_devices(&VmConfig {
        balloon: false,
        ..config.clone()
    })?
    .list;
    Ok(HvfMachine::build(
        hyp,
        Parts {
            config: &shape,
            kernel: &mut kernel,
            initrd: initrd.as_deref(),
            console,
            virtio,
            started,
        },
    )?)
}

/// How `aivmm run` on HVF ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `--workdir`: the command's exit status.
    Command(i32),
    /// `--kernel`: how the VM ended.
    Vm(VmExit),
}

/// `aivmm run` with `args` on `hyp`: a workdir session (`--workdir`), or the
/// VM of the command line with its console on `console` and, if `stdin_tty` is
/// given, host stdin on its UART (`Some(true)`: a raw terminal, with Ctrl-A
/// escapes).
pub fn run_cli<A: HvfApi>(
    hyp: &HvfHypervisor<A>,
    args: &RunArgs,
    console: Box<dyn Write + Send>,
    stdin_tty: Option<bool>,
    started: Instant,
) -> Result<Outcome> {
    if let Some(workdir) = args.workdir.clone() {
        // Before anything is built (see `settings`).
        let settings = crate::settings::apply(args, &workdir)?;
        return crate::launch::run(hyp, args, &settings, &workdir, started)
            .map(Outcome::Command)
            .map_err(|e| Error::Launch(Box::new(e)));
    }
    let config = VmConfig::try_from(args)?;
    let machine = build(hyp, &config, console, started)?;
    if let Some(tty) = stdin_tty {
        crate::console::spawn_stdin_pump(machine.serial(), tty);
    }
    Ok(Outcome::Vm(machine.run()?))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::arch::aarch64::layout::{DRAM_START, VIRTIO_MMIO_START};
    use crate::cli::{Cli, Command};
    use crate::hypervisor::hvf::fake::{FakeHvf, FIRST_HANDLE as H0};
    use crate::hypervisor::hvf::Reg;
    use crate::vmm_hvf::tests::{image, script_print_read_poweroff, Captured};

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["aivmm", "run"].iter().chain(argv)).unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        r
    }

    #[test]
    fn hvf_backend_selection_by_host() {
        assert_eq!(Backend::select("linux", "x86_64").unwrap(), Backend::Kvm);
        assert_eq!(Backend::select("linux", "aarch64").unwrap(), Backend::Kvm);
        assert_eq!(Backend::select("macos", "aarch64").unwrap(), Backend::Hvf);
        let e = Backend::select("macos", "x86_64").unwrap_err().to_string();
        assert!(
            e.contains("macos/x86_64") && e.contains("Apple silicon"),
            "{e}"
        );
        assert!(Backend::select("freebsd", "x86_64").is_err());
        // This test host.
        assert_eq!(Backend::host().unwrap(), Backend::Kvm);
    }

    #[test]
    fn hvf_config_from_the_command_line() {
        let dir = TempDir::new().unwrap();
        let kernel = dir.as_path().join("Image");
        std::fs::write(&kernel, image()).unwrap();
        let k = kernel.to_str().unwrap();
        let cfg = VmConfig::try_from(&run_args(&[
            "--kernel", k, "--cpus", "2", "--memory", "256M",
        ]))
        .unwrap();
        let h = hvf_config(&cfg).unwrap();
        assert_eq!((h.vcpus, h.memory), (2, 256 << 20));
        assert!(!h.cmdline.contains("reboot=acpi"), "{}", h.cmdline);
        assert!(h.cmdline.contains("console=ttyS0"), "{}", h.cmdline);
        for (argv, flag) in [
            (&["--net", "tap:tap0"][..], "--net tap"),
            (&["--net", "passt"][..], "--net passt"),
        ] {
            let mut a = vec!["--kernel", k];
            a.extend_from_slice(argv);
            let cfg = VmConfig::try_from(&run_args(&a)).unwrap();
            let e = hvf_config(&cfg).unwrap_err().to_string();
            assert!(e.starts_with(flag) && e.contains("unix:PATH"), "{e}");
        }
        // The vmlinux cache unpacks x86 bzImages only; an arm64 Image boots as it is.
        let cfg = VmConfig {
            kernel_cache: Some(dir.as_path().to_path_buf()),
            ..cfg
        };
        assert!(hvf_config(&cfg).is_ok());
    }

    /// Scripts vCPU 0: 4-byte reads of `addrs` into x1, x2, …, then SYSTEM_OFF.
    fn script_reads_poweroff(fake: &FakeHvf, addrs: &[u64]) {
        use crate::arch::aarch64::psci::func;
        use crate::hypervisor::hvf::esr::tests::dabt;
        use crate::hypervisor::hvf::esr::EC_HVC64;
        use crate::hypervisor::hvf::ExitReason;
        for (i, &addr) in addrs.iter().enumerate() {
            let reg = u8::try_from(i + 1).unwrap();
            fake.push_exit(H0, ExitReason::Exception, dabt(4, false, reg, false, false), addr, &[]);
        }
        fake.push_exit(
            H0,
            ExitReason::Exception,
            u64::from(EC_HVC64) << 26,
            0,
            &[(Reg::X(0), u64::from(func::SYSTEM_OFF))],
        );
    }

    /// The VM of `aivmm run --workdir` (launch.rs's config) built through the
    /// session layer's `MachineBuilder` on the framework: the guest finds the
    /// rootfs and state disks, the /work and agent shares, vsock, rng and the
    /// power button where its device tree says.
    #[test]
    fn hvf_workdir_run_builds_the_session_vm_on_the_framework() {
        use crate::arch::aarch64::layout::GPIO_ADDR;
        use crate::launch;
        use crate::machine::{default_net_for, Machine, MachineBuilder};
        use crate::workdir::WorkdirState;

        let dir = TempDir::new().unwrap();
        let p = |n: &str| dir.as_path().join(n);
        std::fs::write(p("Image"), image()).unwrap();
        for disk in ["rootfs.ext4", "state.img"] {
            std::fs::write(p(disk), vec![0u8; 1 << 20]).unwrap();
        }
        for d in ["work", "agent", "root"] {
            std::fs::create_dir(p(d)).unwrap();
        }
        let state = WorkdirState::open(&p("root"), &p("work")).unwrap();
        // No --net: on a Mac the workdir run has no network (no passt there).
        assert_eq!(default_net_for("macos"), NetMode::User);
        let args = run_args(&[
            "--workdir", p("work").to_str().unwrap(),
            "--net", "none",
            "--cpus", "2",
            "--memory", "128M",
        ]);
        let image = crate::image::GuestImage {
            kernel: p("Image"),
            initrd: PathBuf::new(),
            rootfs: p("rootfs.ext4"),
            cmdline: "console=ttyS0 reboot=acpi quiet".into(),
        };
        let settings = |a| crate::settings::merge(None, None, &crate::settings::Layer::from_args(a));
        let workdir_vm = |args, extras| {
            VmConfig::try_from(crate::plan::Mode::Workdir(crate::plan::Workdir {
                args,
                settings: &settings(args),
                image: &image,
                state: &state,
                state_disk: &p("state.img"),
                agent_dir: &p("agent"),
                ids: (501, 20),
                extras,
            }))
        };
        let extras = launch::plan_extras(&args, &settings(&args), (501, 20), &state.dir, &p("root")).unwrap();
        let config = workdir_vm(&args, &extras).unwrap();
        let shape = hvf_config(&config).unwrap();
        assert_eq!(shape.cmdline, "console=ttyS0 quiet aivmm.uid=501 aivmm.gid=20");

        let fake = FakeHvf::new();
        let window = |i: u64| VIRTIO_MMIO_START + i * 0x1000 + 8;
        let mut reads: Vec<u64> = (0..7).map(window).collect();
        reads.push(GPIO_ADDR + 0xfe0); // PeriphID0
        reads.push(GPIO_ADDR + 0x414); // GPIORIS, after a press
        let hyp = HvfHypervisor::new(fake.clone());
        let machine: Box<dyn Machine> =
            hyp.build(&config, Instant::now(), Box::new(std::io::sink())).unwrap();
        // A press before the guest armed its edges: GPIOIEV 0 is the falling
        // edge, so the release is latched in the raw status.
        machine.power_button().press().unwrap();
        script_reads_poweroff(&fake, &reads);
        assert!(matches!(machine.run().unwrap(), VmExit::PowerOff));
        let ids: Vec<u64> = (1..=7).map(|r| fake.reg(H0, Reg::X(r))).collect();
        // block, block, fs (/work), fs (agent), vsock, rng; the 7th window is empty.
        assert_eq!(ids, [2, 2, 26, 26, 19, 4, 0]);
        assert_eq!(fake.reg(H0, Reg::X(8)), 0x61, "a PL061 at GPIO_ADDR");
        assert_eq!(fake.reg(H0, Reg::X(9)), 1 << 3, "the button's line moved");

        // The same run with passt is refused on HVF in one line.
        let args = run_args(&["--workdir", p("work").to_str().unwrap(), "--net", "passt"]);
        let config = workdir_vm(&args, &extras).unwrap();
        let e = hyp
            .build(&config, Instant::now(), Box::new(std::io::sink()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("--net passt is not available on macOS"), "{e}");
    }

    /// Host input reaches the guest through the machine's UART.
    #[test]
    fn hvf_console_input_reaches_the_guest_uart() {
        use crate::arch::aarch64::layout::SERIAL_ADDR;
        use crate::machine::Machine;

        let dir = TempDir::new().unwrap();
        let kernel = dir.as_path().join("Image");
        std::fs::write(&kernel, image()).unwrap();
        let args = run_args(&["--kernel", kernel.to_str().unwrap(), "--memory", "64M"]);
        let fake = FakeHvf::new();
        let hyp = HvfHypervisor::new(fake.clone());
        let config = VmConfig::try_from(&args).unwrap();
        let machine = build(&hyp, &config, Box::new(std::io::sink()), Instant::now()).unwrap();
        let serial = Machine::serial(&machine);
        assert_eq!(
            crate::console::pump(&b"hi"[..], &serial, false),
            crate::console::PumpEnd::Eof
        );
        // The guest: LSR (data ready), RBR, RBR, LSR (empty now).
        let lsr = SERIAL_ADDR + 5;
        script_reads_poweroff(&fake, &[lsr, SERIAL_ADDR, SERIAL_ADDR, lsr]);
        assert!(matches!(machine.run().unwrap(), VmExit::PowerOff));
        let regs: Vec<u64> = (1..=4).map(|r| fake.reg(H0, Reg::X(r))).collect();
        assert_eq!(regs[0] & 1, 1, "data ready");
        assert_eq!((regs[1], regs[2]), (u64::from(b'h'), u64::from(b'i')));
        assert_eq!(regs[3] & 1, 0, "drained");
    }

    /// `aivmm builder` boots each VM as a child `aivmm run`: its arguments
    /// take the HVF path, with `--net user` refused in one line.
    #[test]
    fn hvf_builder_vm_arguments_build_an_hvf_machine() {
        use crate::builder::vm::VmSpec;
        use crate::image::GuestImage;

        let dir = TempDir::new().unwrap();
        let p = |n: &str| dir.as_path().join(n);
        std::fs::write(p("Image"), image()).unwrap();
        std::fs::write(p("initrd"), [0u8; 512]).unwrap();
        for disk in ["rootfs.ext4", "disk.img"] {
            std::fs::write(p(disk), vec![0u8; 1 << 20]).unwrap();
        }
        std::fs::create_dir(p("keys")).unwrap();
        let mut spec = VmSpec {
            exe: "aivmm".into(),
            image: GuestImage {
                kernel: p("Image"),
                initrd: p("initrd"),
                rootfs: p("rootfs.ext4"),
                cmdline: "console=ttyS0 quiet".into(),
            },
            cpus: 2,
            memory: 128 << 20,
            net: "none".into(),
            disk: p("disk.img"),
            keys_dir: p("keys"),
            vsock: p("vsock"),
            console: p("console.log"),
            boot_timeout: std::time::Duration::from_secs(1),
        };
        let parse = |spec: &VmSpec| {
            let argv = std::iter::once("aivmm".into()).chain(spec.argv());
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run")
            };
            VmConfig::try_from(&args).unwrap()
        };
        let config = parse(&spec);
        let hyp = HvfHypervisor::new(FakeHvf::new());
        let machine = build(&hyp, &config, Box::new(std::io::sink()), Instant::now()).unwrap();
        // Two disks, the key share, vsock and rng, each with a virtio-mmio window.
        assert_eq!(machine.plan.virtio.len(), 5);
        assert!(config.rng);
        assert_eq!(machine.plan.vcpus, 2);
        spec.net = "passt".into();
        let e = hvf_config(&parse(&spec)).unwrap_err().to_string();
        assert!(
            e.starts_with("--net passt") && e.contains("--net user"),
            "{e}"
        );
        spec.net = "user".into();
        assert!(hvf_config(&parse(&spec)).is_ok());
    }

    #[test]
    fn hvf_run_cli_boots_the_parsed_vm_on_the_framework() {
        let dir = TempDir::new().unwrap();
        let kernel = dir.as_path().join("Image");
        std::fs::write(&kernel, image()).unwrap();
        let initrd = dir.as_path().join("initrd");
        std::fs::write(&initrd, [0x5a; 4096]).unwrap();
        let share = dir.as_path().join("share");
        std::fs::create_dir(&share).unwrap();
        let args = run_args(&[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--share",
            &format!("{}:work", share.display()),
            "--cpus",
            "1",
            "--memory",
            "64M",
        ]);
        let fake = FakeHvf::new();
        // The guest: "A" on the UART, read the first virtio-mmio device's
        // type (virtio-fs: 26), power off.
        script_print_read_poweroff(&fake, VIRTIO_MMIO_START + 8);
        let out = Captured::default();
        let hyp = HvfHypervisor::new(fake.clone());
        let config = VmConfig::try_from(&args).unwrap();
        let machine = build(&hyp, &config, Box::new(out.clone()), Instant::now()).unwrap();
        // The initrd file is in guest RAM, above the kernel.
        let (ia, is) = machine.boot.initrd.unwrap();
        assert_eq!(is, 4096);
        assert!(ia > DRAM_START);
        assert_eq!(machine.mem.read_obj::<u8>(GuestAddress(ia)).unwrap(), 0x5a);
        assert!(matches!(machine.run().unwrap(), VmExit::PowerOff));
        assert_eq!(out.0.lock().unwrap().as_slice(), b"A");
        assert_eq!(
            fake.reg(H0, Reg::X(5)),
            26,
            "the share is a virtio-fs device"
        );

        // A missing kernel is one clear line.
        let mut bad = config.clone();
        bad.kernel = dir.as_path().join("missing");
        let e = build(&hyp, &bad, Box::new(std::io::sink()), Instant::now())
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("cannot read") && e.contains("missing"), "{e}");
    }
}
