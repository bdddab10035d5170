# nixosSystem { system, modules, specialArgs } -> { config, pkgs }
# A much reduced module system: each module is an attribute set, a function taking
# { config, pkgs, lib, ... } + specialArgs, or a path to either. Results are merged by
# lib.mergeAll; config.system.build.{toplevel,etc,systemPath,units} are added at the end.
{ lib, self }:
{ system ? "x86_64-linux", modules ? [ ], specialArgs ? { } }:
let
  pkgs = import ../pkgs { inherit lib system; };
  args = specialArgs // { inherit config pkgs lib; };
  load = m: let m' = if builtins.isPath m || builtins.isString m then import m else m;
            in if builtins.isFunction m' then m' args else m';
  defaults = {
    networking.hostName = "nixos";
    environment.systemPackages = [ ];
    environment.etc = { };
    systemd.services = { };
    boot.kernelPackage = pkgs.linux;
    boot.kernelParams = [ ];
    system.configurationRevision = "unknown";
    system.nixos.version = lib.version;
  };
  userConfig = lib.mergeAll ([ defaults ] ++ map load modules);
  build = import ./system-build.nix { inherit lib pkgs; config = userConfig; };
  config = userConfig // { system = userConfig.system // { inherit build; }; };
in
{ inherit config pkgs; }
