"""A NixOS-like test host whose disk boots by itself: a flake made by the tests, with no nixpkgs.

Its toplevel's `bin/switch-to-configuration boot` does what NixOS's does with systemd-boot, in
small: it copies Debian's `systemd-bootx64.efi` to the ESP's removable path `EFI/BOOT/BOOTX64.EFI`
(and `EFI/systemd/`), a kernel (Debian's vmlinuz) and an initrd to `EFI/nixos/`, and writes
`loader/loader.conf` and a loader entry whose options carry `init=<toplevel>/init
root=LABEL=nixos console=ttyS0,115200n8 mediabuilder.testhost=HOST`. Inside the target's chroot
there is no /bin/sh, so its interpreter is a static busybox in the store.

The initrd reports on the serial console and powers off:
    INSTALLED: host=HOST toplevel=/nix/store/...
    INSTALLED: root /dev/vda2 (LABEL=nixos): system -> system-1-link -> /nix/store/..., nixos-version 25.05.test
the second line read from the installed root file system (mounted read-only).

Debian's files (kernel, initrd, systemd-boot, busybox; git for install.sh) are not in the flake's
git repository: the tests put each directory into the store with `nix-store --add-fixed
--recursive sha256`, and the flake names them as fixed-output derivations with the same hash, so
they evaluate to those paths and are never built. The flake's `nixpkgs` input (a git repository of
its own) has `legacyPackages.x86_64-linux.git`, which the build puts on the media for install.sh
(the live system has no git): Debian's git binary, run with its libraries from the live system.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import standin

HOST = "bootbox"
VERSION = "25.05.test"
# The installed system's initrd: modules for the virtio disk and its ext4 root.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic", "crc32c_intel")

INIT = """\
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "INSTALLED: $*" >/dev/ttyS0; }
stop() { [ -z "$*" ] || say "$*"; sync; poweroff -f; sleep 10; }
param() { tr ' ' '\\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
toplevel=$(param init)
toplevel=${toplevel%/init}
say "host=$(param mediabuilder.testhost) toplevel=$toplevel"
depmod
for m in $(cat /etc/standin-modules); do modprobe "$m" 2>/dev/null; done
dev=
for _ in $(seq 60); do
    dev=$(findfs LABEL=nixos 2>/dev/null) && break
    sleep 0.5
done
[ -n "$dev" ] || stop "no file system labelled nixos"
mount -t ext4 -o ro "$dev" /root || stop "cannot mount $dev"
link=$(readlink /root/nix/var/nix/profiles/system)
system=$(readlink "/root/nix/var/nix/profiles/$link")
version=$(cat "/root$system/nixos-version" 2>/dev/null)
say "root $dev (LABEL=nixos): system -> $link -> $system, nixos-version ${version:-missing}"
umount /root
stop
"""

NIXPKGS_FLAKE = """\
{
  description = "The bootable test host's packages: Debian's files, put into the store by the tests";

  outputs = { self }:
    let
      system = "x86_64-linux";
      # A directory the tests added with `nix-store --add-fixed --recursive sha256`: valid, never built.
      added = name: hash: derivation {
        inherit name system;
        builder = "/bin/sh";
        args = [ "-c" "echo ${name} is put into the store by the tests, not built >&2; exit 1" ];
        outputHashMode = "recursive";
        outputHashAlgo = "sha256";
        outputHash = hash;
      };
      boot = added "@BOOT_NAME@" "@BOOT_HASH@";
      gitBin = added "@GIT_NAME@" "@GIT_HASH@";
      git = derivation {
        name = "git-@GIT_VERSION@";
        inherit system;
        builder = "${boot}/bin/busybox";
        args = [ "sh" "-ec" ''
          B=${boot}/bin/busybox
          $B mkdir -p $out/bin
          printf '#!%s sh\\nexport GIT_EXEC_PATH=%s GIT_TEMPLATE_DIR=%s\\nexec %s "$@"\\n' $B \\
            ${gitBin}/libexec/git-core ${gitBin}/share/templates ${gitBin}/libexec/git-core/git > $out/bin/git
          $B chmod +x $out/bin/git
        '' ];
      };
      toplevel = host: derivation {
        name = "nixos-system-${host}-@VERSION@";
        inherit system host;
        builder = "${boot}/bin/busybox";
        args = [ "sh" "-ec" (builtins.readFile ./toplevel.sh) ];
        boot = boot;
        version = "@VERSION@";
      };
    in
    {
      legacyPackages.${system} = { inherit boot git; };
      lib.mkHost = host: {
        config = {
          networking.hostName = host;
          fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
          fileSystems."/boot" = { device = "/dev/disk/by-label/boot"; fsType = "vfat"; };
          boot.loader.systemd-boot.enable = true;
          system.build.toplevel = toplevel host;
        };
      };
    };
}
"""

# The toplevel's builder (busybox sh; $boot, $host, $version and $out from the derivation).
TOPLEVEL_SH = r"""B=$boot/bin/busybox
$B mkdir -p $out/bin $out/specialisation
$B ln -s $boot/kernel $out/kernel
$B ln -s $boot/initrd $out/initrd
echo "$version" > $out/nixos-version
echo "$host" > $out/hostname
printf '#!%s sh\necho "%s: this test host boots from its initrd, which reports and powers off" >&2\nexit 1\n' \
  $B $out > $out/init
id=$($B basename $out | $B cut -c 1-32)
$B cat > $out/bin/switch-to-configuration <<EOF
#!$B sh
# The bootable test host's switch-to-configuration: \`boot\` only, as an install runs it.
set -e
B=$B
[ "\$1" = boot ] || { echo "switch-to-configuration: the test host knows only 'boot', not '\$1'" >&2; exit 1; }
[ "\$(\$B stat -c %d /boot)" != "\$(\$B stat -c %d /)" ] ||
  { echo "switch-to-configuration: /boot is not a mounted ESP" >&2; exit 1; }
\$B mkdir -p /boot/EFI/BOOT /boot/EFI/systemd /boot/EFI/nixos /boot/loader/entries
\$B cp $boot/systemd-bootx64.efi /boot/EFI/systemd/systemd-bootx64.efi
\$B cp $boot/systemd-bootx64.efi /boot/EFI/BOOT/BOOTX64.EFI
\$B cp $boot/kernel /boot/EFI/nixos/$id-linux-bzImage.efi
\$B cp $boot/initrd /boot/EFI/nixos/$id-initrd-initrd.efi
printf 'timeout 0\ndefault nixos-generation-1.conf\n' > /boot/loader/loader.conf
printf 'title NixOS (%s)\nversion Generation 1 %s\nlinux /EFI/nixos/%s\ninitrd /EFI/nixos/%s\noptions %s\n' \
  "$host" "$version" "$id-linux-bzImage.efi" "$id-initrd-initrd.efi" \
  "init=$out/init root=LABEL=nixos console=ttyS0,115200n8 mediabuilder.testhost=$host" \
  > /boot/loader/entries/nixos-generation-1.conf
\$B sync
echo "switch-to-configuration: systemd-boot, kernel and initrd installed into /boot" >&2
EOF
$B chmod +x $out/init $out/bin/switch-to-configuration
"""

HOST_FLAKE = """\
{
  description = "A test host whose installed disk boots by itself (mediabuilder's QEMU tests)";
  inputs.nixpkgs.url = "git+file://@NIXPKGS@";
  outputs = { self, nixpkgs }: {
    nixosConfigurations.@HOST@ = nixpkgs.lib.mkHost "@HOST@";
  };
}
"""


@dataclass(frozen=True)
class BootableHost:
    flake: Path  # the host's flake repository (2 commits)
    nixpkgs: Path  # its nixpkgs input's repository
    boot: str  # store path of the boot files (kernel, initrd, systemd-boot, busybox)
    git: str  # store path of Debian's git binary


def _files(name: str, env: dict[str, str]) -> Path:
    """Debian's files, cached in CACHE_ROOT/testhost-<hash>/{boot,git}: the kernel, the
    reporting initrd, systemd-boot and a static busybox; git and its templates."""
    package = standin.kernel_package()
    key = hashlib.sha256("\n".join([package, INIT, *INITRD_MODULES, Path(__file__).read_text()]).encode())
    place = standin.CACHE_ROOT / f"testhost-{key.hexdigest()[:16]}"
    if (place / "done").is_file():
        return place / name
    work = standin.CACHE_ROOT / f".testhost-work-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        standin._run("apt-get", "download", package, "systemd-boot-efi", cwd=work)
        kernel_root = work / "kernel"
        standin._run("dpkg-deb", "-x", next(work.glob("linux-image-*.deb")), kernel_root)
        standin._run("dpkg-deb", "-x", next(work.glob("systemd-boot-efi_*.deb")), work / "sdboot")
        version = package.removeprefix("linux-image-")
        boot = work / "out" / "boot"
        (boot / "bin").mkdir(parents=True)
        shutil.copy2(kernel_root / "boot" / f"vmlinuz-{version}", boot / "kernel")
        shutil.copy2(work / "sdboot" / "usr" / "lib" / "systemd" / "boot" / "efi" / "systemd-bootx64.efi",
                     boot / "systemd-bootx64.efi")
        shutil.copy2("/usr/bin/busybox", boot / "bin" / "busybox")
        standin._initrd(kernel_root, version, work, boot / "initrd", init=INIT, modules=INITRD_MODULES)
        git = work / "out" / "git"
        (git / "libexec" / "git-core").mkdir(parents=True)
        shutil.copy2("/usr/bin/git", git / "libexec" / "git-core" / "git")
        (git / "share" / "templates").mkdir(parents=True)
        for path in (work / "out").rglob("*"):
            os.utime(path, (0, 0), follow_symlinks=False)
        place.mkdir(parents=True, exist_ok=True)
        for sub in ("boot", "git"):
            shutil.rmtree(place / sub, ignore_errors=True)
            os.replace(work / "out" / sub, place / sub)
        (place / "done").write_text("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return place / name


def _add_fixed(src: Path, name: str, tmp: Path, env: dict[str, str]) -> tuple[str, str]:
    """`src` put into the store as `name` (fixed-output, recursive sha256): (store path, nix32 hash)."""
    staged = tmp / name
    shutil.copytree(src, staged, symlinks=True)
    path = subprocess.run(["nix-store", "--add-fixed", "--recursive", "sha256", staged], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()
    digest = subprocess.run(["nix-hash", "--type", "sha256", "--base32", staged], env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
    shutil.rmtree(staged)
    return path, digest


def _git(*args: str | Path, cwd: Path) -> None:
    env = dict(os.environ, GIT_AUTHOR_NAME="Test Admin", GIT_AUTHOR_EMAIL="admin@example.invalid",
               GIT_COMMITTER_NAME="Test Admin", GIT_COMMITTER_EMAIL="admin@example.invalid",
               GIT_AUTHOR_DATE="2025-06-01T12:00:00Z", GIT_COMMITTER_DATE="2025-06-01T12:00:00Z",
               GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    subprocess.run(["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *map(str, args)],
                   cwd=cwd, env=env, capture_output=True, check=True)


def make(dest: Path, env: dict[str, str]) -> BootableHost:
    """The flake under dest/flake (2 commits, a committed lock) and its nixpkgs under dest/nixpkgs."""
    dest.mkdir(parents=True, exist_ok=True)
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True,
                                 check=True).stdout.split()[2]
    boot_name, git_name = "testhost-boot-files", f"git-{git_version}-debian"
    boot, boot_hash = _add_fixed(_files("boot", env), boot_name, dest, env)
    git, git_hash = _add_fixed(_files("git", env), git_name, dest, env)
    nixpkgs = dest / "nixpkgs"
    nixpkgs.mkdir()
    text = NIXPKGS_FLAKE
    for k, v in {"BOOT_NAME": boot_name, "BOOT_HASH": boot_hash, "GIT_NAME": git_name, "GIT_HASH": git_hash,
                 "GIT_VERSION": git_version, "VERSION": VERSION}.items():
        text = text.replace(f"@{k}@", v)
    (nixpkgs / "flake.nix").write_text(text)
    (nixpkgs / "toplevel.sh").write_text(TOPLEVEL_SH)
    _git("init", "-q", cwd=nixpkgs)
    _git("add", "-A", cwd=nixpkgs)
    _git("commit", "-q", "-m", "test host packages", cwd=nixpkgs)
    flake = dest / "flake"
    flake.mkdir()
    (flake / "flake.nix").write_text(HOST_FLAKE.replace("@NIXPKGS@", str(nixpkgs)).replace("@HOST@", HOST))
    (flake / "README").write_text(f"The test host {HOST}.\n")
    _git("init", "-q", cwd=flake)
    _git("add", "-A", cwd=flake)
    _git("commit", "-q", "-m", "the test host", cwd=flake)
    subprocess.run(["nix", "flake", "lock", flake], env=env, capture_output=True, text=True, check=True)
    (flake / "README").write_text(f"The test host {HOST}: its installed disk boots by itself.\n")
    _git("add", "-A", cwd=flake)
    _git("commit", "-q", "-m", "lock nixpkgs", cwd=flake)
    return BootableHost(flake, nixpkgs, boot, git)
