"""The kit's first step, run by the clinic's system python3 (stdlib only): check the kit, then install it.

``python3 install.py [install|upgrade] [--prefix /opt/fedclinic] [--expect-key FP] [wizard options...]``

1. Python version and free disk under the prefix, before anything else.
2. The whole kit is verified (signature, every sha256): an altered wheel stops
   here, before any file is written.
3. A venv is created under ``PREFIX/versions/<version>`` and the wheels are installed with pip, offline
   (``--no-index --find-links wheelhouse``, the kit's constraints, pip's own configuration ignored).
4. The rich wizard from the freshly installed package takes over (``fedclinic-install``), with the
   same options.

An existing version directory that was completely installed from the same kit is reused, so running the
command again after a failed later step does not reinstall.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from installers.errors import InstallerError, KitError, MachineError
from installers.kit import CONSTRAINTS_FILE, WHEELHOUSE, KitManifest, file_digest, verify_kit

__all__ = ["MIN_PYTHON", "clean_environment", "main", "stage_version", "version_dir"]

MIN_PYTHON = (3, 10)
DEFAULT_PREFIX = Path("/opt/fedclinic")
_COMPLETE_MARKER = ".installed-from"
ACTIONS = ("install", "upgrade", "verify")


def version_dir(prefix: Path, manifest: KitManifest, kit_digest: str) -> Path:
    # The kit digest in the name: two kits of the same version (a rebuilt kit) never share a venv.
    return prefix / "versions" / f"{manifest.fedclinic_version}-{kit_digest[:12]}"


def clean_environment() -> dict[str, str]:
    """The environment for everything the installer starts: no PYTHONPATH/PYTHONHOME (they would mix another
    Python's packages into the node), no PIP_* (the kit alone decides what is installed)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV") and not k.startswith("PIP_")
    }


def _say(message: str) -> None:
    print(message, flush=True)


def _check_python(manifest: KitManifest) -> None:
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if sys.version_info[:2] < MIN_PYTHON:
        raise MachineError(
            f"Python {running} is too old; fedclinic needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer "
            "(on Debian/Ubuntu: apt install python3 python3-venv)"
        )
    if running != manifest.python:
        raise MachineError(
            f"this kit is built for Python {manifest.python} but this machine runs python3 {running}; "
            "ask the "
            f"hub operator for a kit built with --python-version {running}"
        )


def _check_disk(prefix: Path, needed: int) -> None:
    probe = prefix
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise MachineError(
            f"{probe} has {free / 1e6:.0f} MB free; installing needs about {needed / 1e6:.0f} MB: "
            "free some space "
            "or choose another --prefix"
        )


def stage_version(kit: Path, prefix: Path, manifest: KitManifest, kit_digest: str) -> Path:
    """Create the venv for this kit under the prefix and install its wheels offline; returns its directory."""
    target = version_dir(prefix, manifest, kit_digest)
    marker = target / _COMPLETE_MARKER
    if marker.is_file() and marker.read_text().strip() == kit_digest:
        _say(f"fedclinic {manifest.fedclinic_version} is already installed in {target}; reusing it")
        return target
    if target.exists():
        shutil.rmtree(target)  # an interrupted earlier attempt: start that version over
    target.mkdir(parents=True)
    os.chmod(target, 0o755)
    venv = target / "venv"
    _say(f"creating the environment in {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_environment())
    python = venv / "bin" / "python"
    _say(f"installing {manifest.requirement} from the kit (offline)")
    subprocess.run(
        [
            str(python), "-m", "pip", "install",
            "--isolated",  # this machine's pip.conf and PIP_* variables must not send pip to an index
            "--no-index", "--find-links", str(kit / WHEELHOUSE),
            "--constraint", str(kit / CONSTRAINTS_FILE),
            "--only-binary", ":all:", "--no-cache-dir", "--disable-pip-version-check", "--quiet",
            manifest.requirement,
        ],
        check=True,
        env=clean_environment(),
    )  # fmt: skip
    marker.write_text(kit_digest + "\n")
    return target


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python3 install.py",
        usage="python3 install.py [install|upgrade|verify] [--prefix P] [--expect-key FP] [wizard options]",
        description="Check this fedclinic kit and install the clinic edge node from it (no internet needed).",
    )
    parser.add_argument("--prefix", type=Path, default=DEFAULT_PREFIX, help="where fedclinic is installed")
    parser.add_argument(
        "--expect-key",
        default=os.environ.get("FEDCLINIC_KIT_KEY"),
        help="the kit signing key fingerprint the hub operator gave you (16 hex digits)",
    )
    # The action is the first word only: an optional positional would swallow the wizard's option values.
    action = argv[0] if argv and argv[0] in ACTIONS else "install"
    args, rest = parser.parse_known_args(argv[1:] if argv and argv[0] in ACTIONS else argv)
    args.action = action
    return args, rest


def main(argv: list[str] | None = None, kit: Path | None = None) -> int:
    """Run the bootstrap; ``kit`` defaults to the kit this file is in (KIT/bootstrap/installers/)."""
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    kit = kit if kit is not None else Path(__file__).resolve().parents[2]
    try:
        manifest, fingerprint = verify_kit(kit, args.expect_key)
        _say(
            f"kit verified: fedclinic {manifest.fedclinic_version} ({manifest.variant}), "
            f"{len(manifest.files)} files, signed by key {fingerprint}"
            + (
                ""
                if args.expect_key
                else " - compare this fingerprint with the one the hub operator gave you"
            )
        )
        if args.action == "verify":
            return 0
        _check_python(manifest)
        _check_disk(args.prefix, 3 * sum(f.size for f in manifest.files) + 200_000_000)
        digest = file_digest(kit / "kit.json")
        target = stage_version(kit, args.prefix.resolve(), manifest, digest)
    except KitError as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return 3
    except InstallerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: installing from the kit failed ({exc}); nothing was activated", file=sys.stderr)
        return 2
    wizard = target / "venv" / "bin" / "fedclinic-install"
    command = [
        str(wizard), args.action, "--kit", str(kit), "--prefix", str(args.prefix.resolve()),
        "--version-dir", str(target), *rest,
    ]  # fmt: skip
    if args.expect_key:  # checked against the operator's fingerprint: the wizard need not ask again
        command += ["--key-fingerprint", fingerprint]
    sys.stdout.flush()
    os.execve(command[0], command, clean_environment())
    return 0  # not reached: execv replaces this process
