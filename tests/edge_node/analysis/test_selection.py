"""Series selection: grouping, non-image objects, the manifest's series and frame rules, duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_node.analysis.preprocessing import SkipReason
from edge_node.analysis.selection import (
    Ignored,
    InstanceHeader,
    read_header,
    row_reason,
    select_instances,
    summarise_reasons,
)
from edge_node.protocol.manifest import Preprocessing
from edge_node.state.runs import InstanceRow

CT_PRE = Preprocessing(modalities=["CT"], size=(28, 28), mean=[0.5], std=[0.5])
CR_PRE = Preprocessing(modalities=["CR", "DX"], size=(28, 28), mean=[0.5], std=[0.5])


def _header(
    sop: str,
    *,
    series: str = "1.2.3.1",
    sop_class: str = "1.2.840.10008.5.1.4.1.1.1",
    modality: str = "CR",
    number: int | None = 1,
    frames: int = 1,
    pixels: bool = True,
    position: float | None = None,
) -> InstanceHeader:
    return InstanceHeader(
        path=Path(f"/spool/{sop}.dcm"),
        sop_class_uid=sop_class,
        sop_instance_uid=sop,
        series_instance_uid=series,
        study_instance_uid="1.2.3",
        modality=modality,
        instance_number=number,
        number_of_frames=frames,
        has_pixels=pixels,
        position=position,
    )


def _row(sop: str, sop_class: str, modality: str | None) -> InstanceRow:
    return InstanceRow(sop, "1.2.3.1", sop_class, "1.2.840.10008.1.2.1", modality, Path(f"/spool/{sop}.dcm"))


def test_real_ct_series_with_segmentation(shared_data: Path) -> None:
    folder = shared_data / "dicom" / "dcmqi_ct3slice"
    headers = [read_header(p) for p in sorted(folder.glob("*.dcm"))]
    seg = next(h for h in headers if h.path.name == "liver_seg.dcm")
    assert row_reason(_row("s", seg.sop_class_uid, seg.modality), CT_PRE, "ct-model") == (
        "Segmentation Storage is a segmentation, not an image to analyse"
    )
    images = [h for h in headers if h is not seg]
    each = select_instances(images, CT_PRE)
    assert [c.header.path.name for c in each.candidates] == ["01.dcm", "02.dcm", "03.dcm"]
    assert each.ignored == []
    middle = select_instances(images, CT_PRE.model_copy(update={"series_rule": "middle_slice"}))
    assert [c.header.path.name for c in middle.candidates] == ["02.dcm"]
    not_middle = sorted(
        i.path.name for i in middle.ignored if i.reason == "not the middle slice of its series"
    )
    assert not_middle == ["01.dcm", "03.dcm"]


def test_middle_slice_sorts_by_position_then_number() -> None:
    # Positions out of instance-number order: the middle by position is "b".
    headers = [
        _header("a", number=1, position=30.0),
        _header("b", number=2, position=10.0),
        _header("c", number=3, position=0.0),
        _header("d", number=4, position=20.0),
        _header("e", number=5, position=-5.0),
    ]
    pre = CR_PRE.model_copy(update={"series_rule": "middle_slice"})
    chosen = select_instances(headers, pre).candidates
    assert [c.header.sop_instance_uid for c in chosen] == ["b"]


def test_each_series_is_selected_separately_and_multiframe_gets_its_frame() -> None:
    headers = [
        _header("s1-1", series="1.1", number=2),
        _header("s1-0", series="1.1", number=1),
        _header("s2-0", series="1.2", frames=30, sop_class="1.2.840.10008.5.1.4.1.1.3.1", modality="DX"),
    ]
    sel = select_instances(headers, CR_PRE)
    assert [(c.header.sop_instance_uid, c.frame_index) for c in sel.candidates] == [
        ("s1-0", 0),
        ("s1-1", 0),
        ("s2-0", 15),
    ]
    first = select_instances(headers, CR_PRE.model_copy(update={"frame_rule": "first"}))
    assert first.candidates[-1].frame_index == 0


def test_non_images_and_other_modalities_are_ignored_by_their_rows() -> None:
    rows = [
        _row("img", "1.2.840.10008.5.1.4.1.1.1", "CR"),
        _row("dx", "1.2.840.10008.5.1.4.1.1.1.1", " dx"),
        _row("sr", "1.2.840.10008.5.1.4.1.1.88.33", "SR"),
        _row("sc", "1.2.840.10008.5.1.4.1.1.7", "OT"),
        _row("ct", "1.2.840.10008.5.1.4.1.1.2", "CT"),
        _row("none", "1.2.840.10008.5.1.4.1.1.1", None),
        _row("pr", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),
    ]
    reasons = {r.sop_instance_uid: row_reason(r, CR_PRE, "pneumonia-student") for r in rows}
    assert reasons == {
        "img": None,
        "dx": None,
        "sr": "Comprehensive SR Storage is a structured report, not an image",
        "sc": "Secondary Capture Image Storage is a derived image (secondary capture), not analysed",
        "ct": "modality CT not accepted by model pneumonia-student (accepts CR, DX)",
        "none": "modality (none) not accepted by model pneumonia-student (accepts CR, DX)",
        "pr": "Grayscale Softcopy Presentation State Storage is not an image",
    }


def test_an_instance_without_pixels_is_ignored() -> None:
    sel = select_instances([_header("img"), _header("nopix", pixels=False)], CR_PRE)
    assert [c.header.sop_instance_uid for c in sel.candidates] == ["img"]
    assert [(i.sop_instance_uid, i.reason) for i in sel.ignored] == [("nopix", "no pixel data")]


def test_duplicates_count_once() -> None:
    sel = select_instances([_header("x"), _header("x"), _header("y")], CR_PRE)
    assert [c.header.sop_instance_uid for c in sel.candidates] == ["x", "y"]


def test_unreadable_file_is_a_reason(tmp_path: Path) -> None:
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"this is not DICOM at all" * 10)
    with pytest.raises(SkipReason, match="not a readable DICOM file"):
        read_header(bad)


def test_read_header_of_real_multiframe(shared_data: Path) -> None:
    h = read_header(shared_data / "dicom" / "pydicom_testfiles" / "examples_ybr_color.dcm")
    assert h.number_of_frames == 30 and h.modality == "US" and h.has_pixels


def test_summarise_reasons_counts_and_orders() -> None:
    ignored = [
        Ignored(Path("a"), "1", "modality CT not accepted"),
        Ignored(Path("b"), "2", "modality CT not accepted"),
        Ignored(Path("c"), "3", "no pixel data"),
    ]
    assert summarise_reasons(ignored) == "modality CT not accepted (2 instances); no pixel data"
