"""The built-in synthetic chest X-ray + report benchmark.

``python -m mlip_fast.data.synth --out DIR --n N --seed S [--size 224] [--workers 2]`` writes a dataset in
the prepared-MIMIC-CXR layout that ``mlip_fast.data.pretrain.PretrainDataset`` reads:
```
DIR/master.csv                      one row per image (columns below)
DIR/images/<id>.png                 8-bit grayscale radiograph, S x S
DIR/masks/<id>_<finding>.png        0/255 pixel mask of one finding (present findings only)
DIR/summary.json                    parameters, counts, prevalence, wall time
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
the output does not depend on the number of workers.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mlip_fast._records import SUMMARY_FILE, write_run_record
from mlip_fast.data.labels import SYNTHETIC_LABELS

__all__ = [
    "FINDINGS",
    "PREVALENCE",
    "make_sample",
    "generate",
    "main",
]

FINDINGS = ("consolidation", "pleural_effusion", "pneumothorax", "cardiomegaly", "atelectasis", "edema", "nodule")
PREVALENCE = {
    "consolidation": 0.3,
    "pleural_effusion": 0.27,
    "pneumothorax": 0.22,
    "cardiomegaly": 0.27,
    "atelectasis": 0.27,
    "edema": 0.24,
    "nodule": 0.22,
}
_LABEL_OF = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
}
_SIGN = {"right": -1.0, "left": 1.0}  # patient's right lung is on the image's left
_ZONE_Y = {"upper": (0.17, 0.36), "mid": (0.36, 0.55), "lower": (0.55, 0.78)}


@dataclass
class Finding:
    """One sampled finding: where, how large, and the drawing parameters."""

    name: str
    side: str
    zone: str
    extent: str
    params: dict = field(default_factory=dict)
    sentence: str = ""
    impression: str = ""


# --------------------------------------------------------------------------------------------- sampling


def _sample_findings(rng: np.random.Generator) -> list[Finding]:
    out = []
    present = {name: rng.random() < p for name, p in PREVALENCE.items()}
    if present["consolidation"]:
        side = str(rng.choice(["right", "left"]))
        zone = str(rng.choice(["upper", "mid", "lower"]))
        patchy = bool(rng.random() < 0.65)
        extent = str(rng.choice(["small", "moderate", "extensive"], p=[0.3, 0.45, 0.25]))
        out.append(Finding("consolidation", side, zone, extent, {"patchy": patchy}))
    if present["pleural_effusion"]:
        side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.4, 0.2]))
        extent = str(rng.choice(["small", "moderate", "large"], p=[0.35, 0.4, 0.25]))
        out.append(Finding("pleural_effusion", side, "basal", extent))
    if present["pneumothorax"]:
        side = str(rng.choice(["right", "left"]))
        extent = str(rng.choice(["small", "moderate", "large"], p=[0.3, 0.4, 0.3]))
        out.append(Finding("pneumothorax", side, "apical", extent))
    if present["cardiomegaly"]:
        extent = str(rng.choice(["mild", "moderate", "marked"], p=[0.35, 0.4, 0.25]))
        out.append(Finding("cardiomegaly", "", "cardiac", extent))
    if present["atelectasis"]:
        side = str(rng.choice(["right", "left"]))
        extent = str(rng.choice(["minimal", "mild", "moderate"], p=[0.25, 0.45, 0.3]))
        out.append(Finding("atelectasis", side, "lower", extent))
    if present["edema"]:
        extent = str(rng.choice(["mild", "moderate", "severe"], p=[0.3, 0.45, 0.25]))
        out.append(Finding("edema", "bilateral", "perihilar", extent))
    if present["nodule"]:
        side = str(rng.choice(["right", "left"]))
        zone = str(rng.choice(["upper", "mid", "lower"]))
        diameter_cm = float(rng.choice([0.9, 1.1, 1.2, 1.4, 1.5, 1.6, 1.8]))
        out.append(Finding("nodule", side, zone, f"{diameter_cm:.1f} cm", {"diameter_cm": diameter_cm}))
    return out


# --------------------------------------------------------------------------------------------- drawing


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise: a cells x cells Gaussian grid, bilinearly upsampled to size x size, unit std."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return up / max(float(up.std()), 1e-6)


class _Canvas:
    """Normalised pixel-centre coordinates of an S x S image and the size-aware edge softness."""

    def __init__(self, size: int):
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y = c[:, None]
        self.x = c[None, :]
        # Edges are about 1.2 pixels wide, but never sharper than 1/150 of the image.
        self.soft = max(1.2 / size, 1.0 / 150.0)

    def inside(self, signed: np.ndarray) -> np.ndarray:
        """Soft indicator of ``signed > 0`` where ``signed`` is a distance-like quantity."""
        return _smoothstep(0.5 + signed / (2.0 * self.soft))


def _lung_geometry(cv: _Canvas, anat: dict, side: str, shrink: float = 0.0):
    """Signed distance-like field of one lung (positive inside), optionally shrunk from the apex and the
    lateral wall (pneumothorax)."""
    s = _SIGN[side]
    xc, yc, w, h = anat["lung_xc"][side], anat["lung_yc"], anat["lung_w"], anat["lung_h"]
    xc = xc - s * 0.55 * shrink  # the collapsed lung retracts towards the hilum
    top = yc - h + 1.3 * shrink
    span = (yc + h) - top
    yc2, h2 = top + span / 2, span / 2
    t = np.clip((cv.y - top) / span, 0.0, 1.0)
    width = (w - 0.8 * shrink) * (0.62 + 0.5 * np.sqrt(t))
    r = np.sqrt(((cv.x - xc) / width) ** 2 + ((cv.y - yc2) / h2) ** 2)
    ellipse = (1.0 - r) * min(w, h2)
    dome = anat["diaphragm"][side] - anat["dome"] * np.clip(1.0 - ((cv.x - xc) / (1.1 * w)) ** 2, 0.0, 1.0)
    below_diaphragm = dome - cv.y
    return np.minimum(ellipse, below_diaphragm)


def _heart_field(cv: _Canvas, anat: dict) -> np.ndarray:
    hw, hh = anat["heart_w"], anat["heart_h"]
    xc, yc = anat["heart_xc"], anat["heart_yc"]
    # The heart bulges to the patient's left (image right).
    w = np.where(cv.x > xc, 1.15 * hw, 0.85 * hw)
    r = np.sqrt(((cv.x - xc) / w) ** 2 + ((cv.y - yc) / hh) ** 2)
    return (1.0 - r) * hh


def _segment_distance(cv: _Canvas, p0, p1) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((cv.x - x0) * dx + (cv.y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.sqrt((cv.x - x0 - t * dx) ** 2 + (cv.y - y0 - t * dy) ** 2)


def _anatomy_params(rng: np.random.Generator, findings: list[Finding]) -> dict:
    shift = rng.uniform(-0.02, 0.02)
    scale = rng.uniform(0.95, 1.04)
    names = {f.name: f for f in findings}
    anat = {
        "lung_xc": {"right": 0.5 - 0.205 * scale + shift, "left": 0.5 + 0.205 * scale + shift},
        "lung_yc": 0.47 + rng.uniform(-0.015, 0.015),
        "lung_w": 0.165 * scale,
        "lung_h": 0.355 * scale,
        "diaphragm": {"right": 0.80 + rng.uniform(-0.015, 0.01), "left": 0.82 + rng.uniform(-0.015, 0.01)},
        "dome": rng.uniform(0.06, 0.085),
        "heart_xc": 0.5 + 0.04 * scale + shift,
        "heart_yc": 0.625 + rng.uniform(-0.01, 0.015),
        "heart_w": rng.uniform(0.118, 0.138) * scale,
        "heart_h": rng.uniform(0.125, 0.14),
        "shift": shift,
        "scale": scale,
    }
    if "cardiomegaly" in names:
        factor = {"mild": 1.6, "moderate": 1.72, "marked": 1.85}[names["cardiomegaly"].extent]
        anat["heart_w"] *= factor * rng.uniform(0.97, 1.03)
        anat["heart_h"] *= 1.0 + 0.4 * (factor - 1.0)
        anat["heart_yc"] += 0.01
    if "atelectasis" in names:
        # Volume loss: the hemidiaphragm of the collapsed side rises.
        anat["diaphragm"][names["atelectasis"].side] -= 0.055
    return anat


def _draw(rng: np.random.Generator, size: int, findings: list[Finding]) -> tuple[np.ndarray, dict]:
    cv = _Canvas(size)
    anat = _anatomy_params(rng, findings)
    x, y = cv.x, cv.y
    sides = ("right", "left")

    # A superellipse: square shoulders, rounded flanks.
    body = cv.inside((1.0 - (((x - 0.5 - anat["shift"]) / (0.47 * anat["scale"])) ** 4
                            + ((y - 0.62) / 0.75) ** 4) ** 0.25) * 0.3)
    lung_field = {s: _lung_geometry(cv, anat, s) for s in sides}
    lung = {s: cv.inside(lung_field[s]) for s in sides}
    heart = cv.inside(_heart_field(cv, anat))
    lungs = np.maximum(lung["right"], lung["left"])
    visible_lung = lungs * (1.0 - heart)

    # Density: soft tissue, minus aerated lung, plus bone, vessels and findings.
    density = 0.56 * body
    hilum = {s: (anat["lung_xc"][s] + _SIGN[s] * -0.07, anat["lung_yc"] + 0.01) for s in sides}
    dist_hilum = np.minimum(*[np.sqrt((x - hx) ** 2 + (y - hy) ** 2) for hx, hy in hilum.values()])
    vessels = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, max(6, min(size // 5, 40))), 0.0, 1.0)
    markings = (0.035 + 0.045 * vessels) * np.exp(-dist_hilum / 0.2)
    air = 0.34 * np.ones((size, size), np.float32)
    ptx_regions = {}
    for f in findings:
        if f.name == "pneumothorax":
            shrink = {"small": 0.035, "moderate": 0.06, "large": 0.09}[f.extent] * rng.uniform(0.9, 1.1)
            collapsed = _lung_geometry(cv, anat, f.side, shrink=shrink)
            rim = lung[f.side] * (1.0 - cv.inside(collapsed)) * cv.inside((0.62 - y) * 1.0)
            ptx_regions[f.side] = (rim, collapsed)
    density = density - air * visible_lung + markings * visible_lung
    ribs_mask = cv.inside(0.56 - np.abs(y - 0.45)) * body
    for s in sides:
        s_x = x - 0.5 - anat["shift"]
        phase = (y + 0.22 * (s_x / 0.3) ** 2) / 0.072 + rng.uniform(0, 1)
        rib = np.clip((np.cos(2 * np.pi * phase) - 0.25) / 0.75, 0.0, 1.0)
        side_mask = cv.inside((-s_x if s == "right" else s_x) * 1.0)
        density += 0.075 * rib * side_mask * ribs_mask * (0.4 + 0.6 * lung[s])
        clav_from = (0.5 + anat["shift"] + _SIGN[s] * 0.05, 0.19)
        clav_to = (0.5 + anat["shift"] + _SIGN[s] * 0.3, 0.12 + rng.uniform(-0.01, 0.01))
        density += 0.16 * cv.inside(0.017 - _segment_distance(cv, clav_from, clav_to))
    spine = cv.inside(0.032 - np.abs(x - 0.5 - anat["shift"]))
    density += 0.1 * spine * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.06)) * (1 - 0.5 * heart) * body
    density += 0.06 * cv.inside(0.045 - dist_hilum) * lungs

    masks = {}
    for f in findings:
        add, region = _finding_density(rng, cv, anat, f, lung, lung_field, heart, markings, ptx_regions)
        density += add
        masks[f.name] = region
    # Pneumothorax last: its air replaces whatever lay in the rim, and the pleural line is drawn on top.
    for s, (rim, collapsed) in ptx_regions.items():
        density = density * (1 - rim) + rim * (0.56 * body - 0.43 - 0.02 * ribs_mask)
        line = np.exp(-((collapsed / max(cv.soft, 0.006)) ** 2)) * lung[s] * cv.inside(0.62 - y)
        density += 0.2 * line * (1 - heart)

    # Exposure: gamma, contrast and brightness per image, then quantum-like noise.
    img = np.clip(density + 0.12, 0.0, 1.0)
    img = img ** rng.uniform(0.85, 1.2)
    img = (img - 0.5) * rng.uniform(0.88, 1.12) + 0.5 + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0.0, rng.uniform(0.008, 0.022), img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), {k: v > 0.5 for k, v in masks.items()}


def _zone_band(cv: _Canvas, zone: str) -> np.ndarray:
    lo, hi = _ZONE_Y[zone]
    return cv.inside(np.minimum(cv.y - lo, hi - cv.y))


def _finding_density(rng, cv, anat, f, lung, lung_field, heart, markings, ptx_regions):
    """Density added by one finding and its (soft) region."""
    x, y = cv.x, cv.y
    size = cv.size
    if f.name == "consolidation":
        s = f.side
        lo, hi = _ZONE_Y[f.zone]
        zone = _zone_band(cv, f.zone) * lung[s] * (1 - heart)
        cy = (lo + hi) / 2 + rng.uniform(-0.02, 0.02)
        cx = anat["lung_xc"][s] + _SIGN[s] * rng.uniform(-0.03, 0.05)
        reach = {"small": 0.07, "moderate": 0.1, "extensive": 0.14}[f.extent]
        if f.params["patchy"]:
            # Many overlapping fuzzy blobs with a mottled texture: ill-defined, unlike a nodule's disc.
            blobs = np.zeros((size, size), np.float32)
            for _ in range(int(rng.integers(7, 12))):
                bx, by = cx + rng.uniform(-reach, reach), cy + rng.uniform(-0.075, 0.075)
                radius = rng.uniform(0.03, 0.05)
                blobs += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (radius * radius))
            mottle = np.clip(0.75 + 0.25 * _smooth_noise(rng, size, max(6, min(size // 5, 40))), 0.3, 1.0)
            region = np.clip(blobs, 0.0, 1.0) * lung[s] * (1 - heart)
            return 0.32 * region * mottle, region
        texture = _smooth_noise(rng, size, max(4, min(size // 10, 12)))
        shape = np.sqrt(((x - cx) / (reach * 1.3)) ** 2 + ((y - cy) / (reach * 0.95)) ** 2)
        region = cv.inside((1.0 - shape + 0.1 * texture) * 0.1) * zone
        return 0.38 * region, region
    if f.name == "pleural_effusion":
        add = np.zeros((cv.size, cv.size), np.float32)
        region_all = np.zeros_like(add)
        level = {"small": 0.66, "moderate": 0.59, "large": 0.5}[f.extent]
        for s in (("right", "left") if f.side == "bilateral" else (f.side,)):
            lateral = anat["lung_xc"][s] + _SIGN[s] * anat["lung_w"] * 1.1
            lvl = level + rng.uniform(-0.02, 0.02)
            # Meniscus: the fluid climbs the lateral chest wall.
            surface = lvl + 0.13 * (np.abs(x - lateral) / (2.2 * anat["lung_w"])) ** 1.5
            region = cv.inside(y - surface) * lung[s]
            # Fluid replaces the aerated lung: as dense as soft tissue, homogeneous, no markings.
            add += region * ((0.34 - markings) * (1 - heart) + 0.08)
            region_all = np.maximum(region_all, region)
        return add, region_all
    if f.name == "pneumothorax":
        rim, _ = ptx_regions[f.side]
        return np.zeros_like(rim), rim
    if f.name == "cardiomegaly":
        region = heart
        return np.zeros_like(region), region
    if f.name == "atelectasis":
        s = f.side
        thick = {"minimal": 0.022, "mild": 0.028, "moderate": 0.036}[f.extent]
        cy = anat["diaphragm"][s] - anat["dome"] - rng.uniform(0.05, 0.09)
        cx = anat["lung_xc"][s]
        angle = math.radians(rng.uniform(-18, 18) + (8 if s == "right" else -8))
        half = anat["lung_w"] * 0.85
        p0 = (cx - half * math.cos(angle), cy - half * math.sin(angle))
        p1 = (cx + half * math.cos(angle), cy + half * math.sin(angle))
        region = cv.inside(thick - _segment_distance(cv, p0, p1)) * lung[s] * (1 - 0.5 * heart)
        return 0.3 * region, region
    if f.name == "edema":
        strength = {"mild": 0.2, "moderate": 0.25, "severe": 0.3}[f.extent]
        haze = np.zeros((cv.size, cv.size), np.float32)
        for s in ("right", "left"):
            hx = anat["lung_xc"][s] - _SIGN[s] * 0.045
            hy = anat["lung_yc"] + 0.03
            haze = np.maximum(haze, np.exp(-(((x - hx) / 0.13) ** 2 + ((y - hy) / 0.17) ** 2)))
        lungs = np.maximum(lung["right"], lung["left"]) * (1 - heart)
        reticular = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, max(8, min(size // 3, 56))), 0, 1)
        add = (strength * haze + 0.07 * reticular * haze) * lungs
        return add, (haze > 0.35) * lungs
    if f.name == "nodule":
        s = f.side
        lo, hi = _ZONE_Y[f.zone]
        ny = rng.uniform(lo + 0.04, hi - 0.04)
        nx = anat["lung_xc"][s] + _SIGN[s] * rng.uniform(-0.02, 0.07)
        radius = f.params["diameter_cm"] / 2 / 30.0 * 1.25  # thorax about 30 cm across 0.8 of the image
        region = cv.inside(radius - np.sqrt((x - nx) ** 2 + (y - ny) ** 2)) * cv.inside(lung_field[s] + 0.01)
        return 0.42 * region, region
    raise ValueError(f"unknown finding {f.name!r}")


# --------------------------------------------------------------------------------------------- reports

_ZONE_WORD = {"upper": "upper", "mid": "mid", "lower": "lower"}
_LOBE = {
    ("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
    ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
    ("left", "mid"): "left mid lung", ("left", "lower"): "left lower lobe",
}
_NEGATIONS = {
    "consolidation": ["No focal consolidation.", "There is no focal airspace consolidation.",
                      "No consolidation is seen."],
    "pleural_effusion": ["No pleural effusion.", "There is no pleural effusion.",
                         "The costophrenic angles are sharp without pleural effusion."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
    "cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is normal in size.", "No cardiomegaly."],
    "atelectasis": ["No atelectasis.", "There is no evidence of atelectasis."],
    "edema": ["No pulmonary edema.", "There is no pulmonary edema.", "No evidence of pulmonary edema."],
    "nodule": ["No suspicious pulmonary nodule.", "No pulmonary nodules are seen."],
}
_NORMALS = [
    "The mediastinal contours are within normal limits.",
    "The osseous structures are intact.",
    "The hila are unremarkable.",
    "Visualized upper abdomen is unremarkable.",
    "PA view of the chest.",
]
_NORMAL_IMPRESSIONS = ["No acute cardiopulmonary process.", "Normal chest radiograph.",
                       "No acute cardiopulmonary abnormality."]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _describe(rng: np.random.Generator, f: Finding) -> tuple[str, str]:
    """(findings-section sentence, impression phrase) for one finding."""
    side, zone, ext = f.side, f.zone, f.extent
    if f.name == "consolidation":
        if f.params["patchy"]:
            sentence = _pick(rng, [
                f"Patchy airspace opacities in the {side} {zone} zone, concerning for pneumonia.",
                f"There is patchy consolidation in the {side} {zone} lung, compatible with pneumonia.",
                f"Multifocal patchy opacities in the {side} {zone} lung suggest pneumonia.",
            ])
            return sentence, f"{side.capitalize()} {zone} zone pneumonia."
        sentence = _pick(rng, [
            f"There is {ext} consolidation in the {side} {zone} zone.",
            f"{ext.capitalize()} dense airspace consolidation of the {_LOBE[(side, zone)]}.",
            f"Dense opacity in the {side} {zone} lung, consistent with consolidation.",
        ])
        return sentence, f"{side.capitalize()} {zone} zone consolidation."
    if f.name == "pleural_effusion":
        if side == "bilateral":
            sentence = _pick(rng, [
                f"{ext.capitalize()} bilateral pleural effusions.",
                f"There are {ext} bilateral pleural effusions with blunting of both costophrenic angles.",
            ])
            return sentence, f"{ext.capitalize()} bilateral pleural effusions."
        sentence = _pick(rng, [
            f"{ext.capitalize()} {side} pleural effusion.",
            f"There is a {ext} {side} pleural effusion with a meniscus at the costophrenic angle.",
            f"Blunting of the {side} costophrenic angle is consistent with a {ext} pleural effusion.",
        ])
        return sentence, f"{ext.capitalize()} {side} pleural effusion."
    if f.name == "pneumothorax":
        sentence = _pick(rng, [
            f"There is a {ext} {side} apical pneumothorax.",
            f"{ext.capitalize()} {side} pneumothorax with a visible pleural line at the apex.",
            f"A {ext} pneumothorax is present at the {side} apex.",
        ])
        return sentence, f"{ext.capitalize()} {side} pneumothorax."
    if f.name == "cardiomegaly":
        adverb = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[ext]
        sentence = _pick(rng, [
            f"The heart is {adverb} enlarged.",
            f"{ext.capitalize()} cardiomegaly.",
            f"The cardiac silhouette is {adverb} enlarged, consistent with cardiomegaly.",
        ])
        return sentence, f"{ext.capitalize()} cardiomegaly."
    if f.name == "atelectasis":
        sentence = _pick(rng, [
            f"{ext.capitalize()} linear atelectasis at the {side} lung base.",
            f"Plate-like atelectasis at the {side} base with elevation of the {side} hemidiaphragm.",
            f"Band-like opacity in the {side} lower zone, likely atelectasis.",
        ])
        return sentence, f"{side.capitalize()} basilar atelectasis."
    if f.name == "edema":
        sentence = _pick(rng, [
            f"{ext.capitalize()} pulmonary edema with perihilar haziness.",
            f"Bilateral perihilar opacities consistent with {ext} pulmonary edema.",
            f"There is {ext} interstitial pulmonary edema.",
        ])
        return sentence, f"{ext.capitalize()} pulmonary edema."
    if f.name == "nodule":
        sentence = _pick(rng, [
            f"A {ext} nodule in the {side} {zone} zone.",
            f"There is a {ext} rounded nodular opacity in the {side} {zone} lung.",
            f"{side.capitalize()} {zone} lung nodule measuring {ext}.",
        ])
        return sentence, f"{ext} {side} {zone} lung nodule."
    raise ValueError(f"unknown finding {f.name!r}")


def _write_report(rng: np.random.Generator, findings: list[Finding]) -> tuple[str, str]:
    present = {f.name for f in findings}
    sentences = []
    for f in findings:
        f.sentence, f.impression = _describe(rng, f)
        sentences.append(f.sentence)
    for name in FINDINGS:
        if name not in present and rng.random() < 0.55:
            sentences.append(_pick(rng, _NEGATIONS[name]))
    for normal in _NORMALS:
        if rng.random() < 0.25:
            sentences.append(normal)
    if not present & {"consolidation", "pleural_effusion", "pneumothorax", "atelectasis", "edema", "nodule"}:
        sentences.append(_pick(rng, ["The lungs are clear.", "Lungs are well expanded and clear."]))
    order = rng.permutation(len(sentences))
    findings_text = " ".join(sentences[i] for i in order)
    if not findings:
        return findings_text, _pick(rng, _NORMAL_IMPRESSIONS)
    phrases = [f.impression[0].upper() + f.impression[1:] for f in findings]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))]
    if len(phrases) > 1 and rng.random() < 0.4:
        return findings_text, " ".join(f"{k}. {p}" for k, p in enumerate(phrases, 1))
    return findings_text, " ".join(phrases)


# --------------------------------------------------------------------------------------------- API


def make_sample(seed: int, index: int = 0, size: int = 224) -> dict:
    """One synthetic sample in memory (what ``generate`` writes for image ``index`` with ``seed``).

    Returns:
        dict with ``image`` float32 [S, S] in [0, 1], ``masks`` {finding name: bool [S, S]},
        ``findings`` (list of dicts: name, side, zone, extent, sentence), ``findings_text``,
        ``impression``, ``labels`` {label name: 0 | 1} over ``SYNTHETIC_LABELS``.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    findings = _sample_findings(rng)
    image, masks = _draw(rng, size, findings)
    for name, mask in masks.items():
        if not mask.any():
            # Tiny images can round a small finding away: keep at least its strongest pixel.
            mask.flat[int(np.argmax(np.abs(image - image.mean())))] = True
    findings_text, impression = _write_report(rng, findings)
    labels = {label: 0 for label in SYNTHETIC_LABELS}
    for f in findings:
        if f.name in _LABEL_OF:
            labels[_LABEL_OF[f.name]] = 1
        if f.name == "consolidation" and f.params["patchy"]:
            labels["Pneumonia"] = 1
    return {
        "image": image,
        "masks": masks,
        "findings": [
            {"name": f.name, "side": f.side, "zone": f.zone, "extent": f.extent, "sentence": f.sentence}
            for f in findings
        ],
        "findings_text": findings_text,
        "impression": impression,
        "labels": labels,
    }


def _write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _work(args) -> list[dict]:
    out_dir, seed, size, indices = args
    out_dir = Path(out_dir)
    rows = []
    for i in indices:
        sample = make_sample(seed, i, size)
        study = f"s{i:07d}"
        image_rel = f"images/{study}.png"
        _write_png(out_dir / image_rel, np.round(sample["image"] * 255.0).astype(np.uint8))
        entries = []
        for f in sample["findings"]:
            mask_rel = f"masks/{study}_{f['name']}.png"
            _write_png(out_dir / mask_rel, sample["masks"][f["name"]].astype(np.uint8) * 255)
            entries.append({**f, "mask": mask_rel})
        rows.append({
            "image_path": image_rel,
            "study_id": study,
            "findings": sample["findings_text"],
            "impression": sample["impression"],
            **sample["labels"],
            "findings_json": json.dumps(entries),
            "_index": i,
        })
    return rows


def _splits(n: int, seed: int, fractions) -> list[str]:
    fractions = [float(v) for v in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {fractions}")
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    names = np.empty(n, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_valid]] = "valid"
    names[order[n_train + n_valid :]] = "test"
    return list(names)


def generate(out_dir, n: int, seed: int = 0, size: int = 224, workers: int = 2,
             splits=(0.8, 0.1, 0.1)) -> Path:
    """Write ``n`` synthetic image-report pairs to ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: output folder (created; existing files with the same names are overwritten).
        n: number of images.
        seed: dataset seed; the same seed, n and size give byte-identical files.
        size: image side in pixels (any value >= 8).
        workers: processes (1 = in this process).
        splits: train / valid / test fractions.

    Returns:
        the path of ``master.csv``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    split_of = _splits(n, seed, splits)
    workers = max(1, min(int(workers), n))
    chunk = max(1, min(64, math.ceil(n / (workers * 4))))
    jobs = [(str(out_dir), int(seed), int(size), range(k, min(n, k + chunk))) for k in range(0, n, chunk)]
    if workers == 1:
        parts = [_work(job) for job in jobs]
    else:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            parts = pool.map(_work, jobs, chunksize=1)
    rows = sorted((row for part in parts for row in part), key=lambda r: r["_index"])
    columns = ["image_path", "study_id", "findings", "impression", "split", *SYNTHETIC_LABELS, "findings_json"]
    master = out_dir / "master.csv"
    with open(master, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            row["split"] = split_of[row["_index"]]
            writer.writerow(row)
    wall = time.perf_counter() - start
    prevalence = {label: sum(r[label] for r in rows) / n for label in SYNTHETIC_LABELS}
    summary = {
        "dataset": "mlip_fast synthetic chest X-ray benchmark",
        "n": n, "seed": seed, "size": size, "workers": workers, "splits": list(splits),
        "split_counts": {s: split_of.count(s) for s in ("train", "valid", "test")},
        "prevalence": prevalence,
        "normal_fraction": sum(1 for r in rows if r["findings_json"] == "[]") / n,
        "wall_time_s": round(wall, 3),
        "images_per_s": round(n / wall, 1),
        "versions": {"python": platform.python_version(), "numpy": np.__version__},
        "master_csv": str(master),
    }
    write_run_record(out_dir, summary)
    return master


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlip_fast.data.synth",
        description="Generate the synthetic chest X-ray + report benchmark (prepared-MIMIC-CXR layout).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VALID", "TEST"))
    args = parser.parse_args(argv)
    master = generate(args.out, args.n, args.seed, args.size, args.workers, tuple(args.splits))
    summary = json.loads((master.parent / SUMMARY_FILE).read_text())
    print(f"wrote {args.n} images at {args.size} px in {summary['wall_time_s']:.1f} s "
          f"({summary['images_per_s']:.0f} images/s); master.csv: {master}; summary: {master.parent / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
