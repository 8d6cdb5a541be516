"""Loading mechanics: structural copies of the meta templates, and the page-cache prefetch."""
from __future__ import annotations

import zipfile

import torch
from torch import nn

from cxr_lung_risk.engine import _clone_structure, _meta_template, build_member
from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.weights import WeightSource


def _two_members_of(arch: str):
    ms = [m for m in lung_risk_spec().members if m.architecture == arch]
    assert len(ms) >= 2, arch
    return ms[0], ms[1]


def test_members_built_from_one_template_share_nothing_but_the_class(synthetic_weights):
    src = WeightSource(synthetic_weights)
    a_spec, b_spec = _two_members_of("resnet34")
    template = _meta_template(a_spec.architecture, a_spec.num_outputs)
    a = build_member(a_spec, src)
    b = build_member(b_spec, src)
    # the template is untouched: still meta tensors, still the published BN layout
    assert all(t.is_meta for t in template.state_dict().values())
    assert list(template.state_dict()) == list(a.state_dict()) == list(b.state_dict())
    # each member holds its own file's weights
    sa, sb = a.state_dict(), b.state_dict()
    ref_a, ref_b = src.load(a_spec.file), src.load(b_spec.file)
    for k in sa:
        assert torch.equal(sa[k], ref_a[k]), k
        assert torch.equal(sb[k], ref_b[k]), k
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())
    # module objects and their dicts are distinct: a hook on one member does not reach the other
    mods_a, mods_b = list(a.modules()), list(b.modules())
    assert len(mods_a) == len(mods_b)
    assert not ({id(m) for m in mods_a} & {id(m) for m in mods_b} & {id(m) for m in template.modules()})
    seen = []
    conv_a = next(m for m in a.modules() if isinstance(m, nn.Conv2d))
    conv_a.register_forward_hook(lambda *_: seen.append("a"))
    x = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        b(x)
        assert seen == []
        a(x)
    assert seen == ["a"]


def test_clone_structure_copies_containers_not_tensors():
    template = _meta_template("tiny", 1)
    c = _clone_structure(template)
    assert type(c) is type(template)
    for mt, mc in zip(template.modules(), c.modules()):
        assert type(mt) is type(mc) and mt is not mc
        assert mt._parameters is not mc._parameters and mt._buffers is not mc._buffers
        assert mt._modules is not mc._modules and mt._forward_hooks is not mc._forward_hooks
        assert mt.training == mc.training
        for k, v in mt._parameters.items():
            assert mc._parameters[k] is v  # shared meta tensor, replaced by load_state_dict(assign=True)


def test_byte_ranges_cover_each_member_in_a_folder_and_in_the_zip(synthetic_weights, synthetic_weights_zip):
    spec = lung_risk_spec()
    names = [m.file for m in spec.members[:3]]
    src = WeightSource(synthetic_weights)
    for (path, off, length), name in zip(src.byte_ranges(names), names):
        assert path == synthetic_weights / name and off == 0 and length == path.stat().st_size
    z = synthetic_weights_zip  # all 20 members, STORED (made once per session in conftest)
    zsrc = WeightSource(z)
    ranges = zsrc.byte_ranges(names + ["not_there.pth"])
    assert len(ranges) == 3  # an absent member is skipped; load() reports it
    with zipfile.ZipFile(z) as zf, open(z, "rb") as blob:  # 2.2 GB: read the 4 bytes, not the file
        for (path, off, length), n in zip(ranges, names):
            info = zf.getinfo(f"ensamble-model-weights/{n}")
            assert path == z
            # the range starts at the local header and reaches past the end of the compressed data
            blob.seek(off)
            assert blob.read(4) == b"PK\x03\x04"
            assert off <= info.header_offset and off + length >= info.header_offset + 30 + len(info.filename) + info.compress_size


def test_prefetch_runs_in_the_background_and_loading_still_matches(synthetic_weights):
    spec = lung_risk_spec()
    src = WeightSource(synthetic_weights)
    member = spec.members[0]
    t = src.prefetch([m.file for m in spec.active_members(False)])
    assert t is not None and t.daemon
    t.join(timeout=60)
    assert not t.is_alive()
    assert WeightSource(synthetic_weights).prefetch([]) is None
    state = src.load(member.file)
    with_pf = build_member(member, src).state_dict()
    for k, v in with_pf.items():
        assert torch.equal(v, state[k])
