"""Command line: ``python -m mlip_fast.eval <task> --checkpoint DIR --data PATH --out DIR [options]``.

Tasks: zeroshot, fewshot, segmentation, retrieval, localisation. Each writes ``OUT/summary.json``
(metrics, checkpoint, data, seed, settings, versions, wall time) and its PNG plots into ``OUT``, shows
progress bars, and prints where the summary is. See docs/evaluation.md.

Data (``--dataset``, default ``auto``):
- ``synthetic``: a benchmark folder from ``python -m mlip_fast.data.synth`` (has ``master.csv`` with
  ``findings_json``); ``--split`` (default test) is evaluated, ``--train-split`` (default train) trains
  the few-shot tasks;
- ``covid``: ``../shared/data/covid_chestxray`` (has ``staged_images.csv``); train / test by a seeded
  patient-level split (``--test-fraction``);
- ``masks``: ``--data IMAGES --masks MASKS`` image + mask pairs by file name (segmentation);
- ``image-folder`` (``--data`` = class sub-folders), ``chexpert5x200`` (``--data`` = CheXpert's train.csv or a
  saved 5x200 selection), ``rsna`` / ``siim`` (``--data`` = labels / RLE CSV, ``--images`` = image folder):
  the readers of ``mlip_fast.data.datasets``; few-shot tasks split them with a seeded ``--test-fraction``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mlip_fast.data.datasets import DatasetError
from mlip_fast.eval.common import CheckpointError, EvalDataError, load_checkpoint, seed_everything, write_summary
from mlip_fast.eval.prompts import PromptError

TASKS = ("zeroshot", "fewshot", "segmentation", "retrieval", "localisation")
KINDS = ("auto", "synthetic", "covid", "masks", "image-folder", "chexpert5x200", "rsna", "siim")
DEFAULT_PROMPTS = {"synthetic": "synthetic", "covid": "rsna_pneumonia", "chexpert5x200": "chexpert5",
                   "rsna": "rsna_pneumonia", "siim": "siim_pneumothorax"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, help="model directory written by save_pretrained (the training export)")
    g.add_argument("--data", required=True, help="dataset folder (see --dataset)")
    g.add_argument("--out", required=True, help="output folder for summary.json and plots")
    g.add_argument("--dataset", choices=KINDS, default="auto", help="dataset kind (default: detected from --data)")
    g.add_argument("--split", default="test", help="evaluated split of a synthetic set (default test)")
    g.add_argument("--train-split", default="train", help="training split of a synthetic set for few-shot tasks")
    g.add_argument("--test-fraction", type=float, default=0.3,
                   help="test share of the patient-level split for sets without splits (default 0.3)")
    g.add_argument("--images", default=None, help="image folder of --dataset rsna / siim (--data is the labels CSV)")
    g.add_argument("--masks", default=None, help="mask folder (--dataset masks) or covid mask source: v7labs | lungvae")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-samples", type=int, default=None, help="score at most this many samples (zeroshot, retrieval, localisation)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")

    parser = argparse.ArgumentParser(prog="python -m mlip_fast.eval", description="Evaluate an MLIP checkpoint.")
    sub = parser.add_subparsers(dest="task", required=True)

    p = sub.add_parser("zeroshot", parents=[common], help="zero-shot classification from prompt sets")
    p.add_argument("--prompts", default=None, help="shipped prompt file name or JSON path (default per dataset)")
    p.add_argument("--mode", choices=("global", "local", "combined", "all"), default="all")
    p.add_argument("--classes", nargs="+", default=None, help="evaluate only these prompt classes")
    p.add_argument("--local-weight", type=float, default=0.5, help="weight of the local score in 'combined'")
    p.add_argument("--skip-empty", action="store_true", help="report classes without positives/negatives as skipped")

    p = sub.add_parser("fewshot", parents=[common], help="linear probe and fine-tune with 1/10/100%% of labels")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--methods", nargs="+", choices=("linear", "finetune"), default=["linear", "finetune"])
    p.add_argument("--classes", nargs="+", default=None, help="only these label columns")
    p.add_argument("--linear-steps", type=int, default=300)
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate of the image tower")
    p.add_argument("--splits-dir", default=None, help="split files to read / write (default OUT/splits)")

    p = sub.add_parser("segmentation", parents=[common], help="few-shot segmentation with a light decoder (Dice)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="decoder learning rate")
    p.add_argument("--finetune-encoder", action="store_true", help="train the image tower too (default frozen)")
    p.add_argument("--target", default="any", help="synthetic set: finding to segment, or 'any' (union)")
    p.add_argument("--splits-dir", default=None, help="split files to read / write (default OUT/splits)")
    p.add_argument("--examples", type=int, default=8, help="test images in the overlay PNG")

    sub.add_parser("retrieval", parents=[common], help="image-report retrieval Recall@1/5/10")

    p = sub.add_parser("localisation", parents=[common], help="finding-sentence heat maps vs ground-truth masks")
    p.add_argument("--threshold", type=float, default=0.5, help="heat-map threshold for the mask IoU")
    p.add_argument("--examples", type=int, default=8, help="findings in the overlay PNG")
    return parser


def _detect_kind(args) -> str:
    if args.dataset != "auto":
        return args.dataset
    root = Path(args.data)
    if not root.exists():
        raise EvalDataError(f"--data {root} does not exist")
    if (root / "master.csv").is_file():
        return "synthetic"
    if (root / "staged_images.csv").is_file():
        return "covid"
    if args.masks and Path(args.masks).is_dir():
        return "masks"
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return "image-folder"
    raise EvalDataError(f"cannot tell what kind of dataset {root} is; pass --dataset ({', '.join(KINDS[1:])})")


def _reader(kind: str, args, transform):
    """A whole dataset from ``mlip_fast.data.datasets`` (these readers have no split of their own)."""
    from mlip_fast.data import datasets as D

    if kind == "image-folder":
        return D.ImageFolderDataset(args.data, transform=transform)
    if kind == "chexpert5x200":
        return D.CheXpert5x200Dataset(args.data, transform=transform, seed=args.seed)
    if not args.images:
        raise EvalDataError(f"--dataset {kind} needs --images IMAGE_DIR beside --data (the labels CSV)")
    if kind == "rsna":
        return D.RSNAPneumoniaDataset(args.data, args.images, transform=transform)
    return D.SIIMPneumothoraxDataset(args.data, args.images, transform=transform)


def _train_test(kind: str, args, transform, task: str):
    """(train or None, test) datasets for ``task``; ``describe`` dict of the data for the summary."""
    from torch.utils.data import Subset

    from mlip_fast.eval.data import CovidChestXray, MaskedImageFolder, SyntheticBenchmark, group_split

    needs_train = task in ("fewshot", "segmentation")
    described = {"kind": kind, "path": str(args.data)}
    if kind == "synthetic":
        target = getattr(args, "target", None) if task == "segmentation" else None
        test = SyntheticBenchmark(args.data, split=args.split, transform=transform, segmentation_target=target,
                                  with_findings=task == "localisation")
        train = (SyntheticBenchmark(args.data, split=args.train_split, transform=transform, segmentation_target=target)
                 if needs_train else None)
        described.update(split=args.split, train_split=args.train_split if needs_train else None, target=target)
        return train, test, described
    if kind == "covid":
        masks = (args.masks or "v7labs") if task == "segmentation" else None
        full = CovidChestXray(args.data, transform=transform, masks=masks,
                              labelled_only=task in ("zeroshot", "fewshot"))
        described.update(masks=masks)
        if not needs_train:
            return None, full, described
        tr, te = group_split(full.groups, args.test_fraction, args.seed)
        described.update(test_fraction=args.test_fraction, split="patient-level", n_train=len(tr), n_test=len(te))
        return Subset(full, tr), Subset(full, te), described
    if kind == "masks":
        if not args.masks:
            raise EvalDataError("--dataset masks needs --masks MASK_FOLDER")
        full = MaskedImageFolder(args.data, args.masks, transform=transform)
        described.update(masks=args.masks)
        if not needs_train:
            return None, full, described
        tr, te = group_split([p[0].name for p in full.pairs], args.test_fraction, args.seed)
        return Subset(full, tr), Subset(full, te), described
    full = _reader(kind, args, transform)
    if not needs_train:
        return None, full, described
    tr, te = group_split(list(range(len(full))), args.test_fraction, args.seed)
    described.update(test_fraction=args.test_fraction, split="seeded", n_train=len(tr), n_test=len(te))
    return Subset(full, tr), Subset(full, te), described


def run(args) -> Path:
    """Run one task from parsed arguments; returns the summary path."""
    from mlip_fast.eval.common import eval_transform

    start = time.perf_counter()
    seed_everything(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(args.checkpoint, device)
    transform = eval_transform(model)
    kind = _detect_kind(args)
    train, test, described = _train_test(kind, args, transform, args.task)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    plots: list[Path] = []
    settings: dict = {"device": str(device), "batch_size": args.batch_size, "max_samples": args.max_samples}
    from mlip_fast.eval import plots as P

    if args.task == "zeroshot":
        from mlip_fast.eval.zeroshot import MODES, scores_to_metrics, zero_shot_scores

        prompts = args.prompts or DEFAULT_PROMPTS.get(kind)
        if prompts is None:
            raise PromptError(f"--prompts is required for --dataset {kind}")
        zs = zero_shot_scores(model, test, prompts, local_weight=args.local_weight, batch_size=args.batch_size,
                              device=device, max_samples=args.max_samples, progress=progress, classes=args.classes)
        modes = MODES if args.mode == "all" else (args.mode,)
        metrics = {m: scores_to_metrics(zs.scores[m], zs.labels, zs.class_names, skip_empty=args.skip_empty, mode=m)
                   for m in modes}
        plots.append(P.plot_roc_curves({m: zs.scores[m] for m in modes}, zs.labels, zs.class_names, out / "roc_curves.png"))
        settings.update(prompts=str(prompts), mode=args.mode, local_weight=args.local_weight, classes=zs.class_names)
    elif args.task == "fewshot":
        from mlip_fast.eval.fewshot import few_shot_classify

        splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
        metrics = few_shot_classify(model, train, test, fractions=args.fractions, methods=args.methods, seed=args.seed,
                                    classes=args.classes, splits_dir=splits_dir, linear_steps=args.linear_steps,
                                    finetune_epochs=args.epochs, finetune_lr=args.lr, batch_size=args.batch_size,
                                    device=device, progress=progress)
        plots.append(P.plot_fewshot({m: metrics[m] for m in args.methods}, out / "fewshot_auc.png",
                                    title="few-shot classification (test macro AUC)"))
        settings.update(fractions=args.fractions, methods=args.methods, linear_steps=args.linear_steps,
                        epochs=args.epochs, lr=args.lr, splits_dir=str(splits_dir))
    elif args.task == "segmentation":
        from mlip_fast.eval.segmentation import few_shot_segment

        splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
        metrics = few_shot_segment(model, train, test, fractions=args.fractions, seed=args.seed,
                                   freeze_encoder=not args.finetune_encoder, epochs=args.epochs, lr=args.lr,
                                   batch_size=args.batch_size, splits_dir=splits_dir, device=device,
                                   progress=progress, examples=args.examples)
        examples = metrics.pop("examples", [])
        plots.append(P.plot_segmentation_overlays(examples, out / "segmentation_overlays.png"))
        rows = {k: v for k, v in metrics.items() if isinstance(v, dict) and "dice" in v}
        plots.append(P.plot_fewshot({"decoder": rows}, out / "segmentation_dice.png", metric="dice",
                                    title="few-shot segmentation (test Dice)"))
        settings.update(fractions=args.fractions, epochs=args.epochs, lr=args.lr,
                        freeze_encoder=not args.finetune_encoder, splits_dir=str(splits_dir))
    elif args.task == "retrieval":
        from mlip_fast.eval.retrieval import evaluate_retrieval

        metrics = evaluate_retrieval(model, test, batch_size=args.batch_size, device=device,
                                     max_samples=args.max_samples, progress=progress, return_similarity=True)
        sim = metrics.pop("similarity")
        plots.append(P.plot_retrieval(metrics, out / "retrieval.png", similarity=sim))
    else:
        from mlip_fast.eval.localisation import evaluate_localisation

        metrics = evaluate_localisation(model, test, threshold=args.threshold, batch_size=args.batch_size,
                                        device=device, max_samples=args.max_samples, progress=progress,
                                        examples=args.examples)
        examples = metrics.pop("examples", [])
        plots.append(P.plot_heatmap_overlays(examples, out / "localisation_overlays.png"))
        settings.update(threshold=args.threshold)
    data_desc = {**described, "n_test": len(test), **({"n_train": len(train)} if train is not None else {})}
    path = write_summary(out, args.task, metrics, checkpoint=Path(args.checkpoint).resolve(), data=data_desc,
                         seed=args.seed, wall_time_s=round(time.perf_counter() - start, 3), settings=settings,
                         plots=plots)
    return path


def _headline(task: str, metrics: dict) -> str:
    if task == "zeroshot":
        return "; ".join(f"{m}: macro AUC {v['macro']['auc']:.3f} (chance {v['chance']['auc']:.2f})" for m, v in metrics.items())
    if task == "fewshot":
        return "; ".join(f"{m} {k}: AUC {r['macro_auc']:.3f}" for m, rows in metrics.items() if isinstance(rows, dict)
                         for k, r in rows.items() if isinstance(r, dict) and "macro_auc" in r)
    if task == "segmentation":
        return "; ".join(f"{k}: Dice {v['dice']:.3f}" for k, v in metrics.items() if isinstance(v, dict) and v.get("dice") is not None)
    if task == "retrieval":
        i, r = metrics["image_to_report"], metrics["report_to_image"]
        return (f"image->report R@1/5/10 {i['recall@1']:.3f}/{i['recall@5']:.3f}/{i['recall@10']:.3f}; "
                f"report->image {r['recall@1']:.3f}/{r['recall@5']:.3f}/{r['recall@10']:.3f}")
    return (f"pointing accuracy {metrics['pointing_accuracy']:.3f} (chance {metrics['chance']:.3f}); "
            f"mask IoU {metrics['mask_iou']:.3f} (whole-image {metrics['iou_chance']:.3f})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = run(args)
    except (CheckpointError, EvalDataError, PromptError, DatasetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads(path.read_text())
    print(f"{args.task}: {_headline(args.task, summary['metrics'])}")
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
