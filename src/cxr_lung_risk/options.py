"""Typed options of the jobs (``predict``, ``preprocess``): what the CLI, the MHub modules, the PACS
node and the cluster runner fill in. Nothing below the CLI sees an argparse namespace.

:meth:`PredictOptions.validate` checks everything that can be checked without loading a model
(formats, batch size, models, that the inputs exist), so a mistake costs no start-up time.
This module imports neither torch nor pydicom.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import InputNotFoundError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .dicom_io import SelectionOptions
    from .registry import ModelOptions

__all__ = ["FORMATS", "ENGINES", "is_url", "SALIENCY_METHODS", "IM_VERSIONS", "PRECISION_CHOICES", "PredictOptions", "PreprocessOptions", "parse_formats", "default_selection"]

FORMATS = ("csv", "sr", "json", "parquet", "fhir")
ENGINES = ("local", "ray")
SALIENCY_METHODS = ("gradient", "gradcam")
IM_VERSIONS = ("6.8.9-9", "6.9.11")
#: ``--sr-class`` values (:data:`cxr_lung_risk.outputs.sr.SR_CLASSES` maps them to SOP classes):
#: Comprehensive 3D SR (IHE AI Results, the default) or Comprehensive SR.
SR_CLASS_CHOICES = ("3d", "comprehensive")
PRECISION_CHOICES = ("fp32", "tf32", "bf16", "fp16")  # = runtime.PRECISIONS (kept here: no torch import)


def default_selection() -> "SelectionOptions":
    from .dicom_io import SelectionOptions

    return SelectionOptions()


def parse_formats(text: str | Sequence[str]) -> frozenset[str]:
    """``'csv,sr'`` (or a sequence) -> the set of output formats; refuses unknown ones."""
    items = text.split(",") if isinstance(text, str) else list(text)
    fmts = {t.strip().lower() for t in items if t and t.strip()}
    bad = fmts - set(FORMATS)
    if bad or not fmts:
        raise UsageError(f"--format takes a comma-separated list among {', '.join(FORMATS)} (got {','.join(items)!r})")
    return frozenset(fmts)


def check_sr_class(sr_class: str) -> None:
    if sr_class not in SR_CLASS_CHOICES:
        raise UsageError(f"--sr-class must be one of {', '.join(SR_CLASS_CHOICES)} (got {sr_class!r})")


def check_compute(device: str, precision: str) -> None:
    """``--device`` and ``--precision`` (predict, serve)."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda (got {device!r})")
    if precision not in PRECISION_CHOICES:
        raise UsageError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}")


def is_url(text: object) -> bool:
    """``s3://...``, ``gs://...``, ``file://...``: an input read through a pyarrow/fsspec file system."""
    import re

    return isinstance(text, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _check_inputs(inputs: Sequence[Path | str]) -> None:
    if not inputs:
        raise UsageError("no INPUT given")
    for p in inputs:
        if is_url(p):
            continue
        if not (p.exists() or p.is_symlink()):
            raise InputNotFoundError(p)


def _check_common(opts) -> None:
    """What ``predict`` and ``preprocess`` check alike: workers, ImageMagick version, paths."""
    if opts.workers is not None and opts.workers < 0:
        raise UsageError("--workers must be 0 (decode in process) or more")
    if opts.im_version not in IM_VERSIONS:
        raise UsageError(f"--im-version must be one of {', '.join(IM_VERSIONS)}")
    check_sr_class(getattr(opts, "sr_class", "3d"))
    if opts.inputs or not getattr(opts, "dicomweb", ()):  # DICOMweb sources alone are enough
        _check_inputs(opts.inputs)
    if opts.out.exists() and not opts.out.is_dir():
        raise UsageError(f"--out {opts.out} exists and is not a folder")


@dataclass(frozen=True)
class PredictOptions:
    """Everything a ``predict`` run needs."""

    inputs: tuple[Path | str, ...]  # paths, or URLs (str) with engine "ray"
    out: Path
    models: tuple[str, ...] = ("lung-risk",)  # registry keys, see cxr_lung_risk.registry
    weights: Mapping[str, Path] = field(default_factory=dict)  # per model key; missing: the cache
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 16
    workers: int | None = None  # decode processes; None: cores-1 (1 to 8); 0: in this process
    follow_links: bool = False  # follow symbolic links to folders outside an input folder
    per_model: bool = False
    all_members: bool = False
    formats: frozenset[str] = frozenset({"csv", "sr"})
    deterministic: bool = False
    tta: bool = True
    saliency: bool = False
    saliency_method: str = "gradient"
    selection: "SelectionOptions" = field(default_factory=default_selection)
    im_version: str = "6.8.9-9"
    timings: Path | None = None
    progress: bool = True  # per-image progress on stderr (a bar on a terminal, log lines otherwise)
    result_image: bool = False  # a Secondary Capture showing the scores per scored DICOM image
    sr_class: str = "3d"  # "3d": Comprehensive 3D SR (IHE AIR); "comprehensive": Comprehensive SR (...88.33)
    # DICOMweb (cxr_lung_risk.dicomweb, extra [pacs]): sources "dicomweb+http(s)://.../studies/<uid>[/series/<uid>]",
    # the STOW-RS URL results are sent to after the run, and each side's HttpOptions (token, TLS)
    dicomweb: tuple[str, ...] = ()
    stow: str | None = None
    dicomweb_http: Any = None
    stow_http: Any = None
    engine: str = "local"  # local: this process; ray: a Ray cluster (cxr_lung_risk.cluster)
    ray_address: str | None = None  # None: a local Ray started for the run
    ray_actors: int | None = None  # scoring actors; None: one per GPU, else one
    shard: tuple[int, int] | None = None  # (K, N): only the inputs of shard K of N
    resume: bool = True  # keep what an earlier run into `out` finished (cxr_lung_risk.resume)
    linkage: bool = False  # PatientID, StudyDate, AccessionNumber, ViewPosition columns (identifying)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(p if is_url(p) else Path(p) for p in self.inputs))
        object.__setattr__(self, "out", Path(self.out))
        if isinstance(self.shard, str):
            from .resume import parse_shard

            object.__setattr__(self, "shard", parse_shard(self.shard))
        object.__setattr__(self, "weights", {k: Path(v) for k, v in dict(self.weights).items() if v is not None})
        object.__setattr__(self, "dicomweb", tuple(str(s) for s in self.dicomweb))
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", parse_formats(self.formats))

    @property
    def uid_policy(self) -> str:
        """How output UIDs and dates are chosen (:class:`cxr_lung_risk.outputs.base.UidPolicy`'s
        values): ``deterministic`` with --deterministic; ``stable`` with --stow (a re-sent or
        re-scored result keeps its UIDs, so the server stores nothing twice) and when the inputs
        are sharded or scored on Ray (a retried part keeps its UIDs); else ``random``."""
        if self.deterministic:
            return "deterministic"
        if self.stow or self.shard is not None or self.engine == "ray":
            return "stable"
        return "random"

    def validate(self) -> "PredictOptions":
        """Refuse what cannot work, before anything heavy is imported; returns self."""
        from .registry import resolve_models

        resolve_models(self.models)
        parse_formats(sorted(self.formats))
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        _check_common(self)
        check_compute(self.device, self.precision)
        if self.saliency_method not in SALIENCY_METHODS:
            raise UsageError(f"--saliency-method must be one of {', '.join(SALIENCY_METHODS)}")
        if self.dicomweb or self.stow:
            self._validate_dicomweb()
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.engine != "ray":
            urls = [p for p in self.inputs if is_url(p)]
            if urls:
                raise UsageError(f"object-store inputs ({urls[0]}) need --engine ray")
            if self.ray_address or self.ray_actors:
                raise UsageError("--ray-address and --ray-actors need --engine ray")
        elif self.saliency or self.result_image:
            raise UsageError("--saliency and --result-image are not available with --engine ray (run them with --engine local)")
        elif self.dicomweb or self.stow:
            raise UsageError("DICOMweb sources and --stow are not available with --engine ray (run them with --engine local)")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise UsageError("--ray-actors must be at least 1")
        if self.shard is not None:
            k, n = self.shard
            if n < 1 or not 0 <= k < n:
                raise UsageError("--shard takes K/N with 0 <= K < N")
        return self

    def _validate_dicomweb(self) -> None:
        from .dicomweb import parse_source, parse_stow_url  # standard library only until used

        import importlib.util

        if importlib.util.find_spec("dicomweb_client") is None:
            raise UsageError("DICOMweb sources and --stow need the optional packages: pip install 'cxr-lung-risk[pacs]'")
        for s in self.dicomweb:
            parse_source(s)
        if self.stow:
            parse_stow_url(self.stow)
        for h in (self.dicomweb_http, self.stow_http):
            if h is not None:
                h.validate()

    def model_options(self, key: str) -> "ModelOptions":
        """The options model ``key``'s loader takes."""
        from .registry import ModelOptions

        return ModelOptions(
            weights=self.weights.get(key),
            device=self.device,
            precision=self.precision,
            all_members=self.all_members,
            per_model=self.per_model,
            tta=self.tta,
        )

    def with_(self, **changes) -> "PredictOptions":
        return replace(self, **changes)


@dataclass(frozen=True)
class PreprocessOptions:
    """Everything a ``preprocess`` run (the authors' 8-bit PNGs) needs."""

    inputs: tuple[Path, ...]
    out: Path
    workers: int | None = None
    follow_links: bool = False
    selection: "SelectionOptions" = field(default_factory=default_selection)
    im_version: str = "6.8.9-9"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(Path(p) for p in self.inputs))
        object.__setattr__(self, "out", Path(self.out))

    def validate(self) -> "PreprocessOptions":
        _check_common(self)
        return self
