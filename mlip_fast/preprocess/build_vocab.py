"""Builds the default radiology WordPiece vocabulary shipped in ``mlip_fast/preprocess/vocab/``.

The offline default text tower (``text.source = "random"`` with no training corpus) needs a tokenizer
that exists without any download. This script trains an uncased WordPiece vocabulary (tokenizers library)
on the 3,955 Indiana University / Open-I chest X-ray reports (indication, comparison, findings,
impression) plus a list of common radiology words, so that words frequent in MIMIC-CXR style reports but
rare in IU reports (devices, views, CheXpert labels) still get whole-word pieces.

Run once from the repository root (the output is committed)::

    python -m mlip_fast.preprocess.build_vocab --reports ../shared/data/iu_xray_reports/reports.csv

Training is deterministic (:func:`mlip_fast.preprocess.tokenization.train_wordpiece_vocab`), so a rerun on the
same reports rewrites the committed file byte for byte (a test checks it). Models keep the vocabulary they
were built with, because checkpoints save their tokenizer files.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from mlip_fast.preprocess.tokenization import DEFAULT_VOCAB_PATH, train_wordpiece_vocab

RADIOLOGY_WORDS = """
no finding enlarged cardiomediastinum cardiomegaly lung opacity lesion edema consolidation pneumonia
atelectasis pneumothorax pleural effusion other fracture support devices
abnormality abnormalities acute chronic subacute airspace alveolar interstitial reticular reticulonodular
nodular nodule nodules mass masses granuloma granulomas calcified calcification calcifications
hilar perihilar mediastinal mediastinum cardiac heart silhouette contour contours aortic aorta knob arch
tortuous tortuosity ectatic atherosclerotic unfolded vascular vasculature congestion cephalization
pulmonary lungs lung lobe lobes upper middle lower lingula lingular apical apex apices basilar bibasilar
basal bases base retrocardiac subsegmental segmental bilateral unilateral left right diffuse focal
patchy streaky linear band plate discoid hazy ground glass infiltrate infiltrates
effusions loculated subpulmonic hydropneumothorax pneumomediastinum pneumoperitoneum
subcutaneous emphysema emphysematous hyperinflation hyperinflated hyperexpanded bullous bullae bulla
fibrosis fibrotic scarring scar bronchiectasis bronchial bronchovascular peribronchial thickening
costophrenic angle angles blunting blunted hemidiaphragm hemidiaphragms diaphragm diaphragmatic elevation
elevated eventration trachea tracheal carina midline deviation shift
pericardial effusion cardiomediastinal enlarged enlargement borderline normal size limits
sternotomy wires wire clips surgical postoperative post pacemaker defibrillator icd leads lead
catheter catheters central venous line lines picc port tip terminates projects projecting
endotracheal tube tubes ett nasogastric orogastric enteric feeding dobhoff tracheostomy thoracostomy
chest drain drains swan ganz pulmonary artery svc cavoatrial junction atrium atrial ventricle ventricular
valve replacement prosthetic stent stents hardware fixation plates screws
osseous bony bones bone ribs rib clavicle clavicles scapula humerus humeral shoulder spine thoracic
lumbar vertebral vertebra vertebrae kyphosis scoliosis spondylosis degenerative osteophytes osteopenia
osteoporosis compression deformity deformities healed healing displaced nondisplaced lytic sclerotic
metastatic metastasis metastases malignancy neoplasm tumor lymphadenopathy adenopathy
portable supine upright erect semi frontal lateral view views radiograph radiographs film films ap pa
comparison prior previous interval unchanged stable improved improving worsened worsening increased
increase decreased decrease resolved resolution new persistent persists residual
mild mildly moderate moderately severe severely small large trace minimal tiny slight slightly
likely possibly probably possible probable cannot excluded exclude suggestive consistent concerning
concern compatible differential diagnosis aspiration infection infectious inflammatory
recommend recommended followup follow ct correlation clinical clinically evaluation further
overload fluid failure chf cardiomegaly vascular redistribution kerley lines septal
collapse volume loss low volumes lung volumes hypoinflation crowding
hiatal hernia free air bowel gas stomach abdomen upper quadrant
obscured obscuring silhouetting partially completely evident seen identified demonstrated visualized
there is are no without with and or of the in at to from for on by as which that this these
""".split()


def read_reports(path: Path) -> list[str]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = ("indication", "comparison", "findings", "impression")
    return [" ".join(row[k] for k in fields if row.get(k)).strip() for row in rows]


def vocabulary(reports: Path, vocab_size: int = 4096) -> list[str]:
    """The vocabulary (token per id) trained on the reports of ``reports`` plus ``RADIOLOGY_WORDS``."""
    texts = read_reports(reports)
    # Each listed word appears three times so that min_frequency keeps it as a whole piece.
    texts += [" ".join(RADIOLOGY_WORDS)] * 3
    return train_wordpiece_vocab(texts, vocab_size=vocab_size, lowercase=True, min_frequency=2, limit_alphabet=200)


def build(reports: Path, out: Path, vocab_size: int) -> int:
    vocab = vocabulary(reports, vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(token + "\n" for token in vocab))
    tmp.replace(out)
    return len(vocab)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=Path, required=True, help="IU X-ray reports.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_VOCAB_PATH)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    n = build(args.reports, args.out, args.vocab_size)
    print(f"wrote {n} wordpieces to {args.out}")


if __name__ == "__main__":
    main()
