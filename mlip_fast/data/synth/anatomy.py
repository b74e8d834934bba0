"""Drawing a synthetic radiograph: the anatomy (lungs, heart, ribs, clavicles, diaphragm, noise) and each
finding's density, with one pixel mask per finding. Radiographic convention: the patient's right is on the
image's left."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from mlip_fast.data.synth.findings import SIGN, ZONE_Y, Finding

__all__ = ["draw"]


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
    s = SIGN[side]
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


def draw(rng: np.random.Generator, size: int, findings: list[Finding]) -> tuple[np.ndarray, dict]:
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
    hilum = {s: (anat["lung_xc"][s] + SIGN[s] * -0.07, anat["lung_yc"] + 0.01) for s in sides}
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
        clav_from = (0.5 + anat["shift"] + SIGN[s] * 0.05, 0.19)
        clav_to = (0.5 + anat["shift"] + SIGN[s] * 0.3, 0.12 + rng.uniform(-0.01, 0.01))
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
    lo, hi = ZONE_Y[zone]
    return cv.inside(np.minimum(cv.y - lo, hi - cv.y))


def _finding_density(rng, cv, anat, f, lung, lung_field, heart, markings, ptx_regions):
    """Density added by one finding and its (soft) region."""
    x, y = cv.x, cv.y
    size = cv.size
    if f.name == "consolidation":
        s = f.side
        lo, hi = ZONE_Y[f.zone]
        zone = _zone_band(cv, f.zone) * lung[s] * (1 - heart)
        cy = (lo + hi) / 2 + rng.uniform(-0.02, 0.02)
        cx = anat["lung_xc"][s] + SIGN[s] * rng.uniform(-0.03, 0.05)
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
            lateral = anat["lung_xc"][s] + SIGN[s] * anat["lung_w"] * 1.1
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
            hx = anat["lung_xc"][s] - SIGN[s] * 0.045
            hy = anat["lung_yc"] + 0.03
            haze = np.maximum(haze, np.exp(-(((x - hx) / 0.13) ** 2 + ((y - hy) / 0.17) ** 2)))
        lungs = np.maximum(lung["right"], lung["left"]) * (1 - heart)
        reticular = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, max(8, min(size // 3, 56))), 0, 1)
        add = (strength * haze + 0.07 * reticular * haze) * lungs
        return add, (haze > 0.35) * lungs
    if f.name == "nodule":
        s = f.side
        lo, hi = ZONE_Y[f.zone]
        ny = rng.uniform(lo + 0.04, hi - 0.04)
        nx = anat["lung_xc"][s] + SIGN[s] * rng.uniform(-0.02, 0.07)
        radius = f.params["diameter_cm"] / 2 / 30.0 * 1.25  # thorax about 30 cm across 0.8 of the image
        region = cv.inside(radius - np.sqrt((x - nx) ** 2 + (y - ny) ** 2)) * cv.inside(lung_field[s] + 0.01)
        return 0.42 * region, region
    raise ValueError(f"unknown finding {f.name!r}")
