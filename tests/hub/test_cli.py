"""The real hub CLI commands, end to end: train -> keys -> export -> keys show, and data list/download."""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.signing import fingerprint, load_public_keys
from hub.cli import app as hub_app
from hub.data.medmnist import DATA_ENV, OFFICIAL_MD5


def _app() -> typer.Typer:
    """The CLI exactly as `fedclinic-hub` runs it."""
    return hub_app


@pytest.fixture()
def runner(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv(DATA_ENV, str(shared_data))
    return CliRunner()


def test_train_export_and_show_key(runner: CliRunner, tmp_path: Path) -> None:
    app = _app()
    run = tmp_path / "runs" / "x"
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "student_cnn_s",
            "--dataset",
            "pneumoniamnist",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--max-train-samples",
            "512",
            "--seed",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "val_auc" in result.output and (run / "best" / "model.safetensors").is_file()
    best_before = (run / "best" / "model.safetensors").read_bytes()

    # A second run into the same folder is refused (the first run is kept) unless --force replaces it.
    again = ["train", "--model", "student_cnn_s", "--dataset", "pneumoniamnist", "--epochs", "1"]
    again += ["--out", str(run), "--max-train-samples", "256", "--seed", "3"]
    result = runner.invoke(app, again)
    assert result.exit_code == 1 and "already holds a run" in result.output and "--force" in result.output
    assert (run / "best" / "model.safetensors").read_bytes() == best_before
    result = runner.invoke(app, [*again, "--force"])
    assert result.exit_code == 0, result.output
    assert (run / "best" / "model.safetensors").read_bytes() != best_before

    result = runner.invoke(app, ["keys", "create", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    private = tmp_path / "keys" / "hub.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600

    bundle = tmp_path / "bundles" / "pneumonia-1.0.0"
    result = runner.invoke(
        app,
        [
            "export",
            "--checkpoint",
            str(run / "best"),
            "--key",
            str(private),
            "--out",
            str(bundle),
            "--model-version",
            "1.0.0",
            "--no-int8",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and "test AUC fp32" in result.output and "not requested" in result.output
    assert "input envelope" in result.output and "of test images outside" in result.output
    assert "its grey-value part" in result.output and "widened by 4 augmented copies" in result.output

    trusted = load_public_keys(tmp_path / "keys" / "hub.pub")
    verified = verify_bundle(bundle, trusted)
    assert verified.manifest.model_version == "1.0.0"
    assert verified.manifest.model_id == "pneumonia-student_cnn_s"
    assert [f.path for f in verified.manifest.files] == ["model.onnx"]

    # --zip --format json: the report is one JSON document, and the zip is a bundle the edge accepts.
    bundle2 = tmp_path / "bundles" / "pneumonia-1.0.1"
    export2 = ["export", "--checkpoint", str(run / "best"), "--key", str(private), "--out", str(bundle2)]
    result = runner.invoke(
        app,
        [
            *export2,
            "--model-version",
            "1.0.1",
            "--no-int8",
            "--zip",
            "--envelope-copies",
            "0",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model_version"] == "1.0.1" and report["shipped"] == ["model.onnx"]
    assert report["zip"] == str(tmp_path / "bundles" / "pneumonia-1.0.1.zip") and report["int8"] is None
    assert 0.5 < report["test_auc_fp32"] <= 1.0 and report["key_fingerprint"] == fingerprint(trusted[0])
    manifest = verify_bundle(bundle2, trusted).manifest
    assert manifest.envelope is not None and report["envelope"] == {
        "quantile": manifest.envelope.quantile,
        "fitted_on": manifest.envelope.fitted_on,
        "folds": manifest.envelope.folds,
        "test_outside": manifest.provenance.metrics["test_outside_envelope_fp32"],
        "intensity": True,
        "test_outside_intensity": manifest.provenance.metrics["test_outside_intensity"],
        "augmented_copies": 0,
    }
    from_zip = verify_bundle(Path(report["zip"]), trusted, extract_to=tmp_path / "unzipped")
    assert from_zip.manifest == verify_bundle(bundle2, trusted).manifest

    result = runner.invoke(app, ["keys", "show", str(tmp_path / "keys" / "hub.pub")])
    assert result.exit_code == 0, result.output
    assert fingerprint(trusted[0]) in result.output
    result = runner.invoke(app, ["keys", "show", str(private), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "file": str(private),
        "kind": "private",
        "algorithm": "Ed25519",
        "fingerprint": fingerprint(trusted[0]),
    }
    result = runner.invoke(app, ["keys", "show", str(private)])
    assert result.exit_code == 0 and fingerprint(trusted[0]) in result.output

    # Resume to epoch 2 from the CLI, then refuse a second key pair over the first.
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "student_cnn_s",
            "--dataset",
            "pneumoniamnist",
            "--epochs",
            "2",
            "--out",
            str(run),
            "--resume",
            str(run / "last"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "epoch 1/2" not in result.output
    result = runner.invoke(app, ["keys", "create", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_cli_errors_say_what_to_do(runner: CliRunner, tmp_path: Path) -> None:
    app = _app()
    result = runner.invoke(
        app, ["train", "--model", "nope", "--dataset", "pneumoniamnist", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "student_cnn_s" in result.output and "teacher_cnn_l" in result.output
    result = runner.invoke(
        app, ["train", "--model", "student_cnn_s", "--dataset", "cifar10", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "pneumoniamnist" in result.output and "breastmnist" in result.output

    keys_dir = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "create", "--out", str(keys_dir)]).exit_code == 0
    checkpoint = tmp_path / "run" / "best"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")  # only the pre-checks run: each must stop the export

    def export(key: Path, out: Path, version: str) -> Result:
        args = ["export", "--checkpoint", str(checkpoint), "--key", str(key), "--out", str(out)]
        return runner.invoke(app, [*args, "--model-version", version], env={"COLUMNS": "300"})

    result = export(keys_dir / "hub.key", tmp_path / "b", "1.0")
    assert result.exit_code == 2 and "not a semantic version" in result.output and "1.0.0" in result.output
    (tmp_path / "taken").mkdir()
    result = export(keys_dir / "hub.key", tmp_path / "taken", "1.0.0")
    assert result.exit_code == 2 and "already exists" in result.output
    result = export(keys_dir / "hub.pub", tmp_path / "b", "1.0.0")
    assert result.exit_code == 2 and "public key" in result.output and "hub.key" in result.output
    result = export(keys_dir / "missing.key", tmp_path / "b", "1.0.0")
    assert result.exit_code == 2 and "--key" in result.output
    not_a_checkpoint = ["export", "--checkpoint", str(tmp_path), "--key", str(keys_dir / "hub.key")]
    not_a_checkpoint += ["--out", str(tmp_path / "b"), "--model-version", "1.0.0"]
    result = runner.invoke(app, not_a_checkpoint, env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "not a checkpoint" in result.output
    assert not (tmp_path / "b").exists()
    result = runner.invoke(app, ["keys", "show", str(tmp_path / "missing.pub")])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_data_list_checks_md5(runner: CliRunner, shared_data: Path) -> None:
    result = runner.invoke(_app(), ["data", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pneumoniamnist" in result.output and "official" in result.output
    assert "MISMATCH" not in result.output
    result = runner.invoke(_app(), ["data", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["root"] == str(shared_data / "medmnist")
    by_name = {d["name"]: d for d in doc["datasets"]}
    assert sorted(by_name) == sorted(OFFICIAL_MD5)
    pneumonia = by_name["pneumoniamnist"]
    assert (
        pneumonia["present"] and pneumonia["md5_official"] and pneumonia["labels"] == ["normal", "pneumonia"]
    )
    assert pneumonia["size_bytes"] == (shared_data / "medmnist" / "pneumoniamnist.npz").stat().st_size


class _FileServer(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        return


@pytest.fixture()
def file_server(shared_data: Path) -> Iterator[tuple[str, type[_FileServer]]]:
    handler = type(
        "Handler", (_FileServer,), {"body": (shared_data / "medmnist" / "breastmnist.npz").read_bytes()}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{{name}}.npz", handler
    finally:
        server.shutdown()
        server.server_close()


def test_data_download_over_loopback_http_checks_md5(
    runner: CliRunner, tmp_path: Path, file_server: tuple[str, type[_FileServer]]
) -> None:
    url, _ = file_server
    result = runner.invoke(_app(), ["data", "download", "breastmnist", "--root", str(tmp_path), "--url", url])
    assert result.exit_code == 0, result.output
    saved = tmp_path / "medmnist" / "breastmnist.npz"
    assert hashlib.md5(saved.read_bytes(), usedforsecurity=False).hexdigest() == OFFICIAL_MD5["breastmnist"]

    # The server sends breastmnist's bytes for any name: the md5 check must refuse them as pneumoniamnist.
    result = runner.invoke(
        _app(), ["data", "download", "pneumoniamnist", "--root", str(tmp_path), "--url", url]
    )
    assert result.exit_code == 1 and "md5 mismatch" in result.output
    assert not (tmp_path / "medmnist" / "pneumoniamnist.npz").exists()
    assert not list((tmp_path / "medmnist").glob(".*part"))


def test_data_download_offline_gives_a_clear_error(runner: CliRunner, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{{name}}.npz"
    result = runner.invoke(
        _app(),
        ["data", "download", "pneumoniamnist", "--root", str(tmp_path), "--url", url, "--timeout", "5"],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 1
    assert "download failed" in result.output and "offline" in result.output
    assert not list((tmp_path / "medmnist").iterdir())


def test_data_download_refuses_unknown_names(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(_app(), ["data", "download", "imagenet", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "imagenet" in result.output and "pneumoniamnist" in result.output
