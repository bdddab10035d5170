# The library: a version string that follows this repository's own git revision (like
# nixpkgs' lib.version with its versionSuffix), a few helpers and nixosSystem.
{ self }:
let
  lib = rec {
    release = "23.11";
    # Changes whenever this input is locked to another commit (or evaluated without git).
    versionSuffix = ".${builtins.substring 0 8 (self.lastModifiedDate or "19700101")}.${self.shortRev or "dirty"}";
    version = release + versionSuffix;

    systems = [ "x86_64-linux" "aarch64-linux" ];

    genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);

    # Merge module results: lists concatenate, attribute sets merge recursively (derivations
    # are values, not sets to merge), anything else: the later module wins.
    mergeTwo = a: b:
      if builtins.isList a && builtins.isList b then a ++ b
      else if isPlainSet a && isPlainSet b then
        a // builtins.mapAttrs (n: v: if a ? ${n} then mergeTwo a.${n} v else v) b
      else b;
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString s) + "'";
    isPlainSet = v: builtins.isAttrs v && (v.type or "") != "derivation";
    mergeAll = builtins.foldl' mergeTwo { };

    nixosSystem = import ./nixos-system.nix { inherit lib self; };
  };
in
lib
