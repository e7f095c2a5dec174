"""Edge node test fixtures: free ports, signed bundles, CT series, real edge and storescp processes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom.uid import generate_uid

from edge_node.state.runs import InstanceRow
from tests.support.dcmtk import dcmtk
from tests.support.onnxgen import make_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]
EDGE_BIN = Path(sys.executable).parent / "fedclinic-edge"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_dir() -> Path:
    env = os.environ.get("FEDCLINIC_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return (root / "dicom").resolve()


@dataclass(frozen=True)
class TrustedBundle:
    bundle: Path  # the bundle directory (manifest.json, manifest.sig, model.onnx)
    public_key: Path  # hub.pub that signed it


def find_test_bundle() -> TrustedBundle | None:
    """$FEDCLINIC_TEST_BUNDLE, else build/dev-bundle: a directory holding bundle/ and hub.pub."""
    env = os.environ.get("FEDCLINIC_TEST_BUNDLE")
    root = Path(env) if env else REPO_ROOT / "build" / "dev-bundle"
    if (root / "bundle" / "manifest.json").is_file() and (root / "hub.pub").is_file():
        return TrustedBundle(root / "bundle", root / "hub.pub")
    return None


def require_test_bundle() -> TrustedBundle:
    """The test bundle, or skip the test that needs it (``find_test_bundle`` says where it is looked for)."""
    found = find_test_bundle()
    if found is None:
        pytest.skip(
            "no model bundle: set FEDCLINIC_TEST_BUNDLE to a directory with bundle/ and hub.pub "
            "(`make test-bundle` builds build/test-bundle), or build build/dev-bundle"
        )
    return found


@pytest.fixture(scope="session")
def test_bundle() -> TrustedBundle:
    return require_test_bundle()


def instance_rows(paths: list[Path]) -> list[InstanceRow]:
    """The rows ingest would have recorded for these files (as a claim carries them).

    A file that does not read stands for one damaged on disk after it was spooled: its row says CR image.
    """
    rows: list[InstanceRow] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            row = InstanceRow(
                sop_instance_uid=str(ds.SOPInstanceUID),
                series_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                modality=str(ds.get("Modality", "") or "") or None,
                path=path,
            )
        except Exception:
            row = InstanceRow(
                f"9.9.{len(rows)}", "9.9", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR", path
            )
        rows.append(row)
    return rows


def make_ct_instances(out: Path, n: int, *, studies: int = 1, source: Path | None = None) -> list[Path]:
    """``n`` copies of a CT slice with fresh UIDs, in ``studies`` consecutive studies of one series."""
    src = source or dicom_dir() / "pydicom_testfiles" / "CT_small.dcm"
    ds = pydicom.dcmread(src)
    out.mkdir(parents=True, exist_ok=True)
    per_study = max(1, -(-n // studies))
    paths = []
    study_uid = series_uid = ""
    for i in range(n):
        if i % per_study == 0:
            study_uid, series_uid = generate_uid(), generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i % per_study + 1
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


_SENT_RE = re.compile(r"Sending file: (.+)$")
_RSP_RE = re.compile(r"Received Store Response \((\w+)")


def acknowledged_files(storescu_log: str) -> tuple[list[str], list[str]]:
    """Files storescu -v saw answered with Success, and files answered with anything else, in send order."""
    ok: list[str] = []
    bad: list[str] = []
    current: str | None = None
    for line in storescu_log.splitlines():
        m = _SENT_RE.search(line)
        if m:
            current = m.group(1).strip()
            continue
        m = _RSP_RE.search(line)
        if m and current is not None:
            (ok if m.group(1) == "Success" else bad).append(current)
            current = None
    return ok, bad


#: storescu proposes uncompressed transfer syntaxes unless told otherwise, and cannot decompress on the fly,
#: so a compressed file is sent as it is stored, the way a PACS sends it, with the matching proposal flag.
_PROPOSE_FLAG = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE lossless
    "1.2.840.10008.1.2.1.99": "-xd",  # deflated explicit VR little endian
}


def propose_flag(path: Path) -> list[str]:
    """The storescu option that proposes ``path``'s own (compressed) transfer syntax, if it needs one."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return []
    return [_PROPOSE_FLAG[ts]] if ts in _PROPOSE_FLAG else []


def storescu(
    port: int,
    files: list[Path],
    *,
    called: str = "EDGE",
    calling: str = "TESTSCU",
    flags: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            *(flags or []),
            "-aet",
            calling,
            "-aec",
            called,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )


def echo(port: int, *, called: str = "EDGE", calling: str = "TESTSCU") -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu to the port, with what it said."""
    return subprocess.run(
        [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=30,
    )


def echoscu(port: int, *, called: str = "EDGE", calling: str = "TESTSCU") -> bool:
    return echo(port, called=called, calling=calling).returncode == 0


@dataclass
class Storescp:
    """dcmtk storescp standing in for the PACS that receives results."""

    port: int
    out: Path
    proc: subprocess.Popen[bytes]
    ae_title: str = "PACS"

    def files(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Storescp]:
    out = tmp_path / "pacs"
    out.mkdir()
    log = (tmp_path / "storescp.log").open("wb")
    deadline = time.time() + 10
    proc: subprocess.Popen[bytes] | None = None
    port = 0
    while True:
        if proc is None or proc.poll() is not None:
            # A free port can be taken (by any outgoing connection's ephemeral port) before storescp binds
            # it: storescp then exits at once with "Address already in use", and another port is tried.
            port = free_port()
            proc = subprocess.Popen(
                [dcmtk("storescp"), "-od", str(out), "-aet", "PACS", str(port)],
                stdout=log,
                stderr=log,
                env=DCMTK_ENV,
            )
        answer = echo(port, called="PACS")
        if answer.returncode == 0:
            break
        if time.time() > deadline:
            proc.kill()
            log.flush()
            said = (tmp_path / "storescp.log").read_text(errors="replace")[-2000:]
            why = f"echoscu said: {answer.stderr[-1000:]}\nstorescp's log ends: {said}"
            pytest.fail(f"storescp did not answer an echo within 10 s; {why}")
        time.sleep(0.1)
    yield Storescp(port, out, proc)
    proc.terminate()
    proc.wait(10)
    log.close()


@dataclass
class EdgeProcess:
    """A real ``fedclinic-edge serve`` subprocess with its own data dir and config file."""

    root: Path
    port: int
    env: dict[str, str]
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def start(self, timeout: float = 30.0) -> None:
        log_path = self.root / f"edge-{len(self.logs)}.log"
        self.logs.append(log_path)
        log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(EDGE_BIN), "serve", "--config", str(self.config)], stdout=log, stderr=log, env=self.env
        )
        log.close()
        deadline = time.time() + timeout
        while not echoscu(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"edge node did not start:\n{self.log_text()}")
            time.sleep(0.1)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EDGE_BIN), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return int(self.proc.returncode)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(f"file:{self.data_dir / 'edge.sqlite3'}?mode=ro", uri=True, timeout=30)
        try:
            return list(conn.execute(sql, args).fetchall())
        finally:
            conn.close()

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no study waits or runs and the outbox is empty."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            busy = self.query(
                "SELECT COUNT(*) FROM studies WHERE state IN ('received', 'queued', 'processing')"
            )[0][0]
            pending = self.query("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")[0][0]
            if busy == 0 and pending == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"edge node not idle after {timeout} s:\n{self.log_text()[-4000:]}")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process it started, still running (a node and its receiver processes)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):  # each thread lists the children it started
        try:
            children += [int(c) for c in task.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return [pid, *(p for child in children for p in process_tree(child))]


def process_runs(pid: int) -> bool:
    """Whether process ``pid`` runs (neither gone nor a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def peak_rss(pid: int) -> int:
    """Peak resident memory (VmHWM) of ``pid`` and of its running children, added up (a bound on the
    node's peak: its receiver processes hold what they receive)."""
    total = 0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))
    return total


def write_config(path: Path, **values: object) -> None:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        elif isinstance(value, list):
            items = []
            for v in value:
                if isinstance(v, dict):
                    inner = ", ".join(
                        f"{k} = {v2!r}" if isinstance(v2, int) else f'{k} = "{v2}"' for k, v2 in v.items()
                    )
                    items.append("{" + inner + "}")
                else:
                    items.append(f'"{v}"')
            lines.append(f"{key} = [{', '.join(items)}]")
        else:
            lines.append(f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")


def until(condition: Callable[[], bool], within: float = 20.0) -> bool:
    """Poll ``condition`` every 50 ms until it holds (True) or ``within`` seconds pass (False)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


#: The spool reserve of a node a test starts in its own process: 8 slots, so the reserve's path runs without
#: writing the 1 GiB of zeros a clinic's node keeps (two receiving processes of 512 MiB). Those processes get
#: an environment without FEDCLINIC_EDGE_*, so tests/conftest.py's setting does not reach them.
TEST_SPOOL_RESERVE_BYTES = 8 * 1024 * 1024


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Build (not start) edge processes: ``edge_factory(**settings)``; all are stopped at the end."""
    made: list[EdgeProcess] = []

    def make(**settings: object) -> EdgeProcess:
        root = tmp_path / f"edge{len(made)}"
        root.mkdir()
        port = free_port()
        values: dict[str, object] = {
            "ae_title": "EDGE",
            "port": port,
            "page_port": free_port(),
            "data_dir": str(root / "data"),
            "quiet_seconds": 2.0,
            "providers": ["CPUExecutionProvider"],
            "log_level": "INFO",
            "spool_reserve_bytes": TEST_SPOOL_RESERVE_BYTES,
        }
        values.update(settings)
        config = root / "edge.toml"
        write_config(config, **values)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDCLINIC_EDGE_")}
        env["OMP_NUM_THREADS"] = "1"
        edge = EdgeProcess(root=root, port=port, env=env, config=config)
        made.append(edge)
        return edge

    yield make
    for edge in made:
        if edge.alive():
            edge.stop()


def copy_bundle(src: TrustedBundle, dest: Path) -> TrustedBundle:
    shutil.copytree(src.bundle, dest / "bundle")
    shutil.copy(src.public_key, dest / "hub.pub")
    return TrustedBundle(dest / "bundle", dest / "hub.pub")


def make_signed_bundle(root: Path, key: Ed25519PrivateKey, *, version: str = "1.0.0", seed: int = 0) -> Path:
    """A small signed bundle (linear model, CT/CR/DX/MR) for model-slot tests (the real one: test_bundle)."""
    made = make_bundle(root, modalities=("CT", "CR", "DX", "MR"), seed=seed)
    manifest = made.manifest.model_copy(update={"model_version": version})
    data = manifest.canonical_bytes()
    (root / "manifest.json").write_bytes(data)
    (root / "manifest.sig").write_bytes(key.sign(data))
    return root


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A fresh hub key pair: the private key and the path of its PEM public key."""
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "hub.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub
