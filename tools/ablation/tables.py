"""The ablation's summaries: mean ± std over seeds per configuration, paired differences by seed with a 95% t
interval, the OT settings sweep's table (for ``tools/readme_table.py``) and the PNG of every run.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from mlip_fast.train.args import SPEC_LAMBDA_LOCAL
from tools.ablation.plan import (ARMS, COMPARISONS, DEPARTURES, DIFFERENCE_METRICS, LOCAL_ARMS, METRICS, MODE_ARMS,
                                 SPEC_MASK_RATIO, T975)

# the integrity diagnostics of the records (mlip_fast.eval.integrity; earlier records have only the two AUCs)
INTEGRITY_COLUMNS = ("sie_mask_auc", "target_mask_auc", "finding_kept_share", "kept_share_uniform", "weight_cv")


def config_label(r: dict) -> str:
    if r["arm"] == "clip":
        return "clip (r=0)"
    lam = "" if r["arm"] == "flip" else f", λl={r['lambda_local']:g}"
    ot = f", ε={r['ot_eps']:g}, {r['ot_iters']} it" if r.get("ot_eps") is not None else ""
    warmup = f", warm-up {r['sie_warmup']}" if r.get("sie_warmup") else ""
    return f"{r['arm']} (r={r['mask_ratio']:g}{lam}{ot}{warmup})"


def group_key(r: dict) -> tuple:
    """(arm, mask ratio, lambda_local, ot_eps, ot_iters, sie_warmup): one configuration (OT settings None for max,
    warm-up 0 in records that predate it)."""
    return r["arm"], r["mask_ratio"], r["lambda_local"], r.get("ot_eps"), r.get("ot_iters"), r.get("sie_warmup") or 0


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
    """{:func:`group_key`: its runs} in table order."""
    groups: dict = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    order = {a: i for i, a in enumerate(ARMS)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1] != 0, -kv[0][1], order[kv[0][0]], kv[0][2],
                                                       kv[0][3] or 0, kv[0][4] or 0, kv[0][5])))


def format_interval(d: Optional[dict]) -> str:
    if d is None:
        return ""
    return f"{d['mean']:+.3f}" if d["low"] is None else f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _pairs(keys) -> list:
    """[(label, key A, key B)] over (arm, ratio, lambda_local, warm-up) ``keys``: ``COMPARISONS`` at each mask ratio
    and patch-sentence weight of A (A with each of its warm-ups, B without), then the preset's departures from the
    method."""
    pairs = []
    ratios = sorted({k[1] for k in keys if k[1] > 0}, reverse=True)
    for r in ratios:
        for a, b, label in COMPARISONS:
            for ka in sorted(k for k in keys if k[0] == a and k[1] == r):
                lam, warmup = ka[2], ka[3]
                kb = (b, 0.0 if b == "clip" else r, lam if b in LOCAL_ARMS else 0.0, 0)
                name = label.replace(" - ", f" (warm-up {warmup}) - ", 1) if warmup else label
                where = f"r={r:g}" + ("" if lam in (0.0, SPEC_LAMBDA_LOCAL) else f", λl={lam:g}")
                pairs.append((f"{name}, {where}" + (" vs r=0" if b == "clip" else ""), ka, kb))
    preset = ("mlip", DEPARTURES["mask_ratio"], DEPARTURES["lambda_local"], 0)
    spec = ("mlip", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL, 0)
    # the preset's departures from the method, one at a time and together
    pairs.append((f"MLIP r={preset[1]:g} - r={spec[1]:g} (λl={spec[2]:g})", ("mlip", preset[1], spec[2], 0), spec))
    pairs.append((f"MLIP λl={preset[2]:g} - λl={spec[2]:g} (r={preset[1]:g})", preset,
                  ("mlip", preset[1], spec[2], 0)))
    pairs.append((f"MLIP preset (r={preset[1]:g}, λl={preset[2]:g}) - method (r={spec[1]:g}, λl={spec[2]:g})",
                  preset, spec))
    return pairs


def _by_seed(groups: dict) -> dict:
    """{(arm, ratio, lambda_local, warm-up): {seed: record}}, keyed without the OT settings when each arm has one
    (the ablation); a sweep's grid of OT settings has no pairs ({})."""
    short = {k[:3] + k[5:] for k in groups}
    if len(short) != len(groups):
        return {}
    return {key[:3] + key[5:]: {x["seed"]: x for x in runs} for key, runs in groups.items()}


def paired_rows(records: list) -> list:
    """One row per comparison (:func:`_pairs`) whose both sides are in ``records``: the paired difference by seed with
    its 95% t interval for each of ``DIFFERENCE_METRICS`` (test, then validation)."""
    by = _by_seed(group_runs(records))
    rows = []
    for label, ka, kb in _pairs(by):
        if ka not in by or kb not in by:
            continue
        row = {"difference (paired by seed)": label}
        for m in DIFFERENCE_METRICS:
            row[m] = format_interval(paired_difference({s: x.get(m) for s, x in by[ka].items()},
                                                 {s: x.get(m) for s, x in by[kb].items()}))
        row["seeds"] = min(len(by[ka]), len(by[kb]))
        rows.append(row)
    return rows


def best_mode(records: list) -> Optional[dict]:
    """The configuration of an arm with an integrity mode that beats FLIP+local (same ratio and weight, paired by
    seed) by the most on validation zero-shot AUC (combined), the split and metric the choice is made on:
    {"configuration", "valid_zs_auc_combined", "valid_pointing_accuracy"} (paired differences), or None."""
    best = None
    by = _by_seed(group_runs(records))
    for key, runs in by.items():
        base = ("flip+local", key[1], key[2], 0)
        if key[0] not in MODE_ARMS or base not in by:
            continue
        diff = {m: paired_difference({s: x.get(m) for s, x in runs.items()},
                                     {s: x.get(m) for s, x in by[base].items()})
                for m in ("valid_zs_auc_combined", "valid_pointing_accuracy")}
        if diff["valid_zs_auc_combined"] is None:
            continue
        if best is None or diff["valid_zs_auc_combined"]["mean"] > best["valid_zs_auc_combined"]["mean"]:
            best = {"configuration": config_label(next(iter(runs.values()))), "arm": key[0], "sie_warmup": key[3],
                    **diff}
    return best


def readme_tables(records: list) -> list:
    """[(caption, rows)] for the README: mean ± std over seeds per configuration, then paired differences."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']}, {first['synthetic_n']} synthetic pairs; "
             f"test split, mean ± std over seeds")
    rows = []
    integrity = [m for m in INTEGRITY_COLUMNS if any(x.get(m) is not None for x in records)
                 or m in ("sie_mask_auc", "target_mask_auc")]
    for runs in group_runs(records).values():
        row = {"configuration": config_label(runs[0]), "seeds": len(runs)}
        for m in METRICS:
            row[m] = mean_std([x.get(m) for x in runs], 1 if m == "samples_per_s" else 3)
        row["pointing_chance"] = mean_std([x.get("pointing_chance") for x in runs])
        for m in integrity:
            row[m] = mean_std([x.get(m) for x in runs])
        rows.append(row)
    diffs = paired_rows(records)
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
               "mlip-discriminative": "tab:olive", "mlip-maco": "tab:cyan", "mlip-predictor": "tab:pink",
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
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lays out ``fig``, writes it to ``path`` (folders made) at the ablation's resolution and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
