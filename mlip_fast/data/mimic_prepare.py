"""Build a prepared MIMIC-CXR ``master.csv`` from MIMIC-CXR-JPG and the MIMIC-CXR reports.

```
python -m mlip_fast.data.mimic_prepare --mimic-jpg DIR --reports DIR --out master.csv [--views PA AP]
```
Inputs (PhysioNet layouts):
- ``--mimic-jpg``: MIMIC-CXR-JPG 2.x: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg`` and the CSVs
  ``mimic-cxr-2.0.0-split.csv[.gz]`` (dicom_id, study_id, subject_id, split), optionally
  ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (ViewPosition, for ``--views``) and
  ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (14 CheXpert labels per study: 1, 0, -1 uncertain, blank).
- ``--reports``: the reports folder holding ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (the folder itself
  or its parent).

Output: ``master.csv`` with ``image_path`` (relative to the CSV's folder), ``subject_id``,
``study_id``, ``dicom_id``, ``view``, ``findings``, ``impression``, ``split`` (train / valid / test) and
the CheXpert label columns when the labels CSV is there; plus ``<out stem>_summary.json`` with counts.
A study whose report is missing or has neither a findings nor an impression section is dropped; one
with only one of the two is kept. Every case is counted and printed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from mlip_fast._cli import no_bar
from mlip_fast._records import write_run_record
from mlip_fast.preprocess.reports import extract_sections

__all__ = ["prepare_mimic", "main"]

_SPLIT_NAMES = {"train": "train", "validate": "valid", "valid": "valid", "val": "valid", "test": "test"}


def _find_csv(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.csv", f"{stem}.csv.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_csv(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _require(path: Path, rows: list[dict], columns) -> None:
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows:
        raise ValueError(f"{path} is empty")
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(rows[0])}")


def _study_dir(subject: str, study: str) -> Path:
    return Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"


def prepare_mimic(mimic_jpg, reports, out, split_csv=None, metadata_csv=None, chexpert_csv=None,
                  views=None, check_images: bool = True, progress: bool = True) -> dict:
    """Write ``out`` (master.csv) and return the counts (also written as ``<out stem>_summary.json``).

    Args:
        mimic_jpg: MIMIC-CXR-JPG root (holds ``files/`` and the CSVs).
        reports: reports root (holds ``files/pXX/...txt``), or its ``files`` folder's parent.
        out: output CSV path.
        split_csv, metadata_csv, chexpert_csv: override the CSV locations (default: found in mimic_jpg).
        views: keep only these ViewPosition values (e.g. ("PA", "AP")); needs the metadata CSV.
        check_images: drop rows whose JPG file is missing (one stat per image).
    """
    start = time.perf_counter()
    mimic_jpg, reports, out = Path(mimic_jpg), Path(reports), Path(out)
    split_csv = Path(split_csv) if split_csv else _find_csv(mimic_jpg, "mimic-cxr-2.0.0-split")
    if split_csv is None:
        raise FileNotFoundError(f"mimic-cxr-2.0.0-split.csv[.gz] not found in {mimic_jpg} (pass split_csv)")
    metadata_csv = Path(metadata_csv) if metadata_csv else _find_csv(mimic_jpg, "mimic-cxr-2.0.0-metadata")
    chexpert_csv = Path(chexpert_csv) if chexpert_csv else _find_csv(mimic_jpg, "mimic-cxr-2.0.0-chexpert")
    report_root = reports if (reports / "files").is_dir() else reports.parent
    if not (report_root / "files").is_dir():
        raise FileNotFoundError(f"no files/ folder of reports under {reports}")

    rows = _read_csv(split_csv)
    _require(split_csv, rows, ["dicom_id", "study_id", "subject_id", "split"])
    view_of = {}
    if metadata_csv is not None:
        meta = _read_csv(metadata_csv)
        _require(metadata_csv, meta, ["dicom_id", "ViewPosition"])
        view_of = {m["dicom_id"]: m["ViewPosition"] for m in meta}
    elif views:
        raise FileNotFoundError(f"views={list(views)} needs mimic-cxr-2.0.0-metadata.csv[.gz] in {mimic_jpg}")
    labels_of, label_names = {}, []
    if chexpert_csv is not None:
        lab = _read_csv(chexpert_csv)
        _require(chexpert_csv, lab, ["subject_id", "study_id"])
        label_names = [c for c in lab[0] if c not in ("subject_id", "study_id")]
        labels_of = {(r["subject_id"], r["study_id"]): r for r in lab}

    counts = {"images_listed": len(rows), "wrong_view": 0, "missing_image": 0, "missing_report": 0,
              "empty_report": 0, "no_findings_section": 0, "no_impression_section": 0, "unknown_split": 0,
              "written": 0}
    sections_cache: dict[tuple[str, str], dict | None] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = ["image_path", "subject_id", "study_id", "dicom_id", "view", "findings", "impression", "split",
               *label_names]
    examples: dict[str, list[str]] = {}
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in tqdm(rows, desc="mimic_prepare", disable=no_bar(progress)):
            subject, study, dicom = r["subject_id"], r["study_id"], r["dicom_id"]
            view = view_of.get(dicom, "")
            if views and view not in views:
                counts["wrong_view"] += 1
                continue
            split = _SPLIT_NAMES.get(r["split"].strip().lower())
            if split is None:
                counts["unknown_split"] += 1
                continue
            image = mimic_jpg / _study_dir(subject, study) / f"{dicom}.jpg"
            if check_images and not image.is_file():
                counts["missing_image"] += 1
                examples.setdefault("missing_image", []).append(str(image))
                continue
            key = (subject, study)
            if key not in sections_cache:
                report = report_root / f"{_study_dir(subject, study)}.txt"
                try:
                    text = report.read_text(encoding="utf-8", errors="replace")
                except FileNotFoundError:
                    sections_cache[key] = None
                    counts["missing_report"] += 1
                    examples.setdefault("missing_report", []).append(str(report))
                else:
                    sec = extract_sections(text, fallback=None)
                    if not sec["findings"] and not sec["impression"]:
                        sections_cache[key] = None
                        counts["empty_report"] += 1
                        examples.setdefault("empty_report", []).append(str(report))
                    else:
                        counts["no_findings_section"] += not sec["findings"]
                        counts["no_impression_section"] += not sec["impression"]
                        sections_cache[key] = sec
            sec = sections_cache[key]
            if sec is None:
                continue
            row = {
                "image_path": os.path.relpath(image, out.parent),
                "subject_id": subject, "study_id": study, "dicom_id": dicom, "view": view,
                "findings": sec["findings"], "impression": sec["impression"], "split": split,
            }
            lab = labels_of.get(key, {})
            row.update({c: _label_text(lab.get(c)) for c in label_names})
            writer.writerow(row)
            counts["written"] += 1
    counts["studies"] = len(sections_cache)
    summary = {
        "counts": counts,
        "examples": {k: v[:5] for k, v in examples.items()},
        "inputs": {"mimic_jpg": str(mimic_jpg), "reports": str(reports), "split_csv": str(split_csv),
                   "metadata_csv": str(metadata_csv) if metadata_csv else None,
                   "chexpert_csv": str(chexpert_csv) if chexpert_csv else None, "views": list(views or [])},
        "master_csv": str(out),
        "wall_time_s": round(time.perf_counter() - start, 3),
    }
    write_run_record(out.parent, summary, f"{out.stem}_summary.json")
    return summary


def _label_text(value) -> str:
    if value is None or str(value).strip() == "":
        return ""
    try:
        return str(int(float(value)))
    except ValueError:
        return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlip_fast.data.mimic_prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--mimic-jpg", required=True, help="MIMIC-CXR-JPG root (files/ and the 2.0.0 CSVs)")
    parser.add_argument("--reports", required=True, help="MIMIC-CXR reports root (files/pXX/.../sXXXXXXXX.txt)")
    parser.add_argument("--out", required=True, help="output master.csv")
    parser.add_argument("--split-csv")
    parser.add_argument("--metadata-csv")
    parser.add_argument("--chexpert-csv")
    parser.add_argument("--views", nargs="*", default=None, help="keep only these views, e.g. PA AP")
    parser.add_argument("--no-check-images", action="store_true", help="do not stat every JPG")
    args = parser.parse_args(argv)
    summary = prepare_mimic(args.mimic_jpg, args.reports, args.out, args.split_csv, args.metadata_csv,
                            args.chexpert_csv, args.views, not args.no_check_images)
    c = summary["counts"]
    print(f"wrote {c['written']} of {c['images_listed']} images ({c['studies']} studies) to {args.out}")
    for key in ("wrong_view", "missing_image", "missing_report", "empty_report", "no_findings_section",
                "no_impression_section", "unknown_split"):
        if c[key]:
            print(f"  {key.replace('_', ' ')}: {c[key]}")
    print(f"summary: {Path(args.out).with_name(Path(args.out).stem + '_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
