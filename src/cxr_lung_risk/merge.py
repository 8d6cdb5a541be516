"""``cxr-lung-risk merge``: join the output folders of ``predict --shard K/N`` runs.

Each shard's tables are appended shard by shard (CSV, JSON, manifest, records; Parquet parts are
renumbered), and every file its records list (SRs, saliency images) is copied. The shards must
come from runs with the same options (their ``run.json`` ``resume_key``); two shards that wrote
different bytes under one name are refused (they cannot both be right).
"""
from __future__ import annotations

import csv
import filecmp
import json
import shutil
from pathlib import Path
from typing import Sequence

from .errors import OutputError, UsageError
from .outputs.tables import MANIFEST_CSV, PARQUET_DIR, RESULTS_CSV, RESULTS_JSON, read_json_rows
from .records import RECORDS_JSONL
from .resume import read_records_tolerant

__all__ = ["merge_outputs"]


def _run_json(d: Path) -> dict:
    try:
        return json.loads((d / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UsageError(f"{d} holds no finished predict run (run.json missing)") from None


def _csv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    if not path.is_file():
        return None, []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return (rows[0] if rows else None), rows[1:]


def merge_outputs(shards: Sequence[Path], out: Path):
    """Merge ``shards`` (output folders) into ``out`` (new or empty) -> a RunSummary of the whole."""
    from .jobs import RunSummary

    shards = [Path(s) for s in shards]
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty: merge into a new folder")
    infos = [_run_json(d) for d in shards]
    keys = {json.dumps(i.get("resume_key"), sort_keys=True) for i in infos}
    if len(keys) != 1:
        raise UsageError("the shards were run with different options; they cannot be merged")
    out.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(out=out)
    for name in (RESULTS_CSV, MANIFEST_CSV):
        header, rows = None, []
        for d in shards:
            h, r = _csv(d / name)
            if h is None:
                continue
            if header is not None and h != header:
                raise UsageError(f"{d / name} has other columns than the first shard's")
            header = h
            rows += r
        if header is not None:
            with open(out / name, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
    if any((d / RESULTS_JSON).is_file() for d in shards):
        rows = [r for d in shards for r in read_json_rows(d / RESULTS_JSON)]
        with open(out / RESULTS_JSON, "w", encoding="utf-8") as f:
            f.write("[" + ",".join("\n  " + json.dumps(r, ensure_ascii=False) for r in rows) + ("\n]\n" if rows else "]\n"))
    n = 0
    for d in shards:
        for part in sorted((d / PARQUET_DIR).glob("part-*.parquet")):
            (out / PARQUET_DIR).mkdir(exist_ok=True)
            shutil.copyfile(part, out / PARQUET_DIR / f"part-{n:05d}.parquet")
            n += 1
    with open(out / RECORDS_JSONL, "w", encoding="utf-8") as f:
        for d in shards:
            for rec in read_records_tolerant(d):
                for rels in rec.outputs.values():
                    for rel in rels:
                        src, dst = d / rel, out / rel
                        if dst.exists():
                            if not filecmp.cmp(src, dst, shallow=False):
                                raise OutputError(f"two shards wrote different files named {rel}; merge refused")
                            continue
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(src, dst)
                f.write(json.dumps(rec.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
                summary.counts[str(rec.status)] = summary.counts.get(str(rec.status), 0) + 1
                summary.inputs += 1
    info = dict(infos[0])
    info.update(shard=None, n_inputs=summary.inputs, merged_from=[str(d) for d in shards])
    (out / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
    return summary
