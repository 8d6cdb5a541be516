"""Risk groups, chronological age and the CXR-Age gap in the scoring outputs (issue 21): the
cut-points from models/cxr_lung_risk.json, the derived columns, the Parquet schema and the result
image's line. Needs no weights and no [report] extra."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_lung_risk.risk_groups import AGE_COLUMN, AGE_GAP_COLUMN, RiskGroups, chronological_age, lung_risk_groups
from cxr_lung_risk.scoring import derived_columns, derived_values
from cxr_lung_risk.spec import lung_risk_spec


def test_the_papers_groups_come_from_the_model_definition():
    g = lung_risk_groups()
    assert g.cut_points == (65.0, 75.0) and g.labels == ("< 65", "65 to < 75", ">= 75")
    assert lung_risk_spec().raw["risk_groups"]["column"] == g.column == "CXR_Lung_Risk_Group"
    assert [g.label(s) for s in (-3.0, 64.999, 65.0, 74.99, 75.0, 120.0)] == ["< 65", "< 65", "65 to < 75", "65 to < 75", ">= 75", ">= 75"]
    assert g.label(float("nan")) == "" and g.label(None) == "" and g.code(80.0) == ("CXRLR-0013", "CXR-Lung-Risk >= 75 years")
    assert RiskGroups.custom([60, 70.5]).labels == ("< 60", "60 to < 70.5", ">= 70.5")
    with pytest.raises(ValueError):
        RiskGroups.custom([70, 60])


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize("attrs, age", [
    ({"PatientAge": "063Y"}, 63.0),
    ({"PatientAge": "018M"}, 1.5),
    ({"PatientBirthDate": "19600301", "StudyDate": "20200301"}, 60.0),
    ({"PatientAge": "", "PatientBirthDate": "19600301", "StudyDate": "20200301"}, 60.0),
    ({"PatientBirthDate": "19600301"}, None),
    ({"PatientBirthDate": "2020", "StudyDate": "20200301"}, None),
    ({}, None),
])
def test_chronological_age(attrs, age):
    assert chronological_age(_ds(**attrs)) == age


def test_derived_columns_and_values():
    assert derived_columns(["CXR_Lung_Risk"], False) == ("CXR_Lung_Risk_Group",)
    assert derived_columns(["CXR_Lung_Risk", "CXR_Age"], True) == ("CXR_Lung_Risk_Group", AGE_COLUMN, AGE_GAP_COLUMN)
    assert derived_columns(["CXR_Age"], True) == (AGE_COLUMN, AGE_GAP_COLUMN)
    row = {"CXR_Lung_Risk": 70.0, "CXR_Age": 66.5}
    assert derived_values(row, _ds(PatientAge="060Y"), True) == {"CXR_Lung_Risk_Group": "65 to < 75", AGE_COLUMN: 60.0, AGE_GAP_COLUMN: 6.5}
    assert derived_values(row, None, True) == {"CXR_Lung_Risk_Group": "65 to < 75", AGE_COLUMN: None, AGE_GAP_COLUMN: None}
    assert derived_values(row, None, False) == {"CXR_Lung_Risk_Group": "65 to < 75"}


def test_parquet_holds_the_derived_numbers_as_floats(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    from cxr_lung_risk.outputs.tables import ResultWriter

    cols = ["File", "CXR_Lung_Risk", "CXR_Age", "Weights", "CXR_Lung_Risk_Group", AGE_COLUMN, AGE_GAP_COLUMN]
    with ResultWriter(tmp_path, cols, csv_out=True, json_out=True, parquet_out=True, value_columns=["CXR_Lung_Risk", "CXR_Age"]) as w:
        w.write({"File": "a.dcm", "CXR_Lung_Risk": 70.0, "CXR_Age": 66.5, "Weights": "x", "CXR_Lung_Risk_Group": "65 to < 75",
                 AGE_COLUMN: 60.0, AGE_GAP_COLUMN: 6.5})
        w.write({"File": "b.png", "CXR_Lung_Risk": 50.0, "CXR_Age": 40.0, "Weights": "x", "CXR_Lung_Risk_Group": "< 65",
                 AGE_COLUMN: None, AGE_GAP_COLUMN: None})
    t = pq.read_table(next((tmp_path / "parquet").glob("*.parquet")))
    assert str(t.schema.field(AGE_COLUMN).type) == "double" and t.column(AGE_GAP_COLUMN).to_pylist() == [6.5, None]
    assert t.column("CXR_Lung_Risk_Group").to_pylist() == ["65 to < 75", "< 65"]


def test_result_image_shows_the_group_and_its_cut_points(tmp_path):
    from conftest import dciodvfy

    from cxr_lung_risk import api
    from cxr_lung_risk.outputs.base import write_dataset
    from cxr_lung_risk.outputs.result_image import ResultValue, WeightsLine, _group_note, build_result_image

    note = _group_note(lung_risk_spec(), 70.0)
    assert note == "Risk group: 65 to < 75 (groups < 65 | 65 to < 75 | >= 75 years)"
    from cohort import CHEST_CR

    p = api.prepare_input(CHEST_CR)
    values = [ResultValue("CXR-Lung-Risk", 70.0, "a", note), ResultValue("CXR-Age", 58.0, "a")]
    ds = build_result_image(p.dataset, p.image, values, [WeightsLine("CXR-Lung-Risk", "SYNTHETIC")], software_version="1",
                            deterministic=True)
    path = write_dataset(ds, tmp_path / "r.dcm")
    assert dciodvfy(path)[0] == []
    back = pydicom.dcmread(path)
    lines = back.ImageComments.split("\n")
    assert lines[1:4] == ["CXR-Lung-Risk: 70.0 years", note, "CXR-Age: 58.0 years"]
