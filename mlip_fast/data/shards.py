"""Pre-resized WebDataset shards of any pre-training source (see docs/data.md)::

    python -m mlip_fast.data.shards --data SOURCE --out DIR [--size 256] [--format jpg|png]
                                    [--shard-size 1000] [--workers N] [--seed 0]
    python -m mlip_fast.data.shards --verify DIR

``SOURCE`` is anything training reads (``mlip_fast.data.sources``): a prepared MIMIC-CXR ``master.csv``,
the synthetic benchmark's folder, an Open-I folder, a CSV / JSONL manifest. Every image is decoded once
(large JPEGs at a reduced DCT scale that keeps the shorter side >= 2 x ``--size``), converted to grey as
``load_image`` does, resized so that its shorter side is ``--size`` (Lanczos, aspect kept, never
enlarged) and stored as an 8-bit JPEG or PNG; with ``--format png`` a source of more than 8 bits (16-bit
PNG / TIFF, DICOM) is stored as a 16-bit PNG. Each sample also has a JSON member: the report the model
sees, its findings and impression sections (when the source has them), the labels (null = unknown), the
source index, id and file. The training split is stored in a seeded random order, so every shard is a
random subset; the evaluation splits keep the source order.

Resumable: shard ``k`` of a split always holds the same records (a plan fixed by the source, the
settings and the seed, saved in ``plan.json``); a shard is written to a temporary file, renamed into
place, then recorded in ``<shard>.json``; a rerun skips every recorded shard and refuses a folder
planned with other data or settings unless ``--overwrite``. A bad image (missing, corrupt, unreadable)
is left out, warned about with its file and reason, and listed in the index; a split with more than
``--max-bad-fraction`` bad or report-less items makes the command fail after writing the index.
Ends with ``index.json`` (the contract read by ``mlip_fast.data.shard_reader``) and ``summary.json``
(counts, time, disk, settings, versions).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm
from webdataset import TarWriter

from mlip_fast._cli import no_bar
from mlip_fast._records import jsonable, versions
from mlip_fast.data.pretrain import OpenIDataset, PretrainDataset
from mlip_fast.data.readers import BadSampleWarning, DatasetError
from mlip_fast.preprocess.images import ImageLoadError, load_image, sniff_format
from mlip_fast.preprocess.reports import report_text

from .shard_reader import INDEX_NAME, SHARD_FORMAT, SHARD_VERSION, ShardError, verify_shards
from .sources import DataConfigError, build_pretrain_dataset

__all__ = ["ShardConfig", "collect_records", "write_shards", "resize_shorter", "encode_image", "main"]

SPLITS = ("train", "valid", "test")
PLAN_NAME = "plan.json"
SUMMARY_NAME = "summary.json"
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


@dataclass(frozen=True)
class ShardConfig:
    """Writer settings: ``size`` (shorter side in pixels), ``image_format`` ("jpg" or "png"), JPEG
    ``quality``, ``shard_size`` (samples per shard), ``seed`` (training-split order), ``max_bad_fraction``."""

    size: int = 256
    image_format: str = "jpg"
    quality: int = 95
    shard_size: int = 1000
    seed: int = 0
    max_bad_fraction: float = 0.01

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"size must be >= 8, got {self.size}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")


# ------------------------------------------------------------------------------------------- images
def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """``float32 [H, W]`` resized (Lanczos, in float) so that the shorter side is ``size``, aspect kept;
    an image whose shorter side is already <= ``size`` is returned unchanged."""
    h, w = image.shape
    if min(h, w) <= size:
        return image
    scale = size / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((nw, nh), Image.LANCZOS))
    return np.clip(out, 0.0, 1.0)


def _source_bits(path: Path) -> int:
    """16 when the file holds more than 8 bits per pixel (16-bit PNG / TIFF, DICOM), else 8 (a header
    read; a file that cannot be opened is left to ``load_image`` to report)."""
    try:
        with open(path, "rb") as f:
            fmt = sniff_format(f.read(132))
        if fmt == "dicom" or path.suffix.lower() in (".dcm", ".dicom"):
            return 16
        if fmt in ("png", "tiff"):
            with Image.open(path) as img:
                return 16 if img.mode in _HIGH_DEPTH_MODES else 8
    except Exception:  # noqa: BLE001 - load_image raises the error that names the problem
        return 8
    return 8


def encode_image(path: Path, config: ShardConfig) -> bytes:
    """The stored bytes of one source image (see the module doc). Raises ``ImageLoadError``."""
    image = resize_shorter(load_image(path, max_side=2 * config.size), config.size)
    buf = io.BytesIO()
    if config.image_format == "png" and _source_bits(Path(path)) == 16:
        Image.fromarray(np.round(image * 65535.0).astype(np.uint16)).save(buf, format="PNG")
    else:
        pixels = Image.fromarray(np.round(image * 255.0).astype(np.uint8))
        if config.image_format == "png":
            pixels.save(buf, format="PNG")
        else:
            pixels.save(buf, format="JPEG", quality=config.quality)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ records
def _sections(dataset) -> list:
    """(findings, impression, id) per record of ``dataset`` (None where the source has no sections)."""
    if isinstance(dataset, PretrainDataset):
        rows = [r for r in dataset.rows if report_text(r["findings"], r["impression"])]
        return [(r["findings"], r["impression"], r.get("dicom_id") or r["image_path"]) for r in rows]
    if isinstance(dataset, OpenIDataset):
        reps = [rep for rep in dataset.reports for _ in rep["images"] if report_text(rep["findings"], rep["impression"])]
        return [(rep["findings"], rep["impression"], Path(rec["source"]).stem) for rep, rec in zip(reps, dataset.records)]
    return [(None, None, Path(rec["source"]).name) for rec in dataset.records]


def collect_records(data: str, image_root: str | None = None) -> tuple[dict, tuple, dict]:
    """``({split: [record]}, label_names, {split: [dropped source]})`` of a source; a record is
    ``{"index", "image_path", "report", "findings", "impression", "labels", "id", "source"}`` where
    ``index`` is the item index of the folder reader for that split."""
    records, dropped, label_names = {}, {}, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)  # dropped rows are reported with the rest
        for split in SPLITS:
            ds = build_pretrain_dataset(data, split, None, image_root=image_root, max_bad_fraction=0.99)
            if ds is None:
                continue
            if not hasattr(ds, "records"):
                raise DataConfigError(f"--data {data} is already a shard folder")
            label_names = tuple(ds.label_names)
            records[split] = [
                {"index": i, "image_path": rec["image_path"], "report": rec["report"], "findings": f, "impression": imp,
                 "labels": [None if v != v else v for v in rec["labels"]], "id": str(ident), "source": rec["source"]}
                for i, (rec, (f, imp, ident)) in enumerate(zip(ds.records, _sections(ds)))]
            dropped[split] = list(ds.dropped)
    return records, label_names or (), dropped


def _fingerprint(config: ShardConfig, records: dict) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    for split, recs in records.items():
        h.update(split.encode())
        for r in recs:
            h.update(json.dumps([r["index"], r["source"], r["report"], r["labels"]]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- shards
class _HashingFile:
    """Write-only file wrapper that keeps the SHA-256 and size of what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(value), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_shard(task: tuple) -> dict:
    """Writes one shard (or reuses a recorded one); returns its record (see ``<shard>.json``)."""
    out, split, number, records, config = task
    final = out / split / f"{split}-{number:06d}.tar"
    record_path = final.with_suffix(".json")
    if record_path.is_file() and final.is_file():
        entry = json.loads(record_path.read_text(encoding="utf-8"))
        if entry["bytes"] == final.stat().st_size:
            return {**entry, "reused": True}
    start = time.process_time()
    offsets, bad, reports = [], [], []
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as raw:
        sink = _HashingFile(raw)
        with TarWriter(sink, encoder=False, mtime=0, user="mlip", group="mlip") as tar:
            for rec in records:
                try:
                    image = encode_image(rec["image_path"], config)
                except ImageLoadError as err:
                    bad.append({"split": split, "source": rec["source"], "reason": err.reason})
                    continue
                meta = {k: rec[k] for k in ("index", "id", "source", "report", "findings", "impression", "labels")}
                offsets.append(tar.tarstream.offset)
                tar.write({"__key__": f"s{rec['index']:08d}", config.image_format: image,
                           "json": json.dumps(meta).encode("utf-8")})
                reports.append(rec["report"])
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    entry = {"path": f"{split}/{final.name}", "samples": len(offsets), "bytes": sink.size,
             "sha256": sink.sha.hexdigest(), "offsets": offsets, "bad": bad, "reports": reports,
             "cpu_s": round(time.process_time() - start, 3)}
    _write_json(record_path, entry)
    return {**entry, "reused": False}


def _prepare_out(out: Path, plan: dict, overwrite: bool) -> None:
    """Creates ``out`` or checks that it holds this plan's partial output; refuses anything else."""
    plan_path = out / PLAN_NAME
    if out.exists() and any(out.iterdir()):
        old = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else None
        if old is not None and old["fingerprint"] == plan["fingerprint"]:
            return
        if not overwrite:
            why = ("it was planned with other data or settings" if old is not None
                   else "it is not empty and holds no shard plan")
            raise ShardError(f"--out {out}: {why}; use a new folder, or --overwrite to replace its shards")
        if old is None:
            raise ShardError(f"--out {out}: not a shard folder; --overwrite only replaces a previous writer's output")
        for name in (*SPLITS, INDEX_NAME, PLAN_NAME, SUMMARY_NAME):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, plan)


def write_shards(data: str, out, config: ShardConfig = ShardConfig(), *, image_root: str | None = None,
                 workers: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes (or completes) the shard folder ``out`` for ``data``; returns the index dict.

    Raises:
        ShardError: ``out`` holds something else (before any image is read).
        DatasetError: a split has more than ``config.max_bad_fraction`` bad items (after the index is
            written, so the bad files can be inspected).
    """
    wall0 = time.perf_counter()
    out = Path(out)
    records, label_names, dropped = collect_records(data, image_root)
    if not records.get("train"):
        raise DataConfigError(f"--data {data}: no training records")
    order = np.random.default_rng([config.seed, 0x5A4D]).permutation(len(records["train"]))
    records["train"] = [records["train"][i] for i in order]
    plan = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "config": dataclasses.asdict(config),
            "fingerprint": _fingerprint(config, records), "source": str(data),
            "splits": {s: {"records": len(r), "shards": -(-len(r) // config.shard_size)} for s, r in records.items()}}
    _prepare_out(out, plan, overwrite)
    tasks = []
    for split, recs in records.items():
        (out / split).mkdir(exist_ok=True)
        tasks += [(out, split, k, recs[k * config.shard_size:(k + 1) * config.shard_size], config)
                  for k in range(plan["splits"][split]["shards"])]
    entries = []
    total = sum(len(t[3]) for t in tasks)
    with tqdm(total=total, unit="img", desc=f"shards -> {out}", disable=no_bar(progress), dynamic_ncols=True) as bar:
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap_unordered(_write_shard, tasks) if pool else map(_write_shard, tasks)
            for entry in results:
                for b in entry["bad"] if not entry["reused"] else ():
                    warnings.warn(f"{b['split']}: skipping {b['source']}: {b['reason']}", BadSampleWarning, stacklevel=2)
                entries.append(entry)
                bar.update(entry["samples"] + len(entry["bad"]))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return _finish(out, data, config, plan, entries, label_names, dropped, workers, time.perf_counter() - wall0)


def _finish(out, data, config, plan, entries, label_names, dropped, workers, wall) -> dict:
    """Writes ``reports.txt`` per split, ``index.json`` and ``summary.json``; checks the bad share."""
    entries.sort(key=lambda e: e["path"])
    splits, bad_all, problems = {}, [], []
    for split in plan["splits"]:
        mine = [e for e in entries if e["path"].startswith(f"{split}/")]
        reports = f"{split}/reports.txt"
        (out / reports).write_text("".join(r + "\n" for e in mine for r in e["reports"]), encoding="utf-8")
        bad = [b for e in mine for b in e["bad"]]
        bad_all += bad + [{"split": split, "source": s, "reason": "empty report"} for s in dropped.get(split, [])]
        n = sum(e["samples"] for e in mine)
        splits[split] = {"samples": n, "bad": len(bad), "dropped": len(dropped.get(split, [])),
                         "bytes": sum(e["bytes"] for e in mine), "reports": reports,
                         "shards": [{k: e[k] for k in ("path", "samples", "bytes", "sha256", "offsets")} for e in mine]}
        share = (len(bad) + len(dropped.get(split, []))) / max(1, n + len(bad) + len(dropped.get(split, [])))
        if share > config.max_bad_fraction:
            problems.append(f"{split}: {100 * share:.2f}% bad")
    index = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "config": dataclasses.asdict(config),
             "source": str(data), "label_names": list(label_names), "splits": splits, "bad": bad_all}
    _write_json(out / INDEX_NAME, index)
    n_images = sum(s["samples"] for s in splits.values())
    n_bytes = sum(s["bytes"] for s in splits.values())
    written = [e for e in entries if not e["reused"]]
    cpu = sum(e["cpu_s"] for e in written)
    n_written = sum(e["samples"] + len(e["bad"]) for e in written)
    per_image = cpu / n_written if n_written else None  # None: every shard was already there
    summary = {"index": str(out / INDEX_NAME), "source": str(data), "config": dataclasses.asdict(config),
               "samples": {s: v["samples"] for s, v in splits.items()}, "bad": len(bad_all),
               "bad_files": bad_all[:20], "shards": len(entries), "reused_shards": len(entries) - len(written),
               "bytes": n_bytes, "wall_s": round(wall, 2), "workers": workers, "cpu_s_written": round(cpu, 2),
               "cpu_ms_per_image": None if per_image is None else round(1e3 * per_image, 3),
               "per_100k_images": {"gb": round(n_bytes / max(1, n_images) * 1e5 / 1e9, 3),
                                   "cpu_hours": None if per_image is None else round(per_image * 1e5 / 3600, 3)},
               "versions": versions(), "command": " ".join(sys.argv)}
    _write_json(out / SUMMARY_NAME, summary)
    if problems:
        raise DatasetError(f"{out}: more than max_bad_fraction {config.max_bad_fraction} of the items are bad "
                             f"({'; '.join(problems)}); first: {[b['source'] for b in bad_all[:5]]} (all in {INDEX_NAME})")
    return index


# ------------------------------------------------------------------------------------------- command
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlip_fast.data.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="source: master.csv (or its folder), Open-I folder, CSV/JSONL manifest")
    p.add_argument("--out", help="shard folder to write (created; an interrupted run's folder is completed)")
    p.add_argument("--verify", metavar="DIR", help="only check an existing shard folder against its index")
    p.add_argument("--size", type=int, default=256, help="shorter side in pixels (never enlarged)")
    p.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the training split's stored order")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="writer processes")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--overwrite", action="store_true", help="replace the shards of another plan in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.verify:
            problems = verify_shards(args.verify, progress=not args.no_progress)
            print("\n".join(problems) if problems else f"{args.verify}: every shard matches its index")
            return 2 if problems else 0
        if not args.data or not args.out:
            p.error("--data and --out are required (or --verify DIR)")
        config = ShardConfig(args.size, args.image_format, args.quality, args.shard_size, args.seed, args.max_bad_fraction)
        index = write_shards(args.data, args.out, config, image_root=args.image_root, workers=max(1, args.workers),
                             overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, DatasetError, FileNotFoundError) as err:  # DataConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads((Path(args.out) / SUMMARY_NAME).read_text())
    for split, entry in index["splits"].items():
        print(f"{split}: {entry['samples']} samples in {len(entry['shards'])} shard(s), {entry['bytes'] / 1e6:.1f} MB, "
              f"{entry['bad']} bad, {entry['dropped']} without a report")
    per_100k = summary["per_100k_images"]
    print(f"{summary['wall_s']:.1f} s with {summary['workers']} worker(s), {summary['reused_shards']} shard(s) reused; "
          f"CPU per image {summary['cpu_ms_per_image']} ms; per 100k images: {per_100k['gb']} GB, "
          f"{per_100k['cpu_hours']} CPU hours\nindex: {Path(args.out) / INDEX_NAME}\nsummary: {Path(args.out) / SUMMARY_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
