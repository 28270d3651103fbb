# What the NixOS and nix-darwin builder modules share: the options of
# `services.aivmm-builder`, the registration as a Nix remote builder, the SSH client
# settings, and the key generation script. ./module.nix and ./darwin-module.nix add
# the service itself (systemd socket + service, or a launchd daemon).
#
# How it fits together:
#   nix-daemon ──ssh──▶ 127.0.0.1:port ──(socket activation)──▶ aivmm builder serve
#              ──vsock port 22 (CONNECT 22 on the vsock socket)──▶ guest socat ──▶ sshd
# The guest is ../guest-image/nixos/builder.nix, evaluated with this nixpkgs for the
# Linux system matching the host's CPU.
#
# State directory layout (keys are made on activation, before anything connects):
#   <stateDir>/ssh/id_ed25519{,.pub}  nix-daemon's identity (root only)
#   <stateDir>/ssh/known_hosts        the guest's pinned host key, as `aivmm-builder`
#   <stateDir>/vm/                    aivmm's --state-dir (the service user's):
#     disk.img                          the guest's state disk, --disk-size
#     guest/ssh_host_ed25519_key{,.pub} shared read-only with the guest (virtio-fs
#     guest/authorized_keys             tag `aivmm-builder`)
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.aivmm-builder;
  cpu = pkgs.stdenv.hostPlatform.parsed.cpu.name;
  guestSystem = "${cpu}-linux";
  sshDir = "${cfg.stateDir}/ssh";
  vmDir = "${cfg.stateDir}/vm";

  builderGuest =
    (import (pkgs.path + "/nixos/lib/eval-config.nix") {
      inherit lib;
      # The platform comes from nixpkgs.hostPlatform below; `null` keeps
      # eval-config from reading builtins.currentSystem (impure in flakes).
      system = null;
      modules = [
        ../guest-image/nixos/builder.nix
        {
          nixpkgs.hostPlatform = guestSystem;
          aivmm.builder.emulatedSystems = cfg.emulatedSystems;
        }
      ];
    }).config.system.build.aivmmGuest;
in
{
  options.services.aivmm-builder = {
    enable = lib.mkEnableOption "a Linux Nix remote builder running in an aivmm VM on this machine";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The aivmm package.";
    };

    guest = lib.mkOption {
      type = lib.types.package;
      default = builderGuest;
      defaultText = lib.literalMD "`guest-image/nixos/builder.nix` built for `<cpu>-linux`";
      description = ''
        The builder guest: a directory with `kernel`, `initrd`, `rootfs.img` and
        `cmdline` (`config.system.build.aivmmGuest` of a NixOS configuration).

        It is a Linux derivation, so on macOS the first build of it needs some Linux
        builder (another machine, or a binary cache that has it). Afterwards this
        builder can rebuild its own next image.
      '';
    };

    cores = lib.mkOption {
      type = lib.types.ints.positive;
      default = 4;
      description = "vCPUs of the builder VM; also the builder's `maxJobs`.";
    };

    memory = lib.mkOption {
      type = lib.types.str;
      default = "8G";
      example = "16G";
      description = "Memory of the builder VM (aivmm size syntax: 512M, 8G, …).";
    };

    diskSize = lib.mkOption {
      type = lib.types.str;
      default = "100G";
      description = ''
        Size of the builder's sparse state disk, which holds its Nix store. Raising it
        grows the disk, and the guest its filesystem at the next boot; a smaller size
        than the disk has is refused (the service fails to start, saying so), never cut.
      '';
    };

    onDemand = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = ''
          Boot the VM on the first connection and stop it after it has been idle
          for `onDemand.ttl`. When false the VM runs all the time (`--always-on`).
        '';
      };
      ttl = lib.mkOption {
        type = lib.types.str;
        default = "30m";
        example = "2h";
        description = "How long the VM may sit idle before it is stopped (`--idle`).";
      };
    };

    port = lib.mkOption {
      type = lib.types.port;
      default = 31022;
      description = "TCP port on 127.0.0.1 (loopback only) where the builder's SSH is reached.";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/aivmm-builder";
      description = "Where the keys and the VM's disk live.";
    };

    systems = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ guestSystem ] ++ cfg.emulatedSystems;
      defaultText = lib.literalExpression ''[ "<cpu>-linux" ] ++ emulatedSystems'';
      description = "Systems advertised in nix.buildMachines.";
    };

    emulatedSystems = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "x86_64-linux" ];
      description = "Other Linux systems the guest builds for with binfmt and QEMU (slow).";
    };

    supportedFeatures = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [
        "big-parallel"
        "benchmark"
      ]
      ++ lib.optionals pkgs.stdenv.hostPlatform.isLinux [
        "kvm"
        "nixos-test"
      ];
      defaultText = lib.literalExpression ''
        [ "big-parallel" "benchmark" ] ++ lib.optionals pkgs.stdenv.hostPlatform.isLinux [ "kvm" "nixos-test" ]
      '';
      description = ''
        Features advertised in nix.buildMachines. `kvm` and `nixos-test` need KVM inside
        the guest: on a Linux host whose KVM allows nested virtualization (`kvm_amd` or
        `kvm_intel` with `nested=1`, the kernel's default) the guest gets /dev/kvm.
        Hypervisor.framework gives the guest none, so macOS hosts leave them out.
        `aivmm builder install` prints the same, from the host's `nested` setting.
      '';
    };

    internal = lib.mkOption {
      internal = true;
      readOnly = true;
      type = lib.types.attrsOf lib.types.unspecified;
      description = "Values ./module.nix and ./darwin-module.nix share.";
    };
  };

  config = lib.mkIf cfg.enable {
    services.aivmm-builder.internal = {
      inherit sshDir vmDir guestSystem;

      # `aivmm builder serve`; the listening socket comes from socket activation
      # (systemd LISTEN_FDS, or launchd's `Listener`), --port says which one it is.
      argv =
        [
          (lib.getExe cfg.package)
          "builder"
          "serve"
          "--port"
          (toString cfg.port)
          "--cpus"
          (toString cfg.cores)
          "--memory"
          cfg.memory
          "--disk-size"
          cfg.diskSize
          "--state-dir"
          vmDir
        ]
        ++ (if cfg.onDemand.enable then [ "--idle" cfg.onDemand.ttl ] else [ "--always-on" ]);

      # Points `aivmm builder serve` at the builder guest (without them it builds
      # and boots the Debian builder image, `aivmm image build --builder`).
      environment = {
        AIVMM_BUILDER_KERNEL = "${cfg.guest}/kernel";
        AIVMM_BUILDER_INITRD = "${cfg.guest}/initrd";
        AIVMM_BUILDER_ROOTFS = "${cfg.guest}/rootfs.img";
        AIVMM_BUILDER_CMDLINE_FILE = "${cfg.guest}/cmdline";
      };

      # Idempotent; $1 is the owner of the VM directory.
      makeKeys = pkgs.writeShellScript "aivmm-builder-keys" ''
        set -eu
        PATH=${lib.makeBinPath [ pkgs.openssh pkgs.coreutils ]}
        owner=$1
        install -d -m 0755 ${lib.escapeShellArg cfg.stateDir}
        install -d -m 0700 ${lib.escapeShellArg sshDir}
        install -d -m 0700 -o "$owner" ${lib.escapeShellArg vmDir} ${lib.escapeShellArg "${vmDir}/guest"}
        cd ${lib.escapeShellArg sshDir}
        [ -f id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -C "nix-daemon@aivmm-builder" -f id_ed25519
        guest=${lib.escapeShellArg "${vmDir}/guest"}
        [ -f "$guest/ssh_host_ed25519_key" ] ||
          ssh-keygen -q -t ed25519 -N "" -C aivmm-builder -f "$guest/ssh_host_ed25519_key"
        install -m 0644 -o "$owner" id_ed25519.pub "$guest/authorized_keys"
        chown "$owner" "$guest/ssh_host_ed25519_key" "$guest/ssh_host_ed25519_key.pub"
        read -r type key _ < "$guest/ssh_host_ed25519_key.pub"
        printf 'aivmm-builder %s %s\n' "$type" "$key" > known_hosts.tmp
        mv known_hosts.tmp known_hosts
      '';
    };

    nix.distributedBuilds = true;
    nix.buildMachines = [
      {
        hostName = "aivmm-builder";
        sshUser = "builder";
        sshKey = "${sshDir}/id_ed25519";
        protocol = "ssh-ng";
        systems = cfg.systems;
        maxJobs = cfg.cores;
        supportedFeatures = cfg.supportedFeatures;
        mandatoryFeatures = [ ];
      }
    ];

    # nix-daemon (root) reads the system ssh_config. ConnectTimeout is generous:
    # on demand, the first connection waits for the VM to boot.
    programs.ssh.extraConfig = ''
      Host aivmm-builder
        HostName 127.0.0.1
        Port ${toString cfg.port}
        User builder
        IdentityFile ${sshDir}/id_ed25519
        IdentitiesOnly yes
        HostKeyAlias aivmm-builder
        UserKnownHostsFile ${sshDir}/known_hosts
        StrictHostKeyChecking yes
        ConnectTimeout 120
        ServerAliveInterval 30
    '';
  };
}
