# Turns a merged configuration into the derivations NixOS would build: /etc, the unit files,
# the system profile (sw) and the toplevel with bin/switch-to-configuration.
{ lib, pkgs, config }:
let
  inherit (pkgs) runCommand writeScript symlinkJoin;
  hostName = config.networking.hostName;
  version = config.system.nixos.version;
  names = set: builtins.attrNames set;
  concatMap = f: l: builtins.concatStringsSep "\n" (map f l);

  etcEntry = name:
    let e = config.environment.etc.${name}; in
    "mkdir -p \"$(dirname \"$out/etc/${name}\")\"\n"
    + (if e ? source then "ln -s ${e.source} \"$out/etc/${name}\"\n"
       else "cat > \"$out/etc/${name}\" <<'MEDIABUILDER_EOF'\n${e.text}\nMEDIABUILDER_EOF\n");

  unitScript = name: svc: writeScript "unit-script-${name}-start" ''
    #!/bin/sh
    # ${svc.description or name}
    ${svc.script}
  '';

  units = runCommand "system-units" { } (''
    mkdir -p $out
  '' + concatMap (name: let svc = config.systemd.services.${name}; in ''
    cat > $out/${name}.service <<'MEDIABUILDER_EOF'
    [Unit]
    Description=${svc.description or name}
    [Service]
    ExecStart=${unitScript name svc}
    Environment=PATH=${pkgs.coreutils}/bin:${pkgs.systemd}/bin
    [Install]
    WantedBy=multi-user.target
    MEDIABUILDER_EOF
  '') (names config.systemd.services) + ''
    mkdir -p $out/multi-user.target.wants
    for f in $out/*.service; do ln -s "../$(basename "$f")" $out/multi-user.target.wants/; done
  '');

  etc = runCommand "etc" { } (''
    mkdir -p $out/etc/systemd
    ln -s ${units} $out/etc/systemd/system
  '' + concatMap etcEntry (names config.environment.etc));

  systemPath = symlinkJoin { name = "system-path"; paths = config.environment.systemPackages; };

  kernel = config.boot.kernelPackage;
  initrd = pkgs.makeInitrd { inherit kernel; };

  toplevel = runCommand "nixos-system-${hostName}-${version}" {
    inherit version;
    system = pkgs.system;
    kernelParams = toString config.boot.kernelParams;
  } ''
    mkdir -p $out/bin $out/specialisation
    ln -s ${etc}/etc $out/etc
    ln -s ${systemPath} $out/sw
    ln -s ${kernel}/bzImage $out/kernel
    ln -s ${kernel}/lib/modules $out/kernel-modules
    ln -s ${initrd}/initrd $out/initrd
    ln -s ${pkgs.linux-firmware}/lib/firmware $out/firmware
    printf '%s' "$version" > $out/nixos-version
    printf '%s' "$system" > $out/system
    printf '%s' systemd > $out/init-interface-version
    printf '%s' "init=$out/init $kernelParams" > $out/kernel-params
    printf '%s\n' ${lib.escapeShellArg config.system.configurationRevision} > $out/configuration-revision

    cat > $out/activate <<MEDIABUILDER_EOF
    #!${pkgs.busybox}/bin/sh
    # Activation script of ${hostName}: would populate /etc from $out/etc.
    systemConfig=$out
    export PATH=${pkgs.busybox}/bin
    echo "activating \$systemConfig"
    MEDIABUILDER_EOF
    chmod +x $out/activate

    cat > $out/init <<MEDIABUILDER_EOF
    #!${pkgs.busybox}/bin/sh
    # Stage 2 init of ${hostName}.
    export PATH=${pkgs.busybox}/bin
    $out/activate
    exec ${pkgs.systemd}/lib/systemd/systemd "\$@"
    MEDIABUILDER_EOF
    chmod +x $out/init

    cat > $out/bin/switch-to-configuration <<'MEDIABUILDER_EOF'
    #!${pkgs.busybox}/bin/sh
    # Stand-in for NixOS' switch-to-configuration: records how it was called and changes nothing.
    # Appends one line to $MEDIABUILDER_SWITCH_LOG (default /var/log/switch-to-configuration.log).
    # Self-contained (busybox from the closure), so it runs in `chroot ROOT` where ROOT holds
    # only /nix/store.
    set -eu
    export PATH=${pkgs.busybox}/bin
    log=''${MEDIABUILDER_SWITCH_LOG:-/var/log/switch-to-configuration.log}
    mkdir -p "$(dirname "$log")"
    echo "action=''${1:-} NIXOS_INSTALL_BOOTLOADER=''${NIXOS_INSTALL_BOOTLOADER:-} toplevel=@toplevel@" >> "$log"
    MEDIABUILDER_EOF
    sed -i "s|@toplevel@|$out|" $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '';
in
{ inherit toplevel etc units systemPath kernel initrd; }
