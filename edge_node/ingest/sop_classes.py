"""What the listener accepts: the image storage SOP classes a model may read, and their transfer syntaxes.

UIDs as plain strings (pydicom's ``UID`` is a ``str`` too): the native transport, which receiver processes
run, then needs no pydicom (``edge_node.ingest.part10`` imports it only for the headers it cannot scan).
"""

from __future__ import annotations

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES"]

# PS3.4 Annex B.5 storage SOP classes (pynetdicom builds these names dynamically, which type checkers
# cannot see, so they are spelled out here).
ComputedRadiographyImageStorage = "1.2.840.10008.5.1.4.1.1.1"
CTImageStorage = "1.2.840.10008.5.1.4.1.1.2"
DigitalMammographyXRayImageStorageForPresentation = "1.2.840.10008.5.1.4.1.1.1.2"
DigitalMammographyXRayImageStorageForProcessing = "1.2.840.10008.5.1.4.1.1.1.2.1"
DigitalXRayImageStorageForPresentation = "1.2.840.10008.5.1.4.1.1.1.1"
DigitalXRayImageStorageForProcessing = "1.2.840.10008.5.1.4.1.1.1.1.1"
EnhancedCTImageStorage = "1.2.840.10008.5.1.4.1.1.2.1"
EnhancedMRImageStorage = "1.2.840.10008.5.1.4.1.1.4.1"
LegacyConvertedEnhancedCTImageStorage = "1.2.840.10008.5.1.4.1.1.2.2"
LegacyConvertedEnhancedMRImageStorage = "1.2.840.10008.5.1.4.1.1.4.4"
MRImageStorage = "1.2.840.10008.5.1.4.1.1.4"
MultiFrameGrayscaleByteSecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7.2"
MultiFrameGrayscaleWordSecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7.3"
MultiFrameSingleBitSecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7.1"
MultiFrameTrueColorSecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7.4"
SecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"
UltrasoundImageStorage = "1.2.840.10008.5.1.4.1.1.6.1"
UltrasoundMultiFrameImageStorage = "1.2.840.10008.5.1.4.1.1.3.1"
XRayAngiographicImageStorage = "1.2.840.10008.5.1.4.1.1.12.1"

#: Image storage SOP classes the edge accepts. Anything else (SR, SEG, RT, presentation states, ...) is
#: refused at association negotiation, so the PACS learns at once that this node does not take it.
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

#: Transfer syntaxes accepted for every class above, in order of preference. Uncompressed little endian comes
#: first so that a sender able to convert picks the cheapest one to decode. Explicit VR big endian is retired
#: (PS3.5 Annex A.3) and senders convert it to little endian when it is not offered.
ExplicitVRLittleEndian = "1.2.840.10008.1.2.1"
ImplicitVRLittleEndian = "1.2.840.10008.1.2"
DeflatedExplicitVRLittleEndian = "1.2.840.10008.1.2.1.99"
JPEGBaseline8Bit = "1.2.840.10008.1.2.4.50"
JPEGExtended12Bit = "1.2.840.10008.1.2.4.51"
JPEGLossless = "1.2.840.10008.1.2.4.57"
JPEGLosslessSV1 = "1.2.840.10008.1.2.4.70"
JPEGLSLossless = "1.2.840.10008.1.2.4.80"
JPEGLSNearLossless = "1.2.840.10008.1.2.4.81"
JPEG2000Lossless = "1.2.840.10008.1.2.4.90"
JPEG2000 = "1.2.840.10008.1.2.4.91"
RLELossless = "1.2.840.10008.1.2.5"

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
