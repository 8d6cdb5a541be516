"""CXR-Lung-Risk's home: the ensemble (load members once, score batches of 224x224 images), its
SR measurements, its algorithm identification and its saliency target (:class:`LungRiskModel`,
built by :func:`load_model`; see :mod:`cxr_lung_risk.registry`).

``score = sum_i w_i * pred_i + intercept`` with the LASSO weights and intercept from the spec.
Members with weight 0 are neither loaded nor run unless ``all_members=True``.

Performance (see ``benchmarks/README.md`` for the measurements behind each choice):

* loading: every architecture is built once on the meta device and its module tree copied per
  member (no parameter initialisation, no allocation); weights are memory-mapped and assigned in
  place; the member files are prefetched into the page cache in parallel while the first
  members are built (cold-disk load is then close to warm).
* inference: eval mode, ``torch.inference_mode``, one batch through all members in turn (each
  member's weights are streamed once per batch), each architecture in the layout that measures
  faster on this CPU (:mod:`cxr_lung_risk.layout`): ``fast`` = BatchNorm2d folded into the
  preceding convolution (in float64, rounded once to float32) and channels_last
  activations and weights (oneDNN's NHWC path on the CPU, tensor-core layout on CUDA), or
  ``plain`` = the published layout (on some AVX2-only CPUs the faster one). Decided at load time,
  cached per machine, recorded as the ``layout`` parameter.
* precision: float32 by default, and IEEE float32 on CUDA too: cuDNN would otherwise run float32
  convolutions in TF32 (10-bit mantissa) on Ampere and newer GPUs, PyTorch's default, so every
  forward pass runs under :func:`fp32_math`. ``precision='tf32'`` (CUDA only) allows TF32
  explicitly. ``precision='bf16'`` (CPU or CUDA) or ``'fp16'`` (CUDA only)
  runs each member's convolutional body under autocast while its head (pooling, BatchNorm1d,
  Linear layers) stays float32, so that the outputs are not rounded to 8 mantissa bits. It is an
  explicit option, never a default: its error against float32 is reported by the benchmark.
* CUDA: the uint8 batch is pinned, copied asynchronously, normalised on the GPU.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import archs
from .differentiable import input_format
from .errors import WeightsError, WeightsNotFoundError
from .layout import CACHE_NAME, MARGIN, LayoutCache, LayoutChoice, cpu_key, describe, requested_layout, time_alternating
from .runtime import PRECISIONS, fp32_math, placement, resolve_device, resolve_precision
from .spec import EnsembleSpec, Member, lung_risk_spec
from .transforms import normalize
from .weights import WeightSource, load_into, state_dict_nbytes

__all__ = [
    "LungRiskModel",
    "load_model",
    "PRECISIONS",
    "fp32_math",
    "resolve_device",
    "resolve_precision",
    "LungRiskEnsemble",
    "EnsembleResult",
    "build_member",
    "fold_batchnorm",
    "optimize_for_inference",
    "split_body_head",
]

_MEMBER_FILE = re.compile(r"^(?P<stem>.+)_(?P<idx>\d+)\.pth$")


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d, memory_format: torch.memory_format) -> None:
    """Fold an eval-mode BatchNorm2d into the convolution before it: computed in float64 and
    rounded once to float32 (folding in float32 rounded twice: members' outputs moved by up to
    1.19e-5 from the published layout's on the held images, 1.10e-5 now; the rest is the
    channels_last kernels' accumulation order)."""
    w = conv.weight.detach()
    scale = bn.weight.detach().double() * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    folded = torch.empty_like(w, dtype=torch.float32, memory_format=memory_format)
    folded.copy_(w.double() * scale.view(-1, 1, 1, 1))
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = ((bias - bn.running_mean.detach().double()) * scale + bn.bias.detach().double()).float()
    conv.weight = nn.Parameter(folded, requires_grad=False)
    conv.bias = nn.Parameter(new_bias, requires_grad=False)


_NAMED_PAIRS = (("conv", "bn"), ("conv1", "bn1"), ("conv2", "bn2"))


def fold_batchnorm(model: nn.Module, *, memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into it; return how many were folded.

    Recognised pairs: attributes ``conv``/``bn`` (InceptionV4's BasicConv2d), ``conv1``/``bn1`` and
    ``conv2``/``bn2`` (ResNet blocks), and a Conv2d immediately followed by a BatchNorm2d inside an
    ``nn.Sequential`` (ResNet stem and downsample, Tiny). These are exactly the places where the
    architectures apply the BN to the convolution's output and nothing else reads it. The BN is
    replaced by ``nn.Identity``, so state-dict keys change: fold only a loaded model.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model")
    n = 0
    for mod in list(model.modules()):
        for c, b in _NAMED_PAIRS:
            conv, bn = getattr(mod, c, None), getattr(mod, b, None)
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                _fold_pair(conv, bn, memory_format)
                setattr(mod, b, nn.Identity())
                n += 1
        if isinstance(mod, nn.Sequential):
            keys = list(mod._modules.keys())
            for k1, k2 in zip(keys, keys[1:]):
                conv, bn = mod._modules[k1], mod._modules[k2]
                if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                    _fold_pair(conv, bn, memory_format)
                    mod._modules[k2] = nn.Identity()
                    n += 1
    return n


def _tensor_ptrs(model: nn.Module) -> set[int]:
    return {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.device.type == "cpu"}


def _own_storage(model: nn.Module, loaded: set[int]) -> None:
    """Give every parameter/buffer whose data pointer is in ``loaded`` its own memory.

    The loaded tensors share storage with the memory-mapped weight file; once the big conv
    weights have been replaced by folded copies, the file's pages that were read stay resident
    for as long as any small tensor (BN1d, head) still points into the mapping. Cloning those
    small tensors lets the mapping go, so peak RSS holds one copy of the weights, not two.
    """
    for mod in model.modules():
        for name, t in list(mod._parameters.items()):
            if t is not None and t.data_ptr() in loaded:
                mod._parameters[name] = nn.Parameter(t.detach().clone(), requires_grad=False)
        for name, t in list(mod._buffers.items()):
            if t is not None and t.data_ptr() in loaded:
                mod._buffers[name] = t.clone()


def optimize_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """Eval mode, no grads, BN folded, 4-D weights in channels_last (in place; returns ``model``).

    When anything is converted, every tensor is also detached from the (memory-mapped) file it
    was loaded from (see :func:`_own_storage`).
    """
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    loaded = _tensor_ptrs(model) if (fold_bn or channels_last) else set()
    if fold_bn:
        fold_batchnorm(model, memory_format=fmt)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if loaded:
        _own_storage(model, loaded)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def split_body_head(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(convolutional body, head) of a member: ``Sequential(body, head)`` for the fastai cnn
    learners, ``mdl[:first Linear]`` / ``mdl[first Linear:]`` for Tiny; else (model, None)."""
    if isinstance(model, nn.Sequential) and len(model) == 2:
        return model[0], model[1]
    mdl = getattr(model, "mdl", None)
    if isinstance(mdl, nn.Sequential):
        mods = list(mdl)
        cut = next((i for i, m in enumerate(mods) if isinstance(m, nn.Linear)), None)
        if cut:
            return mdl[:cut], mdl[cut:]
    return model, None


_TEMPLATES: dict[tuple[str, int], nn.Module] = {}


def _meta_template(architecture: str, n_out: int) -> nn.Module:
    """One meta-device instance per architecture; members are structural copies of it."""
    key = (architecture, n_out)
    if key not in _TEMPLATES:
        with torch.device("meta"):
            _TEMPLATES[key] = archs.build(architecture, n_out)
    return _TEMPLATES[key]


def _clone_structure(module: nn.Module) -> nn.Module:
    """A new module tree with the same classes and settings, sharing the (meta) tensors.

    Every module object and every container in its ``__dict__`` (``_parameters``, ``_buffers``,
    ``_modules``, the hook dicts, ``_non_persistent_buffers_set``) is new, so assigning weights or
    registering hooks on the copy never touches the template; the tensors themselves are the
    template's meta tensors, which ``load_state_dict(assign=True)`` replaces. 10x faster than
    ``copy.deepcopy`` (which reduces every meta tensor) and 15x faster than re-running the
    constructors.
    """
    new = module.__class__.__new__(module.__class__)
    state = {}
    for k, v in module.__dict__.items():
        if k == "_modules":
            state[k] = {n: (_clone_structure(c) if c is not None else None) for n, c in v.items()}
        elif isinstance(v, (dict, set, list)):
            state[k] = v.copy()
        else:
            state[k] = v
    new.__dict__.update(state)
    return new


def build_member(
    member: Member,
    source: WeightSource,
    *,
    device: torch.device | None = None,
    fold_bn: bool = False,
    channels_last: bool = False,
) -> nn.Module:
    """Build a member's network on the meta device and assign its (memory-mapped) weights.

    With the defaults the module has the published state-dict layout (saliency, tests); the
    ensemble's own inference copy passes ``fold_bn``/``channels_last`` (see
    :func:`optimize_for_inference`).
    """
    model = _clone_structure(_meta_template(member.architecture, member.num_outputs))
    state = source.load(member.file, expected_bytes=state_dict_nbytes(model))
    load_into(model, state, f"{source.location}/{member.file}" if source.kind == "dir" else f"{source.location}!{member.file}", assign=True)
    optimize_for_inference(model, fold_bn=fold_bn, channels_last=channels_last)
    if device is not None and device.type != "cpu":
        model.to(device)
    return model


@dataclass
class EnsembleResult:
    scores: np.ndarray  # (N,) float64, years
    per_member: np.ndarray  # (N, M) float64 raw member outputs, columns = members


class LungRiskEnsemble:
    """The loaded ensemble. Build with :meth:`load`."""

    def __init__(
        self,
        spec: EnsembleSpec,
        members: Sequence[Member],
        models: Sequence[nn.Module],
        device: torch.device,
        *,
        precision: str = "fp32",
        layouts: dict[str, LayoutChoice] | None = None,
    ) -> None:
        self.spec = spec
        self.members = tuple(members)
        self.models = list(models)
        self.placement = placement(device, precision)
        self.device = self.placement.device
        self.precision = self.placement.precision
        self.amp_dtype = self.placement.amp_dtype
        self.allow_tf32 = self.placement.allow_tf32
        # each network's own input layout (architectures may run in different layouts)
        self._formats = [input_format(m) for m in self.models]
        self.layouts = dict(layouts or {})
        self._parts = [split_body_head(m) for m in self.models]
        self._w = np.array([m.weight for m in self.members], dtype=np.float64)

    @classmethod
    def load(
        cls,
        weights: str | Path,
        *,
        spec: EnsembleSpec | None = None,
        all_members: bool = False,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool | None = None,
        fold_bn: bool | None = None,
        prefetch: bool = True,
        layout: str | None = None,
    ) -> "LungRiskEnsemble":
        """Load the members (non-zero LASSO weight only unless ``all_members``) for inference.

        ``precision``: ``fp32`` (default, IEEE float32 also on CUDA, exact within float32
        reordering), ``tf32`` (CUDA only), ``bf16`` or ``fp16`` (CUDA only) for the convolutional
        bodies. ``layout``: ``auto`` (default; ``$CXR_LUNG_RISK_LAYOUT`` overrides it), ``fast`` or
        ``plain`` (see :mod:`cxr_lung_risk.layout`; the choice per architecture is in
        ``self.layouts``). ``fold_bn`` / ``channels_last`` (benchmarks): set both layout
        ingredients explicitly for every member instead (``fold_bn``: BatchNorm2d folded into the
        convolutions: state-dict keys then differ from the published files).
        ``prefetch``: have the kernel read all member files in parallel first (see
        :meth:`WeightSource.prefetch`); off only to measure what it saves.
        """
        spec = spec or lung_risk_spec()
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        resolve_precision(precision, dev)  # refuse before loading 1 GB
        source = WeightSource(weights)
        check_member_files(spec, source)
        members = spec.active_members(all_members)
        missing = [m.file for m in members if not source.has(m.file)]
        if missing:
            raise WeightsError(
                f"{source.location}: missing {len(missing)} member file(s): {', '.join(missing[:5])}"
                + (" ..." if len(missing) > 5 else "")
            )
        if prefetch:
            source.prefetch([m.file for m in members])
        if fold_bn is not None or channels_last is not None:  # explicit ingredients (benchmarks)
            fb = True if fold_bn is None else bool(fold_bn)
            cl = True if channels_last is None else bool(channels_last)
            name = "fast" if fb and cl else "plain" if not (fb or cl) else f"fold_bn={fb}, channels_last={cl}"
            chosen = {m.architecture: LayoutChoice(m.architecture, name, "requested") for m in members}
            models = [build_member(m, source, device=dev, fold_bn=fb, channels_last=cl) for m in members]
        else:
            chosen, models = _build_in_layouts(members, source, dev, precision, requested_layout(layout))
        return cls(spec, members, models, dev, precision=precision, layouts=chosen)

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _run(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.models[i](x)
        body, head = self._parts[i]
        with self._autocast():
            f = body(x)
        if head is None:
            return f.float()
        return head(f.float())

    @torch.inference_mode()
    def member_outputs(self, x: torch.Tensor, on_member: Callable[[int], None] | None = None) -> torch.Tensor:
        """Raw outputs (N, M) for a normalised float32 batch (N, 3, 224, 224); ``on_member(i)``
        is called after member ``i`` has run (progress)."""
        x = x.to(self.device, non_blocking=True)
        views: dict[torch.memory_format, torch.Tensor] = {}
        outs = []
        with fp32_math(self.allow_tf32):
            for i in range(len(self.models)):
                fmt = self._formats[i]
                if fmt not in views:
                    views[fmt] = x.contiguous(memory_format=fmt) if x.ndim == 4 else x
                outs.append(self._run(i, views[fmt])[:, 0].float())
                if on_member is not None:
                    on_member(i)
        return torch.stack(outs, 1)

    def combine(self, per_member: np.ndarray) -> np.ndarray:
        """LASSO combination in float64: ``per_member @ w + intercept``."""
        return per_member.astype(np.float64) @ self._w + self.spec.intercept

    def predict_uint8(self, batch_u8: torch.Tensor, on_member: Callable[[int], None] | None = None) -> EnsembleResult:
        """Score a uint8 NCHW batch of 224x224 RGB crops (normalised on the model's device)."""
        if self.device.type == "cuda" and not batch_u8.is_pinned():
            batch_u8 = batch_u8.pin_memory()
        x = normalize(batch_u8.to(self.device, non_blocking=True), self.spec.mean, self.spec.std)
        per = self.member_outputs(x, on_member).cpu().double().numpy()
        return EnsembleResult(self.combine(per), per)


CALIBRATION_BATCH = 4  # images per timed pass when choosing a layout


def _layout_cache() -> LayoutCache:
    from .fetch import cache_dir

    try:
        return LayoutCache(cache_dir() / CACHE_NAME)
    except Exception:  # noqa: BLE001 - no usable cache folder: measure every time
        return LayoutCache(None)


def _measure_layouts(arch: str, plain: nn.Module, fast: nn.Module) -> LayoutChoice:
    """Time one member of ``arch`` in both layouts on this CPU; ``plain`` only if clearly faster."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CALIBRATION_BATCH, 3, 224, 224, generator=g)
    xs = {"plain": x, "fast": x.contiguous(memory_format=torch.channels_last)}
    nets = {"plain": plain, "fast": fast}
    with torch.inference_mode(), fp32_math():
        s = time_alternating({k: (lambda k=k: nets[k](xs[k])) for k in ("fast", "plain")}, rounds=2)
    ms = {k: 1000 * v / CALIBRATION_BATCH for k, v in s.items()}
    return LayoutChoice(arch, "plain" if ms["plain"] < ms["fast"] * (1 - MARGIN) else "fast", "measured", ms)


def _build_in_layouts(members: Sequence[Member], source: WeightSource, dev: torch.device, precision: str,
                      request: str) -> tuple[dict[str, LayoutChoice], list[nn.Module]]:
    """Build every member in its architecture's layout (``request``: auto | fast | plain).

    ``auto`` on the CPU in float32: the cached choice for this CPU, else the first member of each
    architecture is built both ways and timed (:func:`_measure_layouts`; the loser is dropped and
    the answer cached). CUDA and reduced precision always run ``fast``.
    """
    from .progress import say

    chosen: dict[str, LayoutChoice] = {}
    models: list[nn.Module] = []
    measure = request == "auto" and dev.type == "cpu" and str(precision).lower() == "fp32"
    cache, key = (_layout_cache(), cpu_key()) if measure else (None, "")
    for m in members:
        arch = m.architecture
        if arch not in chosen:
            if not measure:
                chosen[arch] = LayoutChoice(arch, "fast" if request == "auto" else request, "device" if request == "auto" else "requested")
            elif (hit := cache.get(key, arch)) is not None:
                chosen[arch] = hit
            else:
                say(f"timing both inference layouts of {arch} on this CPU (once per machine; cached) ...")
                plain = build_member(m, source, device=dev, fold_bn=False, channels_last=False)
                fast = build_member(m, source, device=dev, fold_bn=True, channels_last=True)
                choice = chosen[arch] = _measure_layouts(arch, plain, fast)
                cache.put(key, choice)
                say(f"  {arch}: {choice.layout} (fast {choice.ms_per_image['fast']:.0f} ms/image, "
                    f"plain {choice.ms_per_image['plain']:.0f} ms/image)")
                models.append(fast if choice.layout == "fast" else plain)
                continue
        fast_layout = chosen[arch].layout == "fast"
        models.append(build_member(m, source, device=dev, fold_bn=fast_layout, channels_last=fast_layout))
    return chosen, models


def check_member_files(spec: EnsembleSpec, source: WeightSource) -> None:
    """Refuse a weights folder/zip whose member files do not match the spec's count."""
    stems = {_MEMBER_FILE.match(m.file).group("stem") for m in spec.members if _MEMBER_FILE.match(m.file)}
    known = {m.file for m in spec.members}
    found = {n for n in source.filenames() if (mm := _MEMBER_FILE.match(n)) and mm.group("stem") in stems}
    extra = sorted(found - known)
    if extra:
        raise WeightsError(
            f"{source.location}: holds {len(found)} member files but the spec lists {len(spec.members)} "
            f"(unexpected: {', '.join(extra[:3])}); is this the right weights folder?"
        )


class LungRiskModel:
    """CXR-Lung-Risk as the pipeline sees it (:class:`cxr_lung_risk.registry.Model`).

    Columns: ``CXR_Lung_Risk`` and, with ``per_model``, each member's raw output
    ``Lung_Age_081221_<i>``.
    """

    def __init__(self, ensemble: LungRiskEnsemble, *, per_model: bool = False, weights_identity: dict | None = None) -> None:
        self.ensemble = ensemble
        self.spec = ensemble.spec
        self.placement = ensemble.placement
        self.per_model = bool(per_model)
        self.weights_identity = dict(weights_identity or {})
        self.columns = [self.spec.column] + (ensemble.member_names if self.per_model else [])

    @property
    def title(self) -> str:
        return self.spec.title

    @property
    def layouts(self) -> dict[str, LayoutChoice]:
        """The inference layout per architecture and how it was chosen (:mod:`cxr_lung_risk.layout`)."""
        return self.ensemble.layouts

    def score(self, batch_u8: torch.Tensor, on_step: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
        """``on_step(f)``: a further fraction ``f`` of this batch's work is done (progress)."""
        n = len(self.ensemble.models)
        res = self.ensemble.predict_uint8(batch_u8, None if on_step is None else (lambda i: on_step(1.0 / n)))
        out = {self.spec.column: res.scores}
        if self.per_model:
            for j, name in enumerate(self.ensemble.member_names):
                out[name] = res.per_member[:, j]
        return out

    def measurements(self, row: dict) -> list:
        from .outputs.sr import CxrCodes, measurement_from_spec

        members = {n: float(row[n]) for n in self.ensemble.member_names if n in row} if self.per_model else None
        from .risk_groups import lung_risk_groups

        groups, value = lung_risk_groups(), float(row[self.spec.column])
        code = groups.code(value)  # the risk group as a coded qualitative evaluation (99CXRLR)
        evaluation = (*groups.concept, *code) if code and groups.concept else None
        return [measurement_from_spec(self.spec, CxrCodes.CXR_LUNG_RISK, value, members, evaluation)]

    def algorithm(self, extra: dict[str, str] | None = None):
        from .outputs.sr import algorithm_info

        params = dict(self.placement.parameters())
        params["layout"] = describe(self.ensemble.layouts)
        if len(self.ensemble.members) != len(self.spec.active_members()):
            params["all_members"] = "true"
        params.update(extra or {})
        return algorithm_info(self.spec, params, self.weights_identity)

    def saliency_target(self):
        """The LASSO-combined score ``sum_i w_i f_i(x) + b``, differentiated one member at a time."""
        from .differentiable import ensemble_target

        return ensemble_target(self.ensemble)


def load_model(options=None) -> LungRiskModel:
    """Find the weights (``options.weights`` or the fetch-weights cache) and load the ensemble."""
    from .fetch import find_lung_risk_weights, weights_identity
    from .registry import ModelOptions

    o = options or ModelOptions()
    loc = find_lung_risk_weights(o.weights)
    if loc is None:
        if o.weights:
            raise WeightsNotFoundError(f"CXR-Lung-Risk weights not found at {o.weights}")
        raise WeightsNotFoundError(
            "no CXR-Lung-Risk weights found: run `cxr-lung-risk fetch-weights` "
            "(downloads Zenodo record 7941660, 2.16 GB) or pass --weights FOLDER_OR_ZIP "
            "(or try the tool on synthetic weights: `cxr-lung-risk demo --out DIR` once, then add --demo-weights)"
        )
    ens = LungRiskEnsemble.load(loc, all_members=o.all_members, device=o.device, precision=o.precision)
    return LungRiskModel(ens, per_model=o.per_model, weights_identity=weights_identity(Path(loc)))
