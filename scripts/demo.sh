#!/usr/bin/env bash
# The demo: build offline install media for the bundled example flake (two hosts), verify it,
# write it again as a FAT32 stick image and verify that, then install host `alpha` from the
# media into a scratch root with no network and the media read-only.
set -euo pipefail
cd "$(dirname "$0")/.."

out=demo-out
step() { printf '\n\033[1m### %s\033[0m\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

step "Preparing the example flake in $out/example (git repo with history; inputs: github nixpkgs, git tools following it with a nested input, path)"
rm -rf "$out/example" "$out/root" "$out/media-ro"
mkdir -p "$out"
bash examples/prepare.sh "$out/example"
git -C "$out/example/flake" log --oneline >&2
nix --extra-experimental-features 'nix-command flakes' flake metadata "$PWD/$out/example/flake" 2>/dev/null |
    sed 's/\x1b\[[0-9;]*m//g' | sed -n '/^Inputs:/,$p' >&2

step "mediabuilder build --profile profiles/example.toml (hosts alpha and beta)"
mediabuilder build --profile profiles/example.toml --force
# The maker's key (the cache's, never copied to a medium) and its fingerprint, as install.sh and
# the build print it: the first 128 bits of the key's sha256 in groups of four.
key=$(cat cache/signing-key.pub)
fingerprint=$(printf '%s' "${key#*:}" | base64 -d | sha256sum | cut -c1-32 | sed 's/..../&:/g; s/:$//')
echo "media key fingerprint: $fingerprint" >&2

echo "registry.json pins: $(sed -n 's/^ *"id": "\(.*\)"$/\1/p' "$out/media/registry.json" | paste -sd ' ')" >&2

step "mediabuilder verify $out/media (Python only: manifest, every file, signatures, NARs)"
mediabuilder verify "$out/media" --trusted-key "$key"

step "The same media as a USB stick image: FAT32 in a GPT partition, read back without mounting"
mediabuilder build --profile profiles/example.toml --format fat32 --partition-table gpt \
    --output "$out/media.img" --force
mediabuilder inspect "$out/media.img"
mediabuilder verify "$out/media.img" --trusted-key "$key"

step "Moving the flake inputs' sources out of reach"
mv "$out/example/inputs" "$out/example/inputs.away"
trap 'mv "$out/example/inputs.away" "$out/example/inputs" 2>/dev/null || true' EXIT

step "install.sh --host alpha --expect-key $fingerprint: no network (unshare -n), media mounted read-only"
mkdir -p "$out/root" "$out/media-ro"
chmod 755 "$out/root"
# shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
as_root unshare --net --mount --propagation private bash -c '
    set -e
    mount --bind "$1" "$2" && mount -o remount,bind,ro "$2"
    mount --bind "$3" "$3"
    env -u NIX_CONFIG bash "$2/install.sh" --root "$3" --host alpha --yes --expect-key "$4"
' demo "$PWD/$out/media" "$PWD/$out/media-ro" "$PWD/$out/root" "$fingerprint"

step "What the target holds"
root="$PWD/$out/root"
echo "system profile -> $(readlink -f "$root/nix/var/nix/profiles/system" | sed "s|^$root||")" >&2
echo "boot loader log: $(cat "$root/var/log/switch-to-configuration.log")" >&2
echo "/etc/nixos: $(git -C "$root/etc/nixos" rev-list --count HEAD) commits, origin $(git -C "$root/etc/nixos" remote get-url origin)" >&2

step "Evaluating the installed flake with the target's store, offline"
sed "s|/var/lib/mediabuilder/|$root/var/lib/mediabuilder/|" "$root/root/.config/nix/nix.conf" > "$out/target-nix.conf"
printf 'substituters =\nbuild-users-group =\n' >> "$out/target-nix.conf"
evaluated=$(as_root env -u NIX_CONFIG NIX_USER_CONF_FILES="$PWD/$out/target-nix.conf" NIX_CONF_DIR="$root/etc/nix" \
    unshare --net nix --store "$root" eval --raw \
    "git+file://$root/etc/nixos#nixosConfigurations.alpha.config.system.build.toplevel.outPath")
installed=$(readlink -f "$root/nix/var/nix/profiles/system" | sed "s|^$root||")
version=$(as_root env -u NIX_CONFIG NIX_USER_CONF_FILES="$PWD/$out/target-nix.conf" NIX_CONF_DIR="$root/etc/nix" \
    unshare --net nix --store "$root" eval --raw nixpkgs#lib.version 2>/dev/null)
echo "nixpkgs#lib.version through the target's pinned registry: $version" >&2
echo "evaluated: $evaluated" >&2
echo "installed: $installed" >&2
[ "$evaluated" = "$installed" ] && echo "demo: the installed flake evaluates, offline, to the installed system" >&2
