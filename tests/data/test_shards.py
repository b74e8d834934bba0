"""The shard writer and reader: an independent read (tarfile, webdataset) gives back the source's images
and texts; every image format; bad files; resume; checksums; the evaluation reader."""
import csv
import hashlib
import io
import json
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from mlip_fast.data import shard_reader
from mlip_fast.data.pretrain import PretrainDataset
from mlip_fast.data.readers import BadSampleWarning, DatasetError
from mlip_fast.data.shard_reader import ShardError, ShardSplit, decode_image, find_index, load_index, verify_shards
from mlip_fast.data.shards import ShardConfig, main, write_shards
from mlip_fast.data.sources import build_pretrain_dataset
from mlip_fast.data.synth import generate
from mlip_fast.preprocess.images import load_image
from mlip_fast.preprocess.transforms import ImageTransform

from tests.paths import COVID_CXR


def read_tar(path):
    """{key: {ext: bytes}} in stored order and the byte offset of each sample's first member (tarfile)."""
    samples, offsets = {}, []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if key not in samples:
                offsets.append(m.offset)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples, offsets


def reference_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ``size`` with torch's antialiased bicubic (another filter than the writer's Lanczos)."""
    h, w = image.shape
    s = size / min(h, w)
    out = F.interpolate(torch.from_numpy(image)[None, None].double(), size=(round(h * s), round(w * s)),
                        mode="bicubic", antialias=True, align_corners=False)
    return out[0, 0].clamp(0, 1).numpy()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate(root, n=40, seed=0, size=48, workers=1)


@pytest.fixture(scope="module")
def png_shards(tmp_path_factory, synth):
    out = tmp_path_factory.mktemp("png") / "shards"
    write_shards(str(synth), out, ShardConfig(size=256, image_format="png", shard_size=6), progress=False)
    return out


def test_round_trip_by_tarfile_gives_the_source_back(png_shards, synth):
    index = json.loads((png_shards / "index.json").read_text())
    rows = list(csv.DictReader(open(synth)))
    for split in ("train", "valid", "test"):
        source = PretrainDataset(synth, split=split)
        split_rows = [r for r in rows if r["split"] == split]
        entry = index["splits"][split]
        assert entry["samples"] == len(source) and entry["bad"] == 0
        seen, texts = [], []
        for shard in entry["shards"]:
            path = png_shards / shard["path"]
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
            samples, offsets = read_tar(path)
            assert offsets == shard["offsets"] and len(samples) == shard["samples"]
            for key, sample in samples.items():
                assert set(sample) == {"png", "json"}
                meta = json.loads(sample["json"])
                i = meta["index"]
                assert key == f"s{i:08d}"
                rec, row = source.records[i], split_rows[i]
                assert (meta["report"], meta["findings"], meta["impression"]) == (rec["report"], row["findings"], row["impression"])
                assert [math.nan if v is None else v for v in meta["labels"]] == pytest.approx(rec["labels"], nan_ok=True)
                stored = np.asarray(Image.open(io.BytesIO(sample["png"])))
                # 48 px sources are smaller than --size: stored unresized, exactly the folder reader's pixels
                np.testing.assert_array_equal(stored, np.round(load_image(rec["image_path"]) * 255).astype(np.uint8))
                seen.append(i)
                texts.append(meta["report"])
        assert sorted(seen) == list(range(len(source)))
        assert (seen != sorted(seen)) == (split == "train")  # the training split is stored shuffled
        assert (png_shards / entry["reports"]).read_text().splitlines() == texts
    # webdataset reads the same samples
    urls = [str(png_shards / s["path"]) for s in index["splits"]["valid"]["shards"]]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"s{i:08d}" for i in range(len(PretrainDataset(synth, split="valid")))]


def test_resized_jpeg_shards_match_an_independent_resize(tmp_path, synth):
    write_shards(str(synth), tmp_path / "s", ShardConfig(size=32, image_format="jpg", shard_size=100), progress=False)
    source = PretrainDataset(synth, split="valid")
    samples, _ = read_tar(tmp_path / "s" / "valid" / "valid-000000.tar")
    for sample in samples.values():
        i = json.loads(sample["json"])["index"]
        stored = decode_image(sample["jpg"]) / 255.0
        ref = reference_resize(load_image(source.records[i]["image_path"]), 32)
        assert stored.shape == ref.shape == (32, 32)
        assert np.abs(stored - ref).mean() < 0.015  # Lanczos vs bicubic and JPEG q95


def _formats(root):
    """Every real-world format the writer must take, plus two bad files: (manifest, {name: kind})."""
    rng = np.random.default_rng(0)

    def smooth(h, w, channels=0):  # radiograph-like content: resampling filters agree on it
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = 0.5 + 0.3 * np.sin(7 * xx + 3 * yy) * np.cos(5 * yy)
        if channels:
            base = np.stack([base * (0.8 + 0.1 * c) for c in range(channels)], -1)
        return np.round(255 * base).astype(np.uint8)

    files = {}
    yy, xx = np.mgrid[0:300, 0:260]
    Image.fromarray((yy * 200 + xx * 10).astype(np.uint16)).save(root / "grey16.png")
    files["grey16.png"] = "16-bit"
    Image.fromarray(smooth(90, 70)).convert("P", palette=Image.ADAPTIVE).save(root / "palette.png")
    files["palette.png"] = "palette"
    rgba = np.concatenate([smooth(80, 100, 3), np.full((80, 100, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    files["rgba.png"] = "RGBA"
    Image.fromarray(smooth(120, 90, 3)).save(root / "rgb.jpg", quality=90)
    files["rgb.jpg"] = "RGB JPEG"
    Image.fromarray(rng.integers(0, 255, (37, 301), dtype=np.uint8)).save(root / "odd.png")
    files["odd.png"] = "odd size"
    Image.fromarray(rng.integers(0, 255, (15, 20), dtype=np.uint8)).save(root / "tiny.png")
    files["tiny.png"] = "smaller than --size"
    Image.fromarray(smooth(70, 70)).save(root / "png_named.jpg", format="PNG")
    files["png_named.jpg"] = "PNG named .jpg"
    (root / "truncated.jpg").write_bytes((root / "rgb.jpg").read_bytes()[:200])
    files["truncated.jpg"] = "bad"
    files["missing.png"] = "bad"
    with open(root / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report"])
        w.writerows([(name, f"Report of {name}. No effusion.") for name in files])
    return root / "pairs.csv", files


def test_every_format_goes_through_and_bad_files_are_named(tmp_path):
    manifest, files = _formats(tmp_path)
    out = tmp_path / "shards"
    with pytest.warns(BadSampleWarning) as caught:
        with pytest.raises(DatasetError, match="max_bad_fraction"):  # 2 of 9 bad > 1 %
            write_shards(str(manifest), out, ShardConfig(size=64, image_format="png", shard_size=4), progress=False)
    warned = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in warned and "missing.png" in warned
    index = json.loads((out / "index.json").read_text())  # written before the failure, for inspection
    bad = {b["source"].rsplit("/", 1)[-1]: b["reason"] for b in index["bad"]}
    assert set(bad) == {"truncated.jpg", "missing.png"} and "not found" in bad["missing.png"]
    with pytest.raises(DatasetError, match="bad"):  # and training refuses the split
        ShardSplit(out, "train")
    split = ShardSplit(out, "train", max_bad_fraction=0.5)
    assert len(split) == 7
    got = {}
    for shard in split.shards:
        for key, sample in read_tar(shard["file"])[0].items():
            got[json.loads(sample["json"])["source"].rsplit("/", 1)[-1]] = decode_image(sample["png"])
    assert set(got) == {n for n, k in files.items() if k != "bad"}
    for name, stored in got.items():
        source = load_image(tmp_path / name)  # the folder reader's grey view of the file
        if min(source.shape) <= 64:
            assert stored.dtype == np.uint8
            np.testing.assert_array_equal(stored, np.round(source * 255).astype(np.uint8), err_msg=name)
            continue
        scale = 65535.0 if files[name] == "16-bit" else 255.0
        ref = reference_resize(source, 64)
        assert min(stored.shape) == 64 and stored.shape == ref.shape, name
        assert np.abs(stored / scale - ref).mean() < 0.01, name
    assert got["grey16.png"].dtype == np.uint16 and len(np.unique(got["grey16.png"])) > 1000  # 16 bits kept
    assert got["odd.png"].shape == (37, 301) and got["tiny.png"].shape == (15, 20)


def test_resume_rewrites_only_missing_shards_and_refuses_other_plans(tmp_path, synth):
    out = tmp_path / "s"
    config = ShardConfig(size=32, shard_size=5)
    first = write_shards(str(synth), out, config, workers=2, progress=False)
    shards = [s for e in first["splits"].values() for s in e["shards"]]
    victim = out / shards[2]["path"]
    victim.unlink()
    victim.with_suffix(".json").unlink()
    (out / "index.json").unlink()
    (victim.parent / (victim.name + ".tmp999")).write_bytes(b"half a shard")  # an interrupted write
    again = write_shards(str(synth), out, config, workers=2, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reused_shards"] == len(shards) - 1 and summary["shards"] == len(shards)
    assert again["splits"] == first["splits"]  # same bytes, checksums, offsets: deterministic
    with pytest.raises(ShardError, match="other data or settings"):
        write_shards(str(synth), out, ShardConfig(size=24, shard_size=5), progress=False)
    write_shards(str(synth), out, ShardConfig(size=24, shard_size=5), overwrite=True, progress=False)
    assert json.loads((out / "index.json").read_text())["config"]["size"] == 24
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ShardError, match="--out"):
            write_shards(str(synth), foreign, config, overwrite=overwrite, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_verify_finds_a_changed_byte_and_the_reader_a_missing_shard(tmp_path, synth):
    out = tmp_path / "s"
    write_shards(str(synth), out, ShardConfig(size=32, shard_size=8), progress=False)
    assert verify_shards(out, progress=False) == []
    shard = sorted((out / "train").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_shards(out, progress=False)
    assert len(problems) == 1 and shard.name in problems[0]
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard.name} is missing"):
        ShardSplit(out, "train")


def test_shard_split_reads_in_order_and_splits_shards_across_workers(png_shards, synth):
    split = build_pretrain_dataset(str(png_shards / "index.json"), "test", ImageTransform(48))
    assert isinstance(split, ShardSplit) and split.label_names == tuple(PretrainDataset(synth, split="test").label_names)
    items = list(split)
    assert [it["index"] for it in items] == list(range(len(split)))
    assert [it["report"] for it in items] == split.reports()
    assert items[0]["image"].shape == (1, 48, 48) and items[0]["labels"].dtype == torch.float32
    loader = torch.utils.data.DataLoader(ShardSplit(png_shards, "train"), batch_size=None, num_workers=2)
    assert sorted(it["index"] for it in loader) == list(range(len(ShardSplit(png_shards, "train"))))
    assert build_pretrain_dataset(str(png_shards), "unknown", None) is None
    with pytest.raises(ShardError, match="no split"):
        ShardSplit(png_shards, "holdout")


def test_a_jsonl_manifest_is_not_an_index(tmp_path):
    (tmp_path / "pairs.json").write_text('{"image": "a.png", "report": "x"}\n')
    assert find_index(tmp_path / "pairs.json") is None and find_index(tmp_path) is None
    with pytest.raises(ShardError, match="not a shard folder"):
        load_index(tmp_path)


def test_decoders_agree_and_pillow_is_the_fallback(tmp_path, synth, monkeypatch):
    write_shards(str(synth), tmp_path / "s", ShardConfig(size=32, shard_size=100), progress=False)
    samples, _ = read_tar(tmp_path / "s" / "valid" / "valid-000000.tar")
    for sample in samples.values():
        a, b = decode_image(sample["jpg"], "simplejpeg"), decode_image(sample["jpg"], "pillow")
        assert a.dtype == b.dtype == np.uint8 and np.abs(a.astype(int) - b).max() <= 1
    monkeypatch.setattr(shard_reader, "simplejpeg", None)
    np.testing.assert_array_equal(decode_image(sample["jpg"]), b)
    with pytest.raises(RuntimeError, match="pip install simplejpeg"):
        decode_image(sample["jpg"], "simplejpeg")


def test_command_line(tmp_path, synth, capsys):
    out = tmp_path / "s"
    assert main(["--data", str(synth), "--out", str(out), "--size", "32", "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"index: {out / 'index.json'}" in text and "per 100k images" in text
    assert main(["--verify", str(out), "--no-progress"]) == 0
    assert main(["--data", str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(not COVID_CXR.is_dir(), reason="needs ../shared/data/covid_chestxray")
def test_real_png_named_jpg_and_rgba_images(tmp_path):
    """Real files of the COVID-19 collection: an RGBA PNG named .jpg and a grey JPEG, resized."""
    names = ["000001-12.jpg", "00cfd1c1.jpg"]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "report")] + [(str(COVID_CXR / "images" / n), "Chest film.") for n in names])
    write_shards(str(tmp_path / "pairs.csv"), tmp_path / "s", ShardConfig(size=128), progress=False)
    samples, _ = read_tar(tmp_path / "s" / "train" / "train-000000.tar")
    for sample in samples.values():
        meta = json.loads(sample["json"])
        ref = reference_resize(load_image(meta["source"]), 128)
        stored = decode_image(sample["jpg"]) / 255.0
        assert stored.shape == ref.shape and np.abs(stored - ref).mean() < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ShardSplit(tmp_path / "s", "train")) == 2


def test_zero_shot_from_shards_equals_zero_shot_from_the_folder(png_shards, synth):
    """The evaluation of an iterable shard split scores exactly what the folder reader's split scores
    (PNG shards store the 48 px synthetic pixels unchanged), image by image and class by class."""
    from mlip_fast.eval.common import eval_transform
    from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
    from mlip_fast.eval.zeroshot import MODES, zero_shot_scores
    from mlip_fast.models import create_model

    model = create_model("mlip-tiny", vision={"image_size": 48}).eval()
    transform = eval_transform(model)
    kw = dict(progress=False, batch_size=3)
    shards = zero_shot_scores(model, ShardSplit(png_shards, "test", transform), "synthetic", **kw)
    folder = zero_shot_scores(model, SyntheticBenchmark(synth.parent, split="test", transform=transform),
                              "synthetic", **kw)
    assert shards.class_names == folder.class_names and len(shards.class_names) == 7
    assert shards.index.tolist() == folder.index.tolist() == list(range(len(PretrainDataset(synth, split="test"))))
    np.testing.assert_array_equal(shards.labels, folder.labels)
    for mode in MODES:
        np.testing.assert_allclose(shards.scores[mode], folder.scores[mode], rtol=0, atol=1e-6)
    assert np.ptp(folder.scores["combined"]) > 0


def _edit_index(out, edit) -> None:
    index = json.loads((out / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index, indent=1))


@pytest.fixture()
def small_shards(tmp_path, synth):
    out = tmp_path / "data" / "shards"
    write_shards(str(synth), out, ShardConfig(size=32, shard_size=8), progress=False)
    return out


def test_an_index_cannot_point_outside_its_folder(small_shards, tmp_path, capsys):
    """Shard and reports paths of index.json stay inside the shard folder: ``..``, an absolute path and a symlink
    out are refused, by --verify (exit 2, one line) and by training. Before, --verify said "every shard matches its
    index" and the outside file's strings ended up in the exported tokenizer."""
    out = small_shards
    outside = tmp_path / "outside"
    outside.mkdir()
    first = out / json.loads((out / "index.json").read_text())["splits"]["train"]["shards"][0]["path"]
    (outside / "evil.tar").write_bytes(first.read_bytes())
    (outside / "secret.txt").write_text("SECRET TOKEN\n")
    (out / "train" / "link.tar").symlink_to(outside / "evil.tar")
    original = (out / "index.json").read_text()
    cases = [
        (lambda ix: ix["splits"]["train"]["shards"][0].update(path="../../outside/evil.tar"), "leaves the data folder"),
        (lambda ix: ix["splits"]["train"]["shards"][0].update(path=str(outside / "evil.tar")), "leaves the data folder"),
        (lambda ix: ix["splits"]["train"]["shards"][0].update(path="train/link.tar"), "outside the data folder"),
        (lambda ix: ix["splits"]["train"].update(reports="../../outside/secret.txt"), "reports file .* leaves the data"),
    ]
    for edit, says in cases:
        (out / "index.json").write_text(original)
        _edit_index(out, edit)
        with pytest.raises(ShardError, match=says):
            build_pretrain_dataset(str(out), "train", None)
        capsys.readouterr()
        assert main(["--verify", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "index.json" in err[0], err


def test_edited_counts_offsets_and_sample_bytes_are_named(small_shards, capsys):
    """An edited sample count is refused when the index is read; edited offsets and a sample whose JSON bytes were
    flipped are named by shard and sample, by --verify (exit 2, no traceback) and while reading. Before: a silent
    run on other samples, a traceback from --verify, a UnicodeDecodeError naming no shard."""
    out = small_shards
    original = (out / "index.json").read_text()
    _edit_index(out, lambda ix: ix["splits"]["train"]["shards"][0].update(samples=9))
    with pytest.raises(ShardError, match=r"contradicts itself .*8 samples but 9 offsets|9 samples but 8 offsets"):
        ShardSplit(out, "train")
    (out / "index.json").write_text(original)
    _edit_index(out, lambda ix: ix["splits"]["train"].update(samples=ix["splits"]["train"]["samples"] + 1))
    with pytest.raises(ShardError, match=r"the split says \d+ samples, its shards hold \d+"):
        ShardSplit(out, "train")

    (out / "index.json").write_text(original)
    _edit_index(out, lambda ix: ix["splits"]["train"]["shards"][0]["offsets"].__setitem__(1, 512))
    name = json.loads(original)["splits"]["train"]["shards"][0]["path"]
    capsys.readouterr()
    assert main(["--verify", str(out), "--no-progress"]) == 2
    text = capsys.readouterr().out
    assert name in text and "Traceback" not in text

    (out / "index.json").write_text(original)
    shard = out / name
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 2] = 0xFF  # inside the JSON text: no longer UTF-8
    shard.write_bytes(bytes(data))
    _edit_index(out, lambda ix: ix["splits"]["train"]["shards"][0].update(sha256=hashlib.sha256(data).hexdigest()))
    key = member.name.split(".")[0]
    with pytest.raises(ShardError, match=rf"{shard}: sample '{key}': its JSON member does not decode"):
        list(ShardSplit(out, "train"))
    assert main(["--verify", str(out), "--no-progress"]) == 2
    text = capsys.readouterr().out
    assert f"{name}: {shard}: sample '{key}': its JSON member does not decode" in text
