"""Writing a synthetic report: one findings-section sentence per present finding, some negations of absent
findings and normal statements, shuffled, and an impression (the positives, sometimes enumerated, or a
normal line)."""
from __future__ import annotations

import numpy as np

from mlip_fast.data.synth.findings import FINDINGS, Finding

__all__ = ["write_report"]


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


def write_report(rng: np.random.Generator, findings: list[Finding]) -> tuple[str, str]:
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
