# The builder guest that `aivmm builder serve` boots: a Nix remote builder reached
# over SSH. The host's nix-daemon connects to 127.0.0.1:PORT, aivmm forwards that to
# the guest's vsock port 22, socat here bridges it to sshd (on the guest's loopback
# only), and the `builder` user may run only the Nix daemon protocol.
#
# The control channel (the same protocol as the Debian builder image's init2,
# guest-image/builder/): once sshd answers, the guest connects to the host's vsock
# port 10022 and says `ready`; `poweroff` on it (or its end) powers the guest off.
#
# Keys: the host module (nix/module.nix, nix/darwin-module.nix) generates them in the
# service's state directory, and aivmm shares `<state-dir>/guest` read-only with the
# guest under the virtio-fs tag `aivmm-builder`. It holds
#   ssh_host_ed25519_key      the guest sshd's host key (the host pins its .pub)
#   authorized_keys           the host nix-daemon's public key
# Everything else (the Nix store overlay, the database, build outputs) lives on the
# state disk, vdb, sized by `--disk-size`.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.aivmm.builder;
  controlPort = 10022;
  keysDir = "/run/aivmm-builder";
  sshDir = "/var/lib/aivmm-builder";

  # The only commands the builder user may run: the ssh-ng and legacy ssh protocols.
  builderShell = pkgs.writeShellScript "aivmm-builder-command" ''
    case "''${SSH_ORIGINAL_COMMAND-}" in
      "nix-daemon --stdio") exec ${config.nix.package}/bin/nix-daemon --stdio ;;
      "nix-store --serve --write") exec ${config.nix.package}/bin/nix-store --serve --write ;;
      *) echo "aivmm-builder: only Nix remote builds are allowed" >&2; exit 1 ;;
    esac
  '';

  # The guest end of the control channel; stdin/stdout are the vsock connection.
  controlScript = pkgs.writeShellScript "aivmm-builder-control" ''
    : > /run/aivmm-builder-control-up
    echo "ready $(uname -r)"
    while read -r cmd; do
      case "$cmd" in
        ping) echo pong ;;
        poweroff) echo bye; exit 0 ;;
        *) echo "unknown $cmd" ;;
      esac
    done
  '';
in
{
  imports = [ ./guest.nix ];

  options.aivmm.builder = {
    emulatedSystems = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "x86_64-linux" ];
      description = ''
        Other systems this builder builds for through binfmt and QEMU user mode,
        e.g. x86_64-linux on an aarch64 guest. Off by default: emulated builds are
        many times slower, and a builder that advertises a system it builds slowly
        is chosen anyway.
      '';
    };
  };

  config = {
    networking.hostName = "aivmm-builder";

    # No agent, no Claude Code, no interactive user: this guest only serves builds.
    aivmm.guest.agent.enable = false;
    aivmm.guest.packages = [ ];
    systemd.services.aivmm-user.enable = false;
    # The stock kernel comes from the public binary cache, so a first install on a
    # machine without any Linux builder has the least to build (see nix/module.nix).
    aivmm.guest.customKernel = lib.mkDefault false;

    fileSystems.${keysDir} = {
      device = "aivmm-builder";
      fsType = "virtiofs";
      options = [ "ro" ];
    };

    # sshd insists on root-owned 0600 host keys, which a share cannot promise.
    systemd.services.aivmm-builder-keys = {
      description = "Install the builder's SSH keys from the host";
      wantedBy = [ "multi-user.target" ];
      before = [ "sshd.service" ];
      requiredBy = [ "sshd.service" ];
      unitConfig.RequiresMountsFor = keysDir;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      path = [ pkgs.coreutils ];
      script = ''
        install -d -m 0755 ${sshDir}
        install -m 0600 ${keysDir}/ssh_host_ed25519_key ${sshDir}/ssh_host_ed25519_key
        install -m 0644 ${keysDir}/authorized_keys ${sshDir}/authorized_keys
      '';
    };

    # aivmm's vsock port 22 -> sshd on the guest's loopback.
    systemd.services.aivmm-builder-vsock = {
      description = "Bridge vsock port 22 to sshd";
      wantedBy = [ "multi-user.target" ];
      after = [ "sshd.service" ];
      serviceConfig = {
        ExecStart = "${pkgs.socat}/bin/socat VSOCK-LISTEN:22,fork,reuseaddr TCP:127.0.0.1:22";
        Restart = "always";
      };
    };

    systemd.services.aivmm-builder-control = {
      description = "Tell aivmm the builder is ready; power off when it asks";
      wantedBy = [ "multi-user.target" ];
      after = [
        "sshd.service"
        "aivmm-builder-vsock.service"
        "nix-daemon.socket"
      ];
      requires = [ "sshd.service" ];
      path = [
        pkgs.socat
        pkgs.iproute2
        pkgs.coreutils
        pkgs.systemd
      ];
      serviceConfig.Type = "simple";
      script = ''
        until ss -Htln 'sport = :22' | grep -q .; do sleep 0.1; done
        i=0
        while :; do
          socat VSOCK-CONNECT:2:${toString controlPort} EXEC:${controlScript} || true
          [ -e /run/aivmm-builder-control-up ] && break
          i=$((i + 1))
          [ $i -lt 50 ] || break
          sleep 0.2
        done
        systemctl poweroff --no-block
      '';
    };

    services.openssh = {
      enable = true;
      openFirewall = false;
      # Reached only through the vsock bridge above.
      listenAddresses = [
        {
          addr = "127.0.0.1";
          port = 22;
        }
      ];
      startWhenNeeded = false;
      hostKeys = [
        {
          path = "${sshDir}/ssh_host_ed25519_key";
          type = "ed25519";
        }
      ];
      authorizedKeysFiles = lib.mkForce [ "${sshDir}/authorized_keys" ];
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "no";
        AllowUsers = [ "builder" ];
        X11Forwarding = false;
      };
      extraConfig = ''
        Match User builder
          ForceCommand ${builderShell}
          PermitTTY no
          AllowTcpForwarding no
          AllowAgentForwarding no
          AllowStreamLocalForwarding no
      '';
    };

    users.users.builder = {
      isSystemUser = true;
      group = "builder";
      # A real shell: sshd runs ForceCommand through it.
      shell = pkgs.bashInteractive;
      home = "/var/empty";
    };
    users.groups.builder = { };

    nix.settings = {
      trusted-users = [ "builder" ];
      # `kvm`/`nixos-test`: the guest has /dev/kvm when the host's KVM allows nested
      # virtualization (aivmm passes SVM/VMX on; the kernel has KVM built in). The
      # host decides what it sends here (services.aivmm-builder.supportedFeatures).
      system-features = [
        "big-parallel"
        "benchmark"
        "kvm"
        "nixos-test"
      ];
      max-jobs = "auto";
      cores = 0;
      # The guest is disposable and has no users to protect from each other, but
      # keep builds sandboxed so their results match other builders'.
      sandbox = true;
      # Outputs pile up on the state disk: collect garbage while building when
      # less than 1 GiB is free, up to 4 GiB free.
      min-free = 1024 * 1024 * 1024;
      max-free = 4 * 1024 * 1024 * 1024;
    };
    # And old outputs go eventually (a missed run happens at the next boot).
    nix.gc = {
      automatic = true;
      dates = "daily";
      options = "--delete-older-than 7d";
    };

    boot.binfmt.emulatedSystems = cfg.emulatedSystems;
  };
}
