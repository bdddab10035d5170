# The package set: build helpers plus ~30 stand-in packages. Every derivation is built by
# /bin/sh with the host's coreutils (the sandbox is off), so no bootstrap tools are needed.
{ lib, system }:
let
  pkgs = rec {
    inherit system;

    runCommand = name: env: script: derivation ({
      inherit name system;
      builder = "/bin/sh";
      args = [ "-c" ("set -eu\n" + script) ];
      PATH = "/usr/bin:/bin";
    } // env);

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
      runCommand "${pname}-${version}" { inherit pname version deps bins; } (''
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
        echo "$pname $version: a stand-in package built by /bin/sh" > $out/share/doc/$pname/README
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
    # busybox-static), copied in so that the scripts which run inside the installed root
    # (`chroot ROOT <toplevel>/bin/switch-to-configuration`: no /bin/sh, no /usr, only the
    # closure) have a shell and tools. bin/<applet> are relative symlinks to bin/busybox.
    busybox = runCommand "busybox-static" {
      # ELF machine numbers (e_machine) per Nix system.
      elfMachine = { x86_64-linux = "62"; aarch64-linux = "183"; }.${system};
      candidates = "/bin/busybox /usr/bin/busybox /usr/lib/busybox-static/busybox";
      applets = "sh ash [ test basename cat chmod cp cut date dirname echo env false grep head id ln ls mkdir mktemp mv printf readlink realpath rm rmdir sed sleep sort tail touch tr true uname wc";
    } ''
      # is_static FILE: an ELF executable for this system without a program interpreter
      # (no PT_INTERP program header), so it runs with no /lib around it.
      is_static() {
        [ -f "$1" ] && [ -r "$1" ] || return 1
        [ "$(od -An -c -N4 "$1" | tr -d ' ')" = '177ELF' ] || return 1
        [ "$(od -An -tu1 -j4 -N2 "$1" | tr -s ' ')" = ' 2 1' ] || return 1   # 64-bit, little endian
        [ "$(od -An -tu2 -j18 -N2 "$1" | tr -d ' ')" = "$elfMachine" ] || return 1
        phoff=$(od -An -tu8 -j32 -N8 "$1" | tr -d ' ')
        phentsize=$(od -An -tu2 -j54 -N2 "$1" | tr -d ' ')
        phnum=$(od -An -tu2 -j56 -N2 "$1" | tr -d ' ')
        [ "$phnum" -gt 0 ] || return 1
        i=0
        while [ "$i" -lt "$phnum" ]; do
          type=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$1" | tr -d ' ')
          [ "$type" != 3 ] || return 1   # PT_INTERP: dynamically linked
          i=$((i + 1))
        done
      }
      # First what dpkg says busybox-static installed, then the usual places (Debian's
      # busybox-static has /bin/busybox, which is /usr/bin/busybox with merged /usr).
      found=
      for c in $(dpkg-query -L busybox-static 2>/dev/null | grep '/busybox$' || true) $candidates; do
        if is_static "$c"; then found=$c; break; fi
      done
      if [ -z "$found" ]; then
        {
          echo "busybox: no statically linked busybox for $system on the build machine:"
          for c in $candidates; do
            if [ -e "$c" ]; then echo "  $c: not a static ELF executable for $system"; else echo "  $c: missing"; fi
          done
          echo "Install Debian's busybox-static (apt-get install busybox-static); the 'busybox'"
          echo "package is dynamically linked and cannot run in a root without /lib."
        } >&2
        exit 1
      fi
      mkdir -p $out/bin $out/share/doc/busybox
      cp "$found" $out/bin/busybox
      chmod 0555 $out/bin/busybox
      list=$($out/bin/busybox --list)
      for a in $applets; do
        if ! printf '%s\n' "$list" | grep -qxF -- "$a"; then
          echo "busybox: $found has no applet '$a'" >&2
          exit 1
        fi
        ln -s busybox "$out/bin/$a"
      done
      [ "$($out/bin/sh -c 'echo ok')" = ok ]
      { echo "Copied from $found on the build machine:"; $out/bin/busybox 2>&1 | head -n 1; } \
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
