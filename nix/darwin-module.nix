# nix-darwin module: `services.aivmm-builder`, a Linux Nix remote builder in an
# aivmm VM (Hypervisor.framework), aarch64-linux on Apple silicon.
#
#   imports = [ aivmm.darwinModules.builder ];
#   services.aivmm-builder.enable = true;
#
# launchd listens on 127.0.0.1:port for the daemon (the `Listener` socket) and
# starts aivmm at the first connection; aivmm takes the socket with
# launch_activate_socket("Listener") and boots the VM. With onDemand, aivmm exits
# after the idle TTL and launchd waits for the next connection. The options and the
# nix.buildMachines entry are in ./builder-common.nix.
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
        assertion = pkgs.stdenv.hostPlatform.isDarwin;
        message = "services.aivmm-builder: this is the nix-darwin module; on NixOS use nixosModules.builder.";
      }
      {
        assertion = pkgs.stdenv.hostPlatform.isAarch64;
        message = "services.aivmm-builder: aivmm needs an Apple silicon Mac (Hypervisor.framework's arm64 VMs); Intel Macs are not supported.";
      }
    ];

    # Keys exist before launchd loads the daemon, so ssh never races their creation.
    # The daemon runs as root, so root owns the VM directory too.
    system.activationScripts.postActivation.text = lib.mkAfter ''
      echo "setting up the aivmm builder's keys..." >&2
      ${internal.makeKeys} root
    '';

    launchd.daemons.aivmm-builder = {
      environment = internal.environment;
      serviceConfig = {
        Label = "org.aivmm.builder";
        ProgramArguments = internal.argv;
        Sockets.Listener = {
          SockType = "stream";
          SockNodeName = "127.0.0.1";
          SockServiceName = toString cfg.port;
          SockFamily = "IPv4";
        };
        # On demand, launchd starts aivmm at the first connection; otherwise at
        # load, and again whenever it exits.
        RunAtLoad = !cfg.onDemand.enable;
        KeepAlive = !cfg.onDemand.enable;
        ProcessType = "Interactive"; # builds should not get background QoS
        WorkingDirectory = internal.vmDir;
        StandardOutPath = "/var/log/aivmm-builder.log";
        StandardErrorPath = "/var/log/aivmm-builder.log";
      };
    };
  };
}
