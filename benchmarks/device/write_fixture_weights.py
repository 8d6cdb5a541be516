"""Write the oracle fixture's calibrated SYNTHETIC member files (the 13 active members) into DIR:
the same weights the test suite's ``synthetic_weights`` fixture makes, for a benchmark on a
machine without the suite (e.g. the GPU machine). Usage: write_fixture_weights.py DIR"""
import json
import sys
from pathlib import Path

import numpy as np

from cxr_lung_risk.spec import lung_risk_spec
from cxr_lung_risk.synthetic import SyntheticRecipe, write_synthetic_weights

F = Path(__file__).resolve().parents[2] / "tests" / "data" / "oracle"
spec = lung_risk_spec()
active = [m.index for m in spec.active_members()]
bn = {}
for i in active:
    with np.load(F / "bn_stats" / f"member_{i:02d}.npz") as z:
        bn[i] = {k: z[k] for k in z.files}
recipe = SyntheticRecipe.from_json(json.loads((F / "recipe.json").read_text())["recipe"])
write_synthetic_weights(sys.argv[1], recipe, bn, members=active)
print("wrote", len(active), "synthetic members to", sys.argv[1])
