"""Person names handed to highdicom: unambiguous for its checks, restored exactly in the result object.

highdicom warns about a person name with a single component (no "^": "A002304", common in anonymised data)
and quotes the name in the warning text. A warning is a log line, and a log line must never carry PHI. So
highdicom gets a view of the source whose names end in "^" (PS3.5 6.2.1: the same name, trailing component
delimiters may be omitted), and the result gets the source's exact value back afterwards, so the PACS files
it under the same patient, byte for byte.
"""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

__all__ = ["PERSON_NAME_KEYWORDS", "for_highdicom", "restore_names"]

#: The PN attributes highdicom checks when it copies a source's patient and study modules.
PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")


def _needs_caret(value: object) -> bool:
    text = str(value) if value is not None else ""
    return bool(text) and "^" not in text


def for_highdicom(ds: Dataset, *, pixels: bool = True) -> Dataset:
    """A shallow view of ``ds`` (no element copied, the source untouched) with unambiguous person names.

    ``pixels=False`` leaves out the pixel data group (highdicom deep-copies its SR evidence).
    """
    view = Dataset()
    for elem in ds:
        if pixels or elem.tag.group != 0x7FE0:
            view.add(elem)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for keyword in PERSON_NAME_KEYWORDS:
        name = ds.data_element(keyword)
        if name is not None and name.VM == 1 and _needs_caret(name.value):
            # A new element: assigning to the shared one would change the source dataset.
            view.add(DataElement(name.tag, "PN", f"{name.value}^"))
    return view


def restore_names(result: Dataset, source: Dataset) -> None:
    """Put the source's exact person names into ``result`` (where highdicom copied them)."""
    for keyword in PERSON_NAME_KEYWORDS:
        elem = source.data_element(keyword)
        if elem is not None and keyword in result:
            result.add(DataElement(elem.tag, "PN", elem.value))
