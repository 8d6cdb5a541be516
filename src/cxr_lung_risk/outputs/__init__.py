"""Outputs of the pipeline: CSV rows, DICOM Structured Reports (``outputs.sr``) and images."""
