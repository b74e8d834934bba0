"""Report parsing: hand cases and every real Indiana University / Open-I report.

Sentence counts per report on the 3,955 IU reports (findings + impression through ``report_text``):
3,927 non-empty reports; min 1, median 5, mean 5.8, 95th percentile 10, max 27 sentences.
Histogram (count: reports): 1: 35, 2: 48, 3: 181, 4: 790, 5: 990, 6: 760, 7: 468, 8: 254, 9: 182,
10: 90, 11: 48, 12: 25, 13: 22, 14-27: 34.
"""
import csv
import re
import statistics
import tarfile
import xml.etree.ElementTree as ET

import pytest

from mlip_fast.preprocess.reports import extract_sections, report_text, split_sentences

from tests.paths import IU_REPORTS

HEADER_INSIDE = re.compile(r"\b(?:FINDINGS|IMPRESSION|INDICATION|COMPARISON):")
IU = IU_REPORTS


def sentences(text):
    return [text[s:e] for s, e in split_sentences(text)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Nodule measuring 1.5 cm in the right apex. No effusion.",
         ["Nodule measuring 1.5 cm in the right apex.", "No effusion."]),
        ("Dr. Smith was notified at 3 p.m. on the day of the exam. Heart normal.",
         ["Dr. Smith was notified at 3 p.m. on the day of the exam.", "Heart normal."]),
        ("Opacities, e.g. in the left base, vs. atelectasis. Approx. 2 cm. Compare with No. 3 film.",
         ["Opacities, e.g. in the left base, vs. atelectasis.", "Approx. 2 cm.", "Compare with No. 3 film."]),
        ("1. Bullous emphysema. 2. Scarring in the left apex. 3. Opacities.",
         ["1. Bullous emphysema.", "2. Scarring in the left apex.", "3. Opacities."]),
        ("1) Cardiomegaly 2) No effusion 3) Stable", ["1) Cardiomegaly", "2) No effusion", "3) Stable"]),
        ("Chest: 1. Clear lungs. 2. Pectus excavatum.", ["Chest:", "1. Clear lungs.", "2. Pectus excavatum."]),
        ("1.Severe arthritis. 2. Possible COPD.", ["1.Severe arthritis.", "2. Possible COPD."]),
        ("Normal chest x-XXXX. There are XXXX opacities.", ["Normal chest x-XXXX.", "There are XXXX opacities."]),
        ("Clear right lung XXXX.In the left base there is density.",
         ["Clear right lung XXXX.", "In the left base there is density."]),
        ("Lesion in the left apex.There is no pneumothorax",
         ["Lesion in the left apex.", "There is no pneumothorax"]),
        ("The lesion is measuring 2. The heart is normal.", ["The lesion is measuring 2.", "The heart is normal."]),
        ("Lungs clear (see above). Heart normal!  Effusion?  No.", ["Lungs clear (see above).", "Heart normal!",
                                                                   "Effusion?", "No."]),
        ("Heart normal\n - Lungs clear\n - No effusion\n\nStable mediastinum",
         ["Heart normal", "Lungs clear", "No effusion", "Stable mediastinum"]),
        ("The heart is\nnormal in size. Lungs\nclear.", ["The heart is\nnormal in size.", "Lungs\nclear."]),
        ("Unchanged... Stable.", ["Unchanged...", "Stable."]),
        ("", []),
        (" .  - ", []),
    ],
)
def test_split_sentences_hand_cases(text, expected):
    assert sentences(text) == expected


def test_spans_are_stripped_ordered_and_index_the_input():
    text = "  Heart normal.   1. Effusion.  2. Nodule 1.5 cm.  "
    spans = split_sentences(text)
    assert spans == sorted(spans)
    for (s, e), (s2, _) in zip(spans, spans[1:]):
        assert e <= s2
    assert [text[s:e] for s, e in spans] == ["Heart normal.", "1. Effusion.", "2. Nodule 1.5 cm."]


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pna

 COMPARISON:  ___

 FINDINGS:

 PA and lateral views of the chest provided.  There is no focal consolidation,
 effusion, or pneumothorax. Heart size is normal.

 IMPRESSION:

 No acute intrathoracic process.
"""


def test_extract_sections_mimic_style():
    out = extract_sections(MIMIC_REPORT)
    assert out == {
        "findings": "PA and lateral views of the chest provided. There is no focal consolidation, "
        "effusion, or pneumothorax. Heart size is normal.",
        "impression": "No acute intrathoracic process.",
    }


@pytest.mark.parametrize(
    "text, findings, impression",
    [
        ("Findings: lungs clear.\nImpression: normal.", "lungs clear.", "normal."),
        ("FINDINGS - lungs clear.\nIMPRESSION -- normal.", "lungs clear.", "normal."),
        ("findings :\nlungs clear.\nimpression.\nnormal.", "lungs clear.", "normal."),
        ("FINDINGS\nLungs clear.\nCONCLUSION: Normal.", "Lungs clear.", "Normal."),
        ("INDICATION: cough. FINDINGS: Clear. IMPRESSION: Normal. RECOMMENDATION(S): none.", "Clear.", "Normal."),
        ("IMPRESSION: No acute process.", "", "No acute process."),
        ("FINDINGS: Clear lungs. The findings: as above.", "Clear lungs. The findings: as above.", ""),
        ("FINDINGS AND IMPRESSION: Clear lungs.", "Clear lungs.", ""),
        ("INDICATION: cough\nCOMPARISON: none", "", ""),
        ("Heart normal. No effusion.", "Heart normal. No effusion.", ""),
        ("", "", ""),
    ],
)
def test_extract_sections_variants(text, findings, impression):
    assert extract_sections(text) == {"findings": findings, "impression": impression}


def test_extract_sections_fallback():
    assert extract_sections("Heart normal.", fallback=None) == {"findings": "", "impression": ""}
    assert extract_sections("Heart normal.", fallback="impression")["impression"] == "Heart normal."
    with pytest.raises(ValueError, match="fallback"):
        extract_sections("x", fallback="history")


def test_report_text():
    assert report_text("Heart normal", "No acute process") == "Heart normal. No acute process."
    assert report_text("  Heart\n normal.  ", None) == "Heart normal."
    assert report_text("", "Normal?") == "Normal?"
    assert report_text(float("nan"), "nan") == ""
    assert split_sentences(report_text("Heart normal", "No acute process")) == [(0, 13), (14, 31)]


def _iu_rows():
    path = IU / "reports.csv"
    if not path.exists():
        pytest.skip(f"real IU reports not found at {path}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_all_iu_reports_split_without_empty_sentences():
    rows = _iu_rows()
    assert len(rows) == 3955
    counts = []
    for row in rows:
        text = report_text(row["findings"], row["impression"])
        spans = split_sentences(text)
        if not text:
            assert spans == []
            continue
        assert spans, row["uid"]
        for s, e in spans:
            piece = text[s:e]
            assert piece and piece == piece.strip(), (row["uid"], piece)
            assert any(c.isalnum() for c in piece), (row["uid"], piece)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
        # Nothing but whitespace is left between sentences.
        covered = "".join(text[s:e] for s, e in spans)
        assert len(covered.replace(" ", "")) >= len(text.replace(" ", "")) - 2 * len(spans), row["uid"]
        counts.append(len(spans))
    # The distribution documented in the module docstring.
    assert len(counts) == 3927
    assert min(counts) == 1 and max(counts) == 27
    assert statistics.median(counts) == 5
    assert 5.6 < statistics.mean(counts) < 6.0
    assert sorted(counts)[int(0.95 * len(counts))] == 10
    # Decimals and placeholders survive: no sentence starts with a digit continuation or ends inside "XXXX".
    decimals = [row for row in rows if "1.5 cm" in row["findings"]]
    for row in decimals:
        assert any("1.5 cm" in p for p in sentences(row["findings"]))


def test_extract_sections_on_iu_xml():
    """The raw Open-I XML sections rebuilt as a headed report come back unchanged."""
    path = IU / "NLMCXR_reports.tgz"
    if not path.exists():
        pytest.skip(f"real IU archive not found at {path}")
    checked = pasted = 0
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.name.endswith(".xml"):
                continue
            root = ET.parse(tar.extractfile(member)).getroot()
            parts = {el.get("Label"): (el.text or "") for el in root.iter("AbstractText")}
            text = "\n".join(f"{label}: {parts.get(label, '')}" for label in
                             ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"))
            if HEADER_INSIDE.search(parts.get("FINDINGS") or "") or HEADER_INSIDE.search(
                parts.get("IMPRESSION") or ""
            ):
                # A whole headed report pasted inside a section: its own headers rightly re-cut it.
                pasted += 1
                continue
            out = extract_sections(text)
            assert out["findings"] == " ".join(parts.get("FINDINGS", "").split()), member.name
            assert out["impression"] == " ".join(parts.get("IMPRESSION", "").split()), member.name
            checked += 1
    assert checked + pasted == 3955 and pasted <= 5
