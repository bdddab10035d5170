"""The trust chain of a medium (issue 12, items 5-7): no credentials of the user's remotes on the
medium or the installed machine, install.sh using only the copies it verified, and the media
key's fingerprint shown, asked for and checked."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import prepare_example, run_cli
from test_install_script import NIX_CONFIG, Medium, _git, _needs_real_tools, make_medium, run_installer

from mediabuilder.media.flakerepo import without_credentials
from mediabuilder.store.keys import SecretKey

TOKEN = "ghp_s3cretT0kenXYZ"
PASSWORD = "hunter2pw"
ORIGIN = f"https://deploy:{TOKEN}@git.example.invalid/example/machines.git"
BACKUP = f"ssh://git:{PASSWORD}@backup.example.invalid/srv/git/machines.git"
QUERY_TOKEN = "glpat-qu3ryT0ken"
MIRROR = f"https://mirror.example.invalid/machines.git?private_token={QUERY_TOKEN}&ref=main"
PUSH_TOKEN = "ghp_pushT0kenABC"
INSTEAD_TOKEN = "ghp_insteadOfT0ken"
SECRETS = (TOKEN, PASSWORD, QUERY_TOKEN, PUSH_TOKEN, INSTEAD_TOKEN)


# Unit tier


@pytest.mark.parametrize(("url", "clean"), [
    (f"https://deploy:{TOKEN}@git.example.org/a/b.git", "https://git.example.org/a/b.git"),
    (f"https://{TOKEN}@git.example.org/a/b.git", "https://git.example.org/a/b.git"),
    (f"http://u:{TOKEN}@host:8080/x?y=1", "http://host:8080/x?y=1"),
    (f"https://u:p@ss{TOKEN}@host/x", "https://host/x"),
    (f"ssh://git:{PASSWORD}@host.example/srv/x.git", "ssh://git@host.example/srv/x.git"),
    (f"git+ssh://deploy:{PASSWORD}@host/x", "git+ssh://deploy@host/x"),
    (f"ssh://:{PASSWORD}@host/x", "ssh://host/x"),
    ("ssh://git@host.example/srv/x.git", "ssh://git@host.example/srv/x.git"),
    ("git@github.com:owner/repo.git", "git@github.com:owner/repo.git"),
    ("https://git.example.org/a/b.git", "https://git.example.org/a/b.git"),
    ("https://git.example.org/a/b@c.git", "https://git.example.org/a/b@c.git"),
    (f"https://git.example.org/a/b.git?private_token={TOKEN}", "https://git.example.org/a/b.git"),
    (f"https://git.example.org/a/b.git?ref=main&access_token={TOKEN}", "https://git.example.org/a/b.git?ref=main"),
    (f"https://u:{TOKEN}@host/x?Token={TOKEN}&a=1&X-Amz-Signature={TOKEN}#f", "https://host/x?a=1#f"),
    (f"ssh://host/x?password={PASSWORD}", "ssh://host/x"),
    ("https://host/x?tokens=1&ref=a@b", "https://host/x?tokens=1&ref=a@b"),
    ("/srv/git/x.git", "/srv/git/x.git"),
    ("file:///srv/git/x.git", "file:///srv/git/x.git"),
])
def test_without_credentials(url: str, clean: str) -> None:
    assert without_credentials(url) == clean


# Integration tier: item 7, a real build and install


@dataclass(frozen=True)
class Built:
    flake: Path
    media: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The example flake, its remotes given a token and a password, built into a medium."""
    base = tmp_path_factory.mktemp("trust")
    dest = base / "example"
    prepare_example(dest)
    flake = dest / "flake"
    subprocess.run(["git", "-C", str(flake), "remote", "set-url", "origin", ORIGIN], check=True)
    subprocess.run(["git", "-C", str(flake), "remote", "set-url", "backup", BACKUP], check=True)
    git = ["git", "-C", str(flake), "config"]
    subprocess.run(["git", "-C", str(flake), "remote", "add", "mirror", MIRROR], check=True)
    subprocess.run([*git, "remote.origin.pushurl", f"https://push:{PUSH_TOKEN}@git.example.invalid/m.git"], check=True)
    subprocess.run([*git, f"url.https://deploy:{INSTEAD_TOKEN}@git.example.invalid/.insteadOf", "gx:"], check=True)
    subprocess.run([*git, f"url.https://deploy:{INSTEAD_TOKEN}@git.example.invalid/.pushInsteadOf", "gp:"],
                   check=True)
    subprocess.run(["git", "-C", str(flake), "remote", "add", "short", "gx:example/machines.git"], check=True)
    media = base / "media"
    proc = run_cli("build", f"--flake={flake}#alpha", "--cache", base / "cache", "--output", media)
    assert proc.returncode == 0, proc.stderr
    return Built(flake, media, proc)


@pytest.mark.integration
def test_remote_credentials_reach_neither_medium_nor_target(built: Built, tmp_path: Path) -> None:
    from test_install import install_offline

    flake, media, proc = built.flake, built.media, built.proc
    warnings = [line for line in proc.stderr.splitlines() if "carries credentials" in line]
    assert warnings == [
        f"warning: {flake}: remote origin: its URL carries credentials; the media records it without them "
        "(https://git.example.invalid/example/machines.git)",
        f"warning: {flake}: remote backup: its URL carries credentials; the media records it without them "
        "(ssh://git@backup.example.invalid/srv/git/machines.git)",
        f"warning: {flake}: remote mirror: its URL carries credentials; the media records it without them "
        "(https://mirror.example.invalid/machines.git?ref=main)",
    ]
    assert not [s for s in SECRETS if s in proc.stderr + proc.stdout]
    manifest = json.loads((media / "manifest.json").read_text())
    # Only each remote's url is recorded: pushurl and url.*.insteadOf (whose secrets stay on the
    # build machine) never reach the medium; a remote spelled through insteadOf stays as spelled.
    assert manifest["flake"]["remotes"] == {
        "origin": "https://git.example.invalid/example/machines.git",
        "backup": "ssh://git@backup.example.invalid/srv/git/machines.git",
        "mirror": "https://mirror.example.invalid/machines.git?ref=main",
        "short": "gx:example/machines.git",
    }
    files = [Path(d, n) for d, _, names in os.walk(media) for n in names]
    assert media / "flake" / "repo.bundle" in files
    for file in files:
        data = file.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], file
    # The user's own repository keeps its URLs (it is only read).
    url = subprocess.run(["git", "-C", str(flake), "remote", "get-url", "origin"], capture_output=True, text=True)
    assert url.stdout.strip() == ORIGIN

    root = tmp_path / "root"
    root.mkdir()
    proc = install_offline(media, root, "--yes", "--expect-key", (media / "media-key.pub").read_text().strip())
    assert proc.returncode == 0, proc.stderr
    assert not [s for s in SECRETS if s in proc.stderr]
    config = (root / "etc/nixos/.git/config").read_text()
    assert "url = https://git.example.invalid/example/machines.git" in config
    assert "url = ssh://git@backup.example.invalid/srv/git/machines.git" in config
    assert "url = https://mirror.example.invalid/machines.git?ref=main" in config
    assert "pushurl" not in config.lower() and "insteadof" not in config.lower()
    for file in [Path(d, n) for d, _, names in os.walk(root / "etc") for n in names] + \
            [Path(d, n) for d, _, names in os.walk(root / "var/lib/mediabuilder") for n in names]:
        data = file.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], file


# Integration tier: item 5, a medium that answers differently once checked

PHASES_AFTER_CHECK = ("choose_host check_target check_bundle confirm copy_closure set_profile install_bootloader "
                      "clone_flake configure_nix done_summary")


def _evil_files(tmp: Path, medium: Medium) -> Path:
    """Other, valid-looking versions of the files install.sh reads from a medium."""
    evil = tmp / "evil"
    evil.mkdir()
    registry = {"version": 2, "flakes": [{"from": {"type": "indirect", "id": "nixpkgs"},
                                         "to": {"type": "github", "owner": "attacker", "repo": "nixpkgs"}}]}
    (evil / "registry.json").write_text(json.dumps(registry))
    manifest = (medium.root / "manifest.json").read_text()
    (evil / "manifest.json").write_text(manifest.replace("https://example.org/flake.git", "https://attacker.example/x"))
    (evil / "media-key.pub").write_text(SecretKey.generate("attacker").public().render() + "\n")
    repo = tmp / "evil-repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "flake.nix").write_text("{ outputs = _: { attacker = true; }; }\n")
    _git(repo, "add", "flake.nix")
    _git(repo, "commit", "-q", "-m", "evil")
    _git(repo, "bundle", "create", "-q", str(evil / "repo.bundle"), "--all")
    # The toplevel's narinfo, its signature intact, with what the signature does not cover forged:
    # a CA that Nix checks only against the NarHash, and a deriver.
    top = medium.root / "cache" / f"{medium.toplevel[len('/nix/store/'):][:32]}.narinfo"
    lines = [ln for ln in top.read_text().splitlines() if not ln.startswith(("CA:", "Deriver:"))]
    nar_hash = next(ln.split(": ", 1)[1] for ln in lines if ln.startswith("NarHash:"))
    (evil / top.name).write_text("\n".join([*lines, f"CA: fixed:r:{nar_hash}", f"Deriver: {EVIL_DERIVER}"]) + "\n")
    # A part of install.sh whose phases would leave a mark if it were sourced from the medium.
    part = (medium.root / "install-host.sh").read_text()
    (evil / "install-host.sh").write_text(part + 'configure_nix() { : >"$ROOT/pwned"; }\n')
    return evil


EVIL_DERIVER = f"{'0' * 32}-evil.drv"


@pytest.mark.integration
@pytest.mark.parametrize("swapped", [("registry.json", "manifest.json", "media-key.pub"), ("flake/repo.bundle",),
                                     ("toplevel narinfo",), ("install-host.sh",)])
def test_install_uses_only_what_it_checked(tmp_path: Path, swapped: tuple[str, ...]) -> None:
    """install.sh's phases with the medium's files swapped (bind mounts over the read-only
    medium) right after check_media: the target gets the files as they were checked (narinfos
    too: Nix would register their unsigned CA and Deriver), and install.sh's parts run as checked."""
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False)
    narinfo = f"cache/{medium.toplevel[len('/nix/store/'):][:32]}.narinfo"
    swapped = tuple(narinfo if name == "toplevel narinfo" else name for name in swapped)
    evil = _evil_files(tmp_path, medium)
    installed = ("registry.json", "manifest.json", "media-key.pub")
    originals = {name: (medium.root / name).read_bytes() for name in installed}
    root = tmp_path / "target"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    swaps = " ".join(f'mount --bind "$EVIL_DIR/{Path(name).name}" "$MEDIA_DIR/{name}";' for name in swapped)
    late = ""
    if swapped == ("install-host.sh",):  # swapped the moment check_sums matched it, before load_parts
        late, swaps = ('eval "checked_sums() $(declare -f check_sums | tail -n +2)"; '
                       f'check_sums() {{ checked_sums; {swaps} }}; '), ""
    phases = (
        f'INSTALL_SH_SOURCE_ONLY=1 source "$MEDIA_DIR/install.sh"; trap cleanup EXIT; {late}'
        'parse_args --media "$MEDIA_DIR" --root "$TARGET_ROOT" --yes; locate_media; check_media; '
        f'{swaps} for phase in {PHASES_AFTER_CHECK}; do "$phase"; done'
    )
    wrapper = ('set -e; mount --make-rprivate /; mount --bind "$MEDIA_DIR" "$MEDIA_DIR"; '
               'mount -o remount,bind,ro "$MEDIA_DIR"; mount --bind "$TARGET_ROOT" "$TARGET_ROOT"; exec bash -c "$1"')
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG, "TMPDIR": str(scratch), "HOME": str(tmp_path / "home"),
           "MEDIA_DIR": str(medium.root), "TARGET_ROOT": str(root), "EVIL_DIR": str(evil)}
    result = subprocess.run(["unshare", "-m", "-n", "--", "bash", "-c", wrapper, "_", phases],
                            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert list(scratch.iterdir()) == []
    lib = root / "var/lib/mediabuilder"
    for name, data in originals.items():
        assert (lib / name).read_bytes() == data, name
    assert _git(root / "etc/nixos", "rev-parse", "HEAD").strip() == medium.rev
    assert _git(root / "etc/nixos", "remote", "get-url", "origin").strip() == "https://example.org/flake.git"
    registered = subprocess.run(["nix", "path-info", "--store", f"local?root={root}", "--json", medium.toplevel],
                                capture_output=True, text=True, env=env, check=True).stdout
    assert "fixed:r:" not in registered and "evil.drv" not in registered, registered
    assert not (root / "pwned").exists()


# Item 6: the fingerprint shown, asked for and checked


@pytest.mark.integration
def test_yes_without_expect_key_warns_loudly(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False)
    fp = medium.key.public().fingerprint()
    result, root = run_installer(tmp_path, medium, "--yes")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("install.sh: warning:")] == [
        "install.sh: warning: THE MEDIA KEY IS NOT CHECKED: --yes without --expect-key installs whatever a medium "
        "signed by",
        "install.sh: warning: any key holds, and install.sh itself comes from the medium. Pass --expect-key " + fp,
        "install.sh: warning: only if that is the fingerprint the medium's maker gave you.",
    ]
    assert f"==> installing alpha into {root} (--yes, MEDIA KEY NOT CHECKED)" in result.stderr.splitlines()
    assert "    medium created 2026-01-01T00:00:00Z (signed manifest)" in result.stderr.splitlines()
    # With the key given, no warning.
    shutil.rmtree(root)
    result, root = run_installer(tmp_path, medium, "--yes", "--expect-key", fp.upper())
    assert result.returncode == 0, result.stderr
    assert "warning: THE MEDIA KEY" not in result.stderr
    assert f"==> installing alpha into {root} (--yes, media key as expected)" in result.stderr.splitlines()


@pytest.mark.integration
@pytest.mark.parametrize("answer", ["y", "n"])
def test_interactive_install_asks_to_confirm_the_fingerprint(tmp_path: Path, answer: str) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False)
    result, root = run_installer(tmp_path, medium, typed=f"{answer}\ny\n")
    out = result.stdout.replace("\r\n", "\n")
    shown = ["==> confirm the media key (no --expect-key given)",
             "    media key:   test-media-1",
             f"    fingerprint: {medium.key.public().fingerprint()}",
             "    created:     2026-01-01T00:00:00Z"]
    lines = out.splitlines()
    start = lines.index(shown[0])
    assert lines[start:start + 4] == shown, out
    assert "Is this, group by group, the fingerprint the medium's maker gave you? [y/N]" in out
    if answer == "y":
        assert result.returncode == 0, out
        assert _git(root / "etc/nixos", "rev-parse", "HEAD").strip() == medium.rev
    else:
        assert result.returncode == 2, out
        assert lines[-1].endswith("[y/N] install.sh: error: media-key.pub: fingerprint not confirmed; nothing was "
                                  "written (get the fingerprint from the medium's maker, pass --expect-key)"), out
        assert list(root.iterdir()) == []


@pytest.mark.integration
def test_dry_run_and_expect_key_ask_nothing(tmp_path: Path) -> None:
    _needs_real_tools()
    medium = make_medium(tmp_path, split=False)
    result, root = run_installer(tmp_path, medium, "--dry-run", typed="")
    assert result.returncode == 0, result.stdout
    assert "confirm the media key" not in result.stdout
    result, root = run_installer(tmp_path, medium, "--expect-key", medium.key.public().fingerprint(), typed="y\n")
    assert result.returncode == 0, result.stdout
    assert "confirm the media key" not in result.stdout


@pytest.mark.integration
def test_build_prints_fingerprint_and_install_sh_sha256(built: Built) -> None:
    key = (built.media / "media-key.pub").read_text().strip()
    digest = hashlib.sha256(base64.b64decode(key.split(":", 1)[1])).hexdigest()
    fingerprint = ":".join(digest[i : i + 4] for i in range(0, 32, 4))
    script_sha = hashlib.sha256((built.media / "install.sh").read_bytes()).hexdigest()
    (line,) = [ln for ln in built.proc.stderr.splitlines() if ln.startswith("  Writing the medium … ")]
    assert line.startswith(f"  Writing the medium … {built.media}, media key fingerprint {fingerprint}, "
                           f"install.sh sha256 {script_sha}, "), line
    readme = (built.media / "README.txt").read_text()
    assert "    bash /iso/install.sh --expect-key abcd:ef01:2345:6789:abcd:ef01:2345:6789\n" in readme
    assert "Take it from the maker, never from this medium" in readme
