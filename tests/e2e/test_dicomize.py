"""The hub's MedMNIST → DICOM wrapping and the edge's manifest preprocessing agree exactly on the pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from edge_node.analysis.preprocessing import preprocess
from edge_node.protocol.manifest import Preprocessing
from tests.support.dicomgen import WINDOW_CENTER, WINDOW_WIDTH, dicomize_images, medmnist_studies, wrap_image


def test_wrapped_cr_gives_the_training_input(tmp_path: Path, shared_data: Path) -> None:
    written = medmnist_studies("pneumoniamnist", "test", [0, 1, 2, 623], tmp_path, root=shared_data)
    with np.load(shared_data / "medmnist" / "pneumoniamnist.npz", allow_pickle=False) as npz:
        images = np.asarray(npz["test_images"])
    mean, std = 0.5719, 0.1684
    for rules in (["header_window", "bit_depth"], ["bit_depth"]):
        pre = Preprocessing(modalities=["CR", "DX"], voi=rules, size=(28, 28), mean=[mean], std=[std])
        for item in written:
            ds = pydicom.dcmread(item.path)
            got = preprocess(ds, pre).tensor[0]
            want = ((images[item.index].astype(np.float64) / 255.0 - mean) / std).astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_wrapped_instance_is_a_complete_synthetic_cr(tmp_path: Path) -> None:
    image = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28).astype(np.uint8)
    (a, b) = dicomize_images(np.stack([image, image]), tmp_path, dataset="pneumoniamnist", split="val")
    ds = pydicom.dcmread(a.path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (ds.Modality, ds.SOPClassUID) == ("CR", "1.2.840.10008.5.1.4.1.1.1")
    assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME2", 8)
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (WINDOW_CENTER, WINDOW_WIDTH)
    assert (
        str(ds.PatientName) == "SYNTHETIC^PNEUMONIAMNIST" and ds.PatientID == "SYN-pneumoniamnist-val-00000"
    )
    assert ds.PatientIdentityRemoved == "YES"
    np.testing.assert_array_equal(ds.pixel_array, image)
    # Every image is its own study with fresh UIDs.
    assert len({a.study_instance_uid, b.study_instance_uid}) == 2
    assert len({a.sop_instance_uid, b.sop_instance_uid, a.series_instance_uid, b.series_instance_uid}) == 4


def test_wrap_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="uint8 grey"):
        wrap_image(np.zeros((28, 28, 3), np.uint8), dataset="retinamnist", split="test", index=0)
    with pytest.raises(ValueError, match="not supported"):
        wrap_image(np.zeros((28, 28), np.uint8), dataset="x", split="test", index=0, modality="MR")
