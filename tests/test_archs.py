"""Architectures and synthetic weights against the published state-dict contract.

The contract (tests/data/reference/cxr_lung_risk/state_dict_contract.txt) was written by fastai
2.8.12 ``learn.save`` of the original learners: an independent source for every key, shape, dtype.
"""
from __future__ import annotations

import re

import pytest
import torch

from cxr_lung_risk import archs
from cxr_lung_risk.synthetic import synthetic_state_dict


def _contract(reference_dir) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    text = (reference_dir / "cxr_lung_risk" / "state_dict_contract.txt").read_text()
    out: dict[str, list[tuple[str, tuple[int, ...], str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^## arch=(\w+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        if line.startswith("## "):
            cur = None
        if cur is None or not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        cur.append((key, tuple(int(s) for s in re.findall(r"\d+", shape)), dtype))
    return out


@pytest.fixture(scope="module")
def contract(reference_dir):
    c = _contract(reference_dir)
    assert set(c) == {"inceptionv4", "resnet34", "tiny"}
    return c


def _layout(sd) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()]


@pytest.mark.parametrize("arch", ["inceptionv4", "resnet34", "tiny"])
def test_arch_state_dict_equals_contract(arch, contract):
    with torch.device("meta"):
        model = archs.build(arch)
    assert _layout(model.state_dict()) == contract[arch]


@pytest.mark.parametrize("arch", ["inceptionv4", "resnet34", "tiny"])
def test_synthetic_state_dict_equals_contract(arch, contract):
    sd = synthetic_state_dict(arch, 1)
    assert _layout(sd) == contract[arch]
    model = archs.build(arch)
    model.load_state_dict(sd, strict=True)


def test_synthetic_is_deterministic_and_seeded():
    a = synthetic_state_dict("tiny", 5)
    b = synthetic_state_dict("tiny", 5)
    c = synthetic_state_dict("tiny", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mdl.Conv0.weight"], c["mdl.Conv0.weight"])
    # BN weight/bias ranges as documented (U[0.5, 1.0) by default)
    w = a["mdl.BN0.weight"]
    assert float(w.min()) >= 0.5 and float(w.max()) < 1.0


_LEAF = re.compile(r"^\s*\((?P<name>[^)]+)\): (?P<type>Conv2d|BatchNorm[12]d|Linear|MaxPool2d|AvgPool2d|AdaptiveAvgPool2d|AdaptiveMaxPool2d|Dropout|ReLU)\((?P<args>.*)\)$")


def _leaves(text: str) -> list[tuple[str, str, str]]:
    """Leaf layers of a module repr, with arguments normalised across torch versions."""
    out = []
    for line in text.splitlines():
        m = _LEAF.match(line)
        if not m:
            continue
        args = m.group("args").replace(", bias=True, track_running_stats", ", track_running_stats")
        if m.group("type") == "ReLU":
            args = ""  # inplace or not: no numerical effect
        out.append((m.group("name"), m.group("type"), args))
    return out


@pytest.mark.parametrize("arch", ["inceptionv4", "resnet34", "tiny"])
def test_module_tree_matches_contract(arch, reference_dir):
    """Every conv/BN/pool/linear/dropout hyper-parameter (eps, stride, padding...) as fastai built it."""
    text = (reference_dir / "cxr_lung_risk" / "state_dict_contract.txt").read_text()
    m = re.search(rf"^## module tree arch={arch}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"no module tree for {arch} in the contract"
    expected = _leaves(m.group(1))
    with torch.device("meta"):
        model = archs.build(arch)
    got = _leaves(repr(model))
    assert len(expected) > 10
    assert got == expected
