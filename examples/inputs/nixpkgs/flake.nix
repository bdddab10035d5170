{
  description = "A tiny stand-in for nixpkgs: no real software, every package is built by /bin/sh";

  outputs = { self }:
    let
      lib = import ./lib { inherit self; };
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs lib.systems (system: import ./pkgs { inherit lib system; });
    };
}
