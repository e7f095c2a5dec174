"""Must-show 1-3: the kit installs offline, unattended, into a node that answers a real Orthanc; an altered
kit is refused before anything is installed; doctor names a wrong PACS port with its fix.

The kit is built from this source tree with wheels from the package registries (slow the first time; pip's
cache makes it quick after). The install runs with the clinic's system python3, pip pointed at nothing
reachable.
Systemd is not PID 1 here, so the node is started with the unit's exact ExecStart as the service user.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.demo.orthanc import Modality, Orthanc
from installers.pacs import echo
from installers.systemd_unit import UNIT_NAME, verify_unit
from tests.installers.conftest import SYSTEM_PYTHON, BuiltKitInfo, free_port, offline_env
from tests.support.dicomgen import medmnist_studies

pytestmark = pytest.mark.slow


def _install(kit: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SYSTEM_PYTHON), str(kit / "install.py"), *args],
        env=offline_env(kit),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _linked_copy(kit: Path, dest: Path) -> Path:
    """A copy of the kit sharing the big files (hard links); replace a file before changing it."""
    shutil.copytree(kit, dest, copy_function=os.link)
    return dest


def test_altered_wheel_is_refused_before_anything_is_installed(kit: BuiltKitInfo, world_dir: Path) -> None:
    altered = _linked_copy(kit.path, world_dir / "kit")
    wheel = next((altered / "wheelhouse").glob("onnxruntime-*.whl"))
    data = wheel.read_bytes()
    wheel.unlink()  # break the hard link: the original kit stays intact
    wheel.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    prefix = world_dir / "opt"
    done = _install(altered, "--prefix", str(prefix), "--yes")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "REFUSED" in done.stderr and wheel.name in done.stderr and "altered" in done.stderr
    assert not prefix.exists()  # nothing was created, let alone installed


def test_kit_signed_by_another_key_or_edited_is_refused(kit: BuiltKitInfo, world_dir: Path) -> None:
    forged = _linked_copy(kit.path, world_dir / "forged")
    other = Ed25519PrivateKey.generate()
    for name in ("kit.sig", "hub.pub"):
        (forged / name).unlink()
    (forged / "hub.pub").write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (forged / "kit.sig").write_bytes(other.sign((forged / "kit.json").read_bytes()))
    done = _install(forged, "verify", "--expect-key", kit.key_fingerprint)
    assert done.returncode == 3 and f"not by {kit.key_fingerprint}" in done.stderr, done.stderr
    # hub.pub is a listed file: swapping it breaks the hashes even without the operator's fingerprint.
    assert _install(forged, "verify").returncode == 3

    edited = _linked_copy(kit.path, world_dir / "edited")
    manifest = json.loads((edited / "kit.json").read_text())
    manifest["requirement"] = "fedclinic[edge,cpu,hub]==" + manifest["fedclinic_version"]
    (edited / "kit.json").unlink()
    (edited / "kit.json").write_text(json.dumps(manifest, sort_keys=True, separators=(",", ":")))
    done = _install(edited, "verify")
    assert done.returncode == 3 and "does not match its signature" in done.stderr

    extra = _linked_copy(kit.path, world_dir / "extra")
    (extra / "wheelhouse" / "evil-1.0-py3-none-any.whl").write_bytes(b"PK")
    done = _install(extra, "verify")
    assert done.returncode == 3 and "evil-1.0" in done.stderr

    assert _install(kit.path, "verify", "--expect-key", kit.key_fingerprint).returncode == 0


def _unit_command(unit: Path) -> tuple[list[str], dict[str, str], str]:
    """ExecStart, Environment= and User= exactly as the unit file says."""
    command: list[str] = []
    env: dict[str, str] = {}
    user = ""
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStart":
            command = shlex.split(value)
        elif key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "User":
            user = value
    return command, env, user


def _echo_until_answered(orthanc: Orthanc, stop: threading.Event) -> None:
    """The PACS side of the inbound test: Orthanc sends C-ECHO to the node's address until it is answered."""
    while not stop.is_set():
        if orthanc.echo("edge"):  # False (HTTP 500) while nothing listens yet
            return
        time.sleep(0.5)


def _wait_sr(orthanc: Orthanc, study_id: str, timeout: float = 90.0) -> None:
    def has_sr() -> bool:
        return any(s["MainDicomTags"].get("Modality") == "SR" for s in orthanc.study_series(study_id))

    orthanc.wait_for(has_sr, timeout=timeout, interval=0.5)


def _doctor(prefix: Path) -> subprocess.CompletedProcess[str]:
    binary = prefix / "current" / "venv" / "bin" / "fedclinic-install"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(binary), "doctor", "--prefix", str(prefix), "--format", "text"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_offline_unattended_install_answers_orthanc(
    kit: BuiltKitInfo, world_dir: Path, service_user: str, orthanc: Orthanc, shared_data: Path
) -> None:
    port = free_port()
    prefix, config, data, units = (
        world_dir / "opt",
        world_dir / "etc" / "edge.toml",
        world_dir / "data",
        world_dir / "units",
    )
    answers = world_dir / "answers.toml"
    answers.write_text(
        f'ae_title = "CLINICNODE"\nlisten_host = "127.0.0.1"\nport = {port}\n'
        f'data_dir = "{data}"\nprefix = "{prefix}"\nconfig_path = "{config}"\nunit_dir = "{units}"\n'
        f'service_user = "{service_user}"\nwait_for_pacs_seconds = 60\nsend_test_report = true\n'
        f'[pacs]\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    )
    orthanc.put_modality("edge", Modality("CLINICNODE", "127.0.0.1", port))
    stop = threading.Event()
    pacs_side = threading.Thread(target=_echo_until_answered, args=(orthanc, stop), daemon=True)
    pacs_side.start()
    started = time.monotonic()
    try:
        done = _install(kit.path, "--prefix", str(prefix), "--expect-key", kit.key_fingerprint,
                        "--answers", str(answers), "--yes")  # fmt: skip
    finally:
        stop.set()
    seconds = time.monotonic() - started
    print(
        f"\nkit {kit.size_bytes / 1e6:.1f} MB built in {kit.seconds:.0f} s; "
        f"offline install took {seconds:.1f} s"
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "arrived C-ECHO from ORTHANC" in out  # the PACS reached the node's port during the install
    assert "ok test report (SR) sent to" in out
    test_studies = [orthanc.study(s)["MainDicomTags"].get("StudyDescription") for s in orthanc.studies()]
    assert "fedclinic installer connectivity test" in test_studies
    assert "systemd is not running on this computer" in out

    # The settings: readable only by the service user.
    info = config.stat()
    assert (
        stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == __import__("pwd").getpwnam(service_user).pw_uid
    )
    unit = units / UNIT_NAME
    assert verify_unit(unit) is None

    # The node, started exactly as systemd would start it.
    command, unit_env, user = _unit_command(unit)
    assert user == service_user and command[0] == str(prefix / "current" / "venv" / "bin" / "fedclinic-edge")
    log = (world_dir / "node.log").open("w")
    node = subprocess.Popen(
        ["runuser", "-u", user, "--", *command],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **unit_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while not (answered := echo("127.0.0.1", port, "CLINICNODE", "ORTHANC", timeout=5)).ok:
            assert node.poll() is None and time.monotonic() < deadline, (world_dir / "node.log").read_text()
            time.sleep(0.5)
        assert answered.ok

        (study,) = medmnist_studies("pneumoniamnist", "test", [3], world_dir / "cr", root=shared_data)
        study_id = str(orthanc.upload(study.path)["ParentStudy"])
        assert orthanc.store_to_modality("edge", [study_id])["FailedInstancesCount"] == 0
        _wait_sr(orthanc, study_id)

        healthy = _doctor(prefix)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        # A wrong PACS port in the settings: doctor names it and says what to do.
        wrong = free_port()
        text = config.read_text().replace(f"port = {orthanc.dicom_port}", f"port = {wrong}")
        config.write_text(text)
        broken = _doctor(prefix)
        assert broken.returncode == 1
        assert f"refuses connections on port {wrong}" in broken.stdout
        assert "ask the PACS administrator for the PACS's DICOM port" in broken.stdout
    finally:
        node.terminate()
        node.wait(timeout=30)
        log.close()

    # Uninstall keeps the data (and the settings) unless told otherwise.
    binary = prefix / "current" / "venv" / "bin" / "fedclinic-install"
    gone = subprocess.run(
        [str(binary), "uninstall", "--prefix", str(prefix)],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        text=True,
    )
    assert gone.returncode == 0, gone.stderr
    assert not prefix.exists() and (data / "edge.sqlite3").is_file() and config.is_file()
