"""verify_bundle is the only way to a loadable bundle: a good one verifies, every bad one is refused."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_node.protocol.bundle import verify_bundle
from edge_node.protocol.errors import BundleError, IntegrityError, SchemaError, SignatureError
from edge_node.protocol.manifest import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    canonical_json,
    parse_manifest,
)
from edge_node.protocol.signing import fingerprint, load_public_key, load_public_keys, public_key_pem
from export.bundle_writer import sha256_file, zip_bundle
from export.signing import load_private_key
from tests.support.bundle import existing_bundle
from tests.support.bundle import main as bundle_builder_main

REPO = Path(__file__).resolve().parents[2]
CopyBundle = Callable[[], Path]


def _trusted(signed_bundle: tuple[Path, Path]) -> list[Ed25519PublicKey]:
    return [load_public_key(signed_bundle[1])]


def _hub_key(signed_bundle: tuple[Path, Path]) -> Ed25519PrivateKey:
    return load_private_key(signed_bundle[0].parent / "keys" / "hub.key")


def _rewrite(bundle: Path, data: dict[str, Any], key: Ed25519PrivateKey | None) -> None:
    """Write an altered manifest; with ``key`` re-sign it properly (the hub's key, or another)."""
    (bundle / MANIFEST_FILE).write_text(json.dumps(data, indent=2))
    if key is not None:
        (bundle / SIGNATURE_FILE).write_bytes(key.sign(canonical_json(data)))


def _manifest_dict(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def test_a_good_bundle_verifies(signed_bundle: tuple[Path, Path]) -> None:
    bundle, pub = signed_bundle
    verified = verify_bundle(bundle, _trusted(signed_bundle))
    assert isinstance(verified.manifest, Manifest)
    assert verified.key_fingerprint == fingerprint(load_public_key(pub))
    assert len(verified.key_fingerprint) == 16
    assert verified.model_path == bundle.resolve() / "model.onnx"
    assert verified.variant_path("int8") == bundle.resolve() / "model.int8.onnx"
    assert verified.variant_path("fp16") is None
    entry = verified.manifest.file("model.onnx")
    assert verified.path_of(entry).is_file()
    with pytest.raises(IntegrityError, match="not a file of this bundle"):
        verified.path_of("manifest.json")
    with pytest.raises(AttributeError):
        verified.root = Path("/")  # type: ignore[misc]


def test_a_good_zip_bundle_verifies(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    archive = zip_bundle(signed_bundle[0], tmp_path / "bundle.zip")
    verified = verify_bundle(archive, _trusted(signed_bundle), extract_to=tmp_path / "x")
    assert verified.root == (tmp_path / "x").resolve()
    assert sha256_file(verified.model_path) == verified.manifest.file("model.onnx").sha256


def test_tampered_model_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"'model\.onnx' does not match its sha256"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_grown_int8_variant_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    with (bundle / "model.int8.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match=r"'model\.int8\.onnx' has \d+ bytes"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_missing_file_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    (bundle / "model.int8.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"'model\.int8\.onnx' is missing"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_tampered_manifest_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    data = _manifest_dict(bundle)
    data["task"]["decision_threshold"] = 0.01  # report pneumonia for everyone
    _rewrite(bundle, data, key=None)
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_manifest_signed_by_another_key_is_refused(
    signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle
) -> None:
    bundle = bundle_copy()
    _rewrite(bundle, _manifest_dict(bundle), key=Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError, match=fingerprint(load_public_key(signed_bundle[1]))):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_wrong_trusted_key_is_refused(signed_bundle: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(signed_bundle[0], [Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(SignatureError, match="no trusted hub keys"):
        verify_bundle(signed_bundle[0], [])


def test_missing_signature_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    (bundle / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match=r"no manifest\.sig: the bundle is unsigned"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_truncated_signature_is_refused(signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle) -> None:
    bundle = bundle_copy()
    (bundle / SIGNATURE_FILE).write_bytes((bundle / SIGNATURE_FILE).read_bytes()[:63])
    with pytest.raises(SignatureError):
        verify_bundle(bundle, _trusted(signed_bundle))


@pytest.mark.parametrize("resign", [True, False], ids=["signed-by-hub", "unsigned-edit"])
def test_unsupported_schema_version_is_refused_as_such(
    signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle, resign: bool
) -> None:
    bundle = bundle_copy()
    data = _manifest_dict(bundle)
    data["schema_version"] = 2
    data["new_field_of_v2"] = {"x": 1}  # would fail v1 validation: the version must be checked first
    _rewrite(bundle, data, key=_hub_key(signed_bundle) if resign else None)
    with pytest.raises(SchemaError, match="schema version 2 is not supported by this edge"):
        verify_bundle(bundle, _trusted(signed_bundle))


@pytest.mark.parametrize(
    "evil", ["../outside.onnx", "/etc/passwd", "sub/../../x", "a\\..\\b", "C:model.onnx"]
)
def test_path_traversal_in_file_entries_is_refused(
    signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle, evil: str
) -> None:
    bundle = bundle_copy()
    data = _manifest_dict(bundle)
    data["files"].append({**data["files"][0], "path": evil})
    _rewrite(bundle, data, key=_hub_key(signed_bundle))  # even a properly signed manifest
    with pytest.raises(IntegrityError, match="is unsafe"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_symlink_out_of_the_bundle_is_refused(
    signed_bundle: tuple[Path, Path], bundle_copy: CopyBundle, tmp_path: Path
) -> None:
    bundle = bundle_copy()
    outside = tmp_path / "outside.onnx"
    (bundle / "model.onnx").rename(outside)
    os.symlink(outside, bundle / "model.onnx")
    with pytest.raises(IntegrityError, match="resolves outside the bundle"):
        verify_bundle(bundle, _trusted(signed_bundle))


def test_zip_with_traversal_member_is_refused_and_writes_nothing_outside(
    signed_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in signed_bundle[0].iterdir():
            zf.write(path, arcname=path.name)
        zf.writestr("../escaped.txt", b"gotcha")
    dest = tmp_path / "deep" / "x"
    with pytest.raises(IntegrityError, match="is unsafe"):
        verify_bundle(archive, _trusted(signed_bundle), extract_to=dest)
    assert not (tmp_path / "deep" / "escaped.txt").exists()


def test_zip_with_symlink_member_is_refused(signed_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("model.onnx")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(IntegrityError, match="contains a link"):
        verify_bundle(archive, _trusted(signed_bundle), extract_to=tmp_path / "x")


def test_not_a_bundle_is_refused(tmp_path: Path, signed_bundle: tuple[Path, Path]) -> None:
    with pytest.raises(SchemaError, match=r"no manifest\.json"):
        verify_bundle(tmp_path, _trusted(signed_bundle))
    with pytest.raises(BundleError, match="neither a bundle directory nor a zip"):
        verify_bundle(tmp_path / "nothing", _trusted(signed_bundle))


def test_trusted_keys_load_from_a_directory_of_pub_files(
    signed_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "trusted"
    keys.mkdir()
    (keys / "a-old.pub").write_bytes(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    (keys / "b-hub.pub").write_bytes(signed_bundle[1].read_bytes())
    (keys / "notes.txt").write_text("not a key")
    loaded = load_public_keys(keys)
    assert len(loaded) == 2
    assert verify_bundle(signed_bundle[0], loaded).key_fingerprint == fingerprint(loaded[1])
    (keys / "c-bad.pub").write_text("garbage")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load_public_keys(keys)


def test_manifest_parses_from_its_own_bytes(signed_bundle: tuple[Path, Path]) -> None:
    raw = (signed_bundle[0] / MANIFEST_FILE).read_bytes()
    assert parse_manifest(raw) == verify_bundle(signed_bundle[0], _trusted(signed_bundle)).manifest


def test_bundle_verification_needs_no_torch() -> None:
    code = (
        "import sys, edge_node.protocol.bundle, edge_node.protocol.signing\n"
        "bad = [m for m in ('torch', 'hub', 'export', 'onnx') if m in sys.modules]\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_bundle_builder_cli_keeps_a_bundle_that_verifies(
    signed_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = signed_bundle[0].parent
    assert existing_bundle(out_dir) == signed_bundle
    assert bundle_builder_main([str(out_dir)]) == 0
    assert "exists and verifies" in capsys.readouterr().out
    assert existing_bundle(out_dir / "nothing-here") is None
