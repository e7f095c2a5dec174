"""The SR of one model version built fast: highdicom builds it once, each study fills in its own values.

highdicom validates and deep-copies its whole content tree for every document (~150 ms for one finding on
this hardware). Almost all of that tree is the same for every study of a model version: the observation
context, the procedure, the algorithm, the concepts. So a template is built once per model version with
highdicom itself (``build_sr`` on a probe image) and every study gets a new document made of

* the template's shared elements and content items (shared objects: a written dataset is never changed),
* its own patient and study attributes, copied from the source as highdicom copies them (the Patient and
  Study information entities of the source's IOD, from highdicom's tables of the standard),
* its own evidence, contributing equipment, UIDs and times,
* one measurement group per finding: the template's group for that concept, presence (and, with an input
  envelope, the image's Yes/No for it and, with its grey-value part, whether the image looks negative), with
  the probe's references, tracking UID, identifier, frame and score (and a multiclass model's class
  probabilities, and the envelope ratio) replaced by the finding's.

The result equals what ``build_sr`` makes, element by element (a test holds the two side by side on real
and minimal headers); only the creation times differ.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, DS, TM

from edge_node.analysis.findings import Finding
from edge_node.analysis.report_sr import (
    build_sr,
    coding_scheme_identification,
    predecessor_item,
    sr_series_uid,
    sr_study_uid,
)
from edge_node.analysis.result_file import ResultFile, save_result
from edge_node.analysis.result_parts import acquisition_equipment, encoded, mark_encoded, patient_study_tags
from edge_node.analysis.result_uids import result_uid
from edge_node.analysis.source_view import for_highdicom, restore_source
from edge_node.protocol.manifest import Manifest
from edge_node.state.runs import ReportRef

__all__ = ["ReportTemplate", "fast_sr", "write_fast_sr"]

#: Attributes of the document that are per study (or per moment); everything else at the top is shared.
_PER_DOCUMENT = frozenset(
    tag_for_keyword(k)
    for k in (
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContentDate",
        "ContentTime",
        "ContributingEquipmentSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "PertinentOtherEvidenceSequence",
        "PredecessorDocumentsSequence",
        "ContentSequence",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
    )
)
_CONTENT_SEQUENCE = BaseTag(0x0040A730)
_FRAME_NUMBER = BaseTag(0x00081160)
_MEASURED_VALUE = BaseTag(0x0040A300)
_FIRST_IDENTIFIER = "finding 1"  # the tracking identifier report_sr gives the first finding
_IMAGING_MEASUREMENTS = "126010"  # DCM: the container that holds the measurement groups (TID 1500)
#: The probe study's class: one highdicom knows (its references are replaced by each finding's).
_PROBE_CLASS = str(CTImageStorage)


def _code(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _prepared(ds: Dataset, values: frozenset[str], computed: frozenset[BaseTag]) -> Dataset:
    """``ds`` with every element that no study changes encoded once; the others kept to be filled in."""
    out = Dataset()
    for elem in ds:
        if elem.tag in computed or (isinstance(elem.value, str) and elem.value in values):
            out.add(elem)
        elif elem.VR == "SQ":
            items = [_prepared(i, values, computed) for i in elem.value]
            if any(_changing(i) for i in items):
                out.add(DataElement(elem.tag, "SQ", DicomSequence(items)))
            else:
                out[elem.tag] = encoded(elem)
        else:
            out[elem.tag] = encoded(elem)
    return out


def _shallow(ds: Dataset) -> Dataset:
    out = Dataset()
    for tag, elem in ds.items():
        out[tag] = elem
    return out


def _changing(ds: Dataset) -> bool:
    return any(not elem.is_raw for _, elem in ds.items())


def _fill(ds: Dataset, values: dict[str, str], computed: dict[BaseTag, Callable[[], object]]) -> Dataset:
    """A copy of a ``_prepared`` dataset with its changing elements filled in (encoded ones shared).

    A string value found in ``values`` becomes its replacement; an element whose tag is in ``computed``
    gets what its function returns.
    """
    out = Dataset()
    for tag, elem in ds.items():
        if isinstance(elem, RawDataElement):
            out[tag] = elem
            continue
        make = computed.get(tag)
        if make is not None:
            out.add(DataElement(tag, elem.VR, make()))
        elif elem.VR == "SQ":
            out.add(DataElement(tag, "SQ", DicomSequence([_fill(i, values, computed) for i in elem.value])))
        elif isinstance(elem.value, str) and elem.value in values:
            out.add(DataElement(tag, elem.VR, values[elem.value]))
        else:
            out.add(elem)
    return out


@dataclass(frozen=True)
class _GroupKey:
    concept: str
    present: bool
    frames: bool
    #: Class probabilities the group reports (multiclass; 0 for binary).
    classes: int = 0
    #: The image outside the input envelope (True), within it (False), or no envelope (None).
    envelope: bool | None = None
    #: The image looks like a negative (True), does not (False), or no grey-value part (None).
    negative: bool | None = None


class ReportTemplate:
    """What every SR of one model version shares, and the fast build of one study's SR from it."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._probe = self._probe_source()
        outside = None if manifest.envelope is None else False
        negative = None if manifest.envelope is None or manifest.envelope.intensity is None else False
        probe = self._probe_finding("", True, frames=False, outside=outside, negative=negative)
        ref = build_sr([self._probe], [probe], manifest)
        self._file_meta = ref.file_meta
        own = set(patient_study_tags(_PROBE_CLASS))
        self._shared = [encoded(e) for e in ref if e.tag not in _PER_DOCUMENT and e.tag not in own]
        root = list(ref.ContentSequence)
        last = next(i for i, item in enumerate(root) if _code(item) == _IMAGING_MEASUREMENTS)
        container = root[last]
        nothing: frozenset[str] = frozenset()
        self._root_before = [_prepared(i, nothing, frozenset()) for i in root[:last]]
        self._root_after = [_prepared(i, nothing, frozenset()) for i in root[last + 1 :]]
        self._container = [encoded(e) for e in container if e.tag != _CONTENT_SEQUENCE]
        probe_uid = str(self._probe.SOPInstanceUID)
        probe_study = str(self._probe.StudyInstanceUID)
        mid, version = manifest.model_id, manifest.model_version
        self._tracking = result_uid("sr-tracking", probe_study, mid, version, probe_uid, "0")
        self._sentinels = frozenset({probe_uid, _PROBE_CLASS, self._tracking, _FIRST_IDENTIFIER})
        self._groups: dict[_GroupKey, Dataset] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _probe_source() -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = _PROBE_CLASS
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (generate_uid() for _ in range(3))
        ds.Modality = "CT"
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
            setattr(ds, keyword, None)
        for keyword in ("StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
            setattr(ds, keyword, None)
        return ds

    def _probe_finding(
        self,
        label: str,
        present: bool,
        *,
        frames: bool,
        classes: int = 0,
        outside: bool | None = None,
        negative: bool | None = None,
    ) -> Finding:
        return Finding(
            sop_instance_uid=str(self._probe.SOPInstanceUID),
            series_instance_uid=str(self._probe.SeriesInstanceUID),
            sop_class_uid=_PROBE_CLASS,
            score=0.5,
            label=label or self.manifest.task.classes[0].name,
            present=present,
            frame_index=0,
            number_of_frames=2 if frames else 1,
            probabilities=(0.5,) * classes,
            outside_envelope=outside,
            envelope_ratio=None if outside is None else (2.0 if outside else 0.5),
            intensity_outside=negative,
            negative=negative,
        )

    def _key(self, finding: Finding) -> _GroupKey:
        task = self.manifest.task
        concept = finding.label if task.kind != "binary" else ""
        return _GroupKey(
            concept=concept,
            present=finding.present,
            frames=finding.number_of_frames > 1,
            classes=len(finding.probabilities),
            envelope=finding.outside_envelope,
            negative=finding.negative,
        )

    def _group(self, key: _GroupKey) -> Dataset:
        """The probe's measurement group for ``key``, built by highdicom the first time it is needed."""
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                probe = self._probe_finding(
                    key.concept,
                    key.present,
                    frames=key.frames,
                    classes=key.classes,
                    outside=key.envelope,
                    negative=key.negative,
                )
                ref = build_sr([self._probe], [probe], self.manifest)
                container = next(i for i in ref.ContentSequence if _code(i) == _IMAGING_MEASUREMENTS)
                computed = frozenset({_MEASURED_VALUE, _FRAME_NUMBER})
                group = _prepared(container.ContentSequence[0], self._sentinels, computed)
                self._groups[key] = group
            return group

    def _filled_group(self, finding: Finding, study_uid: str, index: int) -> Dataset:
        probe = self._probe
        m = self.manifest
        values = {
            str(probe.SOPInstanceUID): finding.sop_instance_uid,
            _PROBE_CLASS: finding.sop_class_uid,
            self._tracking: result_uid(
                "sr-tracking",
                study_uid,
                m.model_id,
                m.model_version,
                finding.sop_instance_uid,
                str(finding.frame_index),
            ),
            _FIRST_IDENTIFIER: f"finding {index + 1}",
        }
        # The group's NUM items in document order: the score, then each class's probability (multiclass), then
        # the envelope ratio (with an input envelope); each keeps its units from the template.
        numbers = [float(finding.score), *(float(p) for p in finding.probabilities)]
        if finding.envelope_ratio is not None:
            numbers.append(float(finding.envelope_ratio))
        group = self._group(self._key(finding))
        values_with_units = iter(zip(numbers, list(_measured_units(group)), strict=True))

        def measured() -> DicomSequence:
            # As highdicom's NUM content item writes a float: a decimal string and the exact double.
            value, units = next(values_with_units)
            item = Dataset()
            item.NumericValue = DS(value, auto_format=True)
            item.FloatingPointValue = value
            item.MeasurementUnitsCodeSequence = units
            return DicomSequence([item])

        computed: dict[BaseTag, Callable[[], object]] = {
            _MEASURED_VALUE: measured,
            _FRAME_NUMBER: lambda: finding.frame_index + 1,
        }
        return _fill(group, values, computed)

    def build(
        self,
        sources: Sequence[Dataset],
        findings: Sequence[Finding],
        *,
        predecessor: ReportRef | None = None,
        now: datetime.datetime | None = None,
    ) -> Dataset:
        """The SR ``build_sr`` would make for these sources and findings (same checks, same UIDs)."""
        study_uid = sr_study_uid(sources, findings)
        m = self.manifest
        analysed = sorted(f"{f.sop_instance_uid}/{f.frame_index}" for f in findings)
        sop_uid = result_uid("sr", study_uid, m.model_id, m.model_version, *analysed)
        now = now or datetime.datetime.now()
        first = for_highdicom(sources[0], pixels=False)

        sr = Dataset()
        for raw in self._shared:
            sr[raw.tag] = raw
        sr.SOPInstanceUID = sop_uid
        sr.SeriesInstanceUID = sr_series_uid(study_uid, m)
        sr.StudyInstanceUID = study_uid
        sr.InstanceCreationDate, sr.InstanceCreationTime = DA(now.date()), TM(now.time())
        sr.ContentDate, sr.ContentTime = DA(now.date()), TM(now.time())
        container = Dataset()
        for raw in self._container:
            container[raw.tag] = raw
        container.ContentSequence = [self._filled_group(f, study_uid, i) for i, f in enumerate(findings)]
        # New items around the shared encoded elements: reading one SR must not decode the template's.
        sr.ContentSequence = [
            *map(_shallow, self._root_before),
            container,
            *map(_shallow, self._root_after),
        ]
        sr.CurrentRequestedProcedureEvidenceSequence = _evidence(sources)
        charset = first.get("SpecificCharacterSet")
        if charset is not None:  # highdicom takes the character set of the first evidence
            sr.SpecificCharacterSet = charset
        for tag in patient_study_tags(str(first.SOPClassUID)):
            if tag in first:
                sr.add(first[tag])
        equipment: list[Dataset] = []
        acquisition = acquisition_equipment(first)
        if acquisition is not None:
            equipment.append(acquisition)
        equipment.append(hd.ContributingEquipment.for_highdicom())
        sr.ContributingEquipmentSequence = equipment
        restore_source(sr, sources[0])
        sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
        if predecessor is not None and predecessor.sop_instance_uid != sop_uid:
            sr.PredecessorDocumentsSequence = [predecessor_item(study_uid, predecessor)]
        meta = FileMetaDataset()
        for elem in self._file_meta:
            meta.add(elem)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sr.file_meta = meta
        mark_encoded(sr)
        return sr


def _measured_units(group: Dataset) -> Iterator[DicomSequence]:
    """The units sequence of each of the group's NUM items, in document order (shared by every document)."""
    for item in group.ContentSequence:
        if _MEASURED_VALUE in item:
            yield item[_MEASURED_VALUE].value[0].MeasurementUnitsCodeSequence


def _evidence(sources: Sequence[Dataset]) -> list[Dataset]:
    """Current Requested Procedure Evidence: the sources by series, in order of appearance, once each."""
    series: dict[str, list[Dataset]] = {}
    seen: set[str] = set()
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue
        seen.add(uid)
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        series.setdefault(str(ds.SeriesInstanceUID), []).append(item)
    series_items = []
    for uid, refs in series.items():
        entry = Dataset()
        entry.SeriesInstanceUID = uid
        entry.ReferencedSOPSequence = refs
        series_items.append(entry)
    study = Dataset()
    study.ReferencedSeriesSequence = series_items
    study.StudyInstanceUID = sources[0].StudyInstanceUID
    return [study]


_templates: dict[tuple[str, str], ReportTemplate] = {}
_templates_lock = threading.Lock()


def fast_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    manifest: Manifest,
    *,
    predecessor: ReportRef | None = None,
) -> Dataset:
    """``build_sr`` through the template of ``manifest``'s model version (built on first use)."""
    key = (manifest.model_id, manifest.model_version)
    with _templates_lock:
        template = _templates.get(key)
        if template is None or template.manifest != manifest:
            template = _templates[key] = ReportTemplate(manifest)
    return template.build(sources, findings, predecessor=predecessor)


def write_fast_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    manifest: Manifest,
    out_dir: Path,
    *,
    predecessor: ReportRef | None = None,
) -> ResultFile:
    """Build the SR through the template and write it durably into ``out_dir``."""
    return save_result(fast_sr(sources, findings, manifest, predecessor=predecessor), out_dir, "sr")
