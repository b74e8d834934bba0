"""Loader throughput: images per second per worker process, from the stored file to the model input (decode,
grey float, the training ``ImageTransform`` at 224 px with augmentation), on one CPU thread:

- ``folder_full_jpeg``: full-size grey JPEGs (2,500 x 3,000, about 1.8 MB like MIMIC-CXR-JPG) read from a
  folder as the folder reader does (``load_image`` with JPEG DCT scaling down to >= 224 px);
- ``shards_256_jpeg`` / ``shards_256_png``: the same images pre-resized to a 256 px shorter side by
  ``python -m mlip_fast.data.shards``, read from the tar shards as training reads them (``read_samples`` +
  ``make_item``: tar member, JSON, decode, transform);

each with Pillow and with simplejpeg (libjpeg-turbo) where a JPEG is decoded. The rate is per CPU second
of this process (``time.process_time``), so other work on a shared machine inflates it less than wall
time would; the wall-clock rate and the load average are recorded too.

Cores per H100: cores of this kind that keep one H100 fed at the training step rate: the rate
the GPU check (``tools/gpu_check``) measured (its train_step section, in a committed ``results/gpu_*.json``), or
until one is measured a performance model, labelled as such in the JSON: the FLOPs of one MLIP sample (ViT-B/16 at
224 px with the config's mask ratio + BERT-base over ``TEXT_TOKENS`` tokens, forward and backward = 3 x
forward) at ``MFU`` of PERF.md's measured H100 bf16 matmul rate.

    pytest benchmarks/bench_data.py --benchmark-only
    python benchmarks/bench_data.py [--images 200]   # writes benchmarks/results/data_cpu.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # as a script (python benchmarks/bench_data.py): the repository importable, as under pytest
    sys.path.insert(0, str(HERE.parent))

from benchmarks import harness  # noqa: E402
from mlip_fast.data import shard_reader  # noqa: E402
from mlip_fast.data.shard_reader import make_item, read_samples  # noqa: E402
from mlip_fast.data.shards import ShardConfig, write_shards  # noqa: E402
from mlip_fast.data.synth import make_sample  # noqa: E402
from mlip_fast.preprocess.images import load_image  # noqa: E402
from mlip_fast.preprocess.transforms import ImageTransform  # noqa: E402

IMAGE_SIZE = 224
FULL_SIZE = (3000, 2500)  # H, W of a MIMIC-CXR-JPG image
TEST_FULL_SIZE = (360, 300)  # --benchmark-disable (CI): the same code on small files
SHARD_SIZE = 256
GRAIN = 2.0  # film-grain noise (8-bit levels) that brings the JPEG to MIMIC-CXR-JPG's ~1.5-2 MB
CASES = ("folder_full_jpeg", "shards_256_jpeg", "shards_256_png")
DECODERS = ("pillow", "simplejpeg")
TARGET = {"case": "shards_256_jpeg", "images_per_s_per_core": 1500}
# Performance model of one H100 training step (used until a GPU measurement exists).
GPU_MODEL = "mlip-vit-b16-bert-base"
TEXT_TOKENS = 128  # padded length of a batch of findings + impression sections
MATMUL_TFLOPS = 790.0  # PERF.md: measured H100 bf16 matmul rate
MFU = 0.4  # share of that rate a whole training step sustains (assumption)


# -------------------------------------------------------------------------------------------- data
def full_size_jpeg(index: int, size: tuple) -> bytes:
    """A synthetic radiograph upscaled to ``size`` with film grain, as a grey JPEG (quality 95)."""
    base = make_sample(seed=0, index=index, size=512)["image"]
    img = Image.fromarray((base * 255).astype(np.uint8)).resize((size[1], size[0]), Image.BICUBIC)
    noise = np.random.default_rng(index).normal(0.0, GRAIN, (size[0], size[1]))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_corpus(root: Path, n: int, size: tuple, workers: int = 1) -> dict:
    """``n`` full-size JPEGs and a master.csv in ``root/folder``; their JPEG and PNG shards in
    ``root/shards_jpg`` / ``root/shards_png``. Returns paths and the writer's summaries."""
    folder = root / "folder"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / "images" / f"{i:05d}.jpg"
        if not path.is_file():
            path.write_bytes(full_size_jpeg(i, size))
        rows.append({"image_path": f"images/{i:05d}.jpg", "findings": f"Report {i}. Lungs are clear.",
                     "impression": "No acute disease.", "split": "train"})
    with open(folder / "master.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = {"images": sorted((folder / "images").glob("*.jpg")), "writer": {}}
    for fmt in ("jpg", "png"):
        target = root / f"shards_{fmt}"
        shutil.rmtree(target, ignore_errors=True)  # a fresh write: its time is measured
        write_shards(str(folder), target, ShardConfig(size=SHARD_SIZE, image_format=fmt, shard_size=max(n, 1)),
                     workers=workers, progress=False)
        out[f"shards_{fmt}"] = target / "train" / "train-000000.tar"
        out["writer"][fmt] = json.loads((target / "summary.json").read_text())
    return out


# --------------------------------------------------------------------------------------- loaders
def _decode_full_simplejpeg(path: Path) -> np.ndarray:
    data = path.read_bytes()
    pixels = shard_reader.simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=IMAGE_SIZE,
                                                 min_width=IMAGE_SIZE)[..., 0]
    return pixels.astype(np.float32) * np.float32(1 / 255)


def make_pass(case: str, decoder: str, corpus: dict):
    """A zero-argument callable that reads every image of ``corpus`` once through ``case`` with ``decoder``
    and returns the number of images."""
    transform = ImageTransform(IMAGE_SIZE, train=True)
    if case == "folder_full_jpeg":
        read = (lambda p: load_image(p, max_side=IMAGE_SIZE)) if decoder == "pillow" else _decode_full_simplejpeg

        def run() -> int:
            for path in corpus["images"]:
                x = transform(read(path))
            assert x.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
            return len(corpus["images"])
        return run
    shard = corpus["shards_jpg" if case == "shards_256_jpeg" else "shards_png"]

    def run() -> int:
        n = 0
        for sample in read_samples(shard):
            item = make_item(sample, transform, False, decoder)
            n += 1
        assert item["image"].shape == (1, IMAGE_SIZE, IMAGE_SIZE)
        return n
    return run


def skip_reason(case: str, decoder: str):
    if decoder == "simplejpeg" and shard_reader.simplejpeg is None:
        return "simplejpeg is not installed"
    if decoder == "simplejpeg" and case == "shards_256_png":
        return "PNG is decoded by Pillow only"
    return None


def measure(run, rounds: int) -> dict:
    """Median over ``rounds`` passes (after one warm-up pass) of CPU and wall seconds per image."""
    run()
    cpu, wall = [], []
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        n = run()
        cpu.append((time.process_time() - c0) / n)
        wall.append((time.perf_counter() - w0) / n)
    return {"cpu_ms_per_image": 1e3 * float(np.median(cpu)), "wall_ms_per_image": 1e3 * float(np.median(wall)),
            "images_per_s_per_core": 1.0 / float(np.median(cpu)), "wall_images_per_s": 1.0 / float(np.median(wall))}


# ------------------------------------------------------------------------------------- GPU feed model
def encoder_flops(tokens: int, width: int, depth: int, mlp: int) -> int:
    """Forward FLOPs (2 per multiply-add) of a transformer encoder over ``tokens``: per layer and token
    QKV + output projections 8 d^2, MLP 4 d mlp, attention scores and values 4 T d."""
    return depth * tokens * (8 * width * width + 4 * mlp * width + 4 * tokens * width)


def measured_gpu_rate(results: Path | None = None):
    """The fused-impl training rate of the GPU check's train_step section in a committed
    ``results/gpu_*.json`` (the ViT-B/16 + BERT-base step of ``bench_train_step``: batch over step time), or None."""
    for path in sorted((results or harness.RESULTS).glob("gpu_*.json")):
        data = json.loads(path.read_text())
        rows = data.get("sections", {}).get("train_step", {}).get("result", {}).get("rows", [])
        fused = [r for r in rows if r.get("impl") == "triton" and r.get("device") == "cuda"
                 and (r.get("samples_per_s") or (r.get("step_ms") and r.get("batch")))]
        if fused and not data.get("dry_run"):
            r = fused[0]
            rate = r.get("samples_per_s") or r["batch"] * 1000.0 / r["step_ms"]
            return {"source": f"measured: {path.name} (gpu_check.py train_step, fused impl, {r.get('config')}, "
                              f"batch {r['batch']}, {r.get('dtype')})",
                    "device": data.get("environment", {}).get("device"), "samples_per_s": round(rate)}
    return None


def gpu_samples_per_s() -> dict:
    """Training samples per second of one H100: measured by the GPU check when a result is committed,
    else the performance model of the module doc."""
    return measured_gpu_rate() or model_gpu_rate()


def model_gpu_rate() -> dict:
    """The performance model of one H100 training step (see the module doc)."""
    from mlip_fast.models import get_model_config


    cfg = get_model_config(GPU_MODEL)
    v, t = cfg.vision, cfg.text
    patches = (v.image_size // v.patch_size) ** 2
    kept = 1 + round(patches * (1 - cfg.mask_ratio))  # class token + the patches the mask keeps

    forward = encoder_flops(kept, v.width, v.depth, int(v.width * v.mlp_ratio)) + \
        encoder_flops(TEXT_TOKENS, t.hidden_size, t.num_layers, t.intermediate_size)
    flops = 3 * forward
    rate = MATMUL_TFLOPS * 1e12 * MFU / flops
    return {"source": "performance model (no GPU training step measured yet)", "model": GPU_MODEL,
            "image_tokens": kept, "text_tokens": TEXT_TOKENS, "gflop_per_sample": round(flops / 1e9, 1),
            "matmul_tflops": MATMUL_TFLOPS, "mfu": MFU, "samples_per_s": round(rate)}


# -------------------------------------------------------------------------------------------- benchmarks
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request):
    quick = request.config.getoption("benchmark_disable", default=False)
    return make_corpus(tmp_path_factory.mktemp("data-bench"), 3 if quick else 40, TEST_FULL_SIZE if quick else FULL_SIZE)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("case", CASES)
def test_loader(benchmark, bench_env, corpus, case, decoder):
    reason = skip_reason(case, decoder)
    if reason:
        pytest.skip(reason)
    torch.set_num_threads(1)
    run = make_pass(case, decoder, corpus)
    n = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert n == len(corpus["images"])
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(case=case, decoder=decoder, images=n)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = round(n / benchmark.stats.stats.median, 1)


def test_gpu_feed_model_counts_the_encoder_flops():
    """The FLOP formula against torch's FLOP counter on the project's ViT (math attention, so that the
    attention matmuls are counted; the patch-embedding convolution is left out of the formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mlip_fast.models import create_model

    model = create_model("mlip-tiny", vision={"image_size": 64, "attn_backend": "math"}).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.visual(torch.randn(1, 1, 64, 64))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    v = model.config.vision
    formula = encoder_flops(1 + (64 // v.patch_size) ** 2, v.width, v.depth, int(v.width * v.mlp_ratio))
    assert formula == pytest.approx(counter.get_total_flops() - counts["aten.convolution"], rel=0.02)
    feed = model_gpu_rate()
    assert feed["image_tokens"] == 1 + 98 and feed["samples_per_s"] > 0


def test_measured_gpu_rate_is_batch_over_step_time(tmp_path):
    """A GPU check's train_step row (batch, step ms) gives the feed rate; a dry run or a CPU row does not."""
    row = dict(impl="triton", config="mlip-vit-b16-bert-base", batch=64, dtype="bfloat16", device="cuda", step_ms=50.0)
    record = {"environment": {"device": "Card"}, "sections": {"train_step": {"result": {"rows": [
        dict(row, impl="reference", step_ms=80.0), row]}}}}
    (tmp_path / "gpu_card.json").write_text(json.dumps(record))
    feed = measured_gpu_rate(tmp_path)
    assert feed["samples_per_s"] == 1280 and feed["device"] == "Card" and "measured" in feed["source"]
    (tmp_path / "gpu_card.json").write_text(json.dumps(dict(record, dry_run=True)))
    assert measured_gpu_rate(tmp_path) is None


# -------------------------------------------------------------------------------------------- script
def main(argv=None) -> Path:
    import tempfile

    p = argparse.ArgumentParser(description="loader throughput -> benchmarks/results/data_cpu.json")
    p.add_argument("--images", type=int, default=200, help="full-size images in the corpus")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="where the corpus goes (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=harness.RESULTS / "data_cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        corpus = make_corpus(root, args.images, FULL_SIZE, workers=os.cpu_count() or 1)
        print(f"corpus: {args.images} images in {time.perf_counter() - t0:.0f} s")
        full_bytes = np.mean([p.stat().st_size for p in corpus["images"]])
        gpu = gpu_samples_per_s()
        feed = f"cores per H100 at {gpu['samples_per_s']:,} samples/s ({'model' if 'model' in gpu['source'] else 'measured'})"
        rows, results = [], {}
        for case in CASES:
            for decoder in DECODERS:
                if skip_reason(case, decoder):
                    continue
                load = os.getloadavg()[0]
                r = measure(make_pass(case, decoder, corpus), args.rounds)
                results[f"{case}/{decoder}"] = {**r, "load_average_1min": load}
                rows.append({"case": case, "decoder": decoder, "images_per_s_per_core": round(r["images_per_s_per_core"]),
                             "cpu_ms_per_image": round(r["cpu_ms_per_image"], 3),
                             "wall_images_per_s": round(r["wall_images_per_s"]), "load (1 min)": round(load, 1),
                             feed: round(gpu["samples_per_s"] / r["images_per_s_per_core"], 1)})
                print(rows[-1])
        writer = {fmt: {k: s[k] for k in ("cpu_ms_per_image", "per_100k_images", "bytes", "wall_s", "workers")}
                  for fmt, s in corpus["writer"].items()}
    best = max(v["images_per_s_per_core"] for k, v in results.items() if k.startswith(TARGET["case"]))
    met = best >= TARGET["images_per_s_per_core"]
    rows.append({"case": f"target: {TARGET['case']}", "decoder": "met" if met else
                 f"gap: {100 * (1 - best / TARGET['images_per_s_per_core']):.0f}% short",
                 "images_per_s_per_core": TARGET["images_per_s_per_core"],
                 "cpu_ms_per_image": round(1e3 / TARGET["images_per_s_per_core"], 3),
                 "wall_images_per_s": "", "load (1 min)": "", feed: round(gpu["samples_per_s"] / TARGET["images_per_s_per_core"], 1)})
    payload = {
        "benchmark": "bench_data", "environment": harness.environment("cpu"),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "corpus": {"images": args.images, "full_size_hw": FULL_SIZE, "mean_full_jpeg_bytes": int(full_bytes),
                   "shard_size": SHARD_SIZE, "image_size": IMAGE_SIZE, "transform": "ImageTransform(train=True)"},
        "results": results,
        "target": {**TARGET, "best_measured": round(best), "met": met},
        "gpu_feed": gpu, "writer": writer, "table": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({"target": payload["target"], "gpu_feed": gpu, "writer": writer}, indent=2))
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
