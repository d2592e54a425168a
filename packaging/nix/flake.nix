# stackd as a Nix flake: the package and a Home Manager module.
#
#   nix build ./packaging/nix            # from a checkout (the flake's source is the repo)
#   inputs.stackd.url = "github:OWNER/stackd?dir=packaging/nix";
#   home-manager: imports = [ inputs.stackd.homeManagerModules.default ];
{
  description = "stackd: compose stacks as systemd user services, with unit ownership verified";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        stackd = pkgs.callPackage ./package.nix { };
        default = stackd;
      });

      overlays.default = final: _prev: { stackd = final.callPackage ./package.nix { }; };

      homeManagerModules = rec {
        stackd = import ./hm-module.nix { inherit self; };
        default = stackd;
      };
    };
}
