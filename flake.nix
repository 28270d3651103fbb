{
  description = "aivmm: run an AI coding agent (Claude Code) in a real VM on your project";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  # Outputs, per system where they make sense:
  #   packages.<system>.{aivmm,default}   the host binary (all three systems)
  #   packages.<linux>.{aivmm-agent,guest,builder-guest}
  #   apps.<system>.default               `nix run . -- run --workdir .`
  #   nixosModules.{guest,builder}, darwinModules.builder, overlays.default
  #   checks.<system>                     package builds, guest evaluation, a VM test
  #
  # The guest is Linux, so on macOS `nix run` uses the guest of the matching Linux
  # system (aarch64-darwin -> aarch64-linux), which needs a Linux builder to build
  # the first time: nixosModules/darwinModules.builder provide one.
  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # Apple silicon only: aivmm drives Hypervisor.framework's arm64 VMs (and its
      # GICv3), and refuses Intel Macs at start.
      darwinSystems = [
        "aarch64-darwin"
      ];
      allSystems = linuxSystems ++ darwinSystems;

      forSystems = systems: f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # The Linux system whose guest a host of `system` boots: same CPU.
      guestSystemFor = system: "${lib.head (lib.splitString "-" system)}-linux";

      # A NixOS configuration for the guest, from nixosModules plus `modules`.
      guestSystem =
        system: modules:
        lib.nixosSystem {
          modules = [
            { nixpkgs.hostPlatform = system; }
          ] ++ modules;
        };

      guestConfig = system: guestSystem system [ self.nixosModules.guest ];
      builderConfig = system: guestSystem system [ ./guest-image/nixos/builder.nix ];

      # aivmm with its default guest and agent: those of the Linux system matching
      # the host's CPU (on macOS they need a Linux builder the first time, e.g.
      # darwinModules.builder). The environment variables aivmm honours when it boots
      # its default guest (`aivmm run --workdir DIR`; `aivmm builder serve` reads the
      # same set named AIVMM_BUILDER_*, which nix/builder-common.nix sets); flags given
      # on the command line win, and so do these variables when already set:
      #   AIVMM_GUEST_KERNEL       the kernel (ELF vmlinux on x86_64, Image on aarch64)
      #   AIVMM_GUEST_INITRD       the initrd
      #   AIVMM_GUEST_ROOTFS       the read-only store image, attached as vda
      #   AIVMM_GUEST_CMDLINE_FILE a file holding the kernel command line; aivmm
      #                            appends aivmm.uid=, aivmm.gid= (and its
      #                            virtio_mmio.device= with --no-acpi)
      #   AIVMM_AGENT              the guest agent aivmm hands the guest (read-only)
      # The per-workdir state disk (vdb) is aivmm's own: a sparse file it creates;
      # the guest formats it on first boot.
      wrapped =
        system: pkgs:
        let
          guestPkgs = self.packages.${guestSystemFor system};
          guest = guestPkgs.guest;
        in
        pkgs.writeShellApplication {
          name = "aivmm";
          text = ''
            export AIVMM_GUEST_KERNEL="''${AIVMM_GUEST_KERNEL:-${guest}/kernel}"
            export AIVMM_GUEST_INITRD="''${AIVMM_GUEST_INITRD:-${guest}/initrd}"
            export AIVMM_GUEST_ROOTFS="''${AIVMM_GUEST_ROOTFS:-${guest}/rootfs.img}"
            export AIVMM_GUEST_CMDLINE_FILE="''${AIVMM_GUEST_CMDLINE_FILE:-${guest}/cmdline}"
            export AIVMM_AGENT="''${AIVMM_AGENT:-${lib.getExe guestPkgs.aivmm-agent}}"
            exec ${lib.getExe self.packages.${system}.aivmm} "$@"
          '';
          meta = {
            description = "aivmm with the Nix-built NixOS guest and guest agent";
            mainProgram = "aivmm";
          };
        };
    in
    {
      overlays.default = final: _prev: {
        aivmm = final.callPackage ./nix/package.nix { };
        aivmm-agent = final.callPackage ./nix/agent.nix { };
      };

      packages = forSystems allSystems (
        system: pkgs:
        {
          # The bare binary: give it a guest and an agent yourself (AIVMM_GUEST_*,
          # AIVMM_AGENT), or let it build the Debian image (needs apt-get).
          aivmm = pkgs.callPackage ./nix/package.nix { };
          # What `nix run` and `nix profile install` give: aivmm with the Nix-built
          # guest and agent wired in.
          default = wrapped system pkgs;
        }
        // lib.optionalAttrs (lib.elem system linuxSystems) {
          aivmm-agent = pkgs.callPackage ./nix/agent.nix { };
          # The NixOS guest as one directory: kernel, initrd, rootfs.img, cmdline
          # (guest-image/nixos/image.nix). macOS hosts use the matching Linux one.
          guest = (guestConfig system).config.system.build.aivmmGuest;
          # The same for `aivmm builder serve` (guest-image/nixos/builder.nix).
          builder-guest = (builderConfig system).config.system.build.aivmmGuest;
        }
      );

      apps = forSystems allSystems (
        system: _pkgs: {
          default = {
            type = "app";
            program = lib.getExe self.packages.${system}.default;
            meta.description = "aivmm with the Nix-built NixOS guest";
          };
        }
      );

      devShells = forSystems allSystems (
        system: pkgs: {
          # cargo, rustc, clippy and rustfmt from nixpkgs, nixfmt for the Nix files.
          # The nested e2e harness (tests/e2e/run) wants Debian's packages: it runs
          # on Debian or Ubuntu, not here.
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.aivmm ];
            packages = [
              pkgs.clippy
              pkgs.rustfmt
              pkgs.nixfmt
            ];
          };
        }
      );

      formatter = forSystems allSystems (_system: pkgs: pkgs.nixfmt);

      nixosModules = {
        # The guest configuration; extend it like any NixOS module and build
        # `config.system.build.aivmmGuest`.
        guest = ./guest-image/nixos/guest.nix;
        # A Nix remote builder in an aivmm VM on a NixOS host.
        builder = ./nix/module.nix;
        default = self.nixosModules.builder;
      };

      darwinModules = {
        # The same builder on a nix-darwin host.
        builder = ./nix/darwin-module.nix;
        default = self.darwinModules.builder;
      };

      checks = forSystems allSystems (
        system: pkgs:
        {
          aivmm = self.packages.${system}.aivmm;
        }
        // lib.optionalAttrs (lib.elem system linuxSystems) {
          aivmm-agent = self.packages.${system}.aivmm-agent;
          # Evaluating the guests catches option and assertion errors without the
          # (large) image builds; `nix build .#guest` builds the real thing. A bare
          # drvPath would carry a dependency on every output of the closure (its
          # string context is allOutputs): discarding it leaves the .drv alone.
          guest-eval = pkgs.writeText "aivmm-guest-eval" (
            builtins.unsafeDiscardOutputDependency (guestConfig system).config.system.build.toplevel.drvPath
          );
          builder-eval = pkgs.writeText "aivmm-builder-eval" (
            builtins.unsafeDiscardOutputDependency (builderConfig system).config.system.build.toplevel.drvPath
          );
        }
        // lib.optionalAttrs (lib.elem system darwinSystems) {
          # The entitlement the package signs aivmm with is a well-formed plist
          # granting com.apple.security.hypervisor.
          entitlements = pkgs.runCommand "aivmm-entitlements-check" { nativeBuildInputs = [ pkgs.python3 ]; } ''
            python3 -c 'import plistlib, sys; d = plistlib.load(open(sys.argv[1], "rb")); assert d == {"com.apple.security.hypervisor": True}, d' ${./macos/aivmm.entitlements}
            touch $out
          '';
        }
        // lib.optionalAttrs (system == "x86_64-linux") {
          # The host module: the socket listens on loopback, the keys and the
          # ssh/nix configuration are in place. The VM is not booted (that needs
          # the guest image and nested KVM).
          builder-module = pkgs.testers.runNixOSTest {
            name = "aivmm-builder-module";
            nodes.machine = {
              imports = [ self.nixosModules.builder ];
              services.aivmm-builder = {
                enable = true;
                port = 31022;
                # Not booted here, so a stand-in keeps the test from building it.
                guest = pkgs.runCommand "aivmm-guest-stub" { } "mkdir $out";
              };
            };
            testScript = ''
              machine.wait_for_unit("aivmm-builder-keys.service")
              machine.wait_for_unit("aivmm-builder.socket")
              machine.wait_for_open_port(31022, "127.0.0.1")
              machine.succeed("test -f /var/lib/aivmm-builder/ssh/id_ed25519")
              machine.succeed("grep -q '^aivmm-builder ssh-ed25519 ' /var/lib/aivmm-builder/ssh/known_hosts")
              machine.succeed("cmp /var/lib/aivmm-builder/ssh/id_ed25519.pub /var/lib/aivmm-builder/vm/guest/authorized_keys")
              machine.succeed("grep -q 'aivmm-builder' /etc/nix/machines")
              machine.succeed("ssh -G aivmm-builder | grep -qx 'port 31022'")
              # Only loopback: nothing listens on other addresses.
              machine.fail("ss -Htln | grep ':31022' | grep -v '127.0.0.1'")
            '';
          };
        }
      );
    };
}
