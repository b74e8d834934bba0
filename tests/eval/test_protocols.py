"""The field's protocols: scikit-learn / pandas draws index for index (golden values printed by
scikit-learn 1.9.1 and pandas 3.1.1), GLoRIA's 5x200 criterion, uncertain mappings, grouped splits,
balanced negatives and the shipped split definitions."""
import csv
import json
import math

import numpy as np
import pytest

from mlip_fast.data.evaluation.chexpert import map_uncertain
from mlip_fast.data.labels import CHEXPERT5, CHEXPERT_LABELS, GLORIA_5X200_OBSERVATIONS
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval.fewshot import subset_indices
from mlip_fast.eval.protocols import (
    balanced_negatives,
    chexpert_5x200,
    list_split_definitions,
    load_split_definition,
    main,
    materialise_split,
    shuffle_split,
    source_units,
    split_units,
)

from tests.paths import COVID_CXR

# train_test_split(np.arange(n), test_size=0.3, random_state=0), then train_test_split(held, test_size=0.5,
# random_state=0) -> (test, valid): MGCA's and GLoRIA's RSNA / SIIM procedure.
SKLEARN_20 = {"train": [6, 13, 4, 2, 5, 14, 9, 7, 16, 11, 3, 0, 15, 12], "test": [8, 18, 10], "valid": [17, 19, 1]}
SKLEARN_37 = {"train": [36, 34, 29, 33, 8, 13, 5, 17, 14, 7, 27, 1, 12, 26, 24, 6, 23, 4, 18, 21, 19, 9, 35, 3, 0],
              "test": [20, 11, 25, 10, 22, 28], "valid": [15, 32, 31, 30, 16, 2]}
# pd.DataFrame({"a": range(12)}).sample(n=5, random_state=s)["a"]
PANDAS_5_OF_12 = {0: [6, 11, 4, 10, 2], 3: [5, 4, 1, 2, 11]}
# pd.DataFrame({"a": range(30)}).sample(frac=f, random_state=42)["a"]
PANDAS_FRAC_OF_30 = {0.1: [27, 15, 23], 0.5: [27, 15, 23, 17, 8, 9, 28, 24, 12, 0, 4, 16, 5, 13, 11]}


@pytest.mark.parametrize("n,golden", [(20, SKLEARN_20), (37, SKLEARN_37)])
def test_mgca_split_matches_scikit_learn(n, golden):
    units = [f"p{i:03d}" for i in range(n)]
    lists = split_units(units, (0.7, 0.15, 0.15), seed=0, method="mgca")
    assert lists == {k: [units[i] for i in v] for k, v in golden.items()}
    train, test = shuffle_split(n, 0.3, 0)
    assert train.tolist() == golden["train"] and sorted(test.tolist()) == sorted(golden["test"] + golden["valid"])


def test_mgca_samplers_match_pandas():
    for seed, golden in PANDAS_5_OF_12.items():
        assert (np.random.RandomState(seed).permutation(12)[:5]).tolist() == golden
    for fraction, golden in PANDAS_FRAC_OF_30.items():
        assert subset_indices(30, fraction, seed=42, sampler="mgca") == sorted(golden)
    # nested: the 10% subset lies inside the 50% one under either sampler
    for sampler in ("nested", "mgca"):
        assert set(subset_indices(30, 0.1, 42, sampler)) <= set(subset_indices(30, 0.5, 42, sampler))


def _chexpert_rows():
    """12 Edema candidates (file order 0..11) among rows that each test one exclusion rule."""
    def row(i, frontal="Frontal", **values):
        r = {c: "" for c in CHEXPERT_LABELS}
        r.update({"Path": f"CheXpert-v1.0/train/patient{i:05d}/study1/view1.jpg", "Frontal/Lateral": frontal})
        r.update({k.replace("_", " "): v for k, v in values.items()})
        return r

    rows, i = [], 0
    edema = []
    for k in range(12):
        extra = {"No_Finding": "1.0"} if k == 3 else {"Cardiomegaly": "0.0"} if k == 5 else {}
        rows.append(row(i, Edema="1.0", **extra))  # blank / 0 others, "No Finding" not checked: qualifies
        edema.append(rows[-1]["Path"])
        i += 1
        if k % 3 == 0:  # excluded rows interleaved, so file order matters
            rows.append(row(i, Edema="1.0", Lung_Opacity="1.0"))  # another observation positive: gloria excludes
            rows.append(row(i + 1, Edema="1.0", Support_Devices="-1.0"))  # uncertain other: gloria excludes
            rows.append(row(i + 2, Edema="1.0", Atelectasis="-1.0"))  # uncertain among the five: both exclude
            rows.append(row(i + 3, frontal="Lateral", Edema="1.0"))  # lateral: excluded
            rows.append(row(i + 4, Edema="-1.0"))  # uncertain positive: never
            i += 5
    for c in CHEXPERT5:
        if c != "Edema":
            for _ in range(5):
                rows.append(row(i, **{c.replace(" ", "_"): "1.0"}))
                i += 1
    return rows, edema


def test_chexpert_5x200_gloria_criterion_and_draw():
    rows, edema = _chexpert_rows()
    for seed, golden in PANDAS_5_OF_12.items():
        sel = chexpert_5x200(rows, per_class=5, seed=seed)
        assert [s["label"] for s in sel] == [c for c in CHEXPERT5 for _ in range(5)]
        assert [s["path"] for s in sel if s["label"] == "Edema"] == [edema[k] for k in golden]
    by_path = {r["Path"]: r for r in rows}
    for s in chexpert_5x200(rows, per_class=5):
        r = by_path[s["path"]]
        assert r[s["label"]] == "1.0" and r["Frontal/Lateral"] == "Frontal"
        assert all(r[o] in ("", "0.0") for o in GLORIA_5X200_OBSERVATIONS if o != s["label"])
    # the five-class criterion also admits the Lung Opacity / Support Devices rows: 20 Edema candidates
    with pytest.raises(EvalDataError, match=r"'five' criterion.*'Edema': 20"):
        chexpert_5x200(rows, criterion="five", per_class=21)
    with pytest.raises(EvalDataError, match=r"too few images qualify under the 'gloria' criterion.*'Edema': 12"):
        chexpert_5x200(rows, per_class=13)
    with pytest.raises(EvalDataError, match="missing column"):
        chexpert_5x200([{k: v for k, v in r.items() if k != "Fracture"} for r in rows], per_class=5)
    bad = [dict(r) for r in rows]
    bad[0]["Edema"] = "maybe"
    with pytest.raises(EvalDataError, match="line 2.*'maybe'"):
        chexpert_5x200(bad, per_class=5)


def test_uncertain_policies():
    names = ["Atelectasis", "Cardiomegaly", "Pneumothorax"]
    labels = np.array([[-1.0, -1.0, -1.0], [1.0, 0.0, np.nan]], dtype=np.float32)
    ignore = map_uncertain(labels, names, "ignore")
    assert np.isnan(ignore[0]).all() and ignore[1, 0] == 1 and ignore[1, 1] == 0 and np.isnan(ignore[1, 2])
    assert map_uncertain(labels, names, "ones")[0].tolist() == [1, 1, 1]
    assert map_uncertain(labels, names, "zeros")[0].tolist() == [0, 0, 0]
    gloria = map_uncertain(labels, names, "gloria")[0]
    assert gloria[0] == 1 and gloria[1] == 0 and math.isnan(gloria[2])  # not one of the five: unknown
    assert np.array_equal(map_uncertain(labels, names, "ones")[1], labels[1], equal_nan=True)
    with pytest.raises(ValueError, match="uncertain policy"):
        map_uncertain(labels, names, "half")


def test_grouped_split_keeps_patients_together():
    rng = np.random.default_rng(0)
    groups = [f"patient{int(g)}" for g in rng.integers(0, 60, 200)]
    units = [f"img{i}" for i in range(200)]
    lists = split_units(units, (0.7, 0.15, 0.15), seed=4, groups=groups)
    owner = dict(zip(units, groups))
    sides = {s: {owner[u] for u in v} for s, v in lists.items()}
    assert not (sides["train"] & sides["valid"] or sides["train"] & sides["test"] or sides["valid"] & sides["test"])
    n_groups = len(set(groups))
    assert len(sides["test"]) == round(0.15 * n_groups) and len(sides["valid"]) == round(0.15 * n_groups)
    assert sorted(u for v in lists.values() for u in v) == sorted(units)
    assert lists["train"] == [u for u in units if u in set(lists["train"])]  # input order kept
    assert split_units(units, (0.7, 0.15, 0.15), seed=4, groups=groups) == lists
    assert split_units(units, (0.7, 0.15, 0.15), seed=5, groups=groups) != lists
    tiny = split_units(["a", "b", "c"], (0.7, 0.15, 0.15))  # each part gets one group
    assert sorted(len(v) for v in tiny.values()) == [1, 1, 1]
    with pytest.raises(EvalDataError, match="at least 3 groups"):
        split_units(["a", "b"], (0.7, 0.15, 0.15))
    with pytest.raises(ValueError, match="summing to 1"):
        split_units(units, (0.7, 0.2, 0.2))
    with pytest.raises(EvalDataError, match="unique"):
        split_units(["a", "a", "b"], (0.5, 0.0, 0.5))


def test_balanced_negatives():
    flags = [True] * 5 + [False] * 20
    keep = balanced_negatives(flags, seed=1)
    assert len(keep) == 10 and set(range(5)) <= set(keep) and keep == sorted(keep)
    assert keep == balanced_negatives(flags, seed=1) and keep != balanced_negatives(flags, seed=2)
    assert balanced_negatives([True] * 4 + [False] * 2, seed=0) == list(range(6))  # fewer negatives: all kept
    with pytest.raises(EvalDataError, match="at least one positive"):
        balanced_negatives([False] * 3, seed=0)


def test_shipped_definitions_load():
    assert list_split_definitions() == ["chexpert5x200", "covid_chestxray", "rsna_pneumonia", "siim_pneumothorax"]
    for name in list_split_definitions():
        record = load_split_definition(name)
        assert record["name"] == name and record["reproduces"]
    assert load_split_definition("rsna_pneumonia")["procedure"] == {"method": "mgca", "fractions": [0.7, 0.15, 0.15],
                                                                     "seed": 0}


def test_rsna_and_siim_units_and_cli(tmp_path, capsys):
    labels = tmp_path / "stage_2_train_labels.csv"
    ids = [f"{i:04x}-pid" for i in range(40)]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for pid in reversed(ids):  # file order differs from the sorted order MGCA's groupby gives
            w.writerow([pid, "", "", "", "", "0"])
            if pid.startswith("000"):
                w.writerow([pid, "1", "2", "3", "4", "1"])
    units, groups, _ = source_units("rsna_pneumonia", labels)
    assert units == sorted(ids) and groups is None
    out = tmp_path / "rsna.json"
    assert main(["rsna_pneumonia", "--data", str(labels), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    expected = split_units(sorted(ids), (0.7, 0.15, 0.15), 0, "mgca")
    assert record["lists"] == expected and record["counts"] == {"train": 28, "valid": 6, "test": 6}
    assert len(record["source_sha256"]) == 64
    assert main(["rsna_pneumonia", "--data", str(labels), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    # a list file is checked against the data it is applied to
    with pytest.raises(EvalDataError, match="not in the data"):
        materialise_split(record, sorted(ids)[:-1])
    rle = tmp_path / "train-rle.csv"
    rle.write_text("ImageId, EncodedPixels\nb,-1\na,1 2\na,5 2\nc,-1\n")
    assert source_units("siim_pneumothorax", rle)[0] == ["b", "a", "c"]


def test_split_file_errors(tmp_path):
    with pytest.raises(EvalDataError, match="not found"):
        load_split_definition("no_such_split")
    path = tmp_path / "x.json"
    record = load_split_definition("covid_chestxray")
    record["lists"]["test"].append(record["lists"]["train"][0])
    path.write_text(json.dumps(record))
    with pytest.raises(EvalDataError, match="in both 'train' and 'test'"):
        load_split_definition(path)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(EvalDataError, match="not a split file"):
        load_split_definition(path)


@pytest.mark.skipif(not (COVID_CXR / "staged_images.csv").is_file(), reason="real covid data not available")
def test_shipped_covid_lists_are_the_procedures_output():
    shipped = load_split_definition("covid_chestxray")
    units, groups, source = source_units("covid_chestxray", COVID_CXR)
    again = materialise_split({**shipped, "lists": None}, units, groups=groups, source=source)
    assert again["lists"] == shipped["lists"] and again["source_sha256"] == shipped["source_sha256"]
    patient = dict(zip(units, groups))
    sides = [{patient[u] for u in shipped["lists"][s]} for s in ("train", "valid", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert shipped["counts"] == {"train": 324, "valid": 63, "test": 56}
