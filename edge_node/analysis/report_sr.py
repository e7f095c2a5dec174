"""The result as a DICOM Comprehensive SR (TID 1500 measurement report) in the source study, via highdicom.

One SR per analysed study. Each analysed source instance gets a measurement group (TID 1501) that references
it and holds the finding as a coded qualitative evaluation (present/absent) and the model score as a numeric
measurement; a multiclass model's group names its top class as the finding and adds one measurement per
class, that class's probability. The algorithm (model id and version) is named in every group and as the
device observer.

The SR's SOP Instance UID derives from the study, the model and the set of analysed instances: a re-send of
the same run (or a re-run after a crash) is the same object again, while a re-analysis after a late instance
is a new SR, which names the one it replaces in its Predecessor Documents Sequence so the PACS shows the
current result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage

from edge_node.analysis.findings import Finding
from edge_node.analysis.result_uids import result_uid
from edge_node.analysis.source_view import for_highdicom, restore_source
from edge_node.protocol.manifest import ClassLabel, Manifest
from edge_node.state.runs import ReportRef

__all__ = [
    "ENVELOPE_CODE_VALUE",
    "ENVELOPE_RATIO_CODE_VALUE",
    "MANUFACTURER",
    "NEGATIVE_CODE_VALUE",
    "PRIVATE_SCHEME",
    "SCORE_CODE_VALUE",
    "SR_SERIES_NUMBER",
    "build_sr",
    "class_concept",
    "class_probability_concept",
    "coding_scheme_identification",
    "envelope_concept",
    "envelope_ratio_concept",
    "negative_concept",
    "predecessor_item",
    "sr_series_uid",
]

logger = logging.getLogger(__name__)

MANUFACTURER = "fedclinic"
#: Private coding scheme (PS3.16 8.2: designators starting with 99 are local) for concepts without a code.
PRIVATE_SCHEME = "99FEDCLINIC"
SCORE_CODE_VALUE = "MODELSCORE"
ENVELOPE_CODE_VALUE = "INENVELOPE"
ENVELOPE_RATIO_CODE_VALUE = "ENVRATIO"
NEGATIVE_CODE_VALUE = "LOOKSNEG"
SR_SERIES_NUMBER = 9901
SERIES_DESCRIPTION = "AI result (fedclinic) - NOT FOR DIAGNOSTIC USE"


def class_concept(label: ClassLabel) -> hd.sr.CodedConcept:
    """The coded concept of a class: its manifest code (e.g. SNOMED CT) or a private code from its name."""
    if label.code_value and label.code_scheme:
        return hd.sr.CodedConcept(
            value=label.code_value,
            scheme_designator=label.code_scheme,
            meaning=label.code_meaning or label.name,
        )
    return hd.sr.CodedConcept(
        value=label.name.upper()[:16], scheme_designator=PRIVATE_SCHEME, meaning=label.name
    )


def class_probability_concept(label: ClassLabel) -> hd.sr.CodedConcept:
    """The private concept of one class's probability (a multiclass model reports every class's)."""
    meaning = (
        label.code_meaning if label.code_value and label.code_scheme and label.code_meaning else label.name
    )
    return hd.sr.CodedConcept(
        value=f"CLASSPROB{label.index}",
        scheme_designator=PRIVATE_SCHEME,
        meaning=f"Probability of {meaning}"[:64],
    )


def _score_concept(manifest: Manifest) -> hd.sr.CodedConcept:
    task = manifest.task
    target = task.classes[task.positive_class].name if task.kind == "binary" else "predicted class"
    return hd.sr.CodedConcept(
        value=SCORE_CODE_VALUE, scheme_designator=PRIVATE_SCHEME, meaning=f"Model score ({target})"
    )


def envelope_concept() -> hd.sr.CodedConcept:
    """The private concept of the envelope's Yes/No: is the image like those the model was checked on."""
    return hd.sr.CodedConcept(
        value=ENVELOPE_CODE_VALUE,
        scheme_designator=PRIVATE_SCHEME,
        meaning="Image within the model's input envelope",
    )


def envelope_ratio_concept() -> hd.sr.CodedConcept:
    """The private concept of the image's envelope distance over the envelope's threshold."""
    return hd.sr.CodedConcept(
        value=ENVELOPE_RATIO_CODE_VALUE,
        scheme_designator=PRIVATE_SCHEME,
        meaning="Input envelope distance / threshold",
    )


def negative_concept() -> hd.sr.CodedConcept:
    """The private concept of the envelope's grey-value Yes/No: does the image look like a negative of the
    images the model was checked on (a display header that says the wrong thing)."""
    return hd.sr.CodedConcept(
        value=NEGATIVE_CODE_VALUE,
        scheme_designator=PRIVATE_SCHEME,
        meaning="Image looks like a negative of the model's validation images",
    )


def _envelope_items(
    finding: Finding,
    manifest: Manifest,
    algorithm: hd.sr.AlgorithmIdentification,
    source: hd.sr.SourceImageForMeasurement,
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The group's envelope items: none without an envelope, else the ratio and the Yes/No, and with a
    grey-value part whether the image looks like a negative."""
    outside, ratio = finding.outside_envelope, finding.envelope_ratio
    if manifest.envelope is None:
        if outside is not None or ratio is not None:
            raise ValueError("a finding has an input envelope result; the model has no input envelope")
        return [], []
    if outside is None or ratio is None:
        raise ValueError("the model has an input envelope; a finding has no result for it")
    grey = manifest.envelope.intensity is not None
    if grey != (finding.negative is not None):
        raise ValueError("a finding's grey-value result does not match the model's input envelope")
    measurement = hd.sr.Measurement(
        name=envelope_ratio_concept(),
        value=float(ratio),
        unit=codes.UCUM.Ratio,
        algorithm_id=algorithm,
        referenced_images=[source],
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(name=envelope_concept(), value=codes.SCT.No if outside else codes.SCT.Yes)
    ]
    if finding.negative is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                name=negative_concept(), value=codes.SCT.Yes if finding.negative else codes.SCT.No
            )
        )
    return [measurement], evaluations


def _algorithm(manifest: Manifest) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=manifest.model_id, version=manifest.model_version, manufacturer=MANUFACTURER
    )


def _group(
    finding: Finding, manifest: Manifest, study_uid: str, index: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    task = manifest.task
    frames = [finding.frame_index + 1] if finding.number_of_frames > 1 else None
    source_for_group = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=finding.sop_class_uid,
        referenced_sop_instance_uid=finding.sop_instance_uid,
        referenced_frame_numbers=frames,
    )
    source_for_measurement = hd.sr.SourceImageForMeasurement(
        referenced_sop_class_uid=finding.sop_class_uid,
        referenced_sop_instance_uid=finding.sop_instance_uid,
        referenced_frame_numbers=frames,
    )
    algorithm = _algorithm(manifest)
    if task.kind == "binary":
        concept = class_concept(task.classes[task.positive_class])
        present = finding.present
    else:
        # Multiclass: the finding is the predicted class, reported present.
        predicted = next((c for c in task.classes if c.name == finding.label), task.classes[0])
        concept = class_concept(predicted)
        present = True
    evaluation = hd.sr.QualitativeEvaluation(
        name=concept, value=codes.SCT.Present if present else codes.SCT.Absent
    )
    score = hd.sr.Measurement(
        name=_score_concept(manifest),
        value=float(finding.score),
        unit=codes.UCUM.NoUnits,
        algorithm_id=algorithm,
        referenced_images=[source_for_measurement],
    )
    if task.kind != "binary" and finding.probabilities and len(finding.probabilities) != len(task.classes):
        raise ValueError(
            f"a finding has {len(finding.probabilities)} class probabilities; "
            f"the model has {len(task.classes)} classes"
        )
    per_class = [
        hd.sr.Measurement(
            name=class_probability_concept(label),
            value=float(p),
            unit=codes.UCUM.NoUnits,
            algorithm_id=algorithm,
            referenced_images=[source_for_measurement],
        )
        for label, p in zip(task.classes, finding.probabilities, strict=False)
    ]
    envelope_measurements, envelope_evaluations = _envelope_items(
        finding, manifest, algorithm, source_for_measurement
    )
    tracking = hd.sr.TrackingIdentifier(
        uid=result_uid(
            "sr-tracking",
            study_uid,
            manifest.model_id,
            manifest.model_version,
            finding.sop_instance_uid,
            str(finding.frame_index),
        ),
        identifier=f"finding {index + 1}",
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[score, *per_class, *envelope_measurements],
        qualitative_evaluations=[evaluation, *envelope_evaluations],
        source_images=[source_for_group],
    )


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification item (PS3.3 C.12.1) that declares our private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "fedclinic model concepts"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


def sr_series_uid(study_uid: str, manifest: Manifest) -> str:
    """The series every SR of this model version for this study goes into."""
    return result_uid("sr-series", study_uid, manifest.model_id, manifest.model_version)


def predecessor_item(study_uid: str, prior: ReportRef) -> Dataset:
    """One item of the Predecessor Documents Sequence (SOP Instance Reference Macro, PS3.3 C.17.2.3)."""
    sop = Dataset()
    sop.ReferencedSOPClassUID = ComprehensiveSRStorage
    sop.ReferencedSOPInstanceUID = prior.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = prior.series_instance_uid
    series.ReferencedSOPSequence = [sop]
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.ReferencedSeriesSequence = [series]
    return item


def sr_study_uid(sources: Sequence[Dataset], findings: Sequence[Finding]) -> str:
    """The one study the SR is about; ValueError when the sources and findings cannot make one SR."""
    if not sources or not findings:
        raise ValueError("an SR needs at least one analysed source instance and one finding")
    study_uid = str(sources[0].StudyInstanceUID)
    if any(str(ds.StudyInstanceUID) != study_uid for ds in sources):
        raise ValueError("all source instances of one SR must belong to the same study")
    known = {str(ds.SOPInstanceUID) for ds in sources}
    missing = [f.sop_instance_uid for f in findings if f.sop_instance_uid not in known]
    if missing:
        raise ValueError(f"{len(missing)} finding(s) refer to instances missing from the sources")
    return study_uid


def build_sr(
    sources: Sequence[Dataset],
    findings: Sequence[Finding],
    manifest: Manifest,
    *,
    predecessor: ReportRef | None = None,
) -> hd.sr.ComprehensiveSR:
    """An SR for one study: ``sources`` are the analysed instances' headers, ``findings`` one per source.

    Patient and study modules come from the sources (same StudyInstanceUID); the SR's series derives from
    the study UID and the model id and version, its instance also from the analysed instances (and frames),
    so a re-send is the same object and a re-analysis with more instances a new one. ``predecessor``, the SR
    an earlier run sent for this study, is referenced when it is another object.
    """
    study_uid = sr_study_uid(sources, findings)
    mid, version = manifest.model_id, manifest.model_version
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", "", mid, version),
        name=f"{mid} {version}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=mid[:64],
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    groups = [_group(f, manifest, study_uid, i) for i, f in enumerate(findings)]
    analysed = sorted(f"{f.sop_instance_uid}/{f.frame_index}" for f in findings)
    sop_uid = result_uid("sr", study_uid, mid, version, *analysed)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.cid100.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    sr = hd.sr.ComprehensiveSR(
        # Headers only (highdicom deep-copies its evidence; pixels are not evidence), with names it accepts
        # without a warning that would quote them.
        evidence=[for_highdicom(ds, pixels=False) for ds in sources],
        content=report[0],
        series_instance_uid=sr_series_uid(study_uid, manifest),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
    )
    restore_source(sr, sources[0])
    # The score concept is always a private code: a reader learns from here whose scheme 99FEDCLINIC is.
    sr.CodingSchemeIdentificationSequence = [coding_scheme_identification()]
    if predecessor is not None and predecessor.sop_instance_uid != sop_uid:
        sr.PredecessorDocumentsSequence = [predecessor_item(study_uid, predecessor)]
    return sr
