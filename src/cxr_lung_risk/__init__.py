"""CXR-Lung-Risk and CXR-Age: a faithful pure-PyTorch implementation (research use only).

Stages, one module each, data flowing one way:
``discovery``/``dicom_io`` (DICOM reading and selection) -> ``preprocess`` (the published
dcmj2pnm + ImageMagick recipe) -> ``transforms`` (fastai's validation transform) ->
``archs``/``weights``/``engine`` (networks and ensembles) -> ``outputs`` (CSV, DICOM SR, images).
"""

__version__ = "0.1.0"
