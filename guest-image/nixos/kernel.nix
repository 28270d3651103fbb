# The guest kernel. By default nixpkgs' LTS kernel as the binary cache has it, with
# the virtio modules in the initrd. With `aivmm.guest.customKernel = true`, nixpkgs'
# latest kernel with everything aivmm's guest needs built in, so stage 1 loads no
# modules and the devices are up before the first unit runs.
#
# Devices are found two ways (see DESIGN.md, "Device discovery on x86_64"): ACPI
# (DSDT devices with _HID "LNRO0005", which virtio_mmio matches through ACPI), and
# `virtio_mmio.device=` on the command line with `--no-acpi`.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib.kernel) yes;
  inherit (pkgs.stdenv.hostPlatform) isx86_64 isAarch64;

  # Only symbols with a prompt: generate-config answers questions, and a mandatory
  # option that is never asked (like the hidden VIRTIO) fails the build.
  builtIn = {
    # virtio over MMIO, discovered through ACPI or the command line
    VIRTIO_MENU = yes;
    VIRTIO_MMIO = yes;
    VIRTIO_MMIO_CMDLINE_DEVICES = yes;
    # devices
    VIRTIO_BLK = yes;
    VIRTIO_NET = yes;
    VIRTIO_CONSOLE = yes;
    HW_RANDOM = yes;
    HW_RANDOM_VIRTIO = yes;
    # vsock to the host agent socket (vmw_vsock_virtio_transport)
    VSOCKETS = yes;
    VIRTIO_VSOCKETS = yes;
    # /work over virtio-fs
    FUSE_FS = yes;
    VIRTIO_FS = yes;
    # the store image, the state disk and the writable store overlay
    EXT4_FS = yes;
    OVERLAY_FS = yes;
    # the console aivmm attaches (COM1)
    SERIAL_8250 = yes;
    SERIAL_8250_CONSOLE = yes;
  }
  // lib.optionalAttrs isx86_64 {
    ACPI = yes;
  }
  # arm64 (aivmm on Hypervisor.framework): no ACPI; the device tree's ns16550a
  # console, and its power button, a PL061 GPIO line under gpio-keys.
  // lib.optionalAttrs isAarch64 {
    SERIAL_OF_PLATFORM = yes;
    GPIO_PL061 = yes;
    KEYBOARD_GPIO = yes;
  };
in
{
  options.aivmm.guest.customKernel = lib.mkOption {
    type = lib.types.bool;
    default = false;
    description = ''
      Build the kernel with the guest's devices built in: the fastest boot, at the
      cost of compiling Linux on the first `nix run` and again at every nixpkgs bump.
      When false (the default), nixpkgs' LTS kernel (`linuxPackages`) is used unchanged:
      the public binary cache has it, so nothing is compiled, and the virtio modules
      go into the initrd, where udev loads them for the devices aivmm gives.
    '';
  };

  config = lib.mkMerge [
    {
      boot.kernelPackages = lib.mkDefault pkgs.linuxPackages_latest;

      # Nested virtualisation: /dev/kvm inside the guest when the host allows it. On
      # aarch64 KVM is built into the kernel and has no such modules.
      boot.kernelModules = lib.optionals isx86_64 [
        "kvm-intel"
        "kvm-amd"
      ];
    }

    (lib.mkIf config.aivmm.guest.customKernel {
      boot.kernelPatches = [
        {
          name = "aivmm-guest";
          patch = null;
          # mkForce: nixpkgs' common config builds several of these as modules, and
          # a plain `yes` would conflict with its `module`.
          extraStructuredConfig = lib.mapAttrs (_: lib.mkForce) builtIn;
        }
      ];

      # Everything above is built in, so the initrd needs none of the default
      # storage and keyboard modules (a built-in module named by another NixOS
      # module is fine: the initrd's module closure skips it).
      boot.initrd.includeDefaultModules = false;
    })

    (lib.mkIf (!config.aivmm.guest.customKernel) {
      boot.kernelPackages = lib.mkOverride 999 pkgs.linuxPackages;
      boot.initrd.availableKernelModules = [
        "virtio_mmio"
        "virtio_blk"
        "virtio_net"
        "virtio_console"
        "virtio_rng"
        "virtio_balloon"
        "virtiofs"
        "vmw_vsock_virtio_transport"
        "overlay"
        "ext4"
      ]
      # The arm64 power button (gpio-keys on the PL061, which stock kernels build in).
      ++ lib.optionals isAarch64 [ "gpio_keys" ];
    })
  ];
}
