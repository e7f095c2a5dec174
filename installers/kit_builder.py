"""Build a kit on the hub: the fedclinic wheel, its edge dependencies, constraints, signature."""

from __future__ import annotations

import logging
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from installers.errors import KitError
from installers.kit import (
    BUNDLE_DIR,
    CONSTRAINTS_FILE,
    MANIFEST_FILE,
    PUBLIC_KEY_FILE,
    SIGNATURE_FILE,
    WHEELHOUSE,
    KitFile,
    KitManifest,
    file_digest,
    key_fingerprint,
)

__all__ = [
    "BOOTSTRAP_MODULES",
    "SOURCE_ITEMS",
    "BuildOptions",
    "BuiltKit",
    "build_kit",
    "copy_sources",
    "source_root",
]

logger = logging.getLogger(__name__)

#: The stdlib-only modules copied into the kit so that install.py can check it before anything is installed.
BOOTSTRAP_MODULES = ("__init__.py", "errors.py", "ed25519.py", "kit.py", "bootstrap.py")
#: What a clinic's fedclinic wheel is built from: pyproject.toml, the README it names, and the packages a kit
#: carries (not ``harness``, the hub's lab).
SOURCE_ITEMS = ("pyproject.toml", "README.md", "edge_node", "hub", "export", "installers")
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.+\.whl$")

INSTALL_PY = '''#!/usr/bin/env python3
"""fedclinic clinic kit: check this kit, then install the edge node from it. Run: sudo python3 install.py"""
import sys
from pathlib import Path

# Never read or write bytecode beside the kit's modules: a planted __pycache__ file would run unchecked.
sys.dont_write_bytecode = True
sys.pycache_prefix = "/nonexistent/fedclinic-kit-pycache"
sys.path.insert(0, str(Path(__file__).resolve().parent / "bootstrap"))
from installers.bootstrap import main  # noqa: E402

sys.exit(main())
'''


@dataclass(frozen=True)
class BuildOptions:
    """What the operator asked for; ``python_version``/``platform`` default to this machine's."""

    out: Path
    variant: str = "cpu"
    python_version: str | None = None
    platforms: tuple[str, ...] = ()  # pip wheel platform tags; several for e.g. manylinux_* and linux_aarch64
    join_code: str | None = None
    hub_fingerprint: str | None = None
    bundle: Path | None = None


@dataclass(frozen=True)
class BuiltKit:
    path: Path
    manifest: KitManifest
    key_fingerprint: str
    size_bytes: int
    seconds: float


def source_root() -> Path:
    """The source tree this fedclinic runs from; a kit is built from source so it carries this exact code."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise KitError(
            f"fedclinic is not running from a source checkout ({root} has no pyproject.toml); build the kit "
            "from the hub's git checkout"
        )
    return root


def copy_sources(dest: Path, items: tuple[str, ...]) -> Path:
    """Copy ``items`` of the source tree to ``dest`` (created), without bytecode or build metadata; return it.

    pip builds a local project in place (``build/``, ``*.egg-info``), so every build works on its own copy.
    """
    root = source_root()
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in items:
        path = root / item
        if path.is_dir():
            shutil.copytree(path, dest / item, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, dest / item)
    return dest


def _run(command: list[str], what: str) -> None:
    logger.debug("running %s", command)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise KitError(f"{what} failed (pip exit {done.returncode}):\n{tail}")


def _build_wheel(work: Path) -> Path:
    """Build the fedclinic wheel from a copy of the source (building in place would race other builds)."""
    src = copy_sources(work / "src", SOURCE_ITEMS)
    out = work / "built"
    # Build isolation: pip fetches the build backend pyproject.toml asks for, whatever this venv holds.
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        "building the fedclinic wheel",
    )
    wheels = sorted(out.glob("fedclinic-*.whl"))
    if len(wheels) != 1:
        raise KitError(f"building the fedclinic wheel gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _download(wheel: Path, options: BuildOptions, wheelhouse: Path) -> None:
    target = ["--python-version", options.python_version] if options.python_version else []
    for tag in options.platforms:
        target += ["--platform", tag]
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "-d", str(wheelhouse),
         *target, f"{wheel}[edge,{options.variant}]"],
        "downloading the edge dependencies",
    )  # fmt: skip


def _constraints(wheelhouse: Path) -> str:
    lines = ["# Exact versions in this kit's wheelhouse; pip installs nothing else."]
    for wheel in sorted(wheelhouse.glob("*.whl")):
        match = _WHEEL_NAME.match(wheel.name)
        if match is None:
            raise KitError(f"{wheel.name} is not a wheel file name")
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        lines.append(f"{name}=={match['version']}")
    return "\n".join(lines) + "\n"


def _write_bootstrap(out: Path) -> None:
    (out / "install.py").write_text(INSTALL_PY)
    (out / "install.py").chmod(0o755)
    target = out / "bootstrap" / "installers"
    target.mkdir(parents=True)
    package = Path(__file__).resolve().parent
    for name in BOOTSTRAP_MODULES:
        shutil.copy2(package / name, target / name)


def _copy_bundle(bundle: Path, out: Path) -> None:
    dest = out / BUNDLE_DIR
    if bundle.is_dir():
        shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("__pycache__"))
    elif bundle.is_file():
        dest.mkdir()
        shutil.copy2(bundle, dest / bundle.name)
    else:
        raise KitError(f"bundle {bundle} does not exist; pass a bundle directory or .zip to --bundle")


def _list_files(out: Path) -> tuple[KitFile, ...]:
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel in (MANIFEST_FILE, SIGNATURE_FILE):
            continue
        files.append(KitFile(rel, file_digest(path), path.stat().st_size))
    return tuple(files)


def _default_platform() -> str:
    return f"{platform.system().lower()}_{platform.machine()}"


def build_kit(
    options: BuildOptions, key: Ed25519PrivateKey, step: Callable[[str], None] = lambda _msg: None
) -> BuiltKit:
    """Build and sign a kit in ``options.out`` (which must not exist yet); ``step`` hears each stage."""
    if options.variant not in ("cpu", "gpu"):
        raise KitError(f"variant {options.variant!r} is unknown; use cpu or gpu")
    if options.out.exists() and any(options.out.iterdir()):
        raise KitError(f"{options.out} is not empty; choose a new --out folder")
    started = time.monotonic()
    out = options.out
    with tempfile.TemporaryDirectory(prefix="fedclinic-kit-") as tmp:
        step("building the fedclinic wheel")
        wheel = _build_wheel(Path(tmp))
        version = wheel.name.split("-")[1]
        out.mkdir(parents=True, exist_ok=True)
        wheelhouse = out / WHEELHOUSE
        wheelhouse.mkdir()
        step(f"collecting the wheels of fedclinic[edge,{options.variant}]")
        _download(wheel, options, wheelhouse)
    step("writing constraints, bootstrap, README and key")
    (out / CONSTRAINTS_FILE).write_text(_constraints(wheelhouse))
    _write_bootstrap(out)
    readme = resources.files("installers").joinpath("README-clinic.md").read_text()
    (out / "README-clinic.md").write_text(readme)
    example = resources.files("installers").joinpath("answers.example.toml").read_text()
    (out / "answers.example.toml").write_text(example)
    public = key.public_key()
    (out / PUBLIC_KEY_FILE).write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if options.bundle is not None:
        _copy_bundle(options.bundle, out)
    step("hashing and signing")
    manifest = KitManifest(
        fedclinic_version=version,
        variant=options.variant,
        requirement=f"fedclinic[edge,{options.variant}]=={version}",
        python=options.python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        platform=",".join(options.platforms) or _default_platform(),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        join_code=options.join_code,
        hub_fingerprint=options.hub_fingerprint,
        files=_list_files(out),
    )
    signed = manifest.canonical_bytes()
    (out / MANIFEST_FILE).write_bytes(signed)
    (out / SIGNATURE_FILE).write_bytes(key.sign(signed))
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BuiltKit(out, manifest, key_fingerprint(raw), size, time.monotonic() - started)
