"""Mutated DICOM instances from real files, reproducible from a seed (for the fuzz test and its bench)."""

from __future__ import annotations

import copy
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE

from edge_node.delivery.association_loop import ParkedLoop

__all__ = ["TEXT_VRS", "FuzzCase", "fuzz_cases", "send_cases", "source_files", "text_values"]

#: VRs whose values are free text an attacker or a PACS could put PHI in.
TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})
_SENDABLE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless})
_KINDS = (
    "flip",
    "truncate",
    "huge_dims",
    "wrong_vr",
    "zero_pixels",
    "odd_pixels",
    "deep_nesting",
    "rle_bomb",
    "bad_text",
    "clean",
)


@dataclass(frozen=True)
class FuzzCase:
    index: int
    kind: str
    path: Path
    sop_class_uid: str
    transfer_syntax: str


def source_files(root: Path) -> list[Path]:
    """Real single-file instances the node can be sent as they are (little endian, RLE or uncompressed)."""
    found = []
    for path in sorted(root.rglob("*")):
        # Small files keep 2,000 cases within CI time (generation is mostly copying and encoding).
        if not path.is_file() or path.stat().st_size > 150_000:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ts = ds.file_meta.TransferSyntaxUID
        except Exception:
            continue
        if ts not in _SENDABLE or "SOPClassUID" not in ds:
            continue
        full = pydicom.dcmread(path)
        try:
            _encode(copy.deepcopy(full), str(ts))  # pydicom must be able to write it back as it is
        except Exception:
            continue
        if "PixelData" in full:
            found.append(path)
    return found


def text_values(paths: list[Path]) -> set[str]:
    """The text element values (at least 5 characters) of the sources: none may appear in the node's log."""
    values: set[str] = set()

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR in TEXT_VRS and elem.value is not None:
                for v in elem.value if elem.VM > 1 else [elem.value]:
                    text = str(v).strip()
                    if len(text) >= 5:
                        values.add(text)

    for path in paths:
        walk(pydicom.dcmread(path, stop_before_pixels=True))
    return values


def _encode(ds: Dataset, ts: str) -> bytes:
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    ds.file_meta.TransferSyntaxUID = UID(ts)
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, ts == ImplicitVRLittleEndian
    write_dataset(body, ds)
    return bytes(meta.getvalue()) + bytes(body.getvalue())


def _meta_end(data: bytes) -> int:
    (length,) = struct.unpack_from("<I", data, 132 + 8)
    return 132 + 12 + int(length)


#: PackBits runs of 128 zero bytes for an 8192² frame: 1 MB that decodes to 64 MiB (and more as floats).
_BOMB_SEGMENT = bytes([0x81, 0x00]) * (8192 * 8192 // 128)


def _deep(depth: int) -> bytes:
    open_sq = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (open_sq + item) * depth + close * depth


def _mutate(rng: random.Random, kind: str, ds: Dataset, ts: str) -> tuple[bytes, str]:
    if kind == "huge_dims":
        ds.Rows, ds.Columns = rng.choice([(65535, 65535), (1, 65535), (16384, 16384)])
        if rng.random() < 0.5:
            ds.NumberOfFrames = rng.choice([2**31 - 1, 100000, 0])
    elif kind == "zero_pixels":
        ds.PixelData, ts = b"", ExplicitVRLittleEndian
    elif kind == "odd_pixels":
        ds.PixelData, ts = (
            bytes(ds.PixelData)[:-1] if len(ds.PixelData) > 1 else b"\0",
            ExplicitVRLittleEndian,
        )
    elif kind == "rle_bomb":
        side = 8192
        segment = _BOMB_SEGMENT
        ds.PixelData = pydicom.encaps.encapsulate([struct.pack("<16I", 1, 64, *([0] * 14)) + segment])
        ds["PixelData"].VR = "OB"
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.SamplesPerPixel = 8, 8, 7, 1
        ds.PhotometricInterpretation, ts = "MONOCHROME2", RLELossless
        ds.pop("NumberOfFrames", None)
    elif kind == "bad_text":
        with pydicom.config.disable_value_validation():
            ds.PatientSex, ds.PatientBirthDate = "XYZ", "notadate"
            ds.WindowCenter, ds.WindowWidth = "NaN", "inf"
    data = _encode(ds, ts if ts in _SENDABLE else ExplicitVRLittleEndian)
    start = _meta_end(data)
    if kind == "flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 12)):
            pos = rng.randrange(start, len(buf))
            buf[pos] = rng.randrange(256)
        data = bytes(buf)
    elif kind == "truncate":
        data = data[: rng.randrange(start, len(data))]
    elif kind == "wrong_vr" and ts != ImplicitVRLittleEndian:
        buf = bytearray(data)
        pos = start + 4  # the first element's VR
        buf[pos : pos + 2] = rng.choice([b"ZZ", b"SQ", b"UN", b"OB", b"xx"])
        data = bytes(buf)
    elif kind == "deep_nesting":
        data = data[:start] + _deep(rng.choice([200, 3000])) + data[start:]
    return data, str(ds.file_meta.TransferSyntaxUID)


def fuzz_cases(sources: list[Path], out: Path, n: int, seed: int, batch: int) -> Iterator[FuzzCase]:
    """``n`` mutated instances written under ``out``; each batch of ``batch`` shares a few fresh studies."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    parsed = [pydicom.dcmread(p) for p in sources]
    studies: list[str] = []
    for i in range(n):
        if i % batch == 0:
            studies = [generate_uid(prefix=None, entropy_srcs=[str(seed), str(i), str(k)]) for k in range(3)]
        source = rng.choice(parsed)
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID = rng.choice(studies)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
            prefix=None, entropy_srcs=[str(seed), "sop", str(i)]
        )
        kind = _KINDS[i % len(_KINDS)]
        original_ts = str(ds.file_meta.TransferSyntaxUID)
        try:
            data, ts = _mutate(rng, kind, ds, original_ts)
        except ValueError:  # pydicom will not encode that combination (e.g. a native value under RLE)
            kind = "flip"
            ds = copy.deepcopy(source)
            ds.StudyInstanceUID = studies[0]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
                prefix=None, entropy_srcs=[str(seed), "sop", str(i)]
            )
            data, ts = _mutate(rng, kind, ds, original_ts)
        path = out / f"case{i:05d}.dcm"
        path.write_bytes(data)
        yield FuzzCase(i, kind, path, str(ds.SOPClassUID), ts)


def send_cases(port: int, cases: list[FuzzCase], called: str = "EDGE") -> dict[int, int | None]:
    """C-STORE each case's bytes as they are (not re-encoded) in one association; status per case.

    -1: the fuzzer itself cannot send the case (no usable file meta); None: no answer. pynetdicom's
    association loop is parked while the fuzzer holds an association (``ParkedLoop``), so it cannot take a
    response meant for ``send_c_store``: a None is the node's.
    """
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    contexts = sorted({(c.sop_class_uid, c.transfer_syntax) for c in cases})
    for sop_class, ts in contexts[:128]:
        ae.add_requested_context(sop_class, ts)

    def associate() -> ParkedLoop:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            raise RuntimeError("the node refused the fuzzer's association")
        return ParkedLoop(assoc)

    answers: dict[int, int | None] = {}
    held = associate()
    try:
        for case in cases:
            if held.needs_loop() or not held.assoc.is_established:
                held.end()
                held = associate()
            try:
                status = held.assoc.send_c_store(case.path)
            except (ValueError, AttributeError, EOFError, KeyError, TypeError, OSError):
                answers[case.index] = -1
                continue
            answers[case.index] = int(status.Status) if "Status" in status else None
    finally:
        held.end()
    return answers
