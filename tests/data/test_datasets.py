"""Dataset readers on small constructed fixtures, bad-input handling, MIMIC preparation."""
import csv
import gzip
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlip_fast.data.evaluation.chexpert import CheXpert5x200Dataset, build_chexpert_5x200
from mlip_fast.data.evaluation.folders import ImageFolderDataset
from mlip_fast.data.evaluation.rsna import RSNAPneumoniaDataset
from mlip_fast.data.evaluation.siim import SIIMPneumothoraxDataset
from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.data.mimic_prepare import main as mimic_main
from mlip_fast.data.mimic_prepare import prepare_mimic
from mlip_fast.data.pretrain import ManifestDataset, OpenIDataset, PretrainDataset
from mlip_fast.data.readers import BadSampleWarning, DatasetError
from mlip_fast.data.rle import rle_decode, rle_encode
from mlip_fast.data.synth import generate
from mlip_fast.preprocess.transforms import ImageTransform

from tests.paths import IU_REPORTS

IU = IU_REPORTS


def _png(path, h=20, w=30, value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8) if value is None else \
        np.full((h, w), value, np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _write_csv(path, rows, columns=None):
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------- prepared MIMIC / synth


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, n=40, seed=0, size=32, workers=1)
    return out


def test_pretrain_dataset_on_synthetic(synth_dir):
    ds = PretrainDataset(synth_dir / "master.csv", split="train", transform=ImageTransform(24))
    rows = list(csv.DictReader(open(synth_dir / "master.csv")))
    train = [r for r in rows if r["split"] == "train"]
    assert len(ds) == len(train) == 32
    assert set(ds.label_names) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
                                   "Pneumothorax", "Pneumonia"}
    item = ds[3]
    assert item["image"].shape == (1, 24, 24) and item["index"] == 3
    assert item["report"].startswith(train[3]["findings"].split(".")[0])
    for k, name in enumerate(ds.label_names):
        assert item["labels"][k] == float(train[3][name])
    assert len(PretrainDataset(synth_dir / "master.csv", split=None)) == 40
    with_truth = PretrainDataset(synth_dir / "master.csv", split="train", extra_columns=["findings_json"])
    entries = json.loads(with_truth[3]["findings_json"])
    assert all(e["sentence"] in with_truth[3]["report"] for e in entries)
    with pytest.raises(DatasetError, match=r"\['boxes'\]"):
        PretrainDataset(synth_dir / "master.csv", extra_columns=["boxes"])
    with pytest.raises(DatasetError, match="no rows with split == 'validate'"):
        PretrainDataset(synth_dir / "master.csv", split="validate")


def test_missing_columns_fail_at_construction_naming_them(tmp_path):
    path = _write_csv(tmp_path / "m.csv", [{"image_path": "a.png", "report": "x"}])
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['findings', 'impression', 'split'\]"):
        PretrainDataset(path)
    with pytest.raises(DatasetError, match=r"\['Edema'\]"):
        ManifestDataset(path, image_column="image_path", label_columns=["Edema"])
    empty = tmp_path / "empty.csv"
    empty.write_text("image,text\n")
    with pytest.raises(DatasetError, match=r"\['report'\]"):
        ManifestDataset(empty)


def _bad_fixture(tmp_path, n_good=150, corrupt=1, missing=1, empty_report=0):
    rows = []
    for k in range(n_good):
        _png(tmp_path / "img" / f"{k}.png", seed=k)
        rows.append({"image": f"img/{k}.png", "report": f"Heart normal {k}. No effusion."})
    for k in range(corrupt):
        bad = tmp_path / "img" / f"corrupt{k}.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
        rows.insert(5 + k, {"image": f"img/corrupt{k}.png", "report": "Clear lungs."})
    for k in range(missing):
        rows.insert(20 + k, {"image": f"img/missing{k}.png", "report": "Clear lungs."})
    for k in range(empty_report):
        rows.insert(30 + k, {"image": "img/0.png", "report": "  "})
    return _write_csv(tmp_path / "manifest.csv", rows)


def test_bad_items_are_skipped_with_a_warning_and_replaced(tmp_path):
    manifest = _bad_fixture(tmp_path)  # 2 bad of 152: 1.3% > 1%
    ds = ManifestDataset(manifest, transform=ImageTransform(16), max_bad_fraction=0.02)
    with pytest.warns(BadSampleWarning, match=r"corrupt0\.png.*corrupt"):
        item = ds[5]
    assert item["index"] == 6 and item["report"].startswith("Heart normal 5")
    with pytest.warns(BadSampleWarning, match=r"missing0\.png.*not found"):
        assert ds[20]["index"] == 21
    assert ds.bad_count == 2 and ds.bad_items() == [5, 20]
    # Already known bad: replaced silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[5]["index"] == 6
    # A full pass never raises.
    assert len([ds[i] for i in range(len(ds))]) == len(ds)


def test_too_many_bad_items_raise_a_clear_error(tmp_path):
    manifest = _bad_fixture(tmp_path)
    ds = ManifestDataset(manifest, transform=ImageTransform(16))  # default 1%
    with pytest.warns(BadSampleWarning):
        ds[5]  # 1 of 152 is under 1%
    with pytest.raises(DatasetError, match=r"2 of 152 items are bad.*missing0\.png"), pytest.warns(BadSampleWarning):
        ds[20]


def test_validate_finds_every_bad_item(tmp_path):
    ds = ManifestDataset(_bad_fixture(tmp_path), transform=ImageTransform(16), max_bad_fraction=0.05)
    with pytest.warns(BadSampleWarning):
        report = ds.validate(progress=False)
    assert report["n"] == 152 and report["bad"] == 2
    assert [Path(p).name for p in report["bad_files"]] == ["corrupt0.png", "missing0.png"]
    strict = ManifestDataset(_bad_fixture(tmp_path), transform=ImageTransform(16))
    with pytest.raises(DatasetError, match="max_bad_fraction"), pytest.warns(BadSampleWarning):
        strict.validate(progress=False)


def test_empty_reports_dropped_at_construction(tmp_path):
    manifest = _bad_fixture(tmp_path, corrupt=0, missing=0, empty_report=1)
    with pytest.warns(BadSampleWarning, match=r"skipped 1 row\(s\).*manifest\.csv line 32 \(.*0\.png\): empty report"):
        ds = ManifestDataset(manifest, transform=ImageTransform(16))
    assert len(ds) == 150 and ds.bad_count == 1
    assert ds.skipped() == [{"source": f"{manifest} line 32 ({tmp_path / 'img' / '0.png'})", "reason": "empty report"}]
    many = _bad_fixture(tmp_path / "b", corrupt=0, missing=0, empty_report=3)
    with pytest.raises(DatasetError, match="3 of 153 items are bad"), pytest.warns(BadSampleWarning):
        ManifestDataset(many)


def test_bad_items_do_not_stop_a_multiworker_loader(tmp_path):
    from mlip_fast.data.collate import Collator, make_loader

    ds = ManifestDataset(_bad_fixture(tmp_path, n_good=60), transform=ImageTransform(16), max_bad_fraction=0.05)
    collator = Collator(tokenizer=object(), tokenize_fn=_stand_in_tokenize)
    loader = make_loader(ds, collator, batch_size=8, shuffle=True, num_workers=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        seen = torch.cat([b["index"] for b in loader])
    assert len(seen) == len(ds) and 5 not in seen.tolist() and 20 not in seen.tolist()
    # Flags set in the workers are visible here (shared memory).
    assert ds.bad_items() == [5, 20]


# ------------------------------------------------------------------------------------------- report text


def _text_fixture(tmp_path, n=100):
    """A manifest of ``n`` good rows (file lines 2 .. n + 1) as raw bytes, and its images."""
    for k in range(n):
        _png(tmp_path / "img" / f"{k}.png", h=8, w=8, seed=k)
    return [b"image,report\n"] + [f"img/{k}.png,Heart normal {k}. No effusion.\n".encode() for k in range(n)]


def test_undecodable_rows_are_skipped_and_named(tmp_path):
    """A byte that is not UTF-8 (Latin-1 'e acute' in a UTF-8 file) skips that row, naming the file and line;
    the other rows are read. JSONL alike."""
    lines = _text_fixture(tmp_path)
    lines[10] = b"img/9.png,Caf\xe9 au lait spots.\n"  # file line 11
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"".join(lines))
    with pytest.warns(BadSampleWarning, match=r"m\.csv line 11: not valid UTF-8: byte 0xe9 at byte 3 of column 'report'"):
        ds = ManifestDataset(manifest, max_bad_fraction=0.02)
    assert len(ds) == 99 and ds.bad_count == 1
    assert ds.skipped() == [{"source": f"{manifest} line 11",
                             "reason": "not valid UTF-8: byte 0xe9 at byte 3 of column 'report'"}]
    assert all("Caf" not in r["report"] for r in ds.records)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_bytes(b'{"image": "img/0.png", "report": "Clear."}\n{"image": "img/1.png", "report": "Caf\xe9."}\n')
    with pytest.warns(BadSampleWarning):
        ds = ManifestDataset(jsonl, max_bad_fraction=0.5)
    assert [s["source"] for s in ds.skipped()] == [f"{jsonl} line 2"] and len(ds) == 1
    # readers without a skip list (evaluation label files) stop, naming the line
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_bytes(b"patientId,Target\np1,1\np\xff2,0\n")
    with pytest.raises(DatasetError, match=r"labels\.csv line 3: not valid UTF-8: byte 0xff"):
        RSNAPneumoniaDataset(bad_labels, tmp_path / "img")


def test_long_report_and_byte_order_mark(tmp_path):
    """A 200,000-character report (above csv's default field limit of 131,072) is read intact; a UTF-8
    byte-order mark (as Excel writes) does not become part of the first column's name."""
    lines = _text_fixture(tmp_path, n=3)
    long = "Heart size is normal. " * 9091  # 200,002 characters
    lines[2] = f'img/1.png,"{long}"\n'.encode()
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + b"".join(lines))
    ds = ManifestDataset(manifest)
    assert len(ds) == 3 and len(ds[1]["report"]) == len(long.strip())


def test_report_without_letters_or_digits_is_dropped_at_construction(tmp_path):
    """Findings '-' and impression '.' make the text '-. .': no sentence for the text tower. Such a row is
    dropped when the dataset is built (not at a later batch), named by file and line."""
    from mlip_fast.preprocess.reports import report_text, split_sentences

    text = report_text("-", ".")
    assert text.strip() and split_sentences(text) == []
    rows = [{"image_path": f"img/{k}.png", "findings": f"Finding {k}.", "impression": "Normal.", "split": "train"}
            for k in range(100)]
    rows[8].update(findings="-", impression=".")
    for k in range(100):
        _png(tmp_path / "img" / f"{k}.png", h=8, w=8, seed=k)
    master = _write_csv(tmp_path / "master.csv", rows)
    with pytest.warns(BadSampleWarning, match=r"master\.csv line 10 .*8\.png\): report has no letter or digit"):
        ds = PretrainDataset(master, split="train", max_bad_fraction=0.02)
    assert len(ds) == 99 and all(split_sentences(r["report"]) for r in ds.records)


def test_too_many_bad_rows_stop_at_construction_naming_every_one(tmp_path):
    """5 bad rows of 100 (undecodable, empty, punctuation only) exceed 1% before any item is read, and the
    error names all five with their reasons."""
    lines = _text_fixture(tmp_path)
    lines[3] = b"img/2.png,\xff\xfe broken\n"
    lines[20] = b"img/19.png,\n"
    lines[30] = b"img/29.png,  \n"
    lines[40] = b'img/39.png,"- ."\n'
    lines[50] = b"img/49.png,Caf\xe9.\n"
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"".join(lines))
    with pytest.raises(DatasetError) as info, pytest.warns(BadSampleWarning):
        ManifestDataset(manifest)
    message = str(info.value)
    assert "5 of 100 items are bad" in message
    for line in (4, 21, 31, 41, 51):
        assert f"m.csv line {line}" in message
    assert message.count("not valid UTF-8") == 2 and message.count("empty report") == 2
    assert "no letter or digit" in message


def test_skipped_names_items_flagged_in_workers(tmp_path):
    """Items flagged inside DataLoader workers are named with their reason by the parent (re-read), and
    flags found by another process can be merged in."""
    from mlip_fast.data.collate import Collator, make_loader

    ds = ManifestDataset(_bad_fixture(tmp_path, n_good=60), transform=ImageTransform(16), max_bad_fraction=0.05)
    loader = make_loader(ds, Collator(tokenizer=object(), tokenize_fn=_stand_in_tokenize), batch_size=8,
                         shuffle=False, num_workers=2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        list(loader)
    skipped = ds.skipped()
    assert [Path(s["source"]).name for s in skipped] == ["corrupt0.png", "missing0.png"]
    assert "corrupt" in skipped[0]["reason"] and skipped[1]["reason"] == "file not found"
    other = ManifestDataset(_bad_fixture(tmp_path, n_good=60), transform=ImageTransform(16), max_bad_fraction=0.05)
    other.mark_bad(ds.bad_items())
    assert other.bad_items() == [5, 20]


def test_manifest_jsonl_labels_and_sections(tmp_path):
    _png(tmp_path / "a.png")
    lines = [
        {"path": "a.png", "text": "FINDINGS: Small effusion.\nIMPRESSION: Effusion.", "Edema": 1, "Pneumonia": ""},
        {"path": str(tmp_path / "a.png"), "text": "INDICATION: cough\nIMPRESSION: Normal.", "Edema": 0,
         "Pneumonia": -1},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = ManifestDataset(path, image_column="path", text_column="text", label_columns=["Edema", "Pneumonia"],
                         parse_sections=True)
    a, b = ds[0], ds[1]
    assert a["report"] == "Small effusion. Effusion." and b["report"] == "Normal."
    assert a["labels"][0] == 1 and math.isnan(a["labels"][1])
    assert b["labels"][0] == 0 and math.isnan(b["labels"][1])
    assert a["image"].shape == (1, 20, 30)  # no transform: the raw image
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2 is not valid JSON"):
        ManifestDataset(bad, image_column="path", text_column="path")


# ------------------------------------------------------------------------------------------- Open-I


def test_openi_report_only_mode_on_real_archive():
    if not (IU / "NLMCXR_reports.tgz").exists():
        pytest.skip("real IU archive not found")
    with pytest.warns(BadSampleWarning, match="empty report"):
        ds = OpenIDataset(IU / "NLMCXR_reports.tgz")
    assert len(ds) == 3927 and ds.bad_count == 28  # 28 of the 3,955 reports have neither section
    item = ds[0]
    assert "image" not in item and item["report"].startswith("The cardiac silhouette and mediastinum size")
    assert item["labels"].tolist() == [0.0] * 7
    positives = torch.stack([ds[i]["labels"] for i in range(len(ds))]).sum(0)
    # MeSH major headings: Cardiomegaly 375, Pulmonary Atelectasis 347, Pleural Effusion 172 reports.
    names = list(ds.label_names)
    assert positives[names.index("Cardiomegaly")] >= 300
    assert positives[names.index("Pleural Effusion")] >= 140
    with pytest.warns(BadSampleWarning):
        from_csv = OpenIDataset(IU / "reports.csv")
    assert len(from_csv) == len(ds) and from_csv[10]["report"] == ds[10]["report"]


def test_openi_with_png_folder(tmp_path):
    xml = """<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR7"/><MedlineCitation><Article>
    <Abstract><AbstractText Label="FINDINGS">Heart is enlarged.</AbstractText>
    <AbstractText Label="IMPRESSION">Cardiomegaly.</AbstractText></Abstract></Article></MedlineCitation>
    <MeSH><major>Cardiomegaly/mild</major></MeSH>
    <parentImage id="CXR7_IM-1-1001"/><parentImage id="CXR7_IM-1-2001"/></eCitation>"""
    (tmp_path / "ecgen-radiology").mkdir()
    (tmp_path / "ecgen-radiology" / "7.xml").write_text(xml)
    _png(tmp_path / "png" / "CXR7_IM-1-1001.png")
    _png(tmp_path / "png" / "CXR7_IM-1-2001.png", seed=1)
    ds = OpenIDataset(tmp_path / "ecgen-radiology", image_dir=tmp_path / "png", transform=ImageTransform(16),
                      label_names=["Cardiomegaly", "Edema"])
    assert len(ds) == 2
    item = ds[1]
    assert item["report"] == "Heart is enlarged. Cardiomegaly." and item["labels"].tolist() == [1.0, 0.0]
    assert item["image"].shape == (1, 16, 16)


# ------------------------------------------------------------------------------------------- CheXpert


def _chexpert_csv(tmp_path, per_class=4):
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
              "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis",
              "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
    rows, k = [], 0
    rng = np.random.default_rng(0)
    root = tmp_path / "data"

    def add(values, frontal="Frontal"):
        nonlocal k
        path = f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_{frontal.lower()}.jpg"
        row = {h: "" for h in header}
        row.update({"Path": path, "Frontal/Lateral": frontal, **values})
        rows.append(row)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(root / path)
        k += 1

    for c in CHEXPERT5:
        for _ in range(per_class):
            add({c: "1.0", **{o: "0.0" for o in CHEXPERT5 if o != c}})
        add({c: "1.0"})  # others blank: qualifies
        add({c: "1.0", **{o: "-1.0" for o in CHEXPERT5 if o != c}})  # uncertain others: strict excludes
        add({c: "1.0"}, frontal="Lateral")  # lateral: excluded
    add({"Cardiomegaly": "1.0", "Edema": "1.0"})  # two positives: never
    add({"Cardiomegaly": "-1.0"})  # uncertain only: never
    path = root / "CheXpert-v1.0-small" / "train.csv"
    _write_csv(path, rows, header)
    return path


def test_chexpert_5x200_builder(tmp_path):
    path = _chexpert_csv(tmp_path)
    rows = {r["Path"]: r for r in csv.DictReader(open(path))}
    sel = build_chexpert_5x200(path, seed=3, per_class=5)
    assert len(sel) == 25
    assert [s["label"] for s in sel] == [c for c in CHEXPERT5 for _ in range(5)]
    for s in sel:
        r = rows[s["path"]]
        assert r["Frontal/Lateral"] == "Frontal" and r[s["label"]] == "1.0"
        assert all(r[o] in ("", "0.0") for o in CHEXPERT5 if o != s["label"])
    assert build_chexpert_5x200(path, seed=3, per_class=5) == sel
    loose = build_chexpert_5x200(path, seed=3, per_class=6, strict=False)
    assert len(loose) == 30
    with pytest.raises(DatasetError, match=r"only 5 images qualify for 'Atelectasis'"):
        build_chexpert_5x200(path, per_class=6)
    picks = {tuple(s["path"] for s in build_chexpert_5x200(path, seed=s, per_class=3)) for s in range(6)}
    assert len(picks) > 1  # the seed matters


def test_chexpert_5x200_dataset_and_saved_selection(tmp_path):
    path = _chexpert_csv(tmp_path)
    ds = CheXpert5x200Dataset(path, transform=ImageTransform(8), per_class=5, seed=1)
    assert len(ds) == 25 and ds.label_names == CHEXPERT5
    item = ds[7]
    assert item["labels"].tolist() == [0, 1, 0, 0, 0] and item["image"].shape == (1, 8, 8)
    saved = ds.save(tmp_path / "chexpert_5x200.csv")
    again = CheXpert5x200Dataset(saved, root=tmp_path / "data", transform=ImageTransform(8))
    assert again.selection == ds.selection
    assert torch.equal(again[7]["image"], item["image"])


# ------------------------------------------------------------------------------------------- RSNA / SIIM


def test_rsna_labels_boxes_and_lookup(tmp_path):
    _png(tmp_path / "imgs" / "p1.png", h=100, w=100, value=10)
    _png(tmp_path / "imgs" / "sub" / "p2.png", h=100, w=100, value=10)
    rows = [
        {"patientId": "p1", "x": "10", "y": "20", "width": "30", "height": "40", "Target": "1"},
        {"patientId": "p1", "x": "60", "y": "60", "width": "10", "height": "10", "Target": "1"},
        {"patientId": "p2", "x": "", "y": "", "width": "", "height": "", "Target": "0"},
        {"patientId": "p3", "x": "", "y": "", "width": "", "height": "", "Target": "0"},
    ]
    labels = _write_csv(tmp_path / "stage_2_train_labels.csv", rows)
    ds = RSNAPneumoniaDataset(labels, tmp_path / "imgs", boxes=True, max_bad_fraction=0.5)
    assert len(ds) == 3 and ds.label_names == ("Pneumonia",)
    a = ds[0]
    assert a["labels"].tolist() == [1.0] and a["mask"].shape == (100, 100)
    expected = np.zeros((100, 100), bool)
    expected[20:60, 10:40] = True
    expected[60:70, 60:70] = True
    assert np.array_equal(a["mask"].numpy(), expected)
    assert ds[1]["labels"].tolist() == [0.0] and not ds[1]["mask"].any()
    with pytest.warns(BadSampleWarning, match="p3.*not found"):
        assert ds[2]["index"] == 0
    plain = RSNAPneumoniaDataset(labels, tmp_path / "imgs", transform=ImageTransform(16), patient_ids=["p2"])
    assert len(plain) == 1 and "mask" not in plain[0] and plain[0]["image"].shape == (1, 16, 16)
    with pytest.raises(DatasetError, match="not in the labels"):
        RSNAPneumoniaDataset(labels, tmp_path / "imgs", patient_ids=["p9"])


def _independent_relative_rle(mask):
    """train-rle.csv encoding written from its definition with plain loops (column-major pixels)."""
    h, w = mask.shape
    pixels = [bool(mask[r, c]) for c in range(w) for r in range(h)]
    out, pos, last_end = [], 0, 0
    while pos < len(pixels):
        if pixels[pos]:
            start = pos
            while pos < len(pixels) and pixels[pos]:
                pos += 1
            out += [start - last_end, pos - start]
            last_end = pos
        else:
            pos += 1
    return " ".join(map(str, out)) if out else "-1"


def test_rle_round_trip_against_independent_encoder():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (16, 16), (31, 9)]:
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < density
            code = _independent_relative_rle(mask)
            assert rle_encode(mask) == code
            assert np.array_equal(rle_decode(code, *shape), mask)
            absolute = rle_encode(mask, relative=False)
            assert np.array_equal(rle_decode(absolute, *shape, relative=False), mask)
    # Column-major: the first run covers the first column top to bottom.
    m = rle_decode("0 3", 3, 2)
    assert m.tolist() == [[True, False], [True, False], [True, False]]
    assert rle_decode("3 2", 3, 2, relative=False).tolist() == [[False, True], [False, False], [True, False]]
    with pytest.raises(ValueError, match="outside"):
        rle_decode("5 10", 3, 2)
    with pytest.raises(ValueError, match="odd"):
        rle_decode("1 2 3", 3, 2)


def test_siim_dataset_masks(tmp_path):
    shape = (24, 20)
    a = np.zeros(shape, bool)
    a[2:6, 3:9] = True
    b = np.zeros(shape, bool)
    b[15:20, 10:12] = True
    _png(tmp_path / "dicom-images-train" / "1.2.3" / "4.5" / "img1.png", *shape)
    _png(tmp_path / "dicom-images-train" / "9.9" / "img2.png", *shape)
    rows = [{"ImageId": "img1", " EncodedPixels": " " + _independent_relative_rle(a)},
            {"ImageId": "img1", " EncodedPixels": _independent_relative_rle(b)},
            {"ImageId": "img2", " EncodedPixels": " -1"}]
    rle = _write_csv(tmp_path / "train-rle.csv", rows)
    ds = SIIMPneumothoraxDataset(rle, tmp_path / "dicom-images-train")
    x = ds[0]
    assert np.array_equal(x["mask"].numpy(), a | b) and x["labels"].tolist() == [1.0]
    assert not ds[1]["mask"].any() and ds[1]["labels"].tolist() == [0.0]
    sized = SIIMPneumothoraxDataset(rle, tmp_path / "dicom-images-train", transform=ImageTransform(12))
    y = sized[0]
    assert y["image"].shape == (1, 12, 12) and y["mask"].shape == (12, 12) and y["mask"].dtype == torch.bool
    assert y["mask"].any()


def test_image_folder(tmp_path):
    for c, n in (("normal", 2), ("pneumonia", 3)):
        for k in range(n):
            _png(tmp_path / c / f"{k}.png", seed=k)
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, transform=ImageTransform(8))
    assert ds.label_names == ("normal", "pneumonia") and len(ds) == 5
    assert ds[0]["labels"].tolist() == [1.0, 0.0] and ds[4]["labels"].tolist() == [0.0, 1.0]
    ordered = ImageFolderDataset(tmp_path, class_names=["pneumonia", "normal"])
    assert ordered[0]["labels"].tolist() == [1.0, 0.0]
    with pytest.raises(DatasetError, match="covid"):
        ImageFolderDataset(tmp_path, class_names=["covid"])


# ------------------------------------------------------------------------------------------- MIMIC prep


def _mimic_fixture(tmp_path):
    jpg, rep = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    studies = [
        ("10000032", "50414267", ["d1", "d2"], "train",
         "FINAL REPORT\n EXAMINATION: CHEST\n\n FINDINGS:\n\n Lungs are clear.\n\n IMPRESSION:\n\n Normal.\n"),
        ("10000032", "53189527", ["d3"], "validate", "IMPRESSION: No acute process.\n"),
        ("10000764", "57375967", ["d4"], "test", "INDICATION: cough\n\nCOMPARISON: none\n"),  # empty
        ("10000898", "50771383", ["d5"], "train", None),  # no report file
        ("10000935", "50578979", ["d6", "d7"], "train", "FINDINGS: Small left effusion."),
    ]
    split_rows, meta_rows, label_rows = [], [], []
    for subject, study, dicoms, split, text in studies:
        folder = jpg / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        for d in dicoms:
            if d != "d7":  # d7 listed but its JPG is missing
                Image.fromarray(np.full((8, 8), 100, np.uint8)).save(folder / f"{d}.jpg")
            split_rows.append({"dicom_id": d, "study_id": study, "subject_id": subject, "split": split})
            meta_rows.append({"dicom_id": d, "ViewPosition": "LATERAL" if d == "d2" else "PA"})
        if text is not None:
            report = rep / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(text)
        label_rows.append({"subject_id": subject, "study_id": study, "Edema": "1.0", "Pneumonia": "-1.0",
                           "Cardiomegaly": ""})
    _write_csv(jpg / "mimic-cxr-2.0.0-split.csv", split_rows)
    with gzip.open(jpg / "mimic-cxr-2.0.0-metadata.csv.gz", "wt", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dicom_id", "ViewPosition"])
        writer.writeheader()
        writer.writerows(meta_rows)
    _write_csv(jpg / "mimic-cxr-2.0.0-chexpert.csv", label_rows)
    return jpg, rep


def test_mimic_prepare_builds_master_csv(tmp_path, capsys):
    jpg, rep = _mimic_fixture(tmp_path)
    out = tmp_path / "prepared" / "master.csv"
    assert mimic_main(["--mimic-jpg", str(jpg), "--reports", str(rep), "--out", str(out), "--views", "PA", "AP"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 of 7 images" in printed and "missing report: 1" in printed and "empty report: 1" in printed
    summary = json.loads((out.parent / "master_summary.json").read_text())
    c = summary["counts"]
    assert (c["wrong_view"], c["missing_image"], c["missing_report"], c["empty_report"]) == (1, 1, 1, 1)
    assert (c["no_findings_section"], c["no_impression_section"]) == (1, 1)
    rows = list(csv.DictReader(open(out)))
    assert [r["dicom_id"] for r in rows] == ["d1", "d3", "d6"]
    assert [r["split"] for r in rows] == ["train", "valid", "train"]
    assert rows[0]["findings"] == "Lungs are clear." and rows[0]["impression"] == "Normal."
    assert rows[1]["findings"] == "" and rows[1]["impression"] == "No acute process."
    assert (rows[0]["Edema"], rows[0]["Pneumonia"], rows[0]["Cardiomegaly"]) == ("1", "-1", "")
    ds = PretrainDataset(out, split="train", transform=ImageTransform(8))
    assert len(ds) == 2 and ds[0]["report"] == "Lungs are clear. Normal."
    assert ds.label_names == ("Cardiomegaly", "Edema", "Pneumonia")
    labels = ds[0]["labels"]
    assert math.isnan(labels[0]) and labels[1] == 1 and math.isnan(labels[2])
    # Without the metadata filter, the lateral view stays.
    again = prepare_mimic(jpg, rep / "files", tmp_path / "all.csv", progress=False)
    assert again["counts"]["written"] == 4


def test_mimic_prepare_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="split"):
        prepare_mimic(tmp_path, tmp_path, tmp_path / "o.csv", progress=False)


def _stand_in_tokenize(tokenizer, texts, max_length, max_sentences):
    """Stand-in text part: one token per character, one sentence per report."""
    t = min(max(len(x) for x in texts), max_length)
    ids = torch.zeros(len(texts), t, dtype=torch.int64)
    attn = torch.zeros(len(texts), t, dtype=torch.int64)
    for i, x in enumerate(texts):
        n = min(len(x), t)
        ids[i, :n] = torch.tensor([ord(ch) for ch in x[:n]])
        attn[i, :n] = 1
    spans = torch.stack([torch.zeros(len(texts), dtype=torch.int64), attn.sum(1)], 1)[:, None]
    return {"input_ids": ids, "attention_mask": attn, "sentence_spans": spans,
            "sentence_mask": torch.ones(len(texts), 1, dtype=torch.bool)}
