"""Codes used by the DICOM Structured Reports: the private coding scheme and standard codes.

No standard (DCM, SCT, LOINC) concept exists for the CXR-Lung-Risk or CXR-Age estimates, so
they are coded in a private coding scheme whose designator starts with ``99`` (PS3.3
C.12.1.1.2.1 / PS3.16 8.1: designators beginning with "99" are reserved for private schemes).
Every SR declares the scheme in its Coding Scheme Identification Sequence (0008,0110).

Code values are Short Strings (at most 16 characters); code meanings are Long Strings (at
most 64 characters).
"""
from __future__ import annotations

from pydicom.sr.coding import Code

__all__ = [
    "CODING_SCHEME_DESIGNATOR",
    "CODING_SCHEME_NAME",
    "CODING_SCHEME_VERSION",
    "CODING_SCHEME_RESPONSIBLE_ORGANIZATION",
    "CxrCodes",
    "StandardCodes",
]

#: Private coding scheme designator (SH) declared in (0008,0110) of every SR.
CODING_SCHEME_DESIGNATOR = "99CXRLR"
#: Human-readable name of the private coding scheme (Coding Scheme Name, ST).
CODING_SCHEME_NAME = "CXR-Lung-Risk open implementation private codes"
#: Version of the private coding scheme (Coding Scheme Version, SH).
CODING_SCHEME_VERSION = "1"
#: Organisation responsible for the private scheme (Coding Scheme Responsible Organization, ST).
CODING_SCHEME_RESPONSIBLE_ORGANIZATION = "cxr-lung-risk open implementation"


class CxrCodes:
    """Concepts of the private scheme ``99CXRLR``."""

    #: The CXR-Lung-Risk ensemble estimate (years; Weiss et al., Nat. Commun. 2023).
    CXR_LUNG_RISK = Code("CXRLR-0001", CODING_SCHEME_DESIGNATOR, "CXR-Lung-Risk")
    #: The CXR-Age estimate (years; Raghu et al., JACC CV Imaging 2021).
    CXR_AGE = Code("CXRLR-0002", CODING_SCHEME_DESIGNATOR, "CXR-Age")
    #: Prefix of the code values of per-member raw outputs (``CXRLR-M`` + 8 hex digits of
    #: the SHA-256 of "<parent code value>/<member name>"; see ``content.member_concept``).
    MEMBER_PREFIX = "CXRLR-M"


class StandardCodes:
    """Standard codes (DCM, SCT, UCUM) used by the reports."""

    #: TID 1500 document title (CID 7021).
    IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
    #: Procedure reported (CID 100 has no entry for this; the generic SCT concept).
    IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
    #: UCUM "a" (Julian year), the unit of both estimates.
    YEAR = Code("a", "UCUM", "year")
    #: UCUM "1": dimensionless (raw network outputs).
    NO_UNITS = Code("1", "UCUM", "no units")
    #: UCUM "{pixels}" (image library entry rows/columns).
    PIXELS = Code("{pixels}", "UCUM", "pixels")
    #: UCUM "mm".
    MILLIMETER = Code("mm", "UCUM", "millimeter")
    #: TID 1600 / 1601 / 1602 / 1603 concepts.
    IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
    IMAGE_LIBRARY_GROUP = Code("126200", "DCM", "Image Library Group")
    SOURCE = Code("260753009", "SCT", "Source")
    MODALITY = Code("121139", "DCM", "Modality")
    STUDY_DATE = Code("111060", "DCM", "Study Date")
    STUDY_TIME = Code("111061", "DCM", "Study Time")
    CONTENT_DATE = Code("111018", "DCM", "Content Date")
    CONTENT_TIME = Code("111019", "DCM", "Content Time")
    PIXEL_DATA_ROWS = Code("110910", "DCM", "Pixel Data Rows")
    PIXEL_DATA_COLUMNS = Code("110911", "DCM", "Pixel Data Columns")
    PATIENT_ORIENTATION_ROW = Code("111044", "DCM", "Patient Orientation Row")
    PATIENT_ORIENTATION_COLUMN = Code("111043", "DCM", "Patient Orientation Column")
    HORIZONTAL_PIXEL_SPACING = Code("111026", "DCM", "Horizontal Pixel Spacing")
    VERTICAL_PIXEL_SPACING = Code("111066", "DCM", "Vertical Pixel Spacing")
    #: TID 1500 containers (used when reading reports back).
    IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")
    MEASUREMENT_GROUP = Code("125007", "DCM", "Measurement Group")
