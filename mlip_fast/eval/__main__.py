"""Command line: ``python -m mlip_fast.eval <task> --checkpoint DIR --data PATH --out DIR [options]``
(``--train-data DIR`` / ``--test-data DIR`` for labelled image folders given as two folders; ``--version``).

Tasks: zeroshot, fewshot, segmentation, retrieval, localisation. Each writes ``OUT/summary.json``
(metrics, checkpoint, data, seed, settings, versions, wall time) and its PNG plots into ``OUT``, shows
progress bars, and prints where the summary is. See docs/evaluation.md.

Data (``--dataset``, default ``auto``): ``synthetic`` (a benchmark folder from ``python -m
mlip_fast.data.synth``), ``covid`` (``../shared/data/covid_chestxray``), ``masks`` (``--data IMAGES
--masks MASKS``), ``image-folder``, ``chexpert5x200`` (CheXpert's train.csv, a saved selection or a
list file), ``chexpert`` (CheXpert's train.csv, with valid.csv beside it as the test set), ``rsna`` / ``siim`` (``--data`` = labels / RLE CSV, ``--images`` = image folder), ``shards``
(a folder from ``python -m mlip_fast.data.shards``: zeroshot and retrieval on its stored splits). Every kind
is split train / valid / test by the field's protocols (``mlip_fast.eval.benchmarks``): ``--split``
(default test) is scored; few-shot tasks train on train and choose epochs / steps on valid. An image folder is
read as split folders (train/ valid/ test/) or class folders (scored whole by zeroshot, retrieval and
localisation), and its classes and counts are printed before the model loads; an ambiguous layout is refused
(:mod:`mlip_fast.eval.image_folders`). Cheap checks (the data's layout, the prompts) run before the model loads.

Unreadable samples (missing, empty or corrupt image files) are found by reading every sample once before
the task: up to ``--max-bad-fraction`` (default 1%) of each set is left out of the metrics and named in
``summary.json`` (``data.skipped``); more stops with exit 2 and a message naming every one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, Subset

from mlip_fast._cli import HelpFormatter, Parser, add_version
from mlip_fast.constants import LOCAL_MATCHINGS
from mlip_fast.data.evaluation.chexpert import UNCERTAIN_POLICIES
from mlip_fast.data.readers import DatasetError, EvalDataError
from mlip_fast.data.shard_reader import find_index
from mlip_fast.eval import plots as P
from mlip_fast.eval.benchmarks import KINDS as BENCHMARK_KINDS
from mlip_fast.eval.benchmarks import SplitOptions, build_eval_sets
from mlip_fast.eval.common import (
    CheckpointError,
    eval_transform,
    load_checkpoint,
    screen_samples,
    seed_everything,
    write_summary,
)
from mlip_fast.eval.fewshot import SUBSET_SAMPLERS, few_shot_classify
from mlip_fast.eval.image_folders import FolderRequest, describe_image_folders
from mlip_fast.eval.localisation import evaluate_localisation
from mlip_fast.eval.prompts import PromptError, list_prompt_files, load_prompts
from mlip_fast.eval.protocols import SELECTION_CRITERIA, SPLIT_METHODS
from mlip_fast.eval.retrieval import evaluate_retrieval
from mlip_fast.eval.segmentation import few_shot_segment
from mlip_fast.eval.zeroshot import MODES, scores_to_metrics, zero_shot_scores
from mlip_fast.preprocess.images import ImageLoadError

TASKS = ("zeroshot", "fewshot", "segmentation", "retrieval", "localisation")
KINDS = ("auto",) + BENCHMARK_KINDS
DEFAULT_PROMPTS = {"synthetic": "synthetic", "covid": "rsna_pneumonia", "chexpert5x200": "chexpert5", "chexpert": "chexpert5",
                   "rsna": "rsna_pneumonia", "siim": "siim_pneumothorax"}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("run")
    g.add_argument("--checkpoint", required=True, help="model directory written by save_pretrained (the training export)")
    g.add_argument("--data", default=None, help="dataset folder or file (see --dataset); required unless --test-data")
    g.add_argument("--train-data", default=None, metavar="DIR",
                   help="image folders: the class folders to train few-shot classifiers on (beside --test-data)")
    g.add_argument("--test-data", default=None, metavar="DIR",
                   help="image folders: the class folders to score (with --train-data for few-shot tasks)")
    g.add_argument("--out", required=True, help="output folder for summary.json and plots")
    g.add_argument("--dataset", choices=KINDS, default="auto", help="dataset kind (default: detected from --data)")
    g.add_argument("--split", default=None,
                   help="evaluated split: train, valid, test or all (default: test; all images of a class-folder "
                        "image folder for zeroshot, retrieval and localisation)")
    g.add_argument("--train-split", default="train", help="training split of a synthetic set for few-shot tasks")
    g.add_argument("--valid-split", default=None,
                   help="validation split of a synthetic set (default valid, unless it is --split or --train-split)")
    p_split = common.add_argument_group("protocol (docs/evaluation.md)")
    p_split.add_argument("--split-file", default=None,
                         help="split definition or list file replacing the shipped one (covid, rsna, siim, chexpert5x200)")
    p_split.add_argument("--split-fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VALID", "TEST"),
                         help="override the split's fractions (default 0.7 0.15 0.15)")
    p_split.add_argument("--split-method", choices=SPLIT_METHODS, default=None,
                         help="override the split's procedure (grouped: by patient; mgca: GLoRIA / MGCA's)")
    p_split.add_argument("--split-seed", type=int, default=None, help="override the split's seed (default 0)")
    p_split.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="ignore",
                         help="CheXpert's uncertain label -1: ignore (unknown), ones, zeros, or gloria (per class)")
    p_split.add_argument("--selection", choices=SELECTION_CRITERIA, default="gloria",
                         help="CheXpert 5x200 criterion: gloria (12 other observations 0 or blank) or five")
    p_split.add_argument("--balance-negatives", action=argparse.BooleanOptionalAction, default=None,
                         help="segmentation: train on every positive image plus as many negatives "
                              "(default: yes for siim, as GLoRIA / MGCA; no elsewhere)")
    g.add_argument("--images", default=None, help="image folder of --dataset rsna / siim (--data is the labels CSV)")
    g.add_argument("--masks", default=None, help="mask folder (--dataset masks) or covid mask source: v7labs | lungvae")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, few-shot subsets and training")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    g.add_argument("--max-samples", type=int, default=None, help="score at most this many samples (zeroshot, retrieval, localisation)")
    g.add_argument("--max-bad-fraction", type=_fraction, default=0.01,
                   help="share of unreadable samples (missing or corrupt images) left out, named in summary.json; more "
                        "stops with an error naming every one")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")

    parser = Parser(prog="python -m mlip_fast.eval", description="Evaluate an MLIP checkpoint.",
                    formatter_class=HelpFormatter)
    add_version(parser)
    sub = parser.add_subparsers(dest="task", required=True)

    def task(name: str, help_text: str):
        return sub.add_parser(name, parents=[common], help=help_text, formatter_class=HelpFormatter)

    p = task("zeroshot", "zero-shot classification from prompt sets")
    p.add_argument("--prompts", default=None,
                   help=f"shipped prompt file name ({', '.join(list_prompt_files())}) or JSON path (default per dataset: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_PROMPTS.items()) + "; required for others)")
    p.add_argument("--prompts-per-class", type=int, default=None, metavar="N",
                   help="generated prompt files (chexpert5_gloria): N positive prompts sampled per class with --seed "
                        "(0: every combination; default: the file's, 5 as GLoRIA)")
    p.add_argument("--mode", choices=("global", "local", "combined", "all"), default="all",
                   help="score with the global embeddings, the patch-sentence scores, their mix, or all three")
    p.add_argument("--classes", nargs="+", default=None, help="evaluate only these prompt classes")
    p.add_argument("--local-weight", type=float, default=0.5, help="weight of the local score in 'combined'")
    p.add_argument("--local-matching", choices=LOCAL_MATCHINGS, default=None,
                   help="local scores by token-wise max or optimal transport (default: the model config's, the "
                        "matching it was trained with)")
    p.add_argument("--skip-empty", action="store_true", help="report classes without positives/negatives as skipped")

    p = task("fewshot", "linear probe and fine-tune with 1/10/100%% of labels")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="label fractions to train on")
    p.add_argument("--methods", nargs="+", choices=("linear", "finetune"), default=["linear", "finetune"],
                   help="linear probe on frozen features and / or fine-tuning of the image tower")
    p.add_argument("--classes", nargs="+", default=None, help="only these label columns")
    p.add_argument("--linear-steps", type=int, default=300, help="optimizer steps of the linear probe")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate of the image tower")
    p.add_argument("--splits-dir", default=None, help="split files to read / write (default OUT/splits)")
    p.add_argument("--subset-sampler", choices=SUBSET_SAMPLERS, default="nested",
                   help="label-fraction subsets: nested (seeded) or mgca (pandas sample(frac, random_state=--seed))")

    p = task("segmentation", "few-shot segmentation with a light decoder (Dice)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], help="label fractions to train on")
    p.add_argument("--epochs", type=int, default=10, help="decoder training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="decoder learning rate")
    p.add_argument("--finetune-encoder", action="store_true", help="train the image tower too (default frozen)")
    p.add_argument("--target", default="any", help="synthetic set: finding to segment, or 'any' (union)")
    p.add_argument("--splits-dir", default=None, help="split files to read / write (default OUT/splits)")
    p.add_argument("--examples", type=int, default=8, help="test images in the overlay PNG")

    task("retrieval", "image-report retrieval Recall@1/5/10")

    p = task("localisation", "finding-sentence heat maps vs ground-truth masks")
    p.add_argument("--threshold", type=float, default=0.5, help="heat-map threshold for the mask IoU")
    p.add_argument("--examples", type=int, default=8, help="findings in the overlay PNG")
    p.add_argument("--local-matching", choices=LOCAL_MATCHINGS, default=None,
                   help="heat maps of patch cosines (max) or of the transport plan against the report's sentences "
                        "(ot) (default: the model config's, the matching it was trained with)")
    return parser


def _detect_kind(args) -> str:
    if args.dataset != "auto":
        return args.dataset
    if args.train_data is not None or args.test_data is not None:
        return "image-folder"
    root = Path(args.data)
    if not root.exists():
        raise EvalDataError(f"--data {root} does not exist")
    if find_index(root) is not None:
        return "shards"
    if (root / "master.csv").is_file():
        return "synthetic"
    if (root / "staged_images.csv").is_file():
        return "covid"
    if args.masks and Path(args.masks).is_dir():
        return "masks"
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return "image-folder"
    raise EvalDataError(f"cannot tell what kind of dataset {root} is; pass --dataset ({', '.join(KINDS[1:])})")


def _options(args) -> SplitOptions:
    return SplitOptions(split=args.split, train_data=args.train_data, test_data=args.test_data,
                        train_split=args.train_split, valid_split=args.valid_split,
                        fractions=args.split_fractions, method=args.split_method, split_seed=args.split_seed,
                        split_file=args.split_file, uncertain=args.uncertain, criterion=args.selection,
                        balance_negatives=args.balance_negatives, target=getattr(args, "target", "any"),
                        masks=args.masks, images=args.images, out_dir=Path(args.out) / "splits")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _screen(sets, args, progress: bool) -> tuple:
    """(train, valid, test, skipped): each set without its unreadable samples (``screen_samples``), which are
    listed per set (``{"train" | "valid" | "test": [...]}``, test being the evaluated one) and reported on stderr. ``--max-samples`` applies before: the test set is cut first."""
    out, skipped = [], {}
    for name, what in (("train", "training set"), ("valid", "validation set"), ("test", "evaluated set")):
        data = getattr(sets, name)
        if data is None:
            out.append(None)
            continue
        if name == "test" and args.max_samples is not None and not isinstance(data, IterableDataset):
            data = Subset(data, range(min(len(data), args.max_samples)))
        data, bad = screen_samples(data, args.max_bad_fraction, what, progress)
        if bad:
            skipped[name] = bad
            print(f"warning: {what}: left out {len(bad)} unreadable sample(s): "
                  + "; ".join(f"{s['source']}: {s['reason']}" for s in bad), file=sys.stderr)
        out.append(data)
    return (*out, skipped)


def _before_the_model(args) -> tuple:
    """(kind, prompts) after the checks that need no model: the data's kind and, for an image folder, its layout
    (printed: classes and counts), and the zero-shot prompts."""
    if args.data is None and args.test_data is None:
        raise EvalDataError("--data is required (or --test-data for an image folder)")
    if (args.train_data or args.test_data) and args.dataset not in ("auto", "image-folder"):
        raise EvalDataError(f"--train-data / --test-data are image folders; they do not go with --dataset {args.dataset}")
    kind = _detect_kind(args)
    prompts = None
    if args.task == "zeroshot":
        prompts = args.prompts or DEFAULT_PROMPTS.get(kind)
        if prompts is None:
            raise PromptError(f"--prompts is required for --dataset {kind}: a shipped prompt file "
                              f"({', '.join(list_prompt_files())}) or a JSON path naming the data's classes")
        load_prompts(prompts, per_class=args.prompts_per_class, seed=args.seed)  # a bad file fails here
    if kind == "image-folder":
        found = describe_image_folders(FolderRequest(args.data, args.train_data, args.test_data, args.task, args.split))
        print("data: " + found.replace("\n", "\ndata: "), flush=True)
    return kind, prompts


def run(args) -> Path:
    """Run one task from parsed arguments; returns the summary path."""
    start = time.perf_counter()
    kind, prompts = _before_the_model(args)
    seed_everything(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(args.checkpoint, device)
    transform = eval_transform(model)
    sets = build_eval_sets(kind, args.data, args.task, transform, _options(args))
    progress = not args.no_progress
    train, valid, test, skipped = _screen(sets, args, progress)
    described = {"kind": kind, "path": str(args.data if args.data is not None else args.test_data), **sets.described,
                 "skipped": skipped}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plots: list[Path] = []
    settings: dict = {"device": str(device), "batch_size": args.batch_size, "max_samples": args.max_samples}

    if args.task == "zeroshot":
        class_prompts = load_prompts(prompts, per_class=args.prompts_per_class, seed=args.seed)
        zs = zero_shot_scores(model, test, class_prompts, local_weight=args.local_weight, batch_size=args.batch_size,
                              device=device, max_samples=args.max_samples, progress=progress, classes=args.classes,
                              local_matching=args.local_matching)
        modes = MODES if args.mode == "all" else (args.mode,)
        metrics = {m: scores_to_metrics(zs.scores[m], zs.labels, zs.class_names, skip_empty=args.skip_empty, mode=m)
                   for m in modes}
        plots.append(P.plot_roc_curves({m: zs.scores[m] for m in modes}, zs.labels, zs.class_names, out / "roc_curves.png"))
        settings.update(prompts=str(prompts), prompts_per_class=args.prompts_per_class, mode=args.mode,
                        local_weight=args.local_weight, classes=zs.class_names, local_matching=zs.local_matching,
                        positive_prompts={c: list(cp.positive) for c, cp in class_prompts.items()})
    elif args.task == "fewshot":
        splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
        metrics = few_shot_classify(model, train, test, valid_data=valid, fractions=args.fractions, methods=args.methods,
                                    seed=args.seed, classes=args.classes, splits_dir=splits_dir,
                                    subset_sampler=args.subset_sampler, linear_steps=args.linear_steps,
                                    finetune_epochs=args.epochs, finetune_lr=args.lr, batch_size=args.batch_size,
                                    device=device, progress=progress)
        plots.append(P.plot_fewshot({m: metrics[m] for m in args.methods}, out / "fewshot_auc.png",
                                    title="few-shot classification (test macro AUC)"))
        settings.update(fractions=args.fractions, methods=args.methods, linear_steps=args.linear_steps,
                        epochs=args.epochs, lr=args.lr, splits_dir=str(splits_dir), subset_sampler=args.subset_sampler)
    elif args.task == "segmentation":
        splits_dir = Path(args.splits_dir) if args.splits_dir else out / "splits"
        metrics = few_shot_segment(model, train, test, valid_data=valid, fractions=args.fractions, seed=args.seed,
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
        metrics = evaluate_retrieval(model, test, batch_size=args.batch_size, device=device,
                                     max_samples=args.max_samples, progress=progress, return_similarity=True)
        sim = metrics.pop("similarity")
        plots.append(P.plot_retrieval(metrics, out / "retrieval.png", similarity=sim))
    else:
        metrics = evaluate_localisation(model, test, threshold=args.threshold, batch_size=args.batch_size,
                                        device=device, max_samples=args.max_samples, progress=progress,
                                        examples=args.examples, local_matching=args.local_matching)
        examples = metrics.pop("examples", [])
        plots.append(P.plot_heatmap_overlays(examples, out / "localisation_overlays.png"))
        settings.update(threshold=args.threshold)
    data_desc = {**described, "n_test": len(test), **({"n_train": len(train)} if train is not None else {}),
                 **({"n_valid": len(valid)} if valid is not None else {})}
    path = write_summary(out, args.task, metrics, checkpoint=Path(args.checkpoint).resolve(), data=data_desc,
                         seed=args.seed, wall_time_s=round(time.perf_counter() - start, 3), settings=settings,
                         plots=[p for p in plots if p is not None])  # None: no matplotlib, no PNG
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
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    try:
        path = run(args)
    except (CheckpointError, EvalDataError, PromptError, DatasetError, FileNotFoundError, ImageLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = json.loads(path.read_text())
    print(f"{args.task}: {_headline(args.task, summary['metrics'])}")
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
