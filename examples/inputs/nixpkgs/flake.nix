{
  description = "A tiny stand-in for nixpkgs: no real software, every package built from a bootstrap busybox";

  outputs = { self }:
    let
      lib = import ./lib { inherit self; };
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs lib.systems (system: import ./pkgs { inherit lib system; });
    };
}
