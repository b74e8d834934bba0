"""Protocol options end to end: uncertain labels, validation-based selection, the dataset kinds' splits
(synthetic benchmark, the real covid set, and small CheXpert / RSNA / SIIM stand-ins written here)."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_fast.data.evaluation.covid import CovidChestXray
from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.labels import CHEXPERT5, CHEXPERT_LABELS, SYNTHETIC_LABELS
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval.benchmarks import SplitOptions, build_eval_sets, foreground_flags
from mlip_fast.eval.fewshot import LINEAR_CHECK_EVERY, _masked_bce, few_shot_classify, linear_probe
from mlip_fast.eval.protocols import load_split_definition, split_units
from mlip_fast.eval.segmentation import few_shot_segment
from mlip_fast.eval.zeroshot import zero_shot_classify

from tests.paths import COVID_CXR


@pytest.fixture
def uncertain_synth(synth_dir, tmp_path):
    """The synthetic benchmark with a labeller's uncertain value (-1) in some Cardiomegaly / Edema cells."""
    root = tmp_path / "uncertain"
    root.mkdir()
    for folder in ("images", "masks"):
        os.symlink(synth_dir / folder, root / folder)
    with open(synth_dir / "master.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames
    for i, r in enumerate(rows):
        if i % 4 == 0:
            r["Cardiomegaly"] = "-1"
        if i % 5 == 1:
            r["Edema"] = "-1"
    with open(root / "master.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return root


def test_uncertain_labels_on_the_synthetic_benchmark(tiny_model, eval_tf, uncertain_synth):
    results = {}
    for policy in ("ignore", "ones", "zeros", "gloria"):
        data = SyntheticBenchmark(uncertain_synth, split=None, transform=eval_tf, uncertain=policy)
        assert data.n_uncertain == {**{n: 0 for n in SYNTHETIC_LABELS}, "Cardiomegaly": 10, "Edema": 8}
        results[policy] = zero_shot_classify(tiny_model, data, "synthetic", mode="global",
                                             classes=["Cardiomegaly", "Edema"], progress=False)
    ones, zeros, ignore = (results[p]["classes"] for p in ("ones", "zeros", "ignore"))
    for name, k in (("Cardiomegaly", 10), ("Edema", 8)):
        assert ignore[name]["n"] == 40 - k and ones[name]["n"] == zeros[name]["n"] == 40
        assert ones[name]["n_positive"] == ignore[name]["n_positive"] + k
        assert zeros[name]["n_positive"] == ignore[name]["n_positive"]
    gloria = results["gloria"]["classes"]  # U-Zeros for Cardiomegaly, U-Ones for Edema
    assert gloria["Cardiomegaly"] == zeros["Cardiomegaly"] and gloria["Edema"] == ones["Edema"]


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids the oversubscription of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_linear_probe_keeps_the_head_of_the_lowest_validation_loss(one_thread):
    g = torch.Generator().manual_seed(0)
    x, vx = torch.randn(30, 6, generator=g), torch.randn(20, 6, generator=g)
    y = (x[:, :2] + 0.8 * torch.randn(30, 2, generator=g) > 0).float()
    vy = (vx[:, :2] + 0.8 * torch.randn(20, 2, generator=g) > 0).float()
    vy[0, 1] = float("nan")
    steps = 60
    predict, selection = linear_probe(x, y, steps=steps, lr=0.3, valid=(vx, vy))
    # The probe is deterministic, so a probe trained for k steps is the run's head at step k.
    losses = {}
    for k in range(LINEAR_CHECK_EVERY, steps + 1, LINEAR_CHECK_EVERY):
        head_k, last = linear_probe(x, y, steps=k, lr=0.3)
        assert last == {"by": "last", "step": k, "valid_loss": None}
        losses[k] = float(_masked_bce(head_k(vx), vy))
    best = min(losses, key=losses.get)
    assert best < steps, "the toy problem should overfit, or the test cannot tell selection from the last step"
    assert selection["by"] == "valid_loss" and selection["step"] == best
    assert selection["valid_loss"] == pytest.approx(losses[best], rel=1e-6)
    assert torch.allclose(predict(vx), linear_probe(x, y, steps=best, lr=0.3)[0](vx), atol=1e-6)


def test_segmentation_keeps_the_epoch_of_the_lowest_validation_loss(tiny_model, synth_dir, eval_tf):
    train = SyntheticBenchmark(synth_dir, "train", eval_tf, segmentation_target="any")
    valid = SyntheticBenchmark(synth_dir, "valid", eval_tf, segmentation_target="any")
    test = SyntheticBenchmark(synth_dir, "test", eval_tf, segmentation_target="any")
    kw = dict(fractions=(1.0,), batch_size=8, lr=3e-2, progress=False)
    r = few_shot_segment(tiny_model, train, test, valid_data=valid, epochs=3, **kw)
    sel = r["100%"]["selection"]
    assert sel["by"] == "valid_loss" and 1 <= sel["epoch"] <= 3 and r["n_valid"] == len(valid)
    # training is seeded per fraction, so a run of sel["epoch"] epochs is the selected state
    again = few_shot_segment(tiny_model, train, test, epochs=sel["epoch"], **kw)
    assert again["100%"]["selection"]["by"] == "last"
    assert again["100%"]["dice"] == pytest.approx(r["100%"]["dice"], abs=1e-6)


def test_fewshot_selection_on_the_synthetic_valid_split(tiny_model, synth_dir, eval_tf, tmp_path):
    sets = build_eval_sets("synthetic", str(synth_dir), "fewshot", eval_tf, SplitOptions())
    assert sets.described["valid_split"] == "valid" and len(sets.valid) == 4 and len(sets.train) == 24
    r = few_shot_classify(tiny_model, sets.train, sets.test, valid_data=sets.valid, fractions=(1.0,),
                          classes=["Cardiomegaly", "Pleural Effusion"], linear_steps=20, finetune_epochs=2,
                          batch_size=16, progress=False)
    assert r["linear"]["100%"]["selection"]["by"] == "valid_loss"
    assert r["finetune"]["100%"]["selection"]["epoch"] in (1, 2) and r["n_valid"] == 4
    evaluated_valid = build_eval_sets("synthetic", str(synth_dir), "fewshot", eval_tf, SplitOptions(split="valid"))
    assert evaluated_valid.valid is None  # never select on the evaluated split
    with pytest.raises(EvalDataError, match="also the evaluated"):
        build_eval_sets("synthetic", str(synth_dir), "fewshot", eval_tf, SplitOptions(split="valid", valid_split="valid"))


def test_balanced_negatives_on_the_synthetic_benchmark(synth_dir, eval_tf):
    opts = SplitOptions(target="pneumothorax", balance_negatives=True)
    sets = build_eval_sets("synthetic", str(synth_dir), "segmentation", eval_tf, opts)
    full = SyntheticBenchmark(synth_dir, "train", eval_tf, segmentation_target="pneumothorax")
    flags = foreground_flags(full)
    # the cheap flag (findings) agrees with the mask itself
    assert flags == [bool(full[i]["mask"].any()) for i in range(len(full))]
    n_pos = sum(flags)
    assert 0 < n_pos < len(full) - n_pos
    kept = foreground_flags(sets.train)
    assert sum(kept) == n_pos and len(kept) == 2 * n_pos
    assert sets.described["balanced_negatives"]["negatives_total"] == len(full) - n_pos


@pytest.mark.skipif(not (COVID_CXR / "staged_images.csv").is_file(), reason="real covid data not available")
def test_covid_protocol_views(tiny_model, eval_tf, tmp_path):
    shipped = load_split_definition("covid_chestxray")["lists"]
    sets = build_eval_sets("covid", str(COVID_CXR), "fewshot", eval_tf, SplitOptions(out_dir=tmp_path))
    names = {s: {r["filename"] for r in getattr(sets, s).rows} for s in ("train", "valid", "test")}
    patients = {s: {r["patientid"] for r in getattr(sets, s).rows} for s in names}
    assert not (patients["train"] & patients["valid"] or patients["train"] & patients["test"]
                or patients["valid"] & patients["test"])
    for s in names:
        assert names[s] <= set(shipped[s]) and all(r["finding"].strip().lower() != "todo" for r in getattr(sets, s).rows)
    assert (tmp_path / "covid_chestxray.json").is_file() and sets.described["split_file"]
    # overriding the procedure recomputes the lists
    other = build_eval_sets("covid", str(COVID_CXR), "zeroshot", eval_tf, SplitOptions(split_seed=3))
    assert {r["filename"] for r in other.test.rows} != names["test"]
    # the covid labels have no uncertain value: every policy scores the same
    labels = {p: [CovidChestXray.labels_of(r["finding"]).tolist() for r in
                  build_eval_sets("covid", str(COVID_CXR), "zeroshot", eval_tf, SplitOptions(uncertain=p)).test.rows]
              for p in ("ignore", "ones", "gloria")}
    assert labels["ignore"] == labels["ones"] == labels["gloria"]
    seg = build_eval_sets("covid", str(COVID_CXR), "segmentation", eval_tf, SplitOptions())
    assert all(r["v7labs_lung_mask"] for r in seg.train.rows) and seg.valid is not None
    rows = sets.test.rows
    pick = [i for i, r in enumerate(rows) if r["finding"] == "No Finding"][:4] + [
        i for i, r in enumerate(rows) if r["finding"] != "No Finding"][:4]
    r = zero_shot_classify(tiny_model, torch.utils.data.Subset(sets.test, pick), "rsna_pneumonia", mode="global",
                           progress=False)
    assert r["classes"]["pneumonia"]["n_positive"] == 4 and r["n_images"] == 8


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


def test_rsna_split_follows_mgca(tmp_path, eval_tf):
    labels = tmp_path / "stage_2_train_labels.csv"
    pids = [f"{i:03d}-x" for i in range(40)]
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientId", "x", "y", "width", "height", "Target"])
        for i, pid in enumerate(reversed(pids)):
            w.writerow([pid, "1", "1", "4", "4", "1"] if i % 3 == 0 else [pid, "", "", "", "", "0"])
            _png(tmp_path / "images" / f"{pid}.png", i)
    opts = SplitOptions(images=str(tmp_path / "images"), out_dir=tmp_path / "out")
    sets = build_eval_sets("rsna", str(labels), "fewshot", eval_tf, opts)
    expected = split_units(sorted(pids), (0.7, 0.15, 0.15), 0, "mgca")
    assert (sets.train.patients, sets.valid.patients, sets.test.patients) == (
        expected["train"], expected["valid"], expected["test"])
    assert sets.test[0]["labels"].shape == (1,) and sets.described["procedure"]["method"] == "mgca"
    zs = build_eval_sets("rsna", str(labels), "zeroshot", eval_tf, opts)
    assert zs.train is None and zs.test.patients == expected["test"]
    with pytest.raises(EvalDataError, match="needs --images"):
        build_eval_sets("rsna", str(labels), "zeroshot", eval_tf, SplitOptions())


def test_siim_segmentation_trains_on_balanced_negatives(tmp_path, eval_tf):
    rle = tmp_path / "train-rle.csv"
    lines = ["ImageId, EncodedPixels"]
    for i in range(60):
        iid = f"img{i:02d}"
        lines.append(f"{iid}, 20 10" if i % 5 == 0 else f"{iid}, -1")
        if i % 10 == 0:
            lines.append(f"{iid}, 100 5")  # a second region: several rows of one image
        _png(tmp_path / "images" / f"{iid}.png", i)
    rle.write_text("\n".join(lines) + "\n")
    opts = SplitOptions(images=str(tmp_path / "images"))
    sets = build_eval_sets("siim", str(rle), "segmentation", eval_tf, opts)
    base = sets.train.dataset
    kept = [base.image_ids[i] for i in sets.train.indices]
    positive = [bool(base.runs[i]) for i in kept]
    assert sum(positive) == len(positive) - sum(positive) > 0
    assert sets.described["balanced_negatives"]["positives"] == sum(positive)
    ids = [set(v.image_ids) for v in (base, sets.valid, sets.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # every image on one side
    unbalanced = build_eval_sets("siim", str(rle), "segmentation", eval_tf,
                                 SplitOptions(images=opts.images, balance_negatives=False))
    assert len(unbalanced.train) == len(base)


def _chexpert_train_csv(path, per_class=200):
    columns = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    rows = []
    for c in CHEXPERT5:
        for k in range(per_class + 3):
            r = {col: "" for col in columns}
            r.update({"Path": f"CheXpert-v1.0/train/patient{len(rows):05d}/study1/view1_frontal.jpg",
                      "Frontal/Lateral": "Frontal", c: "1.0"})
            if k < 3:
                r["Support Devices"] = "1.0"  # the GLoRIA criterion excludes these three
            rows.append(r)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    return rows


def test_chexpert_5x200_kind(tmp_path, eval_tf):
    train_csv = tmp_path / "CheXpert-v1.0" / "train.csv"
    train_csv.parent.mkdir()
    rows = _chexpert_train_csv(train_csv)
    sets = build_eval_sets("chexpert5x200", str(train_csv), "zeroshot", eval_tf, SplitOptions(out_dir=tmp_path))
    assert len(sets.test) == 1000 and sets.test.label_names == CHEXPERT5
    devices = {r["Path"] for r in rows if r["Support Devices"]}
    assert not devices & {s["path"] for s in sets.test.selection}
    assert sets.test.root == tmp_path and sets.described["criterion"] == "gloria"
    five = build_eval_sets("chexpert5x200", str(train_csv), "zeroshot", eval_tf, SplitOptions(criterion="five"))
    assert devices & {s["path"] for s in five.test.selection}  # the five-class criterion admits them
    few = build_eval_sets("chexpert5x200", str(train_csv), "fewshot", eval_tf, SplitOptions())
    assert len(few.train) + len(few.valid) + len(few.test) == 1000


def test_chexpert_kind_splits_by_patient_and_maps_uncertain_labels(tmp_path, eval_tf):
    folder = tmp_path / "CheXpert-v1.0"
    folder.mkdir()
    rows = _chexpert_train_csv(folder / "train.csv", per_class=400)  # 3 per class with a device: never in 5x200
    # every second image has a second (lateral) view and a -1 for Edema; patients hold 2 studies
    columns = list(rows[0])
    extra = []
    for i, r in enumerate(rows):
        r["Path"] = f"CheXpert-v1.0/train/patient{i // 2:05d}/study{i % 2 + 1}/view1_frontal.jpg"
        if i % 2:
            r["Edema"] = r["Edema"] or "-1.0"
            extra.append({**r, "Path": r["Path"].replace("view1_frontal", "view2_lateral"), "Frontal/Lateral": "Lateral"})
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows + extra)
    valid = [{**{c: "" for c in columns}, "Path": f"CheXpert-v1.0/valid/patient9{k:04d}/study1/view1_frontal.jpg",
              "Frontal/Lateral": "Frontal", "Cardiomegaly": "1.0" if k % 2 else "0.0"} for k in range(6)]
    with open(folder / "valid.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(valid)
    _png(tmp_path / valid[0]["Path"], 0)
    opts = SplitOptions(uncertain="gloria", out_dir=tmp_path / "out")
    sets = build_eval_sets("chexpert", str(folder / "train.csv"), "fewshot", eval_tf, opts)
    selection = {s["path"] for s in build_eval_sets("chexpert5x200", str(folder / "train.csv"), "zeroshot", eval_tf,
                                                    SplitOptions()).test.selection}
    train_paths = {r["Path"] for r in sets.train.rows}
    valid_paths = {r["Path"] for r in sets.valid.rows}
    assert len(train_paths) + len(valid_paths) == len(rows) - 1000 and not (train_paths | valid_paths) & selection
    assert not set(sets.train.groups) & set(sets.valid.groups)
    assert all(r["Frontal/Lateral"] == "Frontal" for r in sets.train.rows)
    assert len(sets.test) == 6 and sets.test[0]["labels"].shape == (5,)
    edema = CHEXPERT5.index("Edema")
    # gloria: U-Ones for Edema; ignore: unknown
    uncertain_rows = [i for i, r in enumerate(sets.train.rows) if r["Edema"] == "-1.0"]
    assert uncertain_rows and all(sets.train.labels[i, edema] == 1.0 for i in uncertain_rows)
    ignore = build_eval_sets("chexpert", str(folder / "train.csv"), "fewshot", eval_tf, SplitOptions())
    assert all(np.isnan(ignore.train.labels[i, edema]) for i in uncertain_rows)
    assert ignore.train.n_uncertain["Edema"] == len(uncertain_rows)
    assert (tmp_path / "out" / "chexpert.json").is_file()
