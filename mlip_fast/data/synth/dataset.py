"""One synthetic sample in memory (``make_sample``) and the dataset on disk (``generate``: images, masks,
``master.csv`` and ``summary.json``; layout in :mod:`mlip_fast.data.synth`)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import multiprocessing as mp
import platform
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from mlip_fast._records import write_run_record
from mlip_fast.data.labels import SYNTHETIC_LABELS
from mlip_fast.data.synth.anatomy import draw
from mlip_fast.data.synth.findings import LABEL_OF, sample_findings
from mlip_fast.data.synth.reports import write_report

__all__ = ["make_sample", "generate", "generator_fingerprint"]

_PACKAGE = Path(__file__).resolve().parent


def generator_fingerprint(n: int, seed: int, size: int, splits=(0.8, 0.1, 0.1)) -> str:
    """What the files of ``generate(out, n, seed, size, splits=splits)`` are a function of: the parameters, the
    generator's own source (every module of this package) and the numpy and Pillow versions (random streams and
    PNG encoding), hashed. A cache whose recorded fingerprint differs was written by another generator."""
    h = hashlib.sha256(json.dumps({"n": int(n), "seed": int(seed), "size": int(size),
                                   "splits": [float(v) for v in splits], "numpy": np.__version__,
                                   "pillow": PIL.__version__}, sort_keys=True).encode())
    for path in sorted(_PACKAGE.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def make_sample(seed: int, index: int = 0, size: int = 224) -> dict:
    """One synthetic sample in memory (what ``generate`` writes for image ``index`` with ``seed``).

    Returns:
        dict with ``image`` float32 [S, S] in [0, 1], ``masks`` {finding name: bool [S, S]},
        ``findings`` (list of dicts: name, side, zone, extent, sentence), ``findings_text``,
        ``impression``, ``labels`` {label name: 0 | 1} over ``SYNTHETIC_LABELS``.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    findings = sample_findings(rng)
    image, masks = draw(rng, size, findings)
    for name, mask in masks.items():
        if not mask.any():
            # Tiny images can round a small finding away: keep at least its strongest pixel.
            mask.flat[int(np.argmax(np.abs(image - image.mean())))] = True
    findings_text, impression = write_report(rng, findings)
    labels = {label: 0 for label in SYNTHETIC_LABELS}
    for f in findings:
        if f.name in LABEL_OF:
            labels[LABEL_OF[f.name]] = 1
        if f.name == "consolidation" and f.params["patchy"]:
            labels["Pneumonia"] = 1
    return {
        "image": image,
        "masks": masks,
        "findings": [
            {"name": f.name, "side": f.side, "zone": f.zone, "extent": f.extent, "sentence": f.sentence}
            for f in findings
        ],
        "findings_text": findings_text,
        "impression": impression,
        "labels": labels,
    }


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _work(args) -> list[dict]:
    out_dir, seed, size, indices = args
    out_dir = Path(out_dir)
    rows = []
    for i in indices:
        sample = make_sample(seed, i, size)
        study = f"s{i:07d}"
        image_rel = f"images/{study}.png"
        _write_png(out_dir / image_rel, np.round(sample["image"] * 255.0).astype(np.uint8))
        entries = []
        for f in sample["findings"]:
            mask_rel = f"masks/{study}_{f['name']}.png"
            _write_png(out_dir / mask_rel, sample["masks"][f["name"]].astype(np.uint8) * 255)
            entries.append({**f, "mask": mask_rel})
        rows.append({
            "image_path": image_rel,
            "study_id": study,
            "findings": sample["findings_text"],
            "impression": sample["impression"],
            **sample["labels"],
            "findings_json": json.dumps(entries),
            "_index": i,
        })
    return rows


def _splits(n: int, seed: int, fractions) -> list[str]:
    fractions = [float(v) for v in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {fractions}")
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    names = np.empty(n, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_valid]] = "valid"
    names[order[n_train + n_valid :]] = "test"
    return list(names)


def generate(out_dir, n: int, seed: int = 0, size: int = 224, workers: int = 2,
             splits=(0.8, 0.1, 0.1)) -> Path:
    """Write ``n`` synthetic image-report pairs to ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: output folder (created; existing files with the same names are overwritten).
        n: number of images.
        seed: dataset seed; the same seed, n and size give byte-identical files.
        size: image side in pixels (any value >= 8).
        workers: processes (1 = in this process).
        splits: train / valid / test fractions.

    Returns:
        the path of ``master.csv``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    split_of = _splits(n, seed, splits)
    workers = max(1, min(int(workers), n))
    chunk = max(1, min(64, math.ceil(n / (workers * 4))))
    jobs = [(str(out_dir), int(seed), int(size), range(k, min(n, k + chunk))) for k in range(0, n, chunk)]
    if workers == 1:
        parts = [_work(job) for job in jobs]
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            parts = pool.map(_work, jobs, chunksize=1)
    rows = sorted((row for part in parts for row in part), key=lambda r: r["_index"])
    columns = ["image_path", "study_id", "findings", "impression", "split", *SYNTHETIC_LABELS, "findings_json"]
    master = out_dir / "master.csv"
    with open(master, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            row["split"] = split_of[row["_index"]]
            writer.writerow(row)
    wall = time.perf_counter() - start
    prevalence = {label: sum(r[label] for r in rows) / n for label in SYNTHETIC_LABELS}
    summary = {
        "dataset": "mlip_fast synthetic chest X-ray benchmark",
        "n": n, "seed": seed, "size": size, "workers": workers, "splits": list(splits),
        "split_counts": {s: split_of.count(s) for s in ("train", "valid", "test")},
        "prevalence": prevalence,
        "normal_fraction": sum(1 for r in rows if r["findings_json"] == "[]") / n,
        "fingerprint": generator_fingerprint(n, seed, size, splits),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(n / wall, 1),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "master_csv": str(master),
    }
    write_run_record(out_dir, summary)
    return master
