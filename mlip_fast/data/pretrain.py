"""Pre-training readers: image-report pairs from a prepared MIMIC-CXR ``master.csv`` (ours, what
``mlip_fast.data.synth`` writes, or MGCA's), CSV / JSONL manifests and Open-I (XML reports + PNG images). Items and
the handling of bad rows and images: :mod:`mlip_fast.data.readers`.
"""
from __future__ import annotations

import logging
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import torch

from mlip_fast.data.labels import CHEXPERT_LABELS
from mlip_fast.data.readers import (DatasetError, RobustDataset, label_value, read_table, report_problem, require_columns,
                                    resolve_path)
from mlip_fast.preprocess.reports import extract_sections, report_text

__all__ = ["PretrainDataset", "ManifestDataset", "OpenIDataset", "read_openi_reports", "OPENI_MESH", "MGCA_VIEWS"]

# MGCA's master.csv (mgca/preprocess/mimic_cxr.py): ``Path`` = "<MIMIC-CXR-JPG folder name>/files/pXX/pXXXXXXXX/
# sXXXXXXXX/<dicom_id>.jpg", read by MGCA as the master.csv folder joined with the path after its first part;
# ``split`` "train" / "valid" (MIMIC's validate and test merged); frontal views only (ViewPosition PA or AP), which
# MGCA's readers filter again.
MGCA_VIEWS = ("PA", "AP")
_SPLIT_ALIASES = {"validate": "valid", "val": "valid", "validation": "valid"}

logger = logging.getLogger(__name__)


class _PairDataset(RobustDataset):
    """Image-report pairs from records ``{image_path, report, labels, source, where}`` (``where``: the file
    and line of the row, for messages). Records whose report cannot be used (``report_problem``) are dropped
    here, after ``dropped`` (rows the reader already left out)."""

    def __init__(self, records, transform, label_names, max_bad_fraction, name, require_image=True, dropped=()):
        kept, dropped = [], list(dropped)
        for rec in records:
            problem = report_problem(rec["report"])
            if problem is None:
                kept.append(rec)
            else:
                where = rec.get("where", rec["source"])
                image = f" ({rec['image_path']})" if rec.get("image_path") is not None else ""
                dropped.append((f"{where}{image}", problem))
        self.records = kept
        self.transform = transform
        self.label_names = tuple(label_names)
        self.require_image = require_image
        super().__init__(len(kept), max_bad_fraction, dropped, name)

    def subset(self, indices: Sequence[int]) -> "_PairDataset":
        """The pairs at ``indices`` (in that order) as a dataset of their own, with this one's transform, labels,
        bad-item limit and name; the rows dropped when this one was read stay listed (``dropped``)."""
        out = _PairDataset([self.records[i] for i in indices], self.transform, self.label_names,
                           self.max_bad_fraction, self.name, self.require_image)
        out.dropped, out.dropped_reasons = list(self.dropped), list(self.dropped_reasons)
        return out

    def _source(self, i: int) -> str:
        return str(self.records[i]["source"])

    def _load(self, i: int) -> dict:
        rec = self.records[i]
        item = {"report": rec["report"]}
        if self.require_image:
            item["image"] = self._image(rec["image_path"], self.transform)
        if self.label_names:
            item["labels"] = torch.tensor(rec["labels"], dtype=torch.float32)
        item.update(rec.get("extra", {}))
        return item


class PretrainDataset(_PairDataset):
    """Image-report pairs from a prepared MIMIC-CXR ``master.csv`` (also what ``mlip_fast.data.synth``
    writes, and MGCA's).

    Args:
        master_csv: CSV with columns ``image_path`` (relative to ``root``), ``findings``, ``impression``,
            and ``split`` when ``split`` is given. MGCA's master.csv (``Path``, ``ViewPosition``, ``impression``,
            ``findings``, ``split``, ...) is read as MGCA reads it: the image is ``root`` / ``Path`` without its
            first part (the MIMIC-CXR-JPG folder's name), only PA / AP views are kept (the others are counted
            in ``excluded_views``), and a ``validate`` split is ``valid``.
        root: folder the image paths are relative to (default: the CSV's folder).
        split: keep only rows of this split ("train", "valid", "test"); None keeps all.
        transform: ``ImageTransform`` (or any callable on a [H, W] float array); None gives
            ``[1, H, W]`` tensors of the raw image.
        label_names: label columns to return; "auto" = those of ``CHEXPERT_LABELS`` (CheXpert's 14
            names, which include Pneumonia) present in the CSV; () = no labels.
        max_bad_fraction: share of bad items tolerated.
        extra_columns: CSV columns passed through as strings under their own key (e.g. the synthetic
            benchmark's ``findings_json``, the ground truth for localisation).
    """

    def __init__(self, master_csv, root=None, split: str | None = "train", transform=None,
                 label_names: Sequence[str] | str = "auto", max_bad_fraction: float = 0.01,
                 extra_columns: Sequence[str] = ()):
        master_csv = Path(master_csv)
        rows = read_table(master_csv, keep_undecodable=True)
        mgca = bool(rows) and "image_path" not in rows[0] and "Path" in rows[0]
        image_column = "Path" if mgca else "image_path"
        require_columns(master_csv, rows, [image_column, "findings", "impression", *extra_columns]
                        + (["split"] if split else []))
        root = Path(root) if root is not None else master_csv.parent
        self.excluded_views = 0
        if mgca:
            rows, self.excluded_views = _mgca_rows(rows)
            if self.excluded_views:
                logger.info("%s (MGCA's layout): left out %d row(s) whose ViewPosition is not %s, as MGCA does",
                            master_csv, self.excluded_views, " or ".join(MGCA_VIEWS))
        if label_names == "auto":
            present = set(rows[0]) if rows else set()
            label_names = [c for c in CHEXPERT_LABELS if c in present]
        else:
            require_columns(master_csv, rows, list(label_names))
        if split:
            splits = {_SPLIT_ALIASES.get(r["split"], r["split"]) for r in rows}
            rows = [r for r in rows if _SPLIT_ALIASES.get(r["split"], r["split"]) == split]
            if not rows:
                raise DatasetError(f"{master_csv}: no rows with split == {split!r}; splits present: {sorted(splits)}")
        undecodable = [(f"{master_csv} line {r.line}", r.problem) for r in rows if r.problem is not None]
        rows = [r for r in rows if r.problem is None]
        records = [
            {
                "image_path": resolve_path(root, r[image_column]),
                "report": report_text(r["findings"], r["impression"]),
                "labels": [label_value(r.get(c)) for c in label_names],
                "source": str(resolve_path(root, r[image_column])),
                "where": f"{master_csv} line {r.line}",
                "extra": {c: r[c] for c in extra_columns},
            }
            for r in rows
        ]
        self.rows = rows
        super().__init__(records, transform, label_names, max_bad_fraction, f"PretrainDataset({master_csv.name})",
                         dropped=undecodable)


def _mgca_rows(rows: list) -> tuple[list, int]:
    """MGCA's master.csv rows read as MGCA reads them: frontal views only, ``Path`` without its first part (the
    MIMIC-CXR-JPG folder's name; the image is then found under the master.csv's folder). Returns (rows, the number
    of other views left out)."""
    kept = [r for r in rows if "ViewPosition" not in r or str(r["ViewPosition"]).strip() in MGCA_VIEWS]
    for r in kept:
        parts = Path(str(r["Path"])).parts
        if len(parts) > 1 and not Path(str(r["Path"])).is_absolute():
            r["Path"] = str(Path(*parts[1:]))
    return kept, len(rows) - len(kept)


class ManifestDataset(_PairDataset):
    """Image-report pairs from a generic CSV or JSONL manifest.

    Args:
        manifest: ``.csv`` or ``.jsonl`` / ``.json`` (one JSON object per line).
        root: folder image paths are relative to (default: the manifest's folder).
        image_column, text_column: column names of the image path and the report text.
        label_columns: label columns (values 1 / 0; blank, -1 or anything else = unknown).
        parse_sections: the text is a whole report with headers: keep its findings + impression.
        require_image: False reads reports only (no "image" key), e.g. for text-side work.
    """

    def __init__(self, manifest, root=None, transform=None, image_column: str = "image",
                 text_column: str = "report", label_columns: Sequence[str] = (), parse_sections: bool = False,
                 require_image: bool = True, max_bad_fraction: float = 0.01):
        manifest = Path(manifest)
        rows = read_table(manifest, keep_undecodable=True)
        require_columns(manifest, rows, ([image_column] if require_image else []) + [text_column, *label_columns])
        root = Path(root) if root is not None else manifest.parent
        undecodable = [(f"{manifest} line {r.line}", r.problem) for r in rows if r.problem is not None]
        rows = [r for r in rows if r.problem is None]
        records = []
        for r in rows:
            text = r[text_column] if isinstance(r[text_column], str) else ""
            if parse_sections:
                text = report_text(**extract_sections(text))
            else:
                text = " ".join(text.split())
            image_path = resolve_path(root, str(r[image_column])) if require_image else None
            records.append({
                "image_path": image_path,
                "report": text,
                "labels": [label_value(r.get(c)) for c in label_columns],
                "source": str(image_path) if image_path else f"{manifest} line {r.line}",
                "where": f"{manifest} line {r.line}",
            })
        self.rows = rows
        super().__init__(records, transform, label_columns, max_bad_fraction, f"ManifestDataset({manifest.name})",
                         require_image=require_image, dropped=undecodable)


# Open-I MeSH major headings that name each label (first part of a "Term/qualifier" heading).
OPENI_MESH = {
    "Atelectasis": ("Pulmonary Atelectasis", "Atelectasis"),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Pulmonary Edema", "Edema"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Pneumothorax": ("Pneumothorax",),
    "Pneumonia": ("Pneumonia",),
}


def read_openi_reports(path) -> list[dict]:
    """Open-I reports as dicts (uid, images, findings, impression, mesh_major list, source) from the
    ``NLMCXR_reports.tgz`` archive, a folder of its XML files, or the derived ``reports.csv``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        rows = read_table(path)
        require_columns(path, rows, ["uid", "images", "findings", "impression"])
        return [{
            "uid": r["uid"], "images": [x for x in r["images"].split(";") if x],
            "findings": r["findings"], "impression": r["impression"],
            "mesh_major": [x for x in r.get("mesh_major", "").split(";") if x],
            "source": r.get("xml_file") or r["uid"],
        } for r in rows]
    out = []
    if path.is_dir():
        for xml in sorted(path.rglob("*.xml"), key=lambda p: (len(p.name), p.name)):
            out.append(_parse_openi_xml(xml.read_bytes(), xml.name))
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
            for m in sorted(members, key=lambda m: (len(m.name), m.name)):
                out.append(_parse_openi_xml(tar.extractfile(m).read(), Path(m.name).name))
    else:
        raise FileNotFoundError(f"Open-I reports not found (expected a .tgz, a folder of XML or reports.csv): {path}")
    return out


def _parse_openi_xml(data: bytes, name: str) -> dict:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise DatasetError(f"Open-I report {name} is not valid XML ({err})") from None
    sections = {el.get("Label", "").upper(): (el.text or "") for el in root.iter("AbstractText")}
    uid = root.find("uId")
    return {
        "uid": uid.get("id") if uid is not None else Path(name).stem,
        "images": [el.get("id") for el in root.iter("parentImage") if el.get("id")],
        "findings": sections.get("FINDINGS", ""),
        "impression": sections.get("IMPRESSION", ""),
        "mesh_major": [el.text or "" for el in root.iter("major")],
        "source": name,
    }


class OpenIDataset(_PairDataset):
    """Indiana University / Open-I pairs: the XML reports plus a folder of PNG images.

    One item per (report, image id) with images ``<image_dir>/<image id>.png`` (e.g. ``CXR1_1_IM-0001-
    3001.png``, the NLMCXR_png layout). With ``image_dir=None`` the set is report-only: one item per
    report, no "image" key (text-side tests and tokenizer training). Labels come from the MeSH major
    headings (``OPENI_MESH``); a report indexed "normal" is 0 for every label.

    Args:
        reports: ``NLMCXR_reports.tgz``, a folder of its XML files, or the derived ``reports.csv``.
        image_dir: folder of PNG images, or None for report-only mode.
        label_names: subset of ``OPENI_MESH`` keys; () for no labels.
    """

    def __init__(self, reports, image_dir=None, transform=None, label_names: Sequence[str] = tuple(OPENI_MESH),
                 image_ext: str = ".png", max_bad_fraction: float = 0.01):
        unknown = [n for n in label_names if n not in OPENI_MESH]
        if unknown:
            raise ValueError(f"unknown Open-I label(s) {unknown}; known: {list(OPENI_MESH)}")
        self.reports = read_openi_reports(reports)
        records = []
        for rep in self.reports:
            heads = {m.split("/")[0].strip().lower() for m in rep["mesh_major"]}
            labels = [float(any(t.lower() in heads for t in OPENI_MESH[n])) for n in label_names]
            text = report_text(rep["findings"], rep["impression"])
            if image_dir is None:
                records.append({"image_path": None, "report": text, "labels": labels, "source": rep["source"]})
                continue
            for image_id in rep["images"]:
                path = Path(image_dir) / f"{image_id}{image_ext}"
                records.append({"image_path": path, "report": text, "labels": labels,
                                "source": str(path) if text else rep["source"]})
        super().__init__(records, transform, label_names, max_bad_fraction, "OpenIDataset",
                         require_image=image_dir is not None)
