"""Installer figures: kit size and build time, and a fresh offline install's wall time (needs root).

    sudo FEDCLINIC_TEST_BUNDLE=build/test-bundle .venv/bin/python bench/bench_installer.py \
        --json out/installer.json

The install goes to a temp prefix with a throwaway service user, pip pointed at nothing reachable, exactly as
a clinic PC without internet; everything is removed afterwards (uninstall --purge).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from export.signing import load_private_key
from installers.kit_builder import BuildOptions, build_kit


def _offline_env(kit: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_NO_INDEX": "1",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_CONFIG_FILE": os.devnull,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle-root", type=Path, default=Path(os.environ.get("FEDCLINIC_TEST_BUNDLE", "build/test-bundle"))
    )
    parser.add_argument("--python", type=Path, default=Path("/usr/bin/python3"), help="the 'clinic' python3")
    parser.add_argument(
        "--gpu", action="store_true", help="measure the NVIDIA variant's size too (no install)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: the install creates a service user", file=sys.stderr)
        return 2
    key = load_private_key(args.bundle_root / "keys" / "hub.key")
    work = Path(tempfile.mkdtemp(prefix="fcbench-", dir="/tmp"))
    os.chmod(work, 0o755)
    user = f"fcb{secrets.token_hex(3)}"
    result: dict[str, float | int | str] = {}
    try:
        built = build_kit(BuildOptions(out=work / "kit", bundle=args.bundle_root / "bundle"), key)
        result |= {"kit_bytes": built.size_bytes, "kit_build_s": round(built.seconds, 1),
                   "wheels": len(built.manifest.wheels())}  # fmt: skip
        if args.gpu:
            gpu = build_kit(BuildOptions(out=work / "kit-gpu", variant="gpu"), key)
            result["gpu_kit_bytes"] = gpu.size_bytes
        prefix = work / "opt"
        answers = work / "answers.toml"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        answers.write_text(
            f'prefix = "{prefix}"\nconfig_path = "{work / "etc" / "edge.toml"}"\n'
            f'unit_dir = "{work / "units"}"\ndata_dir = "{work / "data"}"\nservice_user = "{user}"\n'
            f'listen_host = "127.0.0.1"\nport = {port}\n'
        )
        started = time.monotonic()
        done = subprocess.run(
            [str(args.python), str(work / "kit" / "install.py"), "--prefix", str(prefix),
             "--expect-key", built.key_fingerprint, "--answers", str(answers), "--yes"],
            env=_offline_env(work / "kit"), capture_output=True, text=True,
        )  # fmt: skip
        result["install_s"] = round(time.monotonic() - started, 1)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        result["installed_bytes"] = sum(p.stat().st_size for p in prefix.rglob("*") if p.is_file())
        tool = prefix / "current" / "venv" / "bin" / "fedclinic-install"
        subprocess.run([str(tool), "uninstall", "--prefix", str(prefix), "--purge"], capture_output=True)
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
