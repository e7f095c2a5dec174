"""What the listener accepts: the image storage SOP classes a model may read, and their transfer syntaxes."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["STORAGE_SOP_CLASSES", "TRANSFER_SYNTAXES"]

# PS3.4 Annex B.5 storage SOP classes (pynetdicom builds these names dynamically, which type checkers
# cannot see, so they are spelled out here).
ComputedRadiographyImageStorage = UID("1.2.840.10008.5.1.4.1.1.1")
CTImageStorage = UID("1.2.840.10008.5.1.4.1.1.2")
DigitalMammographyXRayImageStorageForPresentation = UID("1.2.840.10008.5.1.4.1.1.1.2")
DigitalMammographyXRayImageStorageForProcessing = UID("1.2.840.10008.5.1.4.1.1.1.2.1")
DigitalXRayImageStorageForPresentation = UID("1.2.840.10008.5.1.4.1.1.1.1")
DigitalXRayImageStorageForProcessing = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
EnhancedCTImageStorage = UID("1.2.840.10008.5.1.4.1.1.2.1")
EnhancedMRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4.1")
LegacyConvertedEnhancedCTImageStorage = UID("1.2.840.10008.5.1.4.1.1.2.2")
LegacyConvertedEnhancedMRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4.4")
MRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4")
MultiFrameGrayscaleByteSecondaryCaptureImageStorage = UID("1.2.840.10008.5.1.4.1.1.7.2")
MultiFrameGrayscaleWordSecondaryCaptureImageStorage = UID("1.2.840.10008.5.1.4.1.1.7.3")
MultiFrameSingleBitSecondaryCaptureImageStorage = UID("1.2.840.10008.5.1.4.1.1.7.1")
MultiFrameTrueColorSecondaryCaptureImageStorage = UID("1.2.840.10008.5.1.4.1.1.7.4")
SecondaryCaptureImageStorage = UID("1.2.840.10008.5.1.4.1.1.7")
UltrasoundImageStorage = UID("1.2.840.10008.5.1.4.1.1.6.1")
UltrasoundMultiFrameImageStorage = UID("1.2.840.10008.5.1.4.1.1.3.1")
XRayAngiographicImageStorage = UID("1.2.840.10008.5.1.4.1.1.12.1")

#: Image storage SOP classes the edge accepts. Anything else (SR, SEG, RT, presentation states, ...) is
#: refused at association negotiation, so the PACS learns at once that this node does not take it.
STORAGE_SOP_CLASSES: tuple[UID, ...] = (
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
TRANSFER_SYNTAXES: tuple[UID, ...] = (
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
