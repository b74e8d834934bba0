"""Radiology report parsing: section extraction and sentence splitting with character spans.

The text tower pools token states over each sentence, so sentences are returned as character spans
``[start, end)`` into the exact string the tokenizer sees; ``mlip_fast.preprocess.tokenization`` maps them to
token spans with the tokenizer's offsets. Pre-training uses ``report_text(findings, impression)``.

Sentence splitting is rule-based (no model, no download) and written for radiology prose:
- decimals ("1.5 cm"), abbreviations ("Dr.", "e.g.", "vs.", "approx.", "No. 3") do not end a sentence;
- enumerations ("1. ...  2. ...", "1) ... 2) ...") start a new sentence and keep their number;
- de-identification placeholders ("XXXX") are ordinary words;
- a missing space after a full stop ("apex.There are") still ends the sentence;
- blank lines and bullet lines end a sentence; a single newline (line wrapping in MIMIC) does not.
Every returned span is stripped of surrounding whitespace and contains at least one letter or digit.

Measured on the 3,955 Indiana University / Open-I reports (``report_text(findings, impression)``;
see ``tests/preprocess/test_reports.py`` and docs/data.md): 3,927 non-empty reports, sentences per report
min 1, median 5, mean 5.8, 95th percentile 10, max 27.
"""
from __future__ import annotations

import re

__all__ = ["extract_sections", "split_sentences", "report_text", "SECTION_HEADERS"]

# Header name (lower case, single spaces) -> section it opens. Sections other than findings and
# impression are still listed: their headers end the previous section.
SECTION_HEADERS: dict[str, str] = {
    "findings": "findings",
    "finding": "findings",
    "findings and impression": "findings",
    "findings/impression": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "summary": "impression",
    "opinion": "impression",
    "final report": "other",
    "report": "other",
    "examination": "other",
    "exam": "other",
    "type of examination": "other",
    "indication": "other",
    "indications": "other",
    "history": "other",
    "clinical history": "other",
    "clinical information": "other",
    "clinical indication": "other",
    "reason for exam": "other",
    "reason for examination": "other",
    "technique": "other",
    "procedure": "other",
    "comparison": "other",
    "comparisons": "other",
    "reference exam": "other",
    "recommendation": "other",
    "recommendations": "other",
    "recommendation(s)": "other",
    "notification": "other",
    "wet read": "other",
    "addendum": "other",
}

_HEADER_ALTS = sorted(SECTION_HEADERS, key=len, reverse=True)
_HEADER_RE = re.compile(
    r"(?<![\w/])(?P<name>"
    + "|".join(re.escape(h).replace(r"\ ", r"\s+") for h in _HEADER_ALTS)
    + r")(?![\w/(])[ \t]*(?P<punct>:|--?|\.)?",
    re.IGNORECASE,
)


def _line_start(text: str, pos: int) -> bool:
    line_begin = text.rfind("\n", 0, pos) + 1
    return not text[line_begin:pos].strip()


def _line_rest_blank(text: str, pos: int) -> bool:
    line_end = text.find("\n", pos)
    return not text[pos : (len(text) if line_end < 0 else line_end)].strip()


def _normalise_space(text: str) -> str:
    return " ".join(text.split())


def extract_sections(text: str, fallback: str | None = "findings") -> dict[str, str]:
    """Findings and impression sections of a free-text radiology report.

    Headers are matched case-insensitively with punctuation variants ("FINDINGS:", "Findings -",
    "IMPRESSION." alone on its line, "FINDINGS" alone on its line, "IMPRESSION:" inside a line).
    A header inside a line counts only when written in capitals and followed by a colon, so prose such
    as "Chest Comparison: ..." or "the findings: ..." is not cut. "CONCLUSION" / "SUMMARY" count as impression,
    "FINDINGS AND IMPRESSION" as findings; every other known header (INDICATION, COMPARISON, ...) ends the
    current section. Repeated sections are joined. Whitespace inside a section is collapsed to single
    spaces (MIMIC-CXR wraps lines mid-sentence).

    Args:
        text: the report.
        fallback: section that receives the whole text when the report has no recognised header at
            all ("findings", "impression", or None to leave both empty).

    Returns:
        ``{"findings": str, "impression": str}``; a missing section is "".
    """
    if fallback not in ("findings", "impression", None):
        raise ValueError(f"fallback must be 'findings', 'impression' or None, got {fallback!r}")
    text = text or ""
    headers = []
    for m in _HEADER_RE.finditer(text):
        punct = m.group("punct")
        at_line_start = _line_start(text, m.start())
        if punct == ":":
            ok = at_line_start or m.group("name").isupper()
        elif punct in ("-", "--"):
            ok = at_line_start
        else:
            # "Findings." or a bare "FINDINGS" count only as a line of their own.
            ok = at_line_start and _line_rest_blank(text, m.end())
        if ok:
            name = " ".join(m.group("name").lower().split())
            headers.append((m.start(), m.end(), SECTION_HEADERS[name]))

    out = {"findings": [], "impression": []}
    if not headers:
        if fallback is not None and text.strip():
            out[fallback].append(text)
    for k, (_, end, kind) in enumerate(headers):
        stop = headers[k + 1][0] if k + 1 < len(headers) else len(text)
        if kind in out:
            out[kind].append(text[end:stop])
    return {key: _normalise_space(" ".join(parts)) for key, parts in out.items()}


def report_text(findings: str | None, impression: str | None) -> str:
    """The text used for pre-training: findings then impression, whitespace collapsed.

    A section that does not end with terminal punctuation gets a full stop, so the two sections never
    run into one sentence. Missing sections (None, "", NaN-like "nan") are left out.
    """
    parts = []
    for section in (findings, impression):
        if section is None or not isinstance(section, str):
            continue
        section = _normalise_space(section)
        if not section or section.lower() == "nan":
            continue
        if section[-1] not in ".!?":
            section += "."
        parts.append(section)
    return " ".join(parts)


# Words (lower case, without the final full stop) after which a full stop never ends a sentence.
_NEVER_END = frozenset(
    """dr mr mrs ms prof st vs v approx appr approx e.g eg i.e ie cf fig figs incl esp resp viz ca al
    max min mt sr jr pts"""
    .split()
)
# Abbreviations that end a sentence only when a capitalised word follows ("... etc. The heart").
_END_IF_CAPITAL = frozenset("etc a.m p.m u.s".split())
_CLOSERS = "\"')]}'’”"
_BULLETS = "-*•–"
_ENUM_RE = re.compile(r"(?<![\w.,/:-])(\d{1,2})([.)])(?=[ \t]*[A-Za-z(\"])")
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
_BULLET_LINE_RE = re.compile(r"\n[ \t]*[-*•–][ \t]+(?=\S)")


def _word_before(text: str, pos: int) -> tuple[str, int]:
    """The whitespace-delimited word ending at ``pos`` (exclusive) and its start, leading brackets
    and quotes removed."""
    start = pos
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:pos]
    stripped = word.lstrip("([{\"'")
    return stripped, start + (len(word) - len(stripped))


def _next_word(text: str, pos: int) -> str:
    n = len(text)
    while pos < n and text[pos].isspace():
        pos += 1
    end = pos
    while end < n and not text[end].isspace():
        end += 1
    return text[pos:end].lstrip("([{\"'")


def _is_enum_marker_at_sentence_start(text: str, word_start: int, last_cut: int) -> bool:
    return not text[last_cut:word_start].strip(" \t\n\r" + _BULLETS)


def _period_ends_sentence(text: str, dot: int, end: int, last_cut: int) -> bool:
    """Decide whether the run of full stops ``text[dot:end]`` (closers already absorbed) ends a sentence."""
    n = len(text)
    nxt = text[end] if end < n else ""
    prev = text[dot - 1] if dot > 0 else ""
    if nxt and not nxt.isspace():
        # No space after the stop: "1.5", "e.g.", "U.S.", "x.y" and a list marker "1.Severe" stay;
        # "apex.There" and "XXXX.In" are sloppy sentence ends.
        word, word_start = _word_before(text, dot)
        if not nxt.isupper() or word.lower() in _NEVER_END or "." in word:
            return False
        if re.fullmatch(r"\d{1,2}", word):
            return not _is_enum_marker_at_sentence_start(text, word_start, last_cut)
        return prev.islower() or prev.isdigit() or prev in _CLOSERS or (word.isalpha() and len(word) > 1)
    if end - dot > 1:  # ellipsis followed by space or end
        return True
    word, word_start = _word_before(text, dot)
    low = word.lower()
    following = _next_word(text, end)
    if not following:
        return True
    if low in _NEVER_END:
        return False
    if low == "no" and following[:1].isdigit():
        return False
    if low in _END_IF_CAPITAL or re.fullmatch(r"(?:[a-z]\.)+[a-z]", low):
        return following[:1].isupper()
    if re.fullmatch(r"\d{1,2}", word) and _is_enum_marker_at_sentence_start(text, word_start, last_cut):
        return False
    if re.fullmatch(r"[A-Z]", word) and following[:1].isupper() and len(following) > 1 and following[1:2].islower():
        # An initial ("J. Smith").
        return False
    return True


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Split a report into sentences, returning character spans ``[start, end)`` into ``text``.

    Spans are in order, non-overlapping, stripped of surrounding whitespace (and of a leading bullet
    character), and each contains at least one letter or digit, so ``text[s:e]`` is never empty.
    See the module docstring for the rules.

    Args:
        text: any string (a section, ``report_text(...)``, or raw report text).

    Returns:
        list of ``(start, end)`` integer pairs; ``[]`` for blank text.
    """
    if not text:
        return []
    n = len(text)
    cuts: set[int] = set()

    # Enumerations: markers k - 1 and k both start a sentence when k follows k - 1, which keeps
    # "measuring 2. The" from being read as a list item while "1. A 2. B" splits before "1." and "2.".
    seen: dict[str, dict[int, int]] = {".": {}, ")": {}}
    for m in _ENUM_RE.finditer(text):
        k, style = int(m.group(1)), m.group(2)
        if k >= 2 and (k - 1) in seen[style]:
            # The previous marker starts a list item too ("Chest: 1. Clear. 2. ..." -> "1. Clear.").
            cuts.add(seen[style][k - 1])
            cuts.add(m.start())
        seen[style][k] = m.start()
    for m in _BLANK_LINE_RE.finditer(text):
        cuts.add(m.start())
    for m in _BULLET_LINE_RE.finditer(text):
        cuts.add(m.start())

    # Terminal punctuation, scanned left to right because the enumeration rule needs the last cut.
    i = 0
    last_cut = 0
    sorted_extra = sorted(cuts)
    extra_idx = 0
    while i < n:
        while extra_idx < len(sorted_extra) and sorted_extra[extra_idx] <= i:
            last_cut = max(last_cut, sorted_extra[extra_idx])
            extra_idx += 1
        ch = text[i]
        if ch in ".!?":
            j = i
            while j < n and text[j] in ".!?":
                j += 1
            end = j
            while end < n and text[end] in _CLOSERS:
                end += 1
            if "!" in text[i:j] or "?" in text[i:j]:
                ends = end >= n or text[end].isspace() or text[end].isupper()
            else:
                ends = _period_ends_sentence(text, i, end, last_cut)
            if ends:
                cuts.add(end)
                last_cut = end
            i = end
            continue
        i += 1

    spans = []
    start = 0
    for cut in sorted(cuts | {n}):
        if cut <= start:
            continue
        s, e = start, cut
        while s < e and (text[s].isspace() or (text[s] in _BULLETS and s + 1 < e and text[s + 1].isspace())):
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if any(c.isalnum() for c in text[s:e]):
            spans.append((s, e))
        start = cut
    return spans
