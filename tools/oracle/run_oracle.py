"""The ORIGINAL fastai CXR-Lung-Risk inference path, kept runnable as a test oracle.

Runs inside the oracle venv (tools/oracle/setup_venv.sh: torch, torchvision, fastai 2.8,
pretrainedmodels), never in the package. It rebuilds the ensemble the way the authors'
``src/run_cxr_lung_risk.py`` (AIM-Harvard/CXR-Lung-Risk) does -- ``ImageDataLoaders.from_df``
with a dummy training row, bs=4, ``item_tfms=Resize(224)``,
``batch_tfms=[Normalize.from_stats(*imagenet_stats)]``, Cadene's InceptionV4 cut to its
features plus a ``create_head`` through ``cnn_learner`` with a custom arch function,
``cnn_learner(resnet34)``, ``Learner(dls, SimpleConv 'Tiny')``, ``learn.load`` and
``learn.get_preds(ds_idx=1)`` -- and writes per-member predictions plus the LASSO score.

Deliberate differences from the authors' script (all needed to run offline on synthetic weights):
* No network: InceptionV4 is built with ``pretrained=None`` (the authors build it with
  ``'imagenet'`` and then overwrite every weight with ``learn.load``), resnet34 with
  ``pretrained=False``; ``learn.freeze()`` is then called explicitly so the learner owns an
  optimizer and ``learn.save`` writes fastai's ``{'model', 'opt'}`` container, as
  ``cnn_learner(pretrained=True)`` did for the published files.
* The Tiny SimpleConv is re-implemented here from the published state-dict layout (module names
  ``mdl.Conv0 ... mdl.Last_Linear``), not copied.
* Weights: the SYNTHETIC member files given with ``--weights`` (cxr_lung_risk.synthetic) are
  loaded strictly into ``learn.model`` of a freshly built learner and saved with fastai's own
  ``learn.save`` into ``<work>/models``; a second, fresh learner then ``learn.load``s that file
  exactly like the authors' script does, and predicts.
* ``DataFrame.append`` (removed in pandas 2) is replaced by ``pd.concat``; the image list is the
  order given (or sorted folder listing) instead of ``os.listdir`` order; the LASSO weights and
  intercept are read from ``models/cxr_lung_risk.json``.
* ``--toy-out DIR`` additionally saves a small fastai Learner trained for one short cycle
  (``fit_one_cycle``, so its optimizer state holds fastcore ``L`` objects, tensors and numpy
  scalars) as ``fastai_toy_learner.pth`` plus its tensors as ``fastai_toy_learner_expected.npz``.

Usage:
  python tools/oracle/run_oracle.py --weights DIR --images LIST.json|DIR --work DIR --out preds.csv
      [--members 0,1,...] [--toy-out DIR]
LIST.json: [{"name": ..., "path": ...}, ...]; the CSV's File column holds the names.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

warnings.simplefilter(action="ignore")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pretrainedmodels  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import fastai  # noqa: E402
from fastai.vision.all import *  # noqa: E402,F401,F403
from fastai.vision.all import (  # noqa: E402
    ImageDataLoaders, Learner, Normalize, RegressionBlock, Resize, cnn_learner, create_head, imagenet_stats,
)

REPO = Path(__file__).resolve().parents[2]
MDL_NAME = "Lung_Age_081221"


class Tiny(nn.Module):
    """SimpleConv 'Tiny' for 3x224x224 input, written from the published key layout."""

    def __init__(self, out_nodes: int = 1) -> None:
        super().__init__()
        d: "OrderedDict[str, nn.Module]" = OrderedDict()
        ch = [3, 64, 128, 256, 512]
        for i in range(4):
            d[f"Conv{i}"] = nn.Conv2d(ch[i], ch[i + 1], 5)
            d[f"BN{i}"] = nn.BatchNorm2d(ch[i + 1])
            d[f"ReLU{i}"] = nn.ReLU()
            d[f"Max{i}"] = nn.MaxPool2d(3, 2)
        d["AvgPool"] = nn.AvgPool2d(9)
        d["Flatten"] = nn.Flatten()
        d["Linear1"] = nn.Linear(512, 32)
        d["ReLU_Linear1"] = nn.ReLU()
        d["BN_Linear1"] = nn.BatchNorm1d(32)
        d["Dropout"] = nn.Dropout(0.25)
        d["Last_Linear"] = nn.Linear(32, out_nodes)
        self.mdl = nn.Sequential(d)

    def forward(self, x):
        return self.mdl(x)


def make_dls(test_set_dir: Path, files: list[str], size: int, normalize: bool):
    """The authors' DataLoaders: all images in the validation set plus one dummy training row."""
    output_df = pd.DataFrame(columns=["File", "Dummy", "Prediction"])
    output_df["File"] = files
    output_df["Dummy"] = np.random.random_sample(len(files))
    output_df["valid_col"] = np.repeat(True, output_df.shape[0])
    results_df = pd.concat([output_df, output_df.iloc[[output_df.shape[0] - 1], :]], ignore_index=True)
    results_df.loc[results_df.shape[0] - 1, "valid_col"] = False
    bs, val_bs = 4, 4
    return ImageDataLoaders.from_df(
        df=results_df, path=str(test_set_dir), label_col="Dummy", y_block=RegressionBlock, bs=bs, val_bs=val_bs,
        valid_col="valid_col", item_tfms=Resize(size),
        batch_tfms=[Normalize.from_stats(*imagenet_stats)] if normalize else None,
    )


def make_learner(imgs, model_arch: str, out_nodes: int):
    """The authors' learner construction, offline (see the module docstring)."""
    if model_arch == "inceptionv4":
        def get_model(pretrained=True, model_name="inceptionv4", **kwargs):
            if pretrained:
                arch = pretrainedmodels.__dict__[model_name](num_classes=1000, pretrained="imagenet")
            else:
                arch = pretrainedmodels.__dict__[model_name](num_classes=1000, pretrained=None)
            return arch

        def get_cadene_model(pretrained=True, **kwargs):
            return fastai_inceptionv4

        custom_head = create_head(nf=2048 * 2, n_out=37)
        # CHANGE: pretrained=False (the authors download ImageNet weights, then overwrite them all)
        fastai_inceptionv4 = nn.Sequential(*list(get_model(pretrained=False, model_name="inceptionv4").children())[:-2], custom_head)
        learn = cnn_learner(imgs, get_cadene_model, n_out=out_nodes)  # pretrained=True default -> freeze()
    elif model_arch == "resnet34":
        mdl = fastai.vision.models.resnet34
        learn = cnn_learner(imgs, mdl, n_out=out_nodes, pretrained=False)  # CHANGE: no download
        learn.freeze()  # CHANGE: what pretrained=True does; gives the {'model','opt'} container
    elif model_arch == "tiny":
        learn = Learner(imgs, Tiny(out_nodes))
    else:
        raise SystemExit(f"architecture {model_arch!r} not supported")
    return learn


def read_synthetic(path: Path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and set(obj) == {"model", "opt"}:
        obj = obj["model"]
    return obj


def save_toy(out: Path, work: Path) -> None:
    """A small fastai-saved learner with a real optimizer state (fit_one_cycle) and its tensors."""
    from fastai.data.core import DataLoaders
    from fastai.layers import AdaptiveConcatPool2d, Flatten
    from fastai.losses import MSELossFlat

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(16, 3, 12, 12, generator=g)
    ys = torch.randn(16, 1, generator=g)
    ds = [(xs[i], ys[i]) for i in range(16)]
    dls = DataLoaders.from_dsets(ds[:12], ds[12:], bs=4, device="cpu")
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), AdaptiveConcatPool2d(), Flatten(),
        nn.BatchNorm1d(16), nn.Linear(16, 1),
    )
    learn = Learner(dls, model, loss_func=MSELossFlat(), path=work, model_dir="toy")
    learn.fit_one_cycle(1, lr_max=slice(1e-3, 1e-2))
    learn.save("fastai_toy_learner")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(work / "toy" / "fastai_toy_learner.pth", out / "fastai_toy_learner.pth")
    sd = learn.model.state_dict()
    np.savez_compressed(out / "fastai_toy_learner_expected.npz", **{k: v.detach().cpu().numpy() for k, v in sd.items()})
    print("toy learner saved:", out / "fastai_toy_learner.pth")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="folder of SYNTHETIC member files")
    ap.add_argument("--images", type=Path, required=True, help="image folder, or JSON list of {name, path}")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (fastai files go to <work>/models)")
    ap.add_argument("--out", type=Path, required=True, help="CSV: File, member columns, CXR_Lung_Risk")
    ap.add_argument("--members", default="", help="comma-separated member indices (default: all 20)")
    ap.add_argument("--spec", type=Path, default=REPO / "models" / "cxr_lung_risk.json")
    ap.add_argument("--toy-out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    spec = json.loads(args.spec.read_text())
    members = spec["members"]
    idx = [int(i) for i in args.members.split(",") if i.strip()] or list(range(len(members)))

    test_set_dir = args.work / "images"
    if test_set_dir.exists():
        shutil.rmtree(test_set_dir)
    test_set_dir.mkdir(parents=True)
    if args.images.is_dir():
        rows = [{"name": p.name, "path": str(p)} for p in sorted(args.images.iterdir()) if p.is_file()]
    else:
        rows = json.loads(args.images.read_text())
    for r in rows:
        shutil.copyfile(r["path"], test_set_dir / r["name"])
    files = [r["name"] for r in rows]

    (args.work / "models").mkdir(parents=True, exist_ok=True)
    pred_arr = np.zeros((len(files), len(members)))
    for model_id in idx:
        m = members[model_id]
        out_nodes, size = int(m.get("num_outputs", 1)), int(m.get("image_size", 224))
        arch = m["architecture"].lower()
        name = f"{MDL_NAME}_{model_id}"
        # 1) inject the synthetic weights and save them with fastai's own learn.save
        learn = make_learner(make_dls(test_set_dir, files, size, bool(m.get("normalize", True))), arch, out_nodes)
        learn.path = args.work
        learn.model.load_state_dict(read_synthetic(args.weights / m["file"]), strict=True)
        learn.save(name)
        # 2) the authors' path: fresh dls + learner, learn.load, get_preds on the validation set
        imgs = make_dls(test_set_dir, files, size, bool(m.get("normalize", True)))
        learn = make_learner(imgs, arch, out_nodes)
        learn.path = args.work
        learn.load(name)
        preds, _ = learn.get_preds(ds_idx=1, reorder=False)
        pred_arr[:, model_id] = np.array(preds[:, 0])
        print(f"{name} ({arch}) done", flush=True)

    w = np.array([float(m["weight"]) for m in members])
    scores = np.matmul(pred_arr, w) + float(spec["intercept"])
    df = pd.DataFrame({"File": files})
    for model_id in idx:
        df[members[model_id]["name"]] = [repr(float(v)) for v in pred_arr[:, model_id]]
    if len(idx) == len(members):
        df["CXR_Lung_Risk"] = [repr(float(v)) for v in scores]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    meta = {"fastai": fastai.__version__, "torch": torch.__version__, "pretrainedmodels": getattr(pretrainedmodels, "__version__", "?"),
            "numpy": np.__version__, "pandas": pd.__version__, "python": sys.version.split()[0]}
    args.out.with_suffix(".versions.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("wrote", args.out)
    if args.toy_out:
        save_toy(args.toy_out, args.work)


if __name__ == "__main__":
    main()
