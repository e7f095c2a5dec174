"""The source header as highdicom gets it, and the patient/study values a result carries back exactly.

Real headers omit Type 2 elements (no PatientName, no ReferringPhysicianName, no StudyTime, ...) or carry
values that do not conform to their VR. highdicom reads those attributes unconditionally, parses dates and
times, checks person names (and logs a warning that quotes a name it finds ambiguous: PHI in a log line).
So highdicom gets a view of the source in which every Type 2 patient/study attribute is present, empty
when the source lacks it or when its value does not conform, and person names end in "^" (PS3.5 6.2.1:
the same name, trailing component delimiters may be omitted). The result then gets the source's exact
conforming values back, so the PACS files it under the same patient byte for byte, and the rest empty,
which is what Type 2 means.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import VALIDATORS

__all__ = [
    "DEIDENTIFICATION_NOT_STATED",
    "PERSON_NAME_KEYWORDS",
    "TYPE2_KEYWORDS",
    "conforming",
    "for_highdicom",
    "restore_source",
]

#: The PN attributes highdicom checks when it copies a source's patient and study modules.
PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")
#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) every result carries.
TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: The Patient module's de-identification attributes (PS3.3 C.7.1.1): a result says what its source says.
_DEIDENTIFICATION_KEYWORDS = ("DeidentificationMethod", "DeidentificationMethodCodeSequence")
#: DeidentificationMethod when the source says PatientIdentityRemoved YES without naming a method: the
#: attribute is Type 1C then, and the result must not invent a method the source did not state.
DEIDENTIFICATION_NOT_STATED = "identity removed by the source; method not stated by the source"
_SPECIFIC_CHARACTER_SET = 0x00080005
#: Enumerated values (PS3.3 C.7.1.1): highdicom refuses anything else.
_PATIENT_SEX = frozenset({"M", "F", "O"})


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _date_ok(text: str) -> bool:
    # highdicom parses the value into a date: YYYYMMDD that is a real calendar day.
    if len(text) != 8 or not _digits(text):
        return False
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def _time_ok(text: str) -> bool:
    # HH[MM[SS[.F{1,6}]]] within range; the old ACR-NEMA "HH:MM:SS" form is not accepted by highdicom.
    whole, _, frac = text.partition(".")
    if not _digits(whole) or len(whole) not in (2, 4, 6) or (frac and not (_digits(frac) and len(frac) <= 6)):
        return False
    parts = [int(whole[i : i + 2]) for i in range(0, len(whole), 2)]
    limits = (23, 59, 60)
    return all(p <= lim for p, lim in zip(parts, limits, strict=False))


def _person_name_ok(text: str) -> bool:
    # PS3.5 6.2: up to three component groups of up to five components, 64 characters per group, no
    # control characters but ESC (ISO 2022 code extensions). pydicom does not check a decoded PersonName.
    groups = text.split("=")
    return len(groups) <= 3 and all(
        len(g) <= 64 and len(g.split("^")) <= 5 and all(c == "\x1b" or c.isprintable() for c in g)
        for g in groups
    )


_EXTRA_CHECKS: dict[str, Callable[[str], bool]] = {
    "PatientName": _person_name_ok,
    "ReferringPhysicianName": _person_name_ok,
    "PatientBirthDate": _date_ok,
    "StudyDate": _date_ok,
    "StudyTime": _time_ok,
    "PatientSex": lambda text: text in _PATIENT_SEX,
}


def conforming(ds: Dataset, keyword: str) -> DataElement | None:
    """The element ``keyword`` of ``ds`` when it is present, single-valued and conforms to its VR, else None.

    Never raises and never warns for a broken value (a warning would quote it); the reason is not kept,
    since it would have to name the value.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            elem = ds[tag]
            value = elem.value
            vr = dictionary_VR(tag)
            if vr != elem.VR or elem.VM > 1 or value is None or value == "":
                return None
            text = str(value)
            validator = VALIDATORS.get(vr)
            if validator is not None and not validator(vr, value)[0]:
                return None
    except Exception:  # undecodable bytes, a bad charset, a value pydicom cannot convert
        return None
    check = _EXTRA_CHECKS.get(keyword)
    if check is not None and not check(text):
        return None
    return elem


def _needs_caret(elem: DataElement) -> bool:
    text = str(elem.value)
    return bool(text) and "^" not in text


def for_highdicom(ds: Dataset, *, pixels: bool = True) -> Dataset:
    """A shallow view of ``ds`` (the source untouched) with every Type 2 patient/study attribute safe to read.

    ``pixels=False`` leaves out the pixel data group (highdicom deep-copies its SR evidence).
    """
    view = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning about a broken value would quote it
        for key in list(ds.keys()):
            if not pixels and key.group == 0x7FE0:
                continue
            try:
                elem = ds[key]  # converts a raw element
            except Exception:
                # A value pydicom cannot convert (unknown VR, bad length, ...) is left out of what highdicom
                # sees: the result never needs it, and reading it would fail the whole study.
                continue
            if key == _SPECIFIC_CHARACTER_SET and elem.is_empty:
                # Empty means the default repertoire, as no element does; highdicom refuses the empty value.
                continue
            view.add(elem)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    for keyword in TYPE2_KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        vr = dictionary_VR(tag)
        kept = conforming(ds, keyword)
        if kept is None:
            # New elements: assigning to a shared one would change the source dataset.
            view.add(DataElement(tag, vr, None))
        elif keyword in PERSON_NAME_KEYWORDS and _needs_caret(kept):
            view.add(DataElement(tag, vr, f"{kept.value}^"))
    return view


def restore_source(result: Dataset, source: Dataset) -> None:
    """Put the source's exact conforming patient/study values into ``result``, the other Type 2 ones empty."""
    for keyword in TYPE2_KEYWORDS:
        tag = tag_for_keyword(keyword)
        assert tag is not None
        kept = conforming(source, keyword)
        result.add(DataElement(tag, dictionary_VR(tag), None if kept is None else kept.value))
    _restore_deidentification(result, source)


def _restore_deidentification(result: Dataset, source: Dataset) -> None:
    """PatientIdentityRemoved and, when it is YES, the method (Type 1C), as the source states them."""
    for keyword in ("PatientIdentityRemoved", *_DEIDENTIFICATION_KEYWORDS):
        if keyword in result:
            del result[keyword]
    removed = conforming(source, "PatientIdentityRemoved")
    if removed is None or str(removed.value) not in ("YES", "NO"):
        return
    result.PatientIdentityRemoved = str(removed.value)
    if removed.value != "YES":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warning about a broken value would quote it
        try:
            method = source.get("DeidentificationMethod")
            codes = source.get("DeidentificationMethodCodeSequence")
        except Exception:  # undecodable: treated as not stated
            method = codes = None
    if method:
        result.DeidentificationMethod = method
    if codes:
        result.DeidentificationMethodCodeSequence = codes
    if not method and not codes:
        result.DeidentificationMethod = DEIDENTIFICATION_NOT_STATED
