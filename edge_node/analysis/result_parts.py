"""The parts of a result document built from a template: pre-encoded elements and per-source attributes.

A template (``report_template``, ``capture_template``) keeps what every result of a model version shares as
elements encoded once; pydicom writes such raw elements as they are. What comes from each source is copied
as highdicom copies it, with highdicom's own tables of the standard, so that a template-built result equals
highdicom's construction.
"""

from __future__ import annotations

import datetime
from functools import cache

import highdicom as hd
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag

__all__ = ["acquisition_equipment", "encoded", "mark_encoded", "patient_study_tags"]


@cache
def patient_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The root attributes of the Patient and Study IEs of ``sop_class_uid``'s IOD, in highdicom's order.

    highdicom's ``copy_patient_and_study_information`` copies these; its tables of the standard are the
    source, so the two agree whatever the source's IOD.
    """
    from highdicom._standard_utils import (  # the tables highdicom itself uses
        get_iod_module_map,
        get_module_attribute_map,
        get_sop_class_iod_map,
    )

    iod = get_sop_class_iod_map()[sop_class_uid]
    modules = get_module_attribute_map()
    tags: list[BaseTag] = []
    for ie in ("Patient", "Study"):
        for module in get_iod_module_map()[iod]:
            if module["ie"] != ie:
                continue
            for item in modules[module["key"]]:
                tag = tag_for_keyword(str(item["keyword"]))
                if not item["path"] and tag is not None:
                    tags.append(BaseTag(tag))
    return tuple(tags)


@cache
def _is_image_class(sop_class_uid: str) -> bool:
    from highdicom._standard_utils import does_iod_have_pixel_data  # highdicom's own test, once per class

    try:
        return bool(does_iod_have_pixel_data(sop_class_uid))
    except KeyError:  # a class highdicom's tables do not know
        return False


def acquisition_equipment(source: Dataset) -> Dataset | None:
    """The source's acquisition equipment as highdicom's ``for_image_acquisition`` describes it, or None.

    The same item, with the image-IOD test done once per SOP class instead of once per study (it scans
    highdicom's tables, ~4 ms). None where highdicom names no equipment: not an image, or no manufacturer.
    """
    manufacturer = source.get("Manufacturer")
    if not manufacturer or not _is_image_class(str(source.SOPClassUID)):
        return None
    when = source.get("AcquisitionDateTime")
    if when is None:
        day, moment = source.get("AcquisitionDate"), source.get("AcquisitionTime")
        if isinstance(day, datetime.date) and isinstance(moment, datetime.time):
            when = datetime.datetime.combine(day, moment)
    return hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=source.get("ManufacturerModelName"),
        software_versions=source.get("SoftwareVersions"),
        device_serial_number=source.get("DeviceSerialNumber"),
        institution_name=source.get("InstitutionName"),
        institutional_department_name=source.get("InstitutionalDepartmentName"),
        institution_address=source.get("InstitutionAddress"),
        station_name=source.get("StationName"),
        contribution_datetime=when,
        contribution_description="Acquisition equipment of the source image(s)",
    )


_LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def encoded(elem: DataElement) -> RawDataElement:
    """``elem`` encoded once (explicit VR little endian, as results are written): pydicom writes raw as is."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    header = 12 if elem.VR in _LONG_HEADER_VRS else 8
    value = fp.getvalue()[header:]
    return RawDataElement(elem.tag, elem.VR, len(value), value, 0, False, True)


def mark_encoded(ds: Dataset) -> None:
    """Declare ``ds`` and its items already in the encoding results are written in.

    pydicom decodes every raw element of a dataset (to re-encode it) unless the dataset says it was read in
    the transfer syntax and character set it is written in. The shared elements are explicit VR little
    endian and ASCII, which every character set a source may name leaves unchanged.
    """
    ds.set_original_encoding(False, True, ds._character_set)
    for _, elem in ds.items():
        if isinstance(elem, DataElement) and elem.VR == "SQ":
            for item in elem.value:
                mark_encoded(item)
