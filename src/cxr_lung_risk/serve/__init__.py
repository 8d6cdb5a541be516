"""``cxr-lung-risk serve``: a DICOM node that receives chest radiographs, scores them and sends the
results back (C-STORE and/or DICOMweb STOW-RS).

Modules: :mod:`.config` (options, YAML), :mod:`.spool` (the durable on-disk state machine:
``incoming -> scored``, outbox ``pending -> delivered``), :mod:`.scp` (the listener), :mod:`.worker`
(batches -> :mod:`cxr_lung_risk.api`), :mod:`.outbox` (delivery with retry and backoff),
:mod:`.metrics` (``/healthz`` + Prometheus ``/metrics``), :mod:`.audit` (JSON-lines audit log),
:mod:`.node` (starts and stops it all). Needs the ``[pacs]`` extra (pynetdicom, prometheus-client,
PyYAML); imported only by ``serve``.
"""
from .config import Destination, ServeConfig

__all__ = ["Destination", "ServeConfig", "run_serve"]


def run_serve(cfg: ServeConfig, *, ready=None) -> int:
    """Run the node until SIGTERM/SIGINT (or ``ready`` callback's stop); see :mod:`.node`."""
    from .node import run_serve as _run

    return _run(cfg, ready=ready)
