"""Tile size of the CPU patch-sentence op (``impl="chunked"``): forward + backward time against
``tile_elements``, the similarity cells one tile holds.

Why: the op builds the [B, G, K, S] grid one tile at a time; small tiles stay in cache but multiply the ops per
call (each a dispatch round trip), large ones cost memory. The default (``chunked.TILE_ELEMENTS``) is the size this
sweep finds best at the default run's shape and no worse elsewhere. Shapes: the default run's loss (B = G = 64,
48 kept patches, 12 sentences, D = 64), PERF.md's one-GPU shape run on CPU (B = G = 128, K = 98, S = 16, D = 512)
and a 224 px ViT-B/16-like one at a CPU batch (B = G = 32, K = 196, S = 16, D = 256); normalised inputs, 20% of
the sentences padded, fp32. Min over interleaved rounds (the sizes alternate, so load hits all alike):

    python benchmarks/bench_chunked_tiles.py     # writes benchmarks/results/chunked_tiles_cpu.json
    pytest benchmarks/bench_chunked_tiles.py     # one small round, into a temp file
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402

SHAPES = [(64, 48, 12, 64), (128, 98, 16, 512), (32, 196, 16, 256)]
SIZES = (2**17, 2**19, 2**20, 2**21, 2**22)


def measure(rounds: int = 3, number: int = 5, shapes=SHAPES, sizes=SIZES) -> dict:
    from mlip_fast.ops.patch_sentence.chunked import TILE_ELEMENTS, patch_sentence_scores_chunked
    from mlip_fast.ops.patch_sentence.options import ScoresOptions

    options = ScoresOptions(normalize=True)
    rows = []
    for B, K, S, D in shapes:
        gen = torch.Generator().manual_seed(0)
        patches = torch.randn(B, K, D, generator=gen).requires_grad_()
        sentences = torch.randn(B, S, D, generator=gen).requires_grad_()
        mask = torch.rand(B, S, generator=gen) > 0.2
        mask[:, 0] = True
        def call(size: int):
            i2t, t2i = patch_sentence_scores_chunked(patches, sentences, mask, None, options, size)
            (i2t.sum() + t2i.sum()).backward()

        times = harness.interleaved_times({size: (lambda s=size: call(s)) for size in sizes}, rounds, number)
        rows += [{"shape": f"B=G={B} K={K} S={S} D={D} fp32", "tile_elements": size,
                  "default": size == TILE_ELEMENTS, "fwd_bwd_ms": round(min(t) * 1e3, 2)} for size, t in times.items()]
    return {"environment": dict(harness.environment(), threads=torch.get_num_threads(),
                                load_1min=round(os.getloadavg()[0], 2)),
            "what": "chunked patch-sentence op, forward + backward of both directions, ms per call, min over "
                    "interleaved rounds, against tile_elements",
            "rounds": rounds, "number": number, "table": rows}


def test_chunked_tile_sizes(benchmark, tmp_path, capsys):
    """Every size runs at a small shape (the numbers are the JSON's, not asserted); the record is written and read
    back whole."""
    result = benchmark.pedantic(measure, args=(1, 1, [(8, 6, 4, 16)], (2**10, 2**17)), rounds=1, iterations=1)
    assert [r["tile_elements"] for r in result["table"]] == [2**10, 2**17]
    assert all(r["fwd_bwd_ms"] > 0 for r in result["table"])
    out = harness.write_result(tmp_path / "sub" / "tiles.json", result, lambda r: f"row {r['tile_elements']}")
    assert json.loads(out.read_text()) == result
    assert capsys.readouterr().out.splitlines() == ["row 1024", "row 131072", f"wrote {out}"]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="chunked op tile sizes -> benchmarks/results/chunked_tiles_cpu.json")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "chunked_tiles_cpu.json")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    return harness.write_result(args.out, measure(args.rounds), lambda r: (
        f"{r['shape']:<32} {r['tile_elements']:>9} {r['fwd_bwd_ms']:>9} ms{'  (default)' if r['default'] else ''}"))


if __name__ == "__main__":
    main()
