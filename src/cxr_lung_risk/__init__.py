"""CXR-Lung-Risk and CXR-Age: a faithful pure-PyTorch implementation (research use only).

Layers, top to bottom (a module imports only from below; the contract is ``[tool.importlinter]``
in pyproject.toml, the README's layout table says which module does what):

* ``cli`` -> adapters (``predict``, ``cluster`` = ``--engine ray``, ``serve/``, ``demo``, ``merge``)
* ``jobs``: the one job runner (plan -> prepare -> score -> write -> account) under every way in
* ``sources``/``options``/``dicomweb`` (what a job is given) -> ``api`` (the stable facade)
* ``scoring``/``resume`` -> the models (``engine``, ``age``; ``registry``, ``fetch``, ``weights``, ``archs``)
* ``outputs/`` (tables, SR, SC, saliency maps) -> ``differentiable``/``runtime``
* ``pipeline`` -> ``dicom_io`` -> ``preprocess``/``transforms`` -> ``records``/``spec``/``errors``
"""

__version__ = "0.1.0"
