"""What a synthetic case holds: the findings, their prevalence and labels, and the draw of a case's findings."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FINDINGS", "PREVALENCE", "LABEL_OF", "SIGN", "ZONE_Y", "Finding", "sample_findings"]


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
LABEL_OF = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
}
SIGN = {"right": -1.0, "left": 1.0}  # patient's right lung is on the image's left
ZONE_Y = {"upper": (0.17, 0.36), "mid": (0.36, 0.55), "lower": (0.55, 0.78)}


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


def sample_findings(rng: np.random.Generator) -> list[Finding]:
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
