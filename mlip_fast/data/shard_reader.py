"""Reading the WebDataset tar shards written by ``python -m mlip_fast.data.shards``.

Layout of a shard folder (see docs/data.md)::

    OUT/index.json                  the contract: format, image settings, label names, per split the shard
                                    list (path, samples, bytes, sha256, byte offset of every sample)
    OUT/<split>/<split>-000000.tar  WebDataset shards: <key>.jpg | <key>.png (8-bit grey, or 16-bit grey
                                    PNG) and <key>.json (report, findings, impression, labels, index, id)
    OUT/<split>/reports.txt         the split's reports, one per line (tokenizer training without a scan)

A sample's ``key`` is ``s<index:08d>``, where ``index`` is its position in the source dataset (the index
the folder reader would give it). Reading goes through webdataset's tar iterators, starting at a
recorded byte offset, so a reader can begin in the middle of a shard without reading what precedes it.

Trust. A shard folder may come from elsewhere: every path its index lists (shards, reports files) must stay
inside the folder (``mlip_fast.data.readers.resolve_inside``: no absolute path, no ``..``, no symlink out);
the counts and offsets must agree with each other and with the shard sizes (:func:`load_index`); a read that
finds fewer samples than the index promises, a tar that does not parse at a recorded offset, and a sample
whose JSON or image does not decode are each a :class:`ShardError` naming the shard and the sample.
``--verify`` (:func:`verify_shards`) re-reads everything: checksums, offsets, counts and every sample's decode.

``ShardSplit`` is one split as an ``IterableDataset`` of item dicts (``image`` [C, S, S] after the
transform, ``report``, ``labels`` [L] float32 with NaN = unknown, ``index``), in stored order with
the shards divided among DataLoader workers: the evaluation reader. Training order lives in
``mlip_fast.data.shard_order``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from mlip_fast._cli import no_bar
from mlip_fast.data.readers import DatasetError, resolve_inside

try:  # libjpeg-turbo through simplejpeg: faster JPEG decoding; Pillow when it is not installed
    import simplejpeg
except ImportError:  # pragma: no cover - exercised on machines without the optional package
    simplejpeg = None

__all__ = ["SHARD_FORMAT", "INDEX_NAME", "DECODERS", "ShardError", "find_index", "load_index", "read_samples",
           "verify_shards", "decode_image", "to_unit_float", "parse_meta", "sample_index", "make_item", "ShardSplit"]

SHARD_FORMAT = "mlip_fast.shards"
SHARD_VERSION = 1
INDEX_NAME = "index.json"
IMAGE_EXTS = ("jpg", "png")
DECODERS = ("auto", "simplejpeg", "pillow")
_TAR_BLOCK = 512


class ShardError(DatasetError):
    """A shard folder or index is unusable (missing or changed shards, unknown format, unreadable sample)."""


def find_index(path) -> Path | None:
    """The ``index.json`` that ``path`` names (the file itself or a folder holding it), or None when
    ``path`` is not a shard folder. A JSON-lines manifest (one object per line) is not an index."""
    path = Path(path)
    candidate = path / INDEX_NAME if path.is_dir() else path
    if not candidate.is_file() or candidate.suffix.lower() != ".json":
        return None
    with open(candidate, encoding="utf-8") as f:
        if f.readline().strip() != "{":  # the index is written indented; a JSONL line is a whole object
            return None
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return candidate if isinstance(data, dict) and data.get("format") == SHARD_FORMAT else None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_problems(shard) -> list:
    """What in one shard entry of an index contradicts itself: counts, offsets (tar headers start on 512-byte
    blocks, the first at 0, each after the previous, all inside the file), size, checksum."""
    if not isinstance(shard, dict):
        return ["a shard entry is not an object"]
    name, offsets, samples, size = shard.get("path"), shard.get("offsets"), shard.get("samples"), shard.get("bytes")
    if not _is_count(samples) or not _is_count(size):
        return [f"{name}: samples and bytes must be counts, got {samples!r} and {size!r}"]
    if not isinstance(shard.get("sha256"), str):
        return [f"{name}: no sha256"]
    if not isinstance(offsets, list) or not all(_is_count(o) for o in offsets):
        return [f"{name}: offsets must be a list of byte counts"]
    if len(offsets) != samples:
        return [f"{name}: {samples} samples but {len(offsets)} offsets"]
    if offsets and (offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:]))
                    or any(o % _TAR_BLOCK for o in offsets) or offsets[-1] >= size):
        return [f"{name}: offsets are not increasing 512-byte tar blocks from 0 inside its {size} bytes"]
    return []


def load_index(path, check_files: bool = True) -> dict:
    """The parsed index of a shard folder with absolute shard paths (``"file"`` in every shard entry).

    Every listed path must stay inside the folder (see the module doc), and the per-shard and per-split counts
    and offsets must agree.

    Args:
        path: the folder or its ``index.json``.
        check_files: every listed shard must exist with its recorded size (a stat per shard, no read).

    Raises:
        ShardError: not a shard index, an unsupported version, a path out of the folder, counts or offsets that
            contradict each other, or missing / resized shards (named).
    """
    index_path = find_index(path)
    if index_path is None:
        raise ShardError(f"{path}: not a shard folder ({INDEX_NAME} with \"format\": \"{SHARD_FORMAT}\" not found); "
                         f"write one with python -m mlip_fast.data.shards")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("version") != SHARD_VERSION:
        raise ShardError(f"{index_path}: shard format version {index.get('version')}, this reader reads {SHARD_VERSION}")
    root = index_path.parent
    splits = index.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(e, dict) and isinstance(e.get("shards"), list)
                                               for e in splits.values()):
        raise ShardError(f"{index_path}: malformed index (\"splits\" must map each split to its \"shards\" list)")
    problems = []
    for split, entry in splits.items():
        try:
            if "reports" in entry:
                resolve_inside(root, entry["reports"], f"{index_path}: {split} reports file")
            for shard in entry["shards"]:
                found = _shard_problems(shard)
                if found:
                    problems += found
                    continue
                shard["file"] = str(resolve_inside(root, shard["path"], f"{index_path}: shard path"))
        except DatasetError as err:
            raise ShardError(str(err)) from None
        if not problems and entry.get("samples") != sum(s["samples"] for s in entry["shards"]):
            problems.append(f"{split}: the split says {entry.get('samples')!r} samples, its shards hold "
                            f"{sum(s['samples'] for s in entry['shards'])}")
    if problems:
        raise ShardError(f"{index_path}: the index contradicts itself ({len(problems)} problem(s)): {problems[:5]}; "
                         f"rewrite it with python -m mlip_fast.data.shards")
    if check_files:
        for entry in splits.values():
            for shard in entry["shards"]:
                p = Path(shard["file"])
                if not p.is_file():
                    problems.append(f"{shard['path']} is missing")
                elif p.stat().st_size != shard["bytes"]:
                    problems.append(f"{shard['path']} has {p.stat().st_size} bytes, the index says {shard['bytes']}")
    if problems:
        raise ShardError(f"{index_path}: {len(problems)} shard(s) do not match the index: {problems[:5]}; "
                         f"rerun the writer on the same folder to complete it")
    index["root"] = str(root)
    index["index_path"] = str(index_path)
    return index


def webdataset():
    """The ``webdataset`` package, needed only to read or write shards: imported on first use (so the rest of
    the training app imports without it, e.g. on a machine that only benchmarks the model), with what to
    install when it is missing."""
    try:
        import webdataset as wds
    except ImportError as err:
        raise ImportError("reading or writing shards needs the webdataset package: pip install webdataset") from err
    return wds


def read_samples(path, offset: int = 0, count: int | None = None) -> Iterator[dict]:
    """Raw samples (``{"__key__", "jpg" | "png": bytes, "json": bytes, "__url__"}``) of one shard,
    starting at byte ``offset`` (a sample's first tar header, from the index), at most ``count``.

    Raises :class:`ShardError` naming the shard when the tar does not parse from ``offset``, or when it ends
    before ``count`` samples (the index promised them)."""
    tariterators = webdataset().tariterators
    delivered = 0
    with open(path, "rb") as f:
        f.seek(offset)
        samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": str(path), "stream": f}]))
        try:
            for sample in islice(samples, count):
                delivered += 1
                yield sample
        except ShardError:
            raise
        except Exception as err:  # noqa: BLE001 - tarfile / webdataset errors of a damaged or edited shard
            raise ShardError(f"{path}: the tar does not parse after sample {delivered} read from byte {offset} "
                             f"({type(err).__name__}: {err}); check it with python -m mlip_fast.data.shards "
                             f"--verify") from None
    if count is not None and delivered < count:
        raise ShardError(f"{path}: {delivered} sample(s) from byte {offset} where the index promises {count}; the "
                         f"shard or its index was changed (python -m mlip_fast.data.shards --verify)")


def _verify_shard(shard: dict) -> list:
    """Problems of one shard: checksum and size, then every sample at its recorded offset, the keys read in
    one pass, and each sample's JSON and image decoded."""
    p = Path(shard["file"])
    if not p.is_file():
        return [f"{shard['path']}: missing"]
    data = p.read_bytes()
    if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
        return [f"{shard['path']}: checksum or size differs from the index"]
    try:
        starts = [next(read_samples(p, off, 1), {}).get("__key__") for off in shard["offsets"]]
        keys = []
        for sample in read_samples(p):
            keys.append(sample["__key__"])
            make_item(sample, None, False)
    except ShardError as err:
        return [f"{shard['path']}: {err}"]
    if keys != starts or len(keys) != shard["samples"]:
        return [f"{shard['path']}: samples or offsets differ from the index ({len(keys)} samples read, "
                f"{shard['samples']} listed)"]
    return []


def verify_shards(path, progress: bool = True) -> list[str]:
    """Problems found by re-reading every shard of a folder: checksum, size, sample count, offsets and every
    sample's decoding, against the index (empty list = intact). An index that is unusable itself (a path out
    of the folder, contradicting counts) raises :class:`ShardError`."""
    index = load_index(path, check_files=False)
    problems = []
    shards = [s for entry in index["splits"].values() for s in entry["shards"]]
    for shard in tqdm(shards, desc="verifying", unit="shard", disable=no_bar(progress)):
        problems += _verify_shard(shard)
    return problems


def decode_image(data: bytes, decoder: str = "auto") -> np.ndarray:
    """A shard image as ``uint8 [H, W]`` (8-bit) or ``uint16 [H, W]`` (16-bit PNG).

    ``decoder``: "auto" (simplejpeg for JPEG when installed, else Pillow), "simplejpeg" or "pillow".
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if data[:3] == b"\xff\xd8\xff" and decoder != "pillow":
        if simplejpeg is None:
            if decoder == "simplejpeg":
                raise RuntimeError("decoder='simplejpeg' needs the simplejpeg package (pip install simplejpeg)")
        else:
            return simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0]
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            return np.asarray(img).astype(np.uint16)
        return np.asarray(img.convert("L") if img.mode != "L" else img)


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """``float32 [H, W]`` in [0, 1] from a ``decode_image`` array (8-bit / 255, 16-bit / 65535)."""
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    return image.astype(np.float32) * np.float32(1.0 / scale)


def _where(sample: dict) -> str:
    return f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"


def sample_index(sample: dict) -> int:
    """The source index in a raw sample's key ``s<index:08d>``; :class:`ShardError` for any other key."""
    key = sample.get("__key__")
    if not isinstance(key, str) or len(key) < 2 or key[0] != "s" or not key[1:].isdigit():
        raise ShardError(f"{_where(sample)} has a key that this writer does not write (expected s<8 digits>)")
    return int(key[1:])


def parse_meta(sample: dict) -> dict:
    """The JSON member of a raw sample (labels as floats, null -> NaN). :class:`ShardError` naming the shard and
    the sample when it is missing, not UTF-8 JSON, or lacks the report and index."""
    try:
        meta = json.loads(sample["json"])
        if not isinstance(meta, dict) or not isinstance(meta.get("report"), str):
            raise ValueError("no report text")
        meta["index"] = int(meta["index"])
        meta["labels"] = [math.nan if v is None else float(v) for v in meta.get("labels", [])]
    except (KeyError, ValueError, TypeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ShardError(f"{_where(sample)}: its JSON member does not decode ({type(err).__name__}: {err}); check "
                         f"the shard with python -m mlip_fast.data.shards --verify") from None
    return meta


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ShardError(f"sample {sample.get('__key__')} of {sample.get('__url__')} has no image ({sorted(sample)})")


def make_item(sample: dict, transform, with_labels: bool, decoder: str = "auto") -> dict:
    """Item dict of a raw sample: ``image`` (transformed, or the raw float [H, W] without a transform),
    ``report``, ``labels`` float32 [L] (when ``with_labels``), ``index``."""
    meta = parse_meta(sample)
    try:
        image = to_unit_float(decode_image(image_bytes(sample), decoder))
    except (OSError, ValueError) as err:
        raise ShardError(f"{_where(sample)}: its image does not decode ({err}); check the shard with "
                         f"python -m mlip_fast.data.shards --verify") from None
    item = {"image": transform(image) if transform is not None else torch.from_numpy(image)[None],
            "report": meta["report"], "index": meta["index"]}
    if with_labels:
        item["labels"] = torch.tensor(meta["labels"], dtype=torch.float32)
    return item


class ShardSplit(IterableDataset):
    """One split of a shard folder, read in stored order (the evaluation reader; training order is
    ``mlip_fast.data.shard_order``). With DataLoader workers, worker ``w`` of ``W`` reads shards
    ``w, w + W, ...``.

    Args:
        path: the shard folder or its ``index.json``.
        split: "train", "valid" or "test" (must be in the index).
        transform: ``ImageTransform`` (or any callable on a float [H, W] array); None gives ``[1, H, W]``.
        max_bad_fraction: refuse a split whose writer found more bad or dropped items than this share.
        decoder: see ``decode_image``.

    Attributes: ``label_names``, ``shards`` (index entries with absolute ``file``), ``index`` (the parsed
    index), ``num_samples`` (also ``len``).
    """

    def __init__(self, path, split: str, transform=None, max_bad_fraction: float = 0.01, decoder: str = "auto"):
        self.index = load_index(path)
        if split not in self.index["splits"]:
            raise ShardError(f"{self.index['index_path']}: no split {split!r}; splits: {sorted(self.index['splits'])}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        entry = self.index["splits"][split]
        self.split, self.transform, self.decoder = split, transform, decoder
        self.label_names = tuple(self.index.get("label_names", ()))
        self.shards = entry["shards"]
        self.num_samples = int(entry["samples"])
        self.name = f"ShardSplit({Path(self.index['root']).name}/{split})"
        bad = int(entry.get("bad", 0)) + int(entry.get("dropped", 0))
        total = self.num_samples + bad
        if total and bad > max_bad_fraction * total:
            raise DatasetError(f"{self.name}: the writer found {bad} of {total} items bad or without a report "
                               f"({100.0 * bad / total:.2f}% > max_bad_fraction {100.0 * max_bad_fraction:.2f}%); "
                               f"see 'bad' in {self.index['index_path']}")
        if self.num_samples == 0:
            raise DatasetError(f"{self.name}: the split is empty")

    def __len__(self) -> int:
        return self.num_samples

    def describe(self) -> dict:
        return {"kind": "shards", "index": self.index["index_path"], "split": self.split, "n": self.num_samples,
                "shards": len(self.shards)}

    def reports(self) -> list[str]:
        """Every report of the split in stored order (from ``<split>/reports.txt``, no shard read)."""
        root = Path(self.index["root"])
        path = resolve_inside(root, self.index["splits"][self.split]["reports"], f"{self.index['index_path']}: reports file")
        try:
            return path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ShardError(f"{path}: the reports file cannot be read ({err})") from None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in self.shards[worker::workers]:
            for sample in read_samples(shard["file"]):
                yield make_item(sample, self.transform, bool(self.label_names), self.decoder)
