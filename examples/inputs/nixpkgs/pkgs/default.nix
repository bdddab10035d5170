# The package set: a bootstrap, build helpers and ~30 stand-in packages, a build graph shaped
# like nixpkgs' in miniature. Nothing is built by a program outside the store (a chroot store,
# `nix build --store ROOT`, has no /bin/sh): the one way in is `bootstrapBusybox`, a
# fixed-output derivation holding the build machine's static busybox under the hash that
# examples/prepare.sh recorded in ./bootstrap-files.nix (as nixpkgs fetches its bootstrap tools
# by hash). From it, `bootstrapTools` (busybox and its applets, built by that busybox), `stdenv`
# (the setup every builder sources) and build-only tools (`gcc`, `binutils`) that packages
# are built with but do not reference.
{ lib, system }:
let
  bootstrapFiles = import ./bootstrap-files.nix;
  pkgs = rec {
    inherit system;

    # The only derivation whose builder is outside the store: built once on the build machine
    # (which has /bin/sh), checked by its fixed hash, and from then on a plain store path.
    bootstrapBusybox = derivation {
      name = "bootstrap-busybox";
      inherit system;
      builder = "/bin/sh";
      args = [ "-c" ''
        set -eu
        /bin/mkdir -p "$out/bin"
        /bin/cp "${bootstrapFiles.busybox.path}" "$out/bin/busybox"
        /bin/chmod 0555 "$out/bin/busybox"
      '' ];
      outputHashMode = "recursive";
      outputHashAlgo = "sha256";
      outputHash = bootstrapFiles.busybox.hash;
    };

    # busybox with every applet as a symlink, built by the bootstrap busybox itself
    # (its builder's name, `busybox`, makes it take `sh` as the applet to run).
    bootstrapTools = derivation {
      name = "bootstrap-tools";
      inherit system;
      builder = "${bootstrapBusybox}/bin/busybox";
      args = [ "sh" "-c" ''
        set -eu
        bb=${bootstrapBusybox}/bin/busybox
        $bb mkdir -p $out/bin
        $bb cp $bb $out/bin/busybox
        for a in $($out/bin/busybox --list); do
          [ "$a" = busybox ] || $bb ln -s busybox $out/bin/$a
        done
      '' ];
    };

    # What every builder sources first: strict mode, the bootstrap tools and the
    # nativeBuildInputs on PATH.
    stdenv = derivation {
      name = "stdenv-linux";
      inherit system;
      builder = "${bootstrapTools}/bin/sh";
      args = [ "-c" ''
        set -eu
        export PATH=${bootstrapTools}/bin
        mkdir -p $out
        {
          printf 'set -eu\nexport PATH=%s/bin\n' ${bootstrapTools}
          printf 'for p in ${"$"}{nativeBuildInputs:-}; do PATH=$PATH:$p/bin; done\n'
        } > $out/setup
      '' ];
    };

    runCommand = name: env: script: derivation ({
      inherit name system;
      builder = "${bootstrapTools}/bin/sh";
      args = [ "-c" (". ${stdenv}/setup\n" + script) ];
    } // env);

    # Build-only tools: packages are "compiled" with gcc, itself built with binutils; neither
    # is referenced by what they build, so neither is in a system's closure.
    binutils = runCommand "binutils-2.40" { } ''
      mkdir -p $out/bin
      for t in as ld ar; do printf '#!%s/bin/sh\necho "%s (binutils 2.40)"\n' ${bootstrapTools} "$t" > $out/bin/$t; done
      chmod +x $out/bin/*
    '';
    gcc = runCommand "gcc-wrapper-13.2.0" { inherit binutils; } ''
      mkdir -p $out/bin
      printf '#!%s/bin/sh\necho "gcc 13.2.0 (assembled with %s)"\n' ${bootstrapTools} "$(basename $binutils | cut -c34-)" > $out/bin/gcc
      chmod +x $out/bin/gcc
    '';

    writeText = name: text:
      runCommand name { inherit text; passAsFile = [ "text" ]; } ''cp "$textPath" "$out"'';

    writeScript = name: text:
      runCommand name { inherit text; passAsFile = [ "text" ]; } ''cp "$textPath" "$out"; chmod +x "$out"'';

    # A directory of symlinks to the files of `paths` (first one wins), like buildEnv.
    symlinkJoin = { name, paths }: runCommand name { inherit paths; } ''
      mkdir -p "$out"
      for p in $paths; do
        (cd "$p" && find . -mindepth 1 \( -type f -o -type l \) -print | sort) | while read -r f; do
          f=''${f#./}
          mkdir -p "$out/$(dirname "$f")"
          if [ ! -e "$out/$f" ] && [ ! -L "$out/$f" ]; then ln -s "$p/$f" "$out/$f"; fi
        done
      done
    '';

    # A package: bin/<name> scripts, a versioned library with a relative .so symlink, docs,
    # nix-support/propagated-build-inputs naming its dependencies (store references; empty
    # when there are none) and lib/deps/<dep> symlinks into the dependencies.
    mkPackage = { pname, version, deps ? [ ], bins ? [ pname ], script ? "" }:
      runCommand "${pname}-${version}" { inherit pname version deps bins; nativeBuildInputs = [ gcc ]; } (''
        gcc >/dev/null  # a package is built with the compiler (which it does not reference)
        mkdir -p $out/bin $out/lib $out/share/doc/$pname $out/nix-support
        for b in $bins; do
          {
            echo "#!/bin/sh"
            echo "# $pname $version"
            for d in $deps; do echo "# links against $d/lib"; done
            echo "echo \"$b ($pname $version) from $out\""
          } > $out/bin/$b
          chmod +x $out/bin/$b
        done
        printf 'lib%s %s\n' "$pname" "$version" > $out/lib/lib$pname.so.$version
        ln -s lib$pname.so.$version $out/lib/lib$pname.so
        echo "$pname $version: a stand-in package" > $out/share/doc/$pname/README
        : > $out/nix-support/propagated-build-inputs
        for d in $deps; do
          echo "$d" >> $out/nix-support/propagated-build-inputs
          mkdir -p $out/lib/deps
          ln -s "$d" "$out/lib/deps/$(basename "$d" | cut -c34-)"
        done
      '' + script);

    glibc = mkPackage {
      pname = "glibc"; version = "2.38"; bins = [ "ldd" "locale" ];
      script = ''
        mkdir -p $out/lib/gconv/modules.d $out/share/locale/C.UTF-8/LC_MESSAGES $out/etc
        : > $out/etc/ld.so.conf
        : > $out/lib/gconv/modules.d/.keep
        printf 'module INTERNAL UTF-8// UTF-8 1\n' > $out/lib/gconv/gconv-modules
        printf 'C.UTF-8\n' > $out/share/locale/C.UTF-8/LC_MESSAGES/SYS_LC_MESSAGES
      '';
    };
    zlib = mkPackage { pname = "zlib"; version = "1.3"; deps = [ glibc ]; bins = [ ]; };
    xz = mkPackage { pname = "xz"; version = "5.4.4"; deps = [ glibc ]; bins = [ "xz" "unxz" ]; };
    libcap = mkPackage { pname = "libcap"; version = "2.69"; deps = [ glibc ]; bins = [ "capsh" ]; };
    ncurses = mkPackage {
      pname = "ncurses"; version = "6.4"; deps = [ glibc ]; bins = [ "tput" "clear" ];
      script = ''
        mkdir -p $out/share/terminfo/x $out/share/terminfo/l
        printf 'xterm|xterm terminal emulator\n' > $out/share/terminfo/x/xterm
        printf 'linux|linux console\n' > $out/share/terminfo/l/linux
        ln -s xterm $out/share/terminfo/x/xterm-256color
      '';
    };
    readline = mkPackage { pname = "readline"; version = "8.2"; deps = [ ncurses ]; bins = [ ]; };
    bash = mkPackage {
      pname = "bash"; version = "5.2"; deps = [ glibc readline ]; bins = [ "bash" ];
      script = "ln -s bash $out/bin/sh\n";
    };
    coreutils = mkPackage {
      pname = "coreutils"; version = "9.3"; deps = [ glibc libcap ];
      script = ''
        for t in cat chmod cp date echo head ln ls mkdir mv rm sort tail tr uname wc; do
          ln -s coreutils $out/bin/$t
        done
      '';
    };
    gnugrep = mkPackage { pname = "gnugrep"; version = "3.11"; deps = [ glibc ]; bins = [ "grep" ]; };
    gnused = mkPackage { pname = "gnused"; version = "4.9"; deps = [ glibc ]; bins = [ "sed" ]; };
    gawk = mkPackage { pname = "gawk"; version = "5.2.2"; deps = [ glibc readline ]; bins = [ "awk" "gawk" ]; };
    findutils = mkPackage { pname = "findutils"; version = "4.9.0"; deps = [ glibc ]; bins = [ "find" "xargs" ]; };
    gzip = mkPackage { pname = "gzip"; version = "1.13"; deps = [ glibc zlib ]; bins = [ "gzip" "gunzip" ]; };
    openssl = mkPackage {
      pname = "openssl"; version = "3.0.12"; deps = [ glibc zlib ];
      script = "mkdir -p $out/etc/ssl/private $out/etc/ssl/misc\n";   # empty directories
    };
    util-linux = mkPackage {
      pname = "util-linux"; version = "2.39.2"; deps = [ glibc ncurses libcap ];
      bins = [ "mount" "umount" "lsblk" "blkid" "fdisk" "sfdisk" "mkswap" "swapon" ];
    };
    kmod = mkPackage {
      pname = "kmod"; version = "31"; deps = [ glibc zlib xz ]; bins = [ "kmod" ];
      script = "for t in insmod lsmod modprobe rmmod; do ln -s kmod $out/bin/$t; done\n";
    };
    e2fsprogs = mkPackage { pname = "e2fsprogs"; version = "1.47.0"; deps = [ util-linux ]; bins = [ "mke2fs" "e2fsck" ]; };
    dbus = mkPackage { pname = "dbus"; version = "1.14.10"; deps = [ glibc ]; bins = [ "dbus-daemon" ]; };
    systemd = mkPackage {
      pname = "systemd"; version = "254.6"; deps = [ glibc util-linux kmod libcap dbus openssl ];
      bins = [ "systemctl" "journalctl" "udevadm" ];
      script = ''
        mkdir -p $out/lib/systemd/system/multi-user.target.wants $out/lib/systemd/system-generators
        printf '#!%s/bin/sh\necho systemd %s\n' "${busybox}" "$version" > $out/lib/systemd/systemd
        chmod +x $out/lib/systemd/systemd
        for u in multi-user.target getty.target sshd.service; do
          printf '[Unit]\nDescription=%s\n' "$u" > $out/lib/systemd/system/$u
        done
        ln -s ../getty.target $out/lib/systemd/system/multi-user.target.wants/getty.target
        ln -s ../lib/systemd/systemd $out/bin/init
      '';
    };
    shadow = mkPackage { pname = "shadow"; version = "4.14.2"; deps = [ glibc ]; bins = [ "login" "passwd" "useradd" ]; };
    iproute2 = mkPackage { pname = "iproute2"; version = "6.5.0"; deps = [ glibc libcap ]; bins = [ "ip" "ss" ]; };
    procps = mkPackage { pname = "procps"; version = "4.0.4"; deps = [ ncurses ]; bins = [ "ps" "top" "free" ]; };
    less = mkPackage { pname = "less"; version = "643"; deps = [ ncurses ]; };
    nano = mkPackage { pname = "nano"; version = "7.2"; deps = [ ncurses ]; };
    openssh = mkPackage { pname = "openssh"; version = "9.5p1"; deps = [ openssl zlib ]; bins = [ "ssh" "sshd" "ssh-keygen" ]; };
    sudo = mkPackage { pname = "sudo"; version = "1.9.15"; deps = [ glibc ]; };
    nix = mkPackage { pname = "nix"; version = "2.18.1"; deps = [ openssl bash xz ]; bins = [ "nix" "nix-store" "nix-env" ]; };
    nginx = mkPackage { pname = "nginx"; version = "1.24.0"; deps = [ openssl zlib ]; };
    postgresql = mkPackage { pname = "postgresql"; version = "15.5"; deps = [ openssl readline zlib ]; bins = [ "postgres" "psql" "initdb" ]; };

    # The one real program: the build machine's statically linked busybox (Debian package
    # busybox-static, by way of the bootstrap), so that the scripts which run inside the
    # installed root (`chroot ROOT <toplevel>/bin/switch-to-configuration`: no /bin/sh, no /usr,
    # only the closure) have a shell and tools. bin/<applet> are relative symlinks to bin/busybox.
    busybox = runCommand "busybox-static" {
      applets = "sh ash [ test basename cat chmod cp cut date dirname echo env false grep head id ln ls mkdir mktemp mv printf readlink realpath rm rmdir sed sleep sort tail touch tr true uname wc";
    } ''
      mkdir -p $out/bin $out/share/doc/busybox
      cp ${bootstrapTools}/bin/busybox $out/bin/busybox
      chmod 0555 $out/bin/busybox
      for a in $applets; do ln -s busybox "$out/bin/$a"; done
      [ "$($out/bin/sh -c 'echo ok')" = ok ]
      { echo "Copied from the bootstrap tools:"; $out/bin/busybox 2>&1 | head -n 1; } \
        > $out/share/doc/busybox/SOURCE
    '';

    # A stand-in for git: there is no real git in this nixpkgs-free example, so bin/git runs
    # the build machine's /usr/bin/git. What matters is the mechanism (a tool built from the
    # flake's own nixpkgs input, `nix build --inputs-from FLAKE nixpkgs#git`, whose closure
    # the media carries), not that the tool works without the build machine.
    git = runCommand "git-2.39.5" { } ''
      mkdir -p $out/bin
      cat > $out/bin/git <<'MEDIABUILDER_EOF'
      #!${busybox}/bin/sh
      # Stand-in for git: executes the build machine's /usr/bin/git.
      if [ ! -x /usr/bin/git ]; then
        echo "git (stand-in from the example nixpkgs): /usr/bin/git not found" >&2
        exit 127
      fi
      exec /usr/bin/git "$@"
      MEDIABUILDER_EOF
      chmod +x $out/bin/git
    '';

    # Data-only packages.
    tzdata = runCommand "tzdata-2023c" { } ''
      mkdir -p $out/share/zoneinfo/Europe $out/share/zoneinfo/America
      printf 'TZif2 UTC\n' > $out/share/zoneinfo/UTC
      printf 'TZif2 CET\n' > $out/share/zoneinfo/Europe/Berlin
      printf 'TZif2 EST\n' > $out/share/zoneinfo/America/New_York
      ln -s Berlin $out/share/zoneinfo/Europe/Amsterdam
      ln -s UTC $out/share/zoneinfo/Etc
    '';
    cacert = runCommand "nss-cacert-3.95" { } ''
      mkdir -p $out/etc/ssl/certs
      seq 1 64 | while read -r i; do
        printf -- '-----BEGIN CERTIFICATE-----\nMIIC%08dFAKE\n-----END CERTIFICATE-----\n' "$i"
      done > $out/etc/ssl/certs/ca-bundle.crt
    '';
    # Some 330 KB of non-trivial, deterministic data (hex dump of `seq` output).
    linux-firmware = runCommand "linux-firmware-20231111" { } ''
      mkdir -p $out/lib/firmware/intel $out/lib/firmware/amdgpu
      seq 1 20000 | od -An -tx1 -v > $out/lib/firmware/intel/fake-ucode.bin
      seq 1 500 | od -An -to2 -v > $out/lib/firmware/amdgpu/fake-gpu.bin
      : > $out/lib/firmware/regulatory.db.p7s
    '';
    linux = runCommand "linux-6.1.64" { version = "6.1.64"; } ''
      d=$out/lib/modules/$version/kernel
      mkdir -p $d/drivers/net $d/drivers/block $d/fs/ext4
      seq 1 3000 | od -An -tx2 -v > $out/bzImage
      for m in drivers/net/e1000e drivers/block/virtio_blk fs/ext4/ext4; do
        printf 'ELF module %s\n' "$m" > $d/$m.ko
      done
      (cd $out/lib/modules/$version && find kernel -name '*.ko' | sort > modules.dep)
      ln -s $out/lib/modules/$version $out/lib/modules/current
    '';
    makeInitrd = { kernel }: runCommand "initrd-${kernel.name}" { inherit kernel; } ''
      mkdir -p $out
      {
        echo "stage 1 of $kernel"
        echo "${systemd}/lib/systemd/systemd"
        find "$kernel/lib/modules" -name '*.ko' | sort
      } > $out/initrd
    '';
  };
in
pkgs
