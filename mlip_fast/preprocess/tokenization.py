"""Report tokenization with sentence token spans.

:func:`tokenize_reports` turns report texts into the text part of a batch: token ids, attention mask and,
for every sentence, its token span ``[start, end)``. :class:`ReportTokenizer` binds a tokenizer to a model's
limits (``max_length``, ``max_sentences``): ``ReportTokenizer(...)(texts)`` is exactly the batch
``MLIP.encode_text`` takes (what ``get_tokenizer(name)`` returns, as open_clip's tokenizers). Sentences come from
:func:`mlip_fast.preprocess.reports.split_sentences` (character spans) and are mapped to tokens through the fast
tokenizer's offset mapping: a token belongs to the sentence whose character span holds its first
character. Special and padding tokens belong to no sentence.

Tokenizers: any transformers *fast* tokenizer (offsets need one). The offline default is an uncased
WordPiece tokenizer, either trained on a corpus of reports (:func:`train_wordpiece_tokenizer`) or built
from the radiology vocabulary shipped in ``mlip_fast/preprocess/vocab/`` (:func:`default_tokenizer`; rebuilt
by ``python -m mlip_fast.preprocess.build_vocab``).

Vocabulary training (:func:`train_wordpiece_vocab`) is deterministic: the same corpus and settings give
the same vocabulary, in the same order, in every process and under every ``PYTHONHASHSEED``. It follows
the tokenizers library's WordPiece trainer (BERT normalisation and pre-tokenisation, an alphabet of the
``limit_alphabet`` most frequent characters, then greedy merges of the most frequent adjacent pair with
``##`` marking word-internal pieces, ties going to the pair of older tokens) but numbers the word-internal
characters in sorted order, where the library numbers them in hash order and so gives a different
vocabulary in every process.
"""
from __future__ import annotations

import heapq
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

from mlip_fast.preprocess.reports import split_sentences

__all__ = [
    "ReportTokenizer",
    "fast_tokenizer",
    "tokenize_reports",
    "default_tokenizer",
    "train_wordpiece_tokenizer",
    "train_wordpiece_vocab",
    "load_tokenizer",
    "SPECIAL_TOKENS",
    "DEFAULT_VOCAB_PATH",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "vocab" / "radiology_wordpiece.txt"
CONTINUATION = "##"


def _bert_tokenizer(vocab: Union[dict, str], lowercase: bool):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=vocab, do_lower_case=lowercase, strip_accents=True if lowercase else None)


def default_tokenizer(lowercase: bool = True):
    """Uncased WordPiece tokenizer over the shipped radiology vocabulary (no corpus, no download)."""
    if not DEFAULT_VOCAB_PATH.exists():
        raise FileNotFoundError(
            f"the default radiology vocabulary {DEFAULT_VOCAB_PATH} is missing from this install; rebuild it "
            "with `python -m mlip_fast.preprocess.build_vocab --reports <reports.csv>` or pass a corpus"
        )
    vocab = {tok: i for i, tok in enumerate(DEFAULT_VOCAB_PATH.read_text().splitlines())}
    return _bert_tokenizer(vocab, lowercase)


def _corpus_words(texts: Iterable[str], lowercase: bool) -> Counter:
    """Word counts after BERT normalisation and pre-tokenisation (what the tokenizer will see)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=True if lowercase else None, lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def _pairs(symbols: list) -> Counter:
    return Counter(zip(symbols, symbols[1:]))


def _merge_word(symbols: list, left: str, right: str, merged: str) -> list:
    """``symbols`` with every non-overlapping occurrence of ``(left, right)``, from the left, replaced by
    ``merged``."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def train_wordpiece_vocab(corpus: Iterable[str], vocab_size: int = 4096, lowercase: bool = True,
                          min_frequency: int = 2, limit_alphabet: int = 200) -> list:
    """A WordPiece vocabulary trained on ``corpus``: a list of tokens, the index of each being its id.

    Order: ``SPECIAL_TOKENS`` (ids 0-4); the alphabet (the ``limit_alphabet`` most frequent characters,
    frequency ties broken by code point) sorted by code point; the word-internal forms ``##c`` of the
    alphabet characters that occur inside a word, sorted; then one token per merge, in merge order. Each
    merge joins the adjacent pair of symbols with the largest count over the corpus (a word's pairs count
    as often as the word occurs), the pair ``(a, ##b)`` giving ``ab`` (``(##a, ##b)`` gives ``##ab``);
    equal counts go to the pair with the smallest ``(id(left), id(right))``, as in the tokenizers library.
    Training stops at ``vocab_size`` tokens or when no pair occurs ``min_frequency`` times.

    Deterministic: the result depends on the multiset of words of the corpus and the settings only (not
    on the corpus order, the process or ``PYTHONHASHSEED``): every choice is made on counts, strings and
    ids that are themselves fixed by counts and strings.
    """
    if vocab_size < len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS)} (the special tokens), got {vocab_size}")
    if min_frequency < 1 or limit_alphabet < 1:
        raise ValueError(f"min_frequency and limit_alphabet must be >= 1, got {min_frequency} and {limit_alphabet}")
    word_counts = _corpus_words(corpus, lowercase)
    chars: Counter = Counter()
    for word, n in word_counts.items():
        for c in word:
            chars[c] += n
    alphabet = sorted(c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet])
    keep = set(alphabet)

    words, counts = [], []
    for word in sorted(word_counts):
        kept = [c for c in word if c in keep]
        if kept:
            words.append([kept[0]] + [CONTINUATION + c for c in kept[1:]])
            counts.append(word_counts[word])
    vocab = list(SPECIAL_TOKENS) + [c for c in alphabet if c not in SPECIAL_TOKENS]
    vocab += sorted({s for w in words for s in w[1:]} - set(vocab))
    ids = {token: i for i, token in enumerate(vocab)}

    pair_counts: Counter = Counter()
    where: dict = {}
    for i, (w, n) in enumerate(zip(words, counts)):
        for pair, k in _pairs(w).items():
            pair_counts[pair] += k * n
            where.setdefault(pair, set()).add(i)
    # Max-heap on (count, then the smallest ids) with lazy deletion: an entry whose count is stale is
    # re-queued with the current count when it reaches the top.
    heap = [(-n, ids[a], ids[b], a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if -neg != current:
            if current > 0:
                heapq.heappush(heap, (-current, ids[a], ids[b], a, b))
            continue
        if current < min_frequency:
            break
        merged = a + (b[len(CONTINUATION):] if b.startswith(CONTINUATION) else b)
        if merged not in ids:
            ids[merged] = len(vocab)
            vocab.append(merged)
        touched = set()
        for i in sorted(where.pop((a, b), ())):
            old = words[i]
            new = _merge_word(old, a, b, merged)
            if len(new) == len(old):
                continue
            words[i] = new
            before, after = _pairs(old), _pairs(new)
            for pair in before.keys() | after.keys():
                delta = (after.get(pair, 0) - before.get(pair, 0)) * counts[i]
                if delta:
                    pair_counts[pair] += delta
                    touched.add(pair)
                if pair in after:
                    where.setdefault(pair, set()).add(i)
        for pair in sorted(touched):
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], ids[pair[0]], ids[pair[1]], *pair))
            else:
                del pair_counts[pair]
    return vocab


def train_wordpiece_tokenizer(corpus: Iterable[str], vocab_size: int = 4096, lowercase: bool = True,
                              min_frequency: int = 2):
    """A fast BERT tokenizer over the vocabulary :func:`train_wordpiece_vocab` trains on ``corpus``, with
    the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4); deterministic (see there)."""
    texts = [t for t in corpus if t and t.strip()]
    if not texts:
        raise ValueError("train_wordpiece_tokenizer: the corpus has no non-empty text")
    vocab = train_wordpiece_vocab(texts, vocab_size=vocab_size, lowercase=lowercase, min_frequency=min_frequency)
    return _bert_tokenizer({token: i for i, token in enumerate(vocab)}, lowercase)


def load_tokenizer(name_or_path: Union[str, Path], *, local_files_only: bool = True):
    """A fast tokenizer from a local directory, or a hub name (already cached unless
    ``local_files_only=False``)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=local_files_only)
    except OSError as e:
        hint = "" if not local_files_only else (" (only local files and the local cache are searched; downloading "
                                                "needs text.allow_download=true or local_files_only=False)")
        raise OSError(f"no tokenizer found for {str(name_or_path)!r}{hint}: {e}") from e
    if not tokenizer.is_fast:
        raise TypeError(f"the tokenizer of {str(name_or_path)!r} is not a fast tokenizer; sentence spans need "
                        "offset mappings (tokenizers backend)")
    return tokenizer


def _sentence_token_spans(offsets: np.ndarray, text_token: np.ndarray, sentences: np.ndarray) -> np.ndarray:
    """Token spans [n_kept, 2] of the sentences that keep at least one token.

    offsets [T, 2] character spans of the tokens; text_token [T] bool (False for special / padding);
    sentences [n, 2] character spans, sorted and non-overlapping.
    """
    starts = offsets[:, 0]
    sid = np.searchsorted(sentences[:, 0], starts, side="right") - 1
    inside = text_token & (sid >= 0) & (starts < sentences[np.clip(sid, 0, None), 1])
    tok = np.nonzero(inside)[0]
    sid = sid[tok]
    n = len(sentences)
    first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    np.minimum.at(first, sid, tok)
    np.maximum.at(last, sid, tok)
    keep = last >= 0
    return np.stack([first[keep], last[keep] + 1], axis=1)


class ReportTokenizer:
    """A fast tokenizer bound to a model's text limits; call it on report texts.

    ``ReportTokenizer(tokenizer, max_length, max_sentences)(texts)`` with ``texts`` a list of B reports (or
    one string) -> the dict of :func:`tokenize_reports`: ``input_ids`` / ``attention_mask`` [B, T] int64
    with T <= ``max_length`` (longer reports are truncated), ``sentence_spans`` [B, S, 2] and
    ``sentence_mask`` [B, S] bool with S <= ``max_sentences``.

    ``tokenizer`` is the underlying transformers fast tokenizer (vocabulary, ``save_pretrained``).
    """

    def __init__(self, tokenizer, max_length: int = 128, max_sentences: int = 16):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"ReportTokenizer needs a transformers fast tokenizer (offset mappings), got "
                            f"{type(tokenizer).__name__}")
        if not (isinstance(max_length, int) and max_length >= 3):
            raise ValueError(f"max_length must be an int >= 3 ([CLS], one token, [SEP]), got {max_length!r}")
        if not (isinstance(max_sentences, int) and max_sentences >= 1):
            raise ValueError(f"max_sentences must be a positive int, got {max_sentences!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_sentences = max_sentences

    def __call__(self, texts: Union[str, Sequence[str]]) -> dict:
        return tokenize_reports(self.tokenizer, [texts] if isinstance(texts, str) else texts, self.max_length,
                                self.max_sentences)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def save_pretrained(self, directory: Union[str, Path]):
        """Writes the underlying tokenizer's files (the limits belong to the model config)."""
        return self.tokenizer.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return (f"ReportTokenizer({type(self.tokenizer).__name__}, vocab {len(self)}, max_length={self.max_length}, "
                f"max_sentences={self.max_sentences})")


def fast_tokenizer(tokenizer):
    """The transformers fast tokenizer inside ``tokenizer`` (a :class:`ReportTokenizer` or one already)."""
    return tokenizer.tokenizer if isinstance(tokenizer, ReportTokenizer) else tokenizer


def tokenize_reports(tokenizer, texts: Sequence[str], max_length: int = 128, max_sentences: int = 16) -> dict:
    """Tokenizes reports and locates every sentence's tokens.

    Args:
        tokenizer: a transformers fast tokenizer (BERT-style: [CLS] first), or a :class:`ReportTokenizer`
            (its tokenizer is used; the limits are the arguments here).
        texts: B report texts (e.g. findings + impression).
        max_length: T upper bound (longer reports are truncated; padding is to the longest in the batch).
        max_sentences: S upper bound; later sentences are dropped.
    Returns:
        dict with ``input_ids`` [B, T] int64, ``attention_mask`` [B, T] int64 (1 = token),
        ``sentence_spans`` [B, S, 2] int64 token ``[start, end)`` per sentence (zero for padding) and
        ``sentence_mask`` [B, S] bool (True = valid), S = min(max sentences in the batch, max_sentences),
        at least 1. A sentence cut by truncation keeps its surviving tokens; a sentence with no surviving
        token is dropped.
    Raises:
        ValueError: a report is empty (no letter or digit), or none of its sentences has a token left
            after truncation.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of report strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize_reports: texts is empty")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    tokenizer = fast_tokenizer(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize_reports needs a fast tokenizer (offset mappings); got "
                        f"{type(tokenizer).__name__}")
    char_spans = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"report {i} is {type(text).__name__}, not str")
        spans = split_sentences(text)
        if not spans:
            raise ValueError(f"report {i} is empty (no sentence with a letter or digit): {text[:80]!r}")
        char_spans.append(np.asarray(spans, dtype=np.int64).reshape(-1, 2))

    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                    return_offsets_mapping=True, return_special_tokens_mask=True, return_attention_mask=True)
    input_ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    attention_mask = torch.tensor(enc["attention_mask"], dtype=torch.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64)  # [B, T, 2]
    text_token = (np.asarray(enc["special_tokens_mask"]) == 0) & (np.asarray(enc["attention_mask"]) == 1)
    text_token &= offsets[..., 1] > offsets[..., 0]

    per_report = []
    for i, spans in enumerate(char_spans):
        token_spans = _sentence_token_spans(offsets[i], text_token[i], spans)[:max_sentences]
        if len(token_spans) == 0:
            raise ValueError(f"report {i}: no sentence has a token left after truncation to max_length={max_length}")
        per_report.append(token_spans)
    s = max(len(t) for t in per_report)
    sentence_spans = torch.zeros(len(texts), s, 2, dtype=torch.int64)
    sentence_mask = torch.zeros(len(texts), s, dtype=torch.bool)
    for i, token_spans in enumerate(per_report):
        sentence_spans[i, : len(token_spans)] = torch.from_numpy(token_spans)
        sentence_mask[i, : len(token_spans)] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sentence_spans": sentence_spans,
        "sentence_mask": sentence_mask,
    }
