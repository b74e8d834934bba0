"""The built-in synthetic chest X-ray + report benchmark.

``python -m mlip_fast.data.synth --out DIR --n N --seed S [--size 224] [--workers 2]`` writes a dataset in
the prepared-MIMIC-CXR layout that ``mlip_fast.data.pretrain.PretrainDataset`` reads:
```
DIR/master.csv                      one row per image (columns below)
DIR/images/<id>.png                 8-bit grayscale radiograph, S x S
DIR/masks/<id>_<finding>.png        0/255 pixel mask of one finding (present findings only)
DIR/summary.json                    parameters, counts, prevalence, wall time, the generator's fingerprint
```
master.csv columns: ``image_path`` (relative to DIR), ``study_id``, ``findings``, ``impression``,
``split`` (train / valid / test), one 1/0 column per label in ``SYNTHETIC_LABELS`` (CheXpert names), and
``findings_json``: a JSON list with one entry per present finding: ``name``, ``side`` ("right", "left",
"bilateral" or "" for the heart), ``zone`` ("upper", "mid", "lower", "apical", "basal", "perihilar",
"cardiac"), ``extent``, ``mask`` (relative path) and ``sentence`` (the findings-section sentence that
describes it, verbatim, so its character span can be found in the report).

Images follow radiographic convention: the patient's right is on the image's LEFT. Every finding has a
characteristic appearance, strong enough to stay visible at 64 px:
- consolidation: dense opacity filling part of a zone ("lobar") or several patchy blobs ("patchy", the
  pneumonia-like subtype that sets the Pneumonia label);
- pleural effusion: homogeneous opacity at the costophrenic angle with a meniscus higher laterally,
  obscuring the hemidiaphragm;
- pneumothorax: a black rim at the apex and lateral edge without lung markings, with a bright visceral
  pleural line along the collapsed lung;
- cardiomegaly: a heart shadow 1.6 - 1.85 times wider (cardiothoracic ratio about 0.5 - 0.6);
- atelectasis: a thick oblique band-like opacity at a base with elevation of that hemidiaphragm;
- edema: bilateral perihilar ("bat-wing") haze with a reticular interstitial texture;
- nodule: a small round dense spot (0.9 - 1.8 cm).
Each finding is present in about a quarter of the images, independently, so about 13% are normal.
Reports have a findings section (one sentence per present finding, some negations of absent findings,
normal statements, shuffled) and an impression (the positives, sometimes enumerated, or a normal line).

Generation is deterministic for a seed: image ``i`` uses ``numpy.random.default_rng([seed, i])``, so
the output does not depend on the number of workers. ``generator_fingerprint`` hashes what the files are a
function of (parameters, this package's source, numpy and Pillow versions); ``summary.json`` records it, so a
cache written by another generator is recognised (the training app regenerates it).

Modules: ``findings`` (what a case holds and the draw of its findings), ``anatomy`` (drawing the image and
the masks), ``reports`` (writing the report), ``dataset`` (``make_sample``, ``generate``), ``cli``.
"""
from mlip_fast.data.synth.cli import main
from mlip_fast.data.synth.dataset import generate, generator_fingerprint, make_sample
from mlip_fast.data.synth.findings import FINDINGS, PREVALENCE

__all__ = ["FINDINGS", "PREVALENCE", "make_sample", "generate", "generator_fingerprint", "main"]
