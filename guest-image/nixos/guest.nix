# The aivmm guest: a NixOS microVM that aivmm boots directly (no bootloader) to run
# Claude Code on the user's project. This is `nixosModules.guest`; extend it like
# any NixOS module (add packages, services, users) and build
# `config.system.build.aivmmGuest` (./image.nix).
#
# The contract with aivmm (`aivmm run --workdir DIR`):
#   vda  the store image (read-only ext4 labelled `aivmm-store`, ./image.nix)
#   vdb  the per-workdir state disk: writable, formatted on first boot; it holds `/`
#        (home, /var, the Nix database) and the upper layer of the /nix/store overlay
#   virtio-fs tag `work`  mounted at /work
#   virtio-net            DHCP on eth0 (aivmm's user-mode network answers it)
#   vsock                 aivmm-agent connects to the host (CID 2, port 1024)
#   command line          `aivmm.uid=` / `aivmm.gid=`: the host user's ids, given to
#                         the guest user so files in /work keep their owner
# When the agent exits the guest powers off, and aivmm exits with the command's status.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.aivmm.guest;
  workMount = "${utils.escapeSystemdPath cfg.workDir}.mount";
in
{
  imports = [
    ./kernel.nix
    ./image.nix
  ];

  options.aivmm.guest = {
    user = lib.mkOption {
      type = lib.types.str;
      default = "agent";
      description = ''
        The guest user that runs the command. It is created at boot with the uid
        and gid from the kernel command line (`aivmm.uid=`, `aivmm.gid=`; 1000 if
        absent), and its home is on the state disk.
      '';
    };

    sudo = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Whether the guest user may use sudo without a password (the VM is the sandbox).";
    };

    storeLabel = lib.mkOption {
      type = lib.types.str;
      default = "aivmm-store";
      description = "Filesystem label of the read-only store image (vda).";
    };

    stateDevice = lib.mkOption {
      type = lib.types.str;
      default = "/dev/vdb";
      description = ''
        The writable per-workdir state disk. A blank disk is formatted as ext4 on
        first boot, so aivmm only has to create a sparse file.
      '';
    };

    workDir = lib.mkOption {
      type = lib.types.str;
      default = "/work";
      description = "Where the shared project directory is mounted.";
    };

    workTag = lib.mkOption {
      type = lib.types.str;
      default = "work";
      description = "The virtio-fs tag of the shared project directory.";
    };

    packages = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = with pkgs; [
        claude-code
        git
        nodejs
        ripgrep
        openssh
        curl
      ];
      defaultText = lib.literalExpression "with pkgs; [ claude-code git nodejs ripgrep openssh curl ]";
      description = "Packages on the guest user's PATH.";
    };

    agent = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Whether to run aivmm-agent at boot and power off when it exits.";
      };
      package = lib.mkOption {
        type = lib.types.package;
        default = pkgs.callPackage ../../nix/agent.nix { };
        defaultText = lib.literalExpression "pkgs.callPackage ./nix/agent.nix { }";
        description = "The aivmm-agent package (guest/agent in aivmm's workspace).";
      };
      extraArgs = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        description = "Extra arguments for aivmm-agent.";
      };
    };

    debugShell = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Log root in automatically on the serial console (for debugging the image).";
    };
  };

  config = lib.mkMerge [
    {
      # --- Boot: no bootloader; aivmm loads the kernel and initrd itself ---------
      boot.loader.grub.enable = false;
      boot.initrd.systemd.enable = true;
      boot.kernelParams =
        [
          "quiet"
          "panic=-1"
          "systemd.show_status=auto"
          "udev.log_level=3"
        ]
        ++ lib.optionals pkgs.stdenv.hostPlatform.isx86_64 [
          "console=ttyS0"
          "reboot=acpi"
          # aivmm's i8042 is only there for reset: skip probing for a mouse
          "i8042.noaux"
        ];
      # A failed boot should end the VM, not wait on a console nobody watches.
      systemd.enableEmergencyMode = false;
      boot.initrd.systemd.emergencyAccess = false;

      # --- Disks -----------------------------------------------------------------
      fileSystems."/" = {
        device = cfg.stateDevice;
        fsType = "ext4";
        autoFormat = true;
        # aivmm grows the disk when its size is raised (`disk_size`, the builder's
        # diskSize); the filesystem follows at the next boot.
        autoResize = true;
        options = [ "noatime" ];
      };
      fileSystems."/nix/.ro-root" = {
        device = "/dev/disk/by-label/${cfg.storeLabel}";
        fsType = "ext4";
        options = [
          "ro"
          "noatime"
        ];
        neededForBoot = true;
      };
      # The writable Nix store: the image's store below, the state disk above, so
      # `nix build`, `nix-env` and `nix profile` work and survive reboots.
      fileSystems."/nix/store" = {
        overlay = {
          lowerdir = [ "/nix/.ro-root/nix/store" ];
          upperdir = "/nix/.rw-store/upper";
          workdir = "/nix/.rw-store/work";
        };
        neededForBoot = true;
      };
      fileSystems.${cfg.workDir} = {
        device = cfg.workTag;
        fsType = "virtiofs";
        # Without a share the guest still boots; the agent reports the missing cwd.
        options = [ "nofail" ];
      };

      # The Nix database on the state disk must know the image's store paths. Load
      # the image's registration once per image (the disk outlives image upgrades),
      # then drop entries for paths of an older image that are gone.
      systemd.services.aivmm-register-store = {
        description = "Register the guest image's store paths in the Nix database";
        wantedBy = [ "multi-user.target" ];
        before = [
          "nix-daemon.socket"
          "nix-daemon.service"
        ];
        after = [ "local-fs.target" ];
        unitConfig.DefaultDependencies = false;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        path = [
          config.nix.package
          pkgs.diffutils
          pkgs.coreutils
        ];
        script = ''
          reg=/nix/.ro-root/nix-path-registration
          seen=/nix/var/nix/aivmm-registration
          if [ -f "$reg" ] && ! cmp -s "$reg" "$seen"; then
            fresh=1; [ -e "$seen" ] && fresh=0
            nix-store --load-db < "$reg"
            [ "$fresh" = 1 ] || nix-store --verify
            mkdir -p "$(dirname "$seen")"
            cp "$reg" "$seen.tmp" && mv "$seen.tmp" "$seen"
          fi
        '';
      };

      # --- Network -----------------------------------------------------------------
      networking.hostName = lib.mkDefault "aivmm";
      networking.usePredictableInterfaceNames = false; # eth0, whatever the bus
      networking.useNetworkd = true;
      networking.useDHCP = false;
      networking.firewall.enable = false;
      systemd.network.networks."10-eth0" = {
        matchConfig.Name = "eth0";
        networkConfig.DHCP = "ipv4";
        # The 65520-byte MTU aivmm's network (and passt) offer: 64 KiB segments
        # instead of 1500-byte ones, several times the throughput.
        dhcpV4Config.UseMTU = true;
      };
      # Nothing waits for the network: `--net none` must not cost a timeout, and
      # the agent's command copes with a link that comes up a moment later.
      systemd.network.wait-online.enable = false;
      services.resolved.enable = true;

      # --- Fast boot: nothing a headless, single-purpose VM does not use ------------
      systemd.services."getty@tty1".enable = false;
      systemd.services."autovt@".enable = false;
      # `console=ttyS0` would otherwise get a login prompt from the getty generator.
      systemd.services."serial-getty@ttyS0" = lib.mkIf (!cfg.debugShell) { enable = false; };
      services.getty.autologinUser = lib.mkIf cfg.debugShell "root";
      systemd.services.systemd-udev-settle.enable = false;
      documentation.enable = false;
      documentation.man.enable = false;
      documentation.nixos.enable = false;
      documentation.info.enable = false;
      documentation.doc.enable = false;
      programs.command-not-found.enable = false;
      services.udisks2.enable = false;
      services.logrotate.enable = false;
      fonts.fontconfig.enable = false;
      boot.enableContainers = false;
      environment.defaultPackages = lib.mkDefault [ ];
      services.journald.extraConfig = ''
        Storage=volatile
        ForwardToConsole=no
      '';

      # --- Nix inside the guest -------------------------------------------------------
      nix.settings = {
        experimental-features = [
          "nix-command"
          "flakes"
        ];
        trusted-users = [
          "root"
          cfg.user
        ];
      };
      nix.channel.enable = false;

      # --- The user ---------------------------------------------------------------------
      # Created at boot rather than declared, because its ids come from the host.
      # mutableUsers keeps it in /etc/passwd across the activation on the next boot.
      users.mutableUsers = true;
      security.sudo.wheelNeedsPassword = !cfg.sudo;
      systemd.services.aivmm-user = {
        description = "Give ${cfg.user} the host user's uid and gid";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        path = [
          pkgs.shadow
          pkgs.coreutils
          pkgs.getent
        ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          user=${lib.escapeShellArg cfg.user}
          uid=1000 gid=1000
          for arg in $(cat /proc/cmdline); do
            case "$arg" in
              aivmm.uid=*) uid=''${arg#aivmm.uid=} ;;
              aivmm.gid=*) gid=''${arg#aivmm.gid=} ;;
            esac
          done
          case "$uid:$gid" in
            *[!0-9:]* | :* | *:) echo "bad aivmm.uid/aivmm.gid: $uid:$gid" >&2; exit 1 ;;
          esac
          # -o: the host's ids may collide with a guest system group (macOS's staff is 20).
          if getent group "$user" >/dev/null; then
            groupmod -o -g "$gid" "$user"
          else
            groupadd -o -g "$gid" "$user"
          fi
          groups=kvm${lib.optionalString cfg.sudo ",wheel"}
          if getent passwd "$user" >/dev/null; then
            # usermod re-owns the home directory when the uid changes.
            usermod -o -u "$uid" -g "$gid" -G "$groups" "$user"
          else
            useradd -o -u "$uid" -g "$gid" -G "$groups" -m -d "/home/$user" \
              -s /run/current-system/sw/bin/bash "$user"
          fi
          install -d -o "$uid" -g "$gid" -m 0700 "/home/$user"
        '';
      };

      environment.systemPackages = cfg.packages;
      # claude-code is unfree; allow it and nothing else (mkDefault: a user's own
      # predicate wins). Ignored when the caller passes its own `nixpkgs.pkgs`.
      nixpkgs.config.allowUnfreePredicate = lib.mkDefault (pkg: builtins.elem (lib.getName pkg) [ "claude-code" ]);

      # The agent's default PATH is FHS-shaped (/usr/local/bin, /usr/bin, …); give
      # /usr/local/{bin,sbin} the system profile so commands resolve there too.
      systemd.tmpfiles.rules = [
        "L+ /usr/local/bin - - - - /run/current-system/sw/bin"
        "L+ /usr/local/sbin - - - - /run/current-system/sw/sbin"
      ];

      system.stateVersion = lib.mkDefault "25.05";
    }

    (lib.mkIf cfg.agent.enable {
      # --- The agent: runs the host's command, then the VM powers off ---------------
      systemd.services.aivmm-agent = {
        description = "aivmm guest agent";
        wantedBy = [ "multi-user.target" ];
        after = [
          "aivmm-user.service"
          workMount
          "network.target"
          "nix-daemon.socket"
        ];
        # Only wanted: if the user cannot be set up, the agent still starts and the
        # host learns why from the command's failure, instead of a guest that hangs.
        wants = [
          workMount
          "aivmm-user.service"
        ];
        # It runs as root: the host's Start message names the uid, gid, home and cwd.
        environment = {
          PATH = lib.mkForce "/run/wrappers/bin:/etc/profiles/per-user/${cfg.user}/bin:/run/current-system/sw/bin";
          AIVMM_GUEST_USER = cfg.user;
          AIVMM_WORKDIR = cfg.workDir;
        };
        unitConfig = {
          SuccessAction = "poweroff";
          FailureAction = "poweroff";
        };
        serviceConfig = {
          Type = "exec";
          ExecStart = utils.escapeSystemdExecArgs ([ (lib.getExe cfg.agent.package) ] ++ cfg.agent.extraArgs);
          Restart = "no";
          StandardOutput = "journal+console";
          StandardError = "journal+console";
        };
      };
    })
  ];
}
