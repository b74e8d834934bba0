"""The data-efficiency curve (``python -m tools.ablation --data-efficiency``): the same arms trained for the same
number of steps on shares of the synthetic benchmark's training pairs (``--train-fraction`` of the training app,
nested subsets drawn by the seed; validation and test whole). Its summaries: mean ± std over seeds per arm and
share, MLIP's paired differences to each baseline at each share with a 95% t interval, whether MLIP's advantage
grows as data shrinks (the change of the paired difference from the largest share to the smallest, itself paired
by seed), in tables for ``tools/readme_table.py`` and as sentences; and the PNG of the metrics against the pairs.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from tools.ablation.plan import MODE_ARMS
from tools.ablation.tables import (config_label, format_interval, group_runs, mean_std, paired_difference,
                                   save_figure)

METRICS = ("zs_auc_combined", "zs_auc_global", "zs_auc_local", "pointing_accuracy", "probe_auc_1pct")
# test metrics, then the validation metrics
DIFFERENCE_METRICS = ("zs_auc_combined", "pointing_accuracy", "probe_auc_1pct", "valid_zs_auc_combined",
                      "valid_pointing_accuracy")
# what the sentences say whether MLIP's advantage grows on
TREND_METRICS = {"zs_auc_combined": "zero-shot AUC (combined, test)", "pointing_accuracy": "pointing accuracy (test)"}
BASELINES = ("clip", "flip", "flip+local")


def fraction_of(r: dict) -> float:
    return r.get("train_fraction") or 1.0


def _curves(records: list) -> dict:
    """{configuration key: {fraction: {seed: record}}} (configurations in table order)."""
    curves: dict = {}
    for key, runs in group_runs(records).items():
        for x in runs:
            curves.setdefault(key, {}).setdefault(fraction_of(x), {})[x["seed"]] = x
    return curves


def _base_key(mlip: tuple, base: str, keys) -> Optional[tuple]:
    """The configuration of ``base`` that MLIP configuration ``mlip`` is compared with: CLIP at r = 0, FLIP at the
    same ratio, FLIP+local at the same ratio and patch-sentence weight, without warm-up; None when not run."""
    for k in keys:
        if k[0] == base and (base == "clip" or k[1] == mlip[1]) and (base != "flip+local" or k[2] == mlip[2]) \
                and not k[5]:
            return k
    return None


def comparisons(records: list) -> list:
    """[(label, MLIP curve, baseline curve)]: each configuration of an arm with an integrity mode against each
    baseline that ran."""
    curves = _curves(records)
    out = []
    for key, curve in curves.items():
        if key[0] not in MODE_ARMS:
            continue
        for base in BASELINES:
            kb = _base_key(key, base, curves)
            if kb is not None:
                label = f"{config_label(_first(curve))} - {config_label(_first(curves[kb]))}"
                out.append((label, curve, curves[kb]))
    return out


def _first(curve: dict) -> dict:
    return next(iter(next(iter(curve.values())).values()))


def _pairs_count(runs: dict) -> str:
    counts = sorted({x.get("num_train") for x in runs.values() if x.get("num_train") is not None})
    return "/".join(str(c) for c in counts)


def _difference(a: dict, b: dict, metric: str) -> Optional[dict]:
    return paired_difference({s: x.get(metric) for s, x in a.items()}, {s: x.get(metric) for s, x in b.items()})


def change_as_data_shrinks(mlip: dict, base: dict, metric: str) -> Optional[dict]:
    """The paired difference MLIP - baseline at the smallest share minus the one at the largest, paired by seed
    (nested subsets and the same initialisation per seed): above 0 when MLIP's advantage grows as data shrinks."""
    shares = sorted(set(mlip) & set(base))
    if len(shares) < 2:
        return None
    small, large = shares[0], shares[-1]

    def gap(share: float) -> dict:
        seeds = set(mlip[share]) & set(base[share])
        values = {s: (mlip[share][s].get(metric), base[share][s].get(metric)) for s in seeds}
        return {s: a - b for s, (a, b) in values.items() if a is not None and b is not None}

    return paired_difference(gap(small), gap(large))


def _reading(d: Optional[dict]) -> str:
    if d is None:
        return "not measured (one share)"
    if d["mean"] == 0 and d["low"] in (0, None) and d["high"] in (0, None):
        return "does not change as data shrinks"
    direction = "grows" if d["mean"] > 0 else "shrinks"
    if d["low"] is None:
        return f"{direction} as data shrinks in the mean (one seed: no interval)"
    if d["low"] > 0 or d["high"] < 0:
        return f"{direction} as data shrinks (the interval excludes 0: a change at the 5% level)"
    return f"{direction} as data shrinks in the mean, but the interval includes 0 (no change shown at the 5% level)"


def summary_sentences(records: list) -> list:
    """One sentence per comparison and ``TREND_METRICS`` metric: the paired difference at each share (largest
    first) and how it changes as data shrinks."""
    out = []
    for label, mlip, base in comparisons(records):
        for metric, name in TREND_METRICS.items():
            parts = []
            for share in sorted(set(mlip) & set(base), reverse=True):
                d = _difference(mlip[share], base[share], metric)
                if d is not None:
                    parts.append(f"{format_interval(d)} at {share:.0%} of the training pairs ({_pairs_count(mlip[share])})")
            if not parts:
                continue
            change = change_as_data_shrinks(mlip, base, metric)
            tail = "" if change is None else (f"; from the largest share to the smallest it changes by "
                                              f"{format_interval(change)}: the advantage {_reading(change)}")
            out.append(f"{label}, {name}: {', '.join(parts)}{tail}.")
    return out


def efficiency_tables(records: list) -> list:
    """[(caption, rows)] for the README: mean ± std per configuration and share, the paired differences per share,
    and how MLIP's advantage changes as data shrinks (the sentences in the caption)."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']} at every share of the training pairs of "
             f"{first['synthetic_n']} synthetic pairs; test split, mean ± std over seeds")
    rows = []
    for key, curve in _curves(records).items():
        for share in sorted(curve, reverse=True):
            runs = curve[share]
            row = {"configuration": config_label(_first(curve)), "share": f"{share:g}",
                   "pairs": _pairs_count(runs), "seeds": len(runs)}
            for m in METRICS:
                row[m] = mean_std([x.get(m) for x in runs.values()])
            row["pointing_chance"] = mean_std([x.get("pointing_chance") for x in runs.values()])
            rows.append(row)
    diffs, trend = [], []
    for label, mlip, base in comparisons(records):
        for share in sorted(set(mlip) & set(base), reverse=True):
            row = {"difference (paired by seed)": label, "share": f"{share:g}"}
            for m in DIFFERENCE_METRICS:
                row[m] = format_interval(_difference(mlip[share], base[share], m))
            row["seeds"] = len(set(mlip[share]) & set(base[share]))
            diffs.append(row)
        row = {"difference (paired by seed)": label}
        for m in DIFFERENCE_METRICS:
            row[f"{m}: smallest - largest share"] = format_interval(change_as_data_shrinks(mlip, base, m))
        trend.append(row)
    tables = [(where, rows)]
    if diffs:
        tables.append(("paired differences per share of the training pairs, mean [95% t interval] over seeds; test "
                       "split, then validation", diffs))
        tables.append(("does MLIP's advantage grow as data shrinks? The paired difference at the smallest share minus "
                       "the one at the largest, paired by seed (above 0: it grows). " + " ".join(
                           summary_sentences(records)), trend))
    return tables


def plot(records: list, path: Path) -> Path:
    """One panel per metric against the training pairs (log scale): each configuration's mean ± std over seeds,
    every run as a faint dot; chance on the pointing panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("zs_auc_combined", "zero-shot AUC, combined"), ("pointing_accuracy", "pointing accuracy"),
              ("probe_auc_1pct", "linear probe AUC, 1% labels"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    curves = _curves(records)
    for ax, (metric, title) in zip(axes, panels):
        for i, (key, curve) in enumerate(curves.items()):
            colour = f"C{i}"
            xs, means, stds = [], [], []
            for share in sorted(curve):
                runs = list(curve[share].values())
                values = [x[metric] for x in runs if x.get(metric) is not None]
                pairs = [x["num_train"] for x in runs if x.get("num_train")]
                if not values or not pairs:
                    continue
                xs.append(statistics.mean(pairs))
                means.append(statistics.mean(values))
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
                ax.scatter([xs[-1]] * len(values), values, color=colour, s=10, alpha=0.35)
            if xs:
                ax.errorbar(xs, means, yerr=stds, color=colour, marker="o", capsize=3,
                            label=config_label(_first(curve)))
        if metric == "pointing_accuracy":
            chance = [x["pointing_chance"] for x in records if x.get("pointing_chance") is not None]
            if chance:
                ax.axhline(statistics.mean(chance), color="r", linestyle="--", linewidth=1, label="chance")
        else:
            ax.axhline(0.5, color="r", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("training pairs")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    first = records[0]
    fig.suptitle(f"Data efficiency on the synthetic benchmark ({first['model']}, {first['steps']} steps at every "
                 f"share, {len({r['seed'] for r in records})} seeds; mean ± std over seeds, dots: runs)")
    return save_figure(fig, path)

