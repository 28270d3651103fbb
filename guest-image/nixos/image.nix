# `config.system.build.aivmmGuest`: what aivmm boots, as one directory
#
#   kernel     x86_64: the uncompressed ELF vmlinux (no in-guest decompression);
#              aarch64: the Image
#   initrd     the systemd stage-1 initrd
#   rootfs.img the read-only store image for vda: ext4 labelled
#              `config.aivmm.guest.storeLabel`, holding /nix/store with the system's
#              closure and /nix-path-registration for the Nix database
#   cmdline    the kernel command line: `init=<system>/init` and boot.kernelParams.
#              aivmm appends its own parameters (aivmm.uid=, aivmm.gid=, and
#              virtio_mmio.device= with --no-acpi).
#
# The parts are also attributes (kernel, initrd, rootfs, cmdline, toplevel), so a
# wrapper can use them without reading files.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:

let
  toplevel = config.system.build.toplevel;
  kernelPkg = config.boot.kernelPackages.kernel;
  kernel =
    if pkgs.stdenv.hostPlatform.isx86_64 then
      "${kernelPkg.dev}/vmlinux"
    else
      "${kernelPkg}/${config.system.boot.loader.kernelFile}";
  initrd = "${config.system.build.initialRamdisk}/${config.system.boot.loader.initrdFile}";
  rootfs = pkgs.callPackage (modulesPath + "/../lib/make-ext4-fs.nix") {
    storePaths = [ toplevel ];
    volumeLabel = config.aivmm.guest.storeLabel;
  };
  cmdline = lib.concatStringsSep " " ([ "init=${toplevel}/init" ] ++ config.boot.kernelParams);
in
{
  # system.build is a free-form attribute set, so no option is declared for this.
  system.build.aivmmGuest =
    pkgs.runCommand "aivmm-guest-${config.system.nixos.label}"
      {
        passthru = {
          inherit
            kernel
            initrd
            rootfs
            cmdline
            toplevel
            ;
        };
      }
      ''
        mkdir -p $out
        ln -s ${kernel} $out/kernel
        ln -s ${initrd} $out/initrd
        ln -s ${rootfs} $out/rootfs.img
        printf '%s' ${lib.escapeShellArg cmdline} > $out/cmdline
      '';
}
