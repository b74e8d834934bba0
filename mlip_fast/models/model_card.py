"""The model card (``README.md``) written into every MLIP checkpoint.

:func:`render_model_card` describes a model from what it holds (config, preprocessing, tokenizer, parameter
count) and, when a training run's ``summary.json`` dict is given, from what the run measured: data (source,
counts, splits), training (steps, batch, precision, wall time, hardware) and the evaluation numbers next to
their chance rates. It ends with the intended use and limitations (research use; not a medical device).

The YAML header (``huggingface_hub.ModelCardData``) says only what holds: ``library_name``, ``license`` (the
code's licence for a model trained on the synthetic benchmark or saved outside a run; ``other`` once real data
was used, whose terms then apply, unless ``license=`` names one), ``datasets`` (known for the synthetic
benchmark, else as given), ``tags`` and a ``model-index`` with the run's test numbers. It sets no
``pipeline_tag``: no transformers pipeline serves MLIP (``AutoModel`` loads it after ``import mlip_fast``).

A card carries :data:`CARD_MARKER`: ``save_pretrained`` replaces a card with the marker (one it wrote) and
keeps a README.md without it (one a user wrote).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional, Sequence, Union

from huggingface_hub import EvalResult, ModelCardData

from mlip_fast._version import __license__

__all__ = ["render_model_card", "write_model_card", "is_generated_card", "CARD_MARKER", "CARD_METADATA",
           "SYNTHETIC_DATASET"]

CARD_MARKER = "<!-- model card written by mlip_fast; delete this line to keep your edits when the folder is saved again -->"
CARD_METADATA = {
    "library_name": "mlip_fast",
    "tags": ["mlip", "medical-imaging", "chest-x-ray", "radiology", "vision-language", "contrastive-learning"],
}
SYNTHETIC_DATASET = "mlip_fast-synthetic-cxr"  # the built-in benchmark (generated, not on the Hub)


def is_generated_card(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a model card written by this module (it carries :data:`CARD_MARKER`)."""
    path = Path(path)
    return path.is_file() and CARD_MARKER in path.read_text(errors="replace")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _real_data(summary: Optional[dict]) -> bool:
    source = ((summary or {}).get("data") or {}).get("source")
    return source is not None and source != "synthetic"


def _card_license(summary: Optional[dict], license: Optional[str]) -> str:
    return license or ("other" if _real_data(summary) else __license__.lower())


def _card_datasets(summary: Optional[dict], datasets: Optional[Sequence[str]]) -> list:
    if datasets is not None:
        return list(datasets)
    source = ((summary or {}).get("data") or {}).get("source")
    return [SYNTHETIC_DATASET] if source == "synthetic" else []


def _eval_results(summary: Optional[dict], datasets: list) -> list:
    """The run's test numbers as model-index results: zero-shot AUC (macro and per class), pointing accuracy."""
    zs, loc = (summary or {}).get("zero_shot_test"), (summary or {}).get("localisation_test")
    dataset = datasets[0] if datasets else "custom"
    where = dict(dataset_type=dataset, dataset_name=dataset, dataset_split="test")
    results = []
    if zs and zs.get("auc_macro") is not None:
        task = dict(task_type="zero-shot-image-classification", task_name="Zero-shot classification", **where)
        results.append(EvalResult(**task, metric_type="roc_auc", metric_value=zs["auc_macro"],
                                  metric_name="zero-shot macro AUC"))
        results += [EvalResult(**task, metric_type="roc_auc", metric_value=auc, metric_name=f"zero-shot AUC, {name}")
                    for name, auc in zs.get("auc", {}).items() if auc is not None]
    if loc and loc.get("pointing_accuracy") is not None:
        results.append(EvalResult(task_type="phrase-grounding", task_name="Finding localisation", **where,
                                  metric_type="pointing_accuracy", metric_value=loc["pointing_accuracy"],
                                  metric_name="pointing accuracy"))
    return results


def _yaml_header(model, summary: Optional[dict], license: Optional[str], datasets: Optional[Sequence[str]]) -> list:
    datasets = _card_datasets(summary, datasets)
    results = _eval_results(summary, datasets)
    data = ModelCardData(library_name=CARD_METADATA["library_name"], license=_card_license(summary, license),
                         datasets=datasets or None, tags=list(CARD_METADATA["tags"]),
                         model_name=model.config.name if results else None, eval_results=results or None)
    return ["---", *data.to_yaml().splitlines(), "---"]


def _model_section(model) -> list[str]:
    cfg, v, t = model.config, model.config.vision, model.config.text
    n_params = sum(p.numel() for p in model.parameters())
    text_source = {"random": "randomly initialised BERT", "minilm": "all-MiniLM-L6-v2 weights",
                   "hf": f"transformers checkpoint `{t.name}`"}.get(t.source, t.source)
    enc = model.text.encoder.config
    kept = round((1 - cfg.mask_ratio) * v.num_patches)
    return [
        "## Model", "",
        "| part | configuration |", "| --- | --- |",
        f"| config name | `{cfg.name}` |",
        f"| image tower | ViT, {v.image_size} px, patch {v.patch_size} ({v.num_patches} patches), width {v.width}, "
        f"depth {v.depth}, {v.heads} heads, {v.in_chans} input channel(s) |",
        f"| report tower | {text_source}: hidden {enc.hidden_size}, {enc.num_hidden_layers} layers, "
        f"{enc.num_attention_heads} heads, vocabulary {enc.vocab_size} |",
        f"| joint space | D = {cfg.embed_dim}, {cfg.projection} projections |",
        f"| masking | ratio {cfg.mask_ratio:g} in training ({kept} of {v.num_patches} patches kept), {_integrity(cfg)}; "
        f"none at inference |",
        f"| patch-sentence matching | {_matching(cfg)} (local loss, local zero-shot scores, localisation maps) |",
        f"| parameters | {n_params / 1e6:.2f} M |", "",
    ]


def _integrity(cfg) -> str:
    """The integrity mode (``sie_mode``) as the card states it, with its warm-up."""
    mode = {
        "guided": f"integrity-scored (Gumbel temperature {cfg.mask_temperature:g}, estimator hidden {cfg.sie_hidden}), "
                  "views weighted by their kept integrity mass",
        "discriminative": f"integrity-scored (Gumbel temperature {cfg.mask_temperature:g}, estimator hidden "
                          f"{cfg.sie_hidden}, discriminative target), views weighted by their kept integrity mass",
        "maco": "uniform, views weighted by the mask-layout weight softplus(theta^T m + c) (MaCo)",
        "predictor": f"uniform, views weighted by a predicted integrity (head hidden {cfg.sie_hidden})",
    }[cfg.sie_mode]
    warmup = f", after {cfg.sie_warmup} warm-up steps of uniform masking and equal weights" if cfg.sie_warmup else ""
    return f"integrity mode `{cfg.sie_mode}`: {mode}{warmup}"


def _matching(cfg) -> str:
    if cfg.local_matching == "ot":
        return f"entropic optimal transport, eps {cfg.ot_eps:g}, {cfg.ot_iters} Sinkhorn iterations"
    return "token-wise max"


def _preprocess_section(model) -> list[str]:
    p, t = model.preprocess_cfg, model.config.text
    aug = p.augment
    vocab = len(model.tokenizer) if model.tokenizer is not None else "n/a"
    return [
        "## Preprocessing", "",
        f"- Image (stored in `preprocess_config.json`, rebuilt by `create_model_and_transforms`): grey in [0, 1] "
        f"(colour to BT.601 luminance, alpha onto black, 8-bit / 255, 16-bit / 65535, DICOM through its modality and "
        f"VOI LUTs), longer side resized to {p.image_size} px (antialiased bilinear), centred on a zero-padded "
        f"{p.image_size} x {p.image_size} square, replicated to {p.in_chans} channel(s), then (x - mean) / std with "
        f"mean {list(p.mean)}, std {list(p.std)}.",
        f"- Training augmentation: rotation up to {aug['degrees']:g} degrees, scale {list(aug['scale'])}, shift up to "
        f"{aug['translate']:g} of the side; no flips (reports name sides).",
        f"- Reports: WordPiece tokenizer (`tokenizer/`, vocabulary {vocab}), at most {t.max_length} tokens and "
        f"{t.max_sentences} sentences per report (`mlip_fast.get_tokenizer` applies both).", "",
    ]


def _data_section(summary: Optional[dict]) -> list[str]:
    lines = ["## Data", ""]
    data = (summary or {}).get("data")
    if not data:
        return lines + ["Not recorded: this checkpoint was saved outside an `mlip_fast` training run.", ""]
    source = data.get("source")
    if source == "synthetic":
        args = summary.get("args", {})
        what = (f"the built-in synthetic chest X-ray benchmark of `mlip_fast` ({args.get('synthetic_n')} image-report "
                f"pairs, seed {args.get('synthetic_seed')}): generated thoraxes with seven findings, pixel masks and "
                f"free-text reports")
    else:
        what = f"`{Path(str(data.get('path') or source)).name}` (`--data {source}`)"
    return lines + [
        f"- Source: {what}.",
        f"- Splits: {data.get('n_train')} training, {data.get('n_valid')} validation and {data.get('n_test')} test pairs "
        f"(split by patient where the source has patient ids).", "",
    ]


def _hardware(summary: dict) -> str:
    versions = summary.get("versions", {})
    device = summary.get("device", "n/a")
    cores = summary.get("cpu_count")
    what = versions.get("gpu") or (f"CPU, {cores} cores" if device == "cpu" and cores else device)
    return f"{summary.get('world_size', 1)} process(es) on {what} ({versions.get('platform') or platform.platform()})"


def _training_section(summary: Optional[dict]) -> list[str]:
    lines = ["## Training", ""]
    if not summary:
        return lines + ["Not recorded (no training run summary was given when this card was written).", ""]
    ds = summary.get("ds_config", {})
    opt = ds.get("optimizer", {}).get("params", {})
    sched = ds.get("scheduler", {})
    versions = summary.get("versions", {})
    loss = summary.get("final_loss_mean_last_steps") or summary.get("final_loss") or {}
    lines += [
        "| setting | value |", "| --- | --- |",
        f"| steps | {summary.get('steps')} |",
        f"| global batch | {summary.get('global_batch')} = {summary.get('micro_batch')} per process x "
        f"{summary.get('gradient_accumulation')} accumulation x {summary.get('world_size')} process(es) |",
        f"| precision | {summary.get('dtype')} |",
        f"| DeepSpeed | ZeRO stage {summary.get('zero_stage')} |",
        f"| optimizer | {ds.get('optimizer', {}).get('type')}, peak lr {opt.get('lr')}, weight decay "
        f"{opt.get('weight_decay', 0.0)}, {sched.get('type', 'constant lr')} |",
        f"| wall time | {_num(summary.get('wall_time_s'), 1)} s in all, {_num(summary.get('train_s'), 1)} s training "
        f"({_num(summary.get('samples_per_s'), 1)} samples/s) |",
        f"| hardware | {_hardware(summary)} |",
        f"| seed | {summary.get('seed')} |",
        f"| software | mlip_fast {versions.get('mlip_fast')}, torch {versions.get('torch')}, deepspeed "
        f"{versions.get('deepspeed')}, transformers {versions.get('transformers')} |",
    ]
    if loss:
        lines.append("| final loss (mean of the last steps) | " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()) + " |")
    return lines + [""]


def _evaluation_section(summary: Optional[dict]) -> list[str]:
    lines = ["## Evaluation", ""]
    zs = (summary or {}).get("zero_shot_test")
    loc = (summary or {}).get("localisation_test")
    if not zs and not loc:
        return lines + ["No evaluation was recorded with this checkpoint (`python -m mlip_fast.eval` measures one).", ""]
    lines += ["Measured at the end of the training run on its test split.", "",
              "| metric | value | chance |", "| --- | --- | --- |"]
    if zs:
        chance = zs.get("chance_auc", 0.5)
        for name, auc in zs.get("auc", {}).items():
            lines.append(f"| zero-shot AUC, {name} | {_num(auc)} | {_num(chance)} |")
        lines.append(f"| zero-shot AUC, macro ({zs.get('n_images')} images) | {_num(zs.get('auc_macro'))} | {_num(chance)} |")
    if loc:
        lines.append(f"| localisation pointing accuracy ({loc.get('n_sentences')} finding sentences) | "
                     f"{_num(loc.get('pointing_accuracy'))} | {_num(loc.get('chance'))} |")
        if loc.get("mask_iou") is not None:
            lines.append(f"| localisation mask IoU | {_num(loc.get('mask_iou'))} | {_num(loc.get('iou_chance'))} |")
    return lines + [""]


def _usage_section(model) -> list[str]:
    return [
        "## Use", "",
        "```python",
        "import torch",
        "import mlip_fast",
        "",
        'model, _, preprocess = mlip_fast.create_model_and_transforms("hf-hub:<org>/<name>")  # or this folder',
        'tokenizer = mlip_fast.get_tokenizer("hf-hub:<org>/<name>")',
        "with torch.no_grad():",
        '    image, text, scale = model(preprocess("chest_xray.png")[None],',
        '                               tokenizer(["Pleural effusion.", "No pleural effusion."]))  # normalised',
        "    probs = (scale * image @ text.T).softmax(dim=-1)",
        "```", "",
        "transformers' `AutoModel.from_pretrained` loads it too once `mlip_fast` is imported (outputs are "
        "`ModelOutput`s with `logits_per_image`); no transformers `pipeline` serves it, so the card names no "
        "`pipeline_tag`.", "",
    ]


_LIMITATIONS = [
    "## Intended use and limitations", "",
    "- Research use only: representation learning, zero-shot and retrieval experiments on chest X-rays and "
    "radiology reports. It is **not a medical device** and must not be used for diagnosis, triage, or any "
    "clinical decision.",
    "- The numbers above describe the data this model was trained and tested on. Numbers on the built-in "
    "synthetic benchmark measure that generated task, not performance on real radiographs.",
    "- Reports are expected in English; images are frontal chest X-rays. Training data carry the biases of "
    "their source (sites, devices, populations, labelling); nothing here was checked for fairness across "
    "patient groups.",
    "",
]


def _licence_section(summary: Optional[dict], license: Optional[str]) -> list[str]:
    chosen = _card_license(summary, license)
    if license is None and chosen == "other":
        what = ("`other`: the weights were trained on real data, whose terms (for example a data use agreement) "
                "apply to them; name the licence with `save_pretrained(..., model_card_kwargs={\"license\": ...})`")
    else:
        what = f"`{chosen}`" + ("" if license else f" (the licence of the mlip_fast code; the training data were the "
                                                       f"built-in synthetic benchmark or are not recorded)")
    return ["## Licence", "", f"Licence of these weights: {what}.", ""]


def render_model_card(model, summary: Optional[dict] = None, license: Optional[str] = None,
                      datasets: Optional[Sequence[str]] = None) -> str:
    """The card of ``model`` (an ``MLIP``) as Markdown with a YAML header; ``summary`` is a training run's
    ``summary.json`` dict (data, training and evaluation sections), or None for a model saved outside a run.
    ``license`` (an SPDX id such as ``apache-2.0``) and ``datasets`` (Hub dataset ids) replace what the card
    would otherwise say (see the module docstring)."""
    name = model.config.name
    lines = _yaml_header(model, summary, license, datasets) + [
        CARD_MARKER, "",
        f"# MLIP `{name}`", "",
        "MLIP (medical language-image pre-training with masked local representation learning) image-report model: "
        "a ViT image tower that runs on integrity-scored kept patches, a BERT report tower with sentence embeddings, "
        "a global image-report contrastive loss and a local patch-sentence loss. Trained and saved with "
        "`mlip_fast`.", "",
    ]
    for section in (_model_section(model), _preprocess_section(model), _data_section(summary),
                    _training_section(summary), _evaluation_section(summary), _usage_section(model), _LIMITATIONS,
                    _licence_section(summary, license)):
        lines += section
    return "\n".join(lines)


def write_model_card(directory: Union[str, Path], model, summary: Optional[dict] = None, **card) -> Path:
    """(Re)writes ``directory/README.md`` with :func:`render_model_card` through a temporary file and a rename
    (a reader never sees half a card). A README.md without :data:`CARD_MARKER` (a user's) is not replaced:
    ``FileExistsError``. Returns the path."""
    path = Path(directory) / "README.md"
    if path.exists() and not is_generated_card(path):
        raise FileExistsError(f"{path} was not written by mlip_fast; not replacing it (move it away to get a new card)")
    tmp = path.with_name(f".README.md.tmp-{os.getpid()}")
    tmp.write_text(render_model_card(model, summary, **card))
    os.replace(tmp, path)
    return path
