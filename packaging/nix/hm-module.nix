# Home Manager module: services.stackd.
#
# Writes ~/.config/stackd/config.toml from `settings` and `stacks`, runs stackd as the user
# service stackd.service, and after every switch (after reloadSystemd) makes the running daemon
# apply the new config (`stackd reload`, which waits for the reconcile) and then asserts unit
# ownership against the user manager (`stackd check --offline`). Findings, an invalid config or
# an unreachable user manager fail the activation with stackd's own message.
#
# Stacks whose units Home Manager (or anything else) still writes are adopted: set
# `managed = false` on them; stackd then verifies, watches and updates them but never writes
# their unit files.
{ self }:
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    types
    ;
  cfg = config.services.stackd;
  tomlFormat = pkgs.formats.toml { };

  stackModule = types.submodule {
    options = {
      directory = mkOption {
        type = types.str;
        example = "/srv/stacks/web";
        description = "The stack's directory (absolute, or starting with ~/).";
      };
      composeFiles = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "compose.yaml" ];
        description = "Compose files, relative to `directory`; empty: compose's default.";
      };
      envFiles = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "/run/secrets/web.env" ];
        description = "Env files (paths only: stackd never reads them), e.g. sops-nix secrets.";
      };
      legacyEnvFiles = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Used only when envFiles are missing; logged as deprecated.";
      };
      startupTimeout = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "300s";
        description = "TimeoutStartSec of the stack unit; null: [daemon] startup_timeout.";
      };
      update = mkOption {
        type = types.bool;
        default = true;
        description = "Take part in scheduled updates.";
      };
      managed = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Whether stackd writes this stack's units. Set to false for adopted stacks whose
          units Home Manager (or another tool) still writes: stackd verifies and updates them.
        '';
      };
    };
  };

  stackToml =
    stack:
    {
      inherit (stack) directory update managed;
      compose_files = stack.composeFiles;
      env_files = stack.envFiles;
      legacy_env_files = stack.legacyEnvFiles;
    }
    // lib.optionalAttrs (stack.startupTimeout != null) { startup_timeout = stack.startupTimeout; };

  configFile = tomlFormat.generate "stackd-config.toml" (
    cfg.settings // { stacks = lib.mapAttrs (_: stackToml) cfg.stacks; }
  );

  stackd = lib.getExe cfg.package;
in
{
  options.services.stackd = {
    enable = mkEnableOption "stackd, compose stacks as systemd user services";

    package = mkOption {
      type = types.package;
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      defaultText = lib.literalExpression "stackd.packages.\${system}.default";
      description = "The stackd package.";
    };

    settings = mkOption {
      type = tomlFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          daemon.compose_command = [ "podman" "compose" ];
          updates = { schedule = "daily"; concurrency = 2; };
        }
      '';
      description = "The [daemon] and [updates] tables of config.toml (see `man stackd`).";
    };

    stacks = mkOption {
      type = types.attrsOf stackModule;
      default = { };
      description = "The stacks, by name; each becomes [stacks.NAME] and NAME.service.";
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ pkgs.podman ];
      defaultText = lib.literalExpression "[ pkgs.podman ]";
      description = "Put on the daemon's PATH: the compose provider and the engine.";
    };

    checkOnActivation = mkOption {
      type = types.bool;
      default = true;
      description = "Fail home-manager switch when `stackd check --offline` reports findings.";
    };
  };

  config = mkIf cfg.enable {
    home.packages = [ cfg.package ];

    xdg.configFile."stackd/config.toml".source = configFile;

    systemd.user.services.stackd = {
      Unit = {
        Description = "stackd: compose stacks as systemd user services";
        After = [ "dbus.socket" ];
        Requires = [ "dbus.socket" ];
      };
      Service = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${stackd} daemon";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "2s";
        WatchdogSec = "30s";
        TimeoutStartSec = "90s";
        TimeoutStopSec = "20s";
        # /run/wrappers/bin: the setuid newuidmap/newgidmap rootless podman needs (NixOS).
        Environment = [
          "PATH=${lib.makeBinPath cfg.extraPackages}:/run/wrappers/bin:/run/current-system/sw/bin"
        ];
        UMask = "0077";
        LimitCORE = 0;
        Nice = 5;
      };
      Install.WantedBy = [ "default.target" ];
    };

    # After reloadSystemd: the unit and config are in place and (re)started. First make the
    # running daemon apply the new config (reload waits for its reconcile), then verify.
    home.activation.stackd = lib.hm.dag.entryAfter [ "reloadSystemd" ] ''
      if [[ -v DRY_RUN ]]; then
        echo "stackd: would run \`stackd reload\` and \`stackd check --offline\`"
      else
        stackd_fail() {
          echo "stackd: $1" >&2
          echo "stackd: activation failed; fix the cause and switch again" >&2
          exit 1
        }
        stackd_rc=0
        ${stackd} reload || stackd_rc=$?
        case $stackd_rc in
          0) ;;
          2) stackd_fail "the new config was not applied (see above); the daemon keeps its last good config" ;;
          3) stackd_fail "the daemon or the user manager is unreachable (see above): systemctl --user status stackd" ;;
          *) stackd_fail "stackd reload failed (exit $stackd_rc)" ;;
        esac
        ${lib.optionalString cfg.checkOnActivation ''
          stackd_rc=0
          ${stackd} check --offline || stackd_rc=$?
          case $stackd_rc in
            0) ;;
            1) stackd_fail "unit ownership findings (listed above): see 'stackd status' and the operations guide" ;;
            3) stackd_fail "the systemd user manager is unavailable, ownership could not be verified" ;;
            *) stackd_fail "stackd check --offline failed (exit $stackd_rc)" ;;
          esac
        ''}
      fi
    '';
  };
}
