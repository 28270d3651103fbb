# NixOS module: `services.aivmm-builder`, a Linux Nix remote builder in an aivmm VM.
#
#   imports = [ aivmm.nixosModules.builder ];
#   services.aivmm-builder = { enable = true; cores = 8; memory = "16G"; };
#
# systemd listens on 127.0.0.1:port (aivmm-builder.socket); the first connection
# starts aivmm-builder.service, which is handed the socket (LISTEN_FDS) and boots
# the VM. With onDemand, aivmm exits after the idle TTL and the socket waits again.
# The options and the nix.buildMachines entry are in ./builder-common.nix.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.aivmm-builder;
  inherit (cfg) internal;
in
{
  imports = [ ./builder-common.nix ];

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = pkgs.stdenv.hostPlatform.isLinux;
        message = "services.aivmm-builder: this is the NixOS module; on macOS use darwinModules.builder.";
      }
    ];

    users.users.aivmm-builder = {
      isSystemUser = true;
      group = "aivmm-builder";
      extraGroups = [ "kvm" ]; # /dev/kvm is all aivmm needs
      home = internal.vmDir;
    };
    users.groups.aivmm-builder = { };

    # Keys exist before anything can connect, so ssh never races their creation.
    systemd.services.aivmm-builder-keys = {
      description = "Generate the aivmm builder's SSH keys";
      wantedBy = [ "multi-user.target" ];
      before = [
        "aivmm-builder.socket"
        "aivmm-builder.service"
        "nix-daemon.service"
      ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${internal.makeKeys} aivmm-builder";
      };
    };

    systemd.sockets.aivmm-builder = {
      description = "aivmm Nix builder (SSH on loopback)";
      wantedBy = [ "sockets.target" ];
      requires = [ "aivmm-builder-keys.service" ];
      after = [ "aivmm-builder-keys.service" ];
      listenStreams = [ "127.0.0.1:${toString cfg.port}" ];
      # One long-lived aivmm for all connections; it accepts them itself.
      socketConfig.Accept = false;
    };

    systemd.services.aivmm-builder = {
      description = "aivmm Nix builder VM";
      requires = [
        "aivmm-builder.socket"
        "aivmm-builder-keys.service"
      ];
      after = [
        "aivmm-builder.socket"
        "aivmm-builder-keys.service"
      ];
      # Always-on: boot with the machine instead of at the first connection.
      wantedBy = lib.mkIf (!cfg.onDemand.enable) [ "multi-user.target" ];
      environment = internal.environment;
      serviceConfig = {
        ExecStart = lib.escapeShellArgs internal.argv;
        User = "aivmm-builder";
        Group = "aivmm-builder";
        SupplementaryGroups = [ "kvm" ];
        # Idle exit is normal with onDemand; a crash is retried.
        Restart = "on-failure";
        RestartSec = 2;
        # The guest gets a clean shutdown (sync of its state disk) before the kill.
        TimeoutStopSec = 60;
        KillMode = "mixed";

        ProtectSystem = "strict";
        ReadWritePaths = [ internal.vmDir ];
        ProtectHome = true;
        PrivateTmp = true;
        NoNewPrivileges = true;
        DeviceAllow = [ "/dev/kvm rw" ];
        DevicePolicy = "closed";
      };
    };
  };
}
