"""The result image: a DICOM Secondary Capture any viewer shows, one per scored DICOM image.

A TID 1500 SR without image coordinates is invisible in many viewers (OHIF v3 among them); this
8-bit RGB Secondary Capture carries the result as pixels and as attributes:

- burned-in text: the score(s) with their names and units (``CXR-Lung-Risk: 62.3 years``,
  ``CXR-Age: 58.1 years``), the model(s) and the software version, the weights' identity
  (``published`` / ``unverified`` / ``SYNTHETIC`` with the SHA-256; synthetic weights are said in
  red, with "scores are meaningless"), and ``RESEARCH USE ONLY - NOT FOR CLINICAL USE`` in a banner;
- the 224x224 crop the networks saw (shown 2x), and with ``--saliency`` the first model's overlay
  next to it;
- the same text in ``ImageComments``, ``DerivationDescription`` and ``SeriesDescription``;
- same patient and study as the source, its own series (number 9201), deterministic UIDs with
  ``--deterministic`` (:func:`cxr_lung_risk.outputs.sc.derived_secondary_capture` builds it, as it
  builds the saliency SC: one builder, one copy of the patient/study modules).

Text is drawn with Pillow's built-in font (no font files, no network).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from .base import UidPolicy, output_path, uid_stem, write_dataset
from .sc import derived_secondary_capture

__all__ = [
    "RESEARCH_ONLY",
    "ResultValue",
    "WeightsLine",
    "result_lines",
    "render_result",
    "build_result_image",
    "result_image_filename",
    "ResultImageWriter",
]

RESEARCH_ONLY = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
SERIES_NUMBER = 9201
_NS = "result-image"
_UNITS = {"a": "years", "mo": "months", "d": "days"}
#: The derivation concept (the package's private coding scheme, declared in the object).
DERIVATION_CODE = ("CXRLR-0100", "99CXRLR", "Rendered result of a research model")

_BG = (0, 0, 0)
_FG = (235, 235, 235)
_DIM = (170, 170, 170)
_RED = (200, 20, 20)
_WARN = (255, 70, 70)
_YELLOW = (255, 220, 60)


@dataclass(frozen=True)
class ResultValue:
    """One score: ``CXR-Lung-Risk`` = 62.3 years."""

    title: str
    value: float
    unit: str  # UCUM code of the spec ("a" = years)
    note: str = ""  # a line of its own after the value (the risk group with its cut-points)

    @property
    def text(self) -> str:
        unit = _UNITS.get(self.unit, self.unit)
        return f"{self.title}: {self.value:.1f} {unit}"


@dataclass(frozen=True)
class WeightsLine:
    """Which weights made a model's score."""

    title: str
    kind: str  # published / unverified / SYNTHETIC
    sha256: str = ""

    @property
    def synthetic(self) -> bool:
        return self.kind == "SYNTHETIC"

    @property
    def text(self) -> str:
        sha = f" (sha256 {self.sha256[:16]}...)" if self.sha256 else ""
        tail = " - SCORES ARE MEANINGLESS" if self.synthetic else ""
        return f"{self.title} weights: {self.kind}{sha}{tail}"


def _group_note(spec: Any, value: float) -> str:
    """``Risk group: 65 to < 75 (groups < 65 | 65 to < 75 | >= 75 years)`` for a model with risk
    groups (``risk_groups`` in its models/*.json), else ''."""
    if "risk_groups" not in (getattr(spec, "raw", None) or {}):
        return ""
    from ..risk_groups import lung_risk_groups

    g = lung_risk_groups()
    return f"Risk group: {g.label(value)} (groups {g.describe()} years)"


def result_lines(values: Sequence[ResultValue], weights: Sequence[WeightsLine], software_version: str) -> list[str]:
    """The text of a result image, one line each (what is drawn and what ``ImageComments`` holds)."""
    lines = [RESEARCH_ONLY]
    for v in values:
        lines += [v.text] + ([v.note] if v.note else [])
    models = ", ".join(dict.fromkeys(w.title for w in weights)) or ", ".join(v.title for v in values)
    lines.append(f"Model: {models}; software cxr-lung-risk {software_version or 'unknown'}")
    lines += [w.text for w in weights]
    return lines


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: the built-in scalable font
    except TypeError:  # pragma: no cover - older Pillow: the built-in bitmap font
        return ImageFont.load_default()


def _to_rgb(image_chw: np.ndarray) -> Image.Image:
    img = np.asarray(image_chw, dtype=np.uint8)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(img), mode="RGB")


def render_result(
    image: np.ndarray,
    values: Sequence[ResultValue],
    weights: Sequence[WeightsLine],
    *,
    software_version: str = "",
    overlay: np.ndarray | None = None,
    overlay_title: str = "",
    scale: int = 2,
) -> np.ndarray:
    """The result image's pixels (H x W x 3 uint8): banner, image (+ overlay), the text lines."""
    tiles = [(_to_rgb(image), "Image the model saw (224 x 224 crop)")]
    if overlay is not None:
        tiles.append((_to_rgb(overlay), overlay_title or "Saliency overlay"))
    tile = 224 * scale
    pad = 16
    big, mid, small = _font(30), _font(22), _font(16)
    banners = [RESEARCH_ONLY] + (["SYNTHETIC WEIGHTS - THE SCORES ARE MEANINGLESS"] if any(w.synthetic for w in weights) else [])
    banner_h = 14 + 42 * len(banners)
    text = result_lines(values, weights, software_version)[1:]
    value_texts = {v.text for v in values}
    is_value = [line in value_texts for line in text]  # values in big yellow; their notes and the rest below
    line_h = [44 if v else 30 for v in is_value]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max([measure.textlength(t, font=big if is_value[i] else mid) for i, t in enumerate(text)]
                 + [measure.textlength(t, font=big) for t in banners])
    width = int(max(960, pad + len(tiles) * (tile + pad), 2 * pad + text_w + 1))
    height = banner_h + pad + 24 + tile + pad + sum(line_h) + pad + 40
    width, height = width + width % 2, height + height % 2
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)

    draw.rectangle([0, 0, width, banner_h], fill=_RED)
    for i, line in enumerate(banners):
        w = draw.textlength(line, font=big)
        draw.text(((width - w) / 2, 12 + 42 * i), line, fill=(255, 255, 255), font=big)

    y = banner_h + pad
    for i, (im, caption) in enumerate(tiles):
        x = pad + i * (tile + pad)
        draw.text((x, y), caption, fill=_DIM, font=small)
        canvas.paste(im.resize((tile, tile), Image.BILINEAR), (x, y + 24))
    y += 24 + tile + pad

    for i, (line, h) in enumerate(zip(text, line_h)):
        if is_value[i]:
            draw.text((pad, y), line, fill=_YELLOW, font=big)
        else:
            synthetic = "SYNTHETIC" in line and "weights:" in line
            draw.text((pad, y), line, fill=_WARN if synthetic else _FG, font=mid)
        y += h
    footer = "Not a medical device. Results must not be used for diagnosis or treatment."
    draw.text((pad, height - 32), footer, fill=_DIM, font=small)
    return np.asarray(canvas)


def build_result_image(
    source: Dataset,
    image: np.ndarray,
    values: Sequence[ResultValue],
    weights: Sequence[WeightsLine],
    *,
    software_version: str = "",
    deterministic: "UidPolicy | bool" = False,
    series_number: int = SERIES_NUMBER,
    **render: Any,
) -> Dataset:
    """The result image of one scored ``source`` (its dataset) and ``image`` (the uint8 3 x 224 x
    224 crop the networks saw) as a DICOM SC Image dataset; ``render``: ``overlay``,
    ``overlay_title`` (see :func:`render_result`)."""
    from .sr.content import coding_scheme_item

    if not values:
        raise ValueError("a result image needs at least one score")
    rgb = render_result(image, values, weights, software_version=software_version, **render)
    lines = result_lines(values, weights, software_version)
    titles = " + ".join(v.title for v in values)
    scores = "; ".join(v.text for v in values)
    kinds = "; ".join(w.text for w in weights)
    ds = derived_secondary_capture(
        source,
        rgb,
        what="a result image",
        series_description=f"{titles} result (research use only)",
        derivation=f"{scores}; {kinds}; cxr-lung-risk {software_version or 'unknown'}; {RESEARCH_ONLY}",
        derivation_code=DERIVATION_CODE,
        image_comments="\n".join(lines),
        uid_key=["result-image", *[v.title for v in values], *[f"{w.kind}:{w.sha256}" for w in weights], software_version],
        namespace=_NS,
        texts=lines,
        software_version=software_version,
        series_number=series_number,
        deterministic=deterministic,
    )
    ds.CodingSchemeIdentificationSequence = [coding_scheme_item()]
    ds.RecognizableVisualFeatures = "NO"
    return ds


def result_image_filename(source_sop_instance_uid: str) -> str:
    """``<source SOP Instance UID>.dcm`` (``result-<hash>.dcm`` when the UID is malformed)."""
    return f"{uid_stem(source_sop_instance_uid, prefix='result')}.dcm"


class ResultImageWriter:
    """Writes ``result/<SOPInstanceUID>.dcm`` for each scored DICOM image (an
    :class:`~cxr_lung_risk.outputs.writer.OutputWriter` part)."""

    def __init__(self, out: str | os.PathLike, models: Sequence[Any], *, deterministic: "UidPolicy | bool", names: Any) -> None:
        from .. import __version__
        from .sr import weights_parameters

        self.out = Path(out)
        self.models = list(models)
        self.deterministic = deterministic
        self.names = names
        self.version = __version__
        self.weights = []
        for m in self.models:
            params = weights_parameters(getattr(m, "weights_identity", None))
            self.weights.append(WeightsLine(m.spec.title, params["weights"], params.get("weights_sha256", "")))

    def values(self, row: dict[str, Any]) -> list[ResultValue]:
        return [ResultValue(m.spec.title, float(row[m.spec.column]), m.spec.unit, _group_note(m.spec, float(row[m.spec.column])))
                for m in self.models if m.spec.column in row]

    def write(self, p: Any, row: dict[str, Any], overlay_png: str | os.PathLike | None = None, *, result: Any = None) -> str:
        """Write the result image of prepared input ``p`` (with its scored ``row``); ``overlay_png``:
        a saliency PNG to show next to the image; ``result``: the input's
        :class:`~cxr_lung_risk.outputs.results.ImageResult` (what the SR and the table report), whose
        values and weights the image then shows. Returns the path written, relative to ``out``."""
        overlay, title = None, ""
        if overlay_png is not None:
            with Image.open(overlay_png) as im:
                overlay = np.asarray(im.convert("RGB"))
            title = f"Saliency overlay ({self.models[0].spec.title})"
        ds = build_result_image(
            p.dataset,
            p.image,
            self.values(row) if result is None else result.result_values(),
            self.weights if result is None else result.weights_lines(),
            software_version=self.version,
            overlay=overlay,
            overlay_title=title,
            deterministic=self.deterministic,
        )
        rel = self.names.claim("result/" + result_image_filename(p.uids.get("SOPInstanceUID", "")))
        write_dataset(ds, output_path(self.out, rel))
        return rel
