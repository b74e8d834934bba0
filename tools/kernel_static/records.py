"""The static compile's records: the gate rules, the JSON layout (compact launch records plus one full analysis
per distinct compile) and the README table. Plain Python: the performance model and the GPU check read the
committed records through this module without triton's compiler.
"""
from __future__ import annotations

# the patch-sentence kernels that hold the op's matmuls (the side kernels are listed with the sweep, in ``cases``)
PS_KERNELS = ("_patch_sentence_fwd_kernel", "_patch_sentence_fwd_v3_kernel", "_patch_sentence_bwd_kernel")


def violations(records: list) -> list:
    """Records that break the static gate: not compiled (and not refused up front), spills, shared memory
    above the arch limit, or a half-precision matmul kernel without tensor-core instructions."""
    bad = []
    for r in records:
        if r.get("refused"):
            continue
        why = []
        if not r.get("compiled"):
            why.append(f"does not compile: {r.get('error')}")
        else:
            if r.get("analysis_error"):
                why.append(r["analysis_error"])
            if r.get("spill_bytes", 0) > 0:
                why.append(f"spills {r['spill_bytes']} bytes")
            if r.get("shared_bytes", 0) > r.get("shared_limit", 1 << 62):
                why.append(f"shared memory {r['shared_bytes']} > {r['shared_limit']}")
            if r.get("matmul") and r["dtype"] in ("bf16", "fp16") and r.get("tensor_core_sass", 0) == 0:
                why.append("no tensor-core instructions")
        if why:
            bad.append((r, why))
    return bad


_FLAG_PREFIXES = ("HAS_", "DO_", "UPCAST", "USE_", "SEED_", "NORMALIZE", "PRECISION", "NAN_REDUCE")


def summary_rows(records: list) -> list:
    """The README table: the PERF.md shape (B=128 x G=1024, K=98, S=16, D=512) for each patch-sentence kernel (the
    forward v2 forced on sm_90 too; side kernels left out) and the mask kernels at P=196, C=768 (fp32 and bf16; fp64
    for the mask), on both archs."""
    rows = []
    for r in records:
        if not r.get("compiled"):
            continue
        if r["op"] == "patch_sentence":
            main = dict(B=128, G=1024, K=98, S=16, D=512, directions="both")
            shapes = (main, dict(main, normalize=True), dict(main, normalize=True, kernel="v2"))
            if r["shape"] in shapes and r["dtype"] in ("fp32", "bf16") and r["kernel"] in PS_KERNELS:
                rows.append(r)
        elif r["shape"] == dict(B=128, P=196, C=768, keep=98) and r["dtype"] in ("fp32", "bf16", "fp64"):
            rows.append(r)
    return rows


def table_markdown(data: dict) -> str:
    recs = unpack(data)
    env = data["environment"]
    lines = [
        f"**kernel_static.json**: static compile (no GPU), triton {env['triton']}, ptxas of the triton wheel, "
        f"{env['date']}; {len(recs)} launches, {data['distinct_compiles']} distinct compiles, "
        f"{len(violations(recs))} gate violations, {sum(1 for r in recs if r.get('refused'))} shapes refused up front",
        "",
        "| kernel | arch | dtype | shape | tile | regs | spill B | shared B | blocks/SM | TC instr | hot loop SASS instr |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary_rows(recs):
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "directions")
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items()
                       if (k.isupper() and not k.startswith(_FLAG_PREFIXES)) or k == "num_warps")
        name = r["kernel"].strip("_").replace("_kernel", "")
        lines.append(
            f"| {name} | {r['arch']} | {r['dtype']} | {shape} | {cfg} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {r['blocks_per_sm']} ({r['limited_by']}) | "
            f"{r['tensor_core_sass']} | {', '.join(map(str, r['hot_loop_instructions']))} |"
        )
    worst = {}
    for r in recs:
        if r.get("compiled"):
            k = (r["kernel"], r["arch"])
            if k not in worst or (r["registers"], r["shared_bytes"]) > (worst[k]["registers"], worst[k]["shared_bytes"]):
                worst[k] = r
    lines += ["", "Largest register / shared-memory footprint of each kernel over the whole sweep (all spill-free):", "",
              "| kernel | arch | dtype | shape | regs | spill B | shared B | blocks/SM |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kern, arch), r in sorted(worst.items()):
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "directions")
        lines.append(f"| {kern.strip('_').replace('_kernel', '')} | {arch} | {r['dtype']} | {shape} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes']} | {r['blocks_per_sm']} |")
    return "\n".join(lines)


GATE_FIELDS = ("compiled", "registers", "spill_bytes", "stack_bytes", "shared_bytes", "tensor_core_sass")
# Fields every launch record keeps; the rest of a compile's analysis (loops, ptxas report, occupancy detail)
# is stored once per distinct compile under "compiles" (the same kernel compiles for many shapes).
RECORD_FIELDS = ("op", "mode", "kernel", "arch", "dtype", "shape", "grid", "programs", "compile_id", "refused",
                 "compiled", "error", "registers", "spill_bytes", "shared_bytes", "blocks_per_sm")


def pack(records: list, env: dict, **extra) -> dict:
    """The JSON layout: compact launch records plus one full analysis per distinct compile."""
    compiles = {}
    for r in records:
        if r.get("compile_id") and r["compile_id"] not in compiles:
            compiles[r["compile_id"]] = {k: v for k, v in r.items()
                                         if k not in RECORD_FIELDS or k in GATE_FIELDS or k == "blocks_per_sm"}
    slim = [{k: r[k] for k in RECORD_FIELDS if k in r} for r in records]
    return {"environment": env, **extra, "distinct_compiles": len(compiles), "records": slim, "compiles": compiles}


def unpack(data: dict) -> list:
    """Launch records with their compile's full analysis merged back in."""
    compiles = data.get("compiles", {})
    return [{**compiles.get(r.get("compile_id"), {}), **r} for r in data["records"]]


def describe(r: dict) -> str:
    return f"{r['arch']} {r.get('kernel') or r['op']} {r['mode']} {r['dtype']} {r['shape']} config={r.get('config')}"
