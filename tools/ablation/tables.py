"""The ablation's summaries: mean ± std over seeds per configuration, paired differences by seed with a 95% t
interval, the OT settings sweep's table (for ``tools/readme_table.py``) and the PNG of every run.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from mlip_fast.train.args import SPEC_LAMBDA_LOCAL
from tools.ablation.plan import (ARMS, COMPARISONS, DEPARTURES, DIFFERENCE_METRICS, LOCAL_ARMS, METRICS, SPEC_MASK_RATIO,
                                 T975)


def config_label(r: dict) -> str:
    if r["arm"] == "clip":
        return "clip (r=0)"
    lam = "" if r["arm"] == "flip" else f", λl={r['lambda_local']:g}"
    ot = f", ε={r['ot_eps']:g}, {r['ot_iters']} it" if r.get("ot_eps") is not None else ""
    return f"{r['arm']} (r={r['mask_ratio']:g}{lam}{ot})"


def mean_std(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_difference(a: dict, b: dict) -> Optional[dict]:
    """Mean of a[seed] - b[seed] over the seeds both have, with a two-sided 95% t interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(diffs)}
    df = len(diffs) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}


def group_runs(records: list) -> dict:
    """{(arm, mask ratio, lambda_local, ot_eps, ot_iters): its runs} in table order (OT settings None for max)."""
    groups: dict = {}
    for r in records:
        key = (r["arm"], r["mask_ratio"], r["lambda_local"], r.get("ot_eps"), r.get("ot_iters"))
        groups.setdefault(key, []).append(r)
    order = {a: i for i, a in enumerate(ARMS)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1] != 0, -kv[0][1], order[kv[0][0]], kv[0][2],
                                                       kv[0][3] or 0, kv[0][4] or 0)))


def readme_tables(records: list) -> list:
    """[(caption, rows)] for the README: mean ± std over seeds per configuration, then paired differences."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']}, {first['synthetic_n']} synthetic pairs; "
             f"test split, mean ± std over seeds")
    rows = []
    for runs in group_runs(records).values():
        row = {"configuration": config_label(runs[0]), "seeds": len(runs)}
        for m in METRICS:
            row[m] = mean_std([x.get(m) for x in runs], 1 if m == "samples_per_s" else 3)
        row["pointing_chance"] = mean_std([x.get("pointing_chance") for x in runs])
        row["sie_mask_auc"] = mean_std([x.get("sie_mask_auc") for x in runs])
        row["target_mask_auc"] = mean_std([x.get("target_mask_auc") for x in runs])
        rows.append(row)
    diffs = []
    # keyed without the OT settings when each arm has one (the ablation); a sweep's grid has no pairs
    groups = group_runs(records)
    short = {k[:3] for k in groups}
    by = ({key[:3]: {x["seed"]: x for x in runs} for key, runs in groups.items()} if len(short) == len(groups)
          else {})
    ratios = sorted({r["mask_ratio"] for r in records if r["mask_ratio"] > 0}, reverse=True)
    pairs = []
    for r in ratios:
        for a, b, label in COMPARISONS:
            ka = (a, r, SPEC_LAMBDA_LOCAL if a in LOCAL_ARMS else 0.0)
            kb = (b, 0.0 if b == "clip" else r, SPEC_LAMBDA_LOCAL if b in LOCAL_ARMS else 0.0)
            pairs.append((f"{label}, r={r:g}" + (" vs r=0" if b == "clip" else ""), ka, kb))
    preset = ("mlip", DEPARTURES["mask_ratio"], DEPARTURES["lambda_local"])
    spec = ("mlip", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL)
    # the preset's departures from the method, one at a time and together
    pairs.append((f"MLIP r={preset[1]:g} - r={spec[1]:g} (λl={spec[2]:g})", ("mlip", preset[1], spec[2]), spec))
    pairs.append((f"MLIP λl={preset[2]:g} - λl={spec[2]:g} (r={preset[1]:g})", preset, ("mlip", preset[1], spec[2])))
    pairs.append((f"MLIP preset (r={preset[1]:g}, λl={preset[2]:g}) - method (r={spec[1]:g}, λl={spec[2]:g})",
                  preset, spec))
    for label, ka, kb in pairs:
        if ka not in by or kb not in by:
            continue
        row = {"difference (paired by seed)": label}
        for m in DIFFERENCE_METRICS:
            d = paired_difference({s: x.get(m) for s, x in by[ka].items()}, {s: x.get(m) for s, x in by[kb].items()})
            row[m] = "" if d is None else (f"{d['mean']:+.3f}" if d["low"] is None else
                                           f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        row["seeds"] = min(len(by[ka]), len(by[kb]))
        diffs.append(row)
    tables = [(where, rows)]
    if diffs:
        tables.append(("paired differences, mean [95% t interval] over seeds (an interval excluding 0 is a "
                       "difference at the 5% level); test split, then the validation split that choices are made on",
                       diffs))
    return tables


SWEEP_METRICS = ("valid_zs_auc_combined", "valid_zs_auc_local", "valid_pointing_accuracy", "zs_auc_combined",
                 "zs_auc_local", "pointing_accuracy", "samples_per_s")


def sweep_tables(records: list) -> list:
    """[(caption, rows)] of a grid of OT settings (``--ot-eps`` / ``--ot-iters`` with several values): the
    validation metrics the choice is made on first, then the test split's, mean over seeds per configuration."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']}; OT settings chosen on the validation split "
             f"(valid_*), test split beside; pointing chance {mean_std([x.get('valid_pointing_chance') for x in records])}"
             f" (validation)")
    rows = []
    for runs in group_runs(records).values():
        row = {"configuration": config_label(runs[0]), "seeds": len(runs)}
        for m in SWEEP_METRICS:
            row[m] = mean_std([x.get(m) for x in runs], 1 if m == "samples_per_s" else 3)
        rows.append(row)
    return [(where, rows)]


def plot(records: list, path: Path) -> Path:
    """One panel per metric: every run as a dot, the mean of each configuration as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(records)
    labels = [config_label(runs[0]) for runs in groups.values()]
    panels = (("zs_auc_combined", "zero-shot AUC, combined"), ("zs_auc_global", "zero-shot AUC, global"),
              ("zs_auc_local", "zero-shot AUC, local"), ("pointing_accuracy", "pointing accuracy"),
              ("probe_auc_1pct", "linear probe AUC, 1% labels"), ("probe_auc_10pct", "linear probe AUC, 10% labels"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = {"clip": "tab:gray", "flip": "tab:blue", "flip+local": "tab:orange", "mlip": "tab:green",
               "flip+local-ot": "tab:red", "mlip-ot": "tab:purple"}
    for ax, (metric, title) in zip(axes.flat, panels):
        for i, runs in enumerate(groups.values()):
            values = [x[metric] for x in runs if x.get(metric) is not None]
            if not values:
                continue
            ax.bar(i, statistics.mean(values), color=colours[runs[0]["arm"]], alpha=0.45, width=0.7)
            ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
        if metric == "pointing_accuracy":
            chance = [x["pointing_chance"] for x in records if x.get("pointing_chance") is not None]
            if chance:
                ax.axhline(statistics.mean(chance), color="r", linestyle="--", linewidth=1, label="chance")
                ax.legend(loc="lower right")
        elif metric.startswith(("zs_", "probe_")):
            ax.axhline(0.5, color="r", linestyle="--", linewidth=1)
        values = [x[metric] for x in records if x.get(metric) is not None]
        if values:
            lo, hi = min(values), max(values)
            pad = max(0.02, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad) if metric != "pointing_accuracy" else 0.0, min(1.0, hi + pad))
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    first = records[0]
    fig.suptitle(f"MLIP ablation on the synthetic benchmark ({first['model']}, {first['steps']} steps, "
                 f"{len({r['seed'] for r in records})} seeds; dots: runs, bars: means)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
