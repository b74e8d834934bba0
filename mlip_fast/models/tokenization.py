"""Report tokenization with sentence token spans.

:func:`tokenize_reports` turns report texts into the text part of a batch: token ids, attention mask and,
for every sentence, its token span ``[start, end)``. Sentences come from
:func:`mlip_fast.data.reports.split_sentences` (character spans) and are mapped to tokens through the fast
tokenizer's offset mapping: a token belongs to the sentence whose character span holds its first
character. Special and padding tokens belong to no sentence.

Tokenizers: any transformers *fast* tokenizer (offsets need one). The offline default is an uncased
WordPiece tokenizer, either trained on a corpus of reports (:func:`train_wordpiece_tokenizer`) or built
from the radiology vocabulary shipped in ``mlip_fast/models/vocab/`` (:func:`default_tokenizer`; rebuilt
by ``python -m mlip_fast.models.build_vocab``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

__all__ = [
    "tokenize_reports",
    "default_tokenizer",
    "train_wordpiece_tokenizer",
    "load_tokenizer",
    "SPECIAL_TOKENS",
    "DEFAULT_VOCAB_PATH",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "vocab" / "radiology_wordpiece.txt"


def _bert_tokenizer(vocab: Union[dict, str], lowercase: bool):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=vocab, do_lower_case=lowercase, strip_accents=True if lowercase else None)


def default_tokenizer(lowercase: bool = True):
    """Uncased WordPiece tokenizer over the shipped radiology vocabulary (no corpus, no download)."""
    if not DEFAULT_VOCAB_PATH.exists():
        raise FileNotFoundError(
            f"the default radiology vocabulary {DEFAULT_VOCAB_PATH} is missing from this install; rebuild it "
            "with `python -m mlip_fast.models.build_vocab --reports <reports.csv>` or pass a corpus"
        )
    vocab = {tok: i for i, tok in enumerate(DEFAULT_VOCAB_PATH.read_text().splitlines())}
    return _bert_tokenizer(vocab, lowercase)


def train_wordpiece_tokenizer(corpus: Iterable[str], vocab_size: int = 4096, lowercase: bool = True,
                              min_frequency: int = 2):
    """Trains a WordPiece vocabulary (tokenizers library) on ``corpus`` and wraps it as a fast BERT
    tokenizer with the special tokens [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    texts = [t for t in corpus if t and t.strip()]
    if not texts:
        raise ValueError("train_wordpiece_tokenizer: the corpus has no non-empty text")
    trainer = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=True if lowercase else None)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=list(SPECIAL_TOKENS), limit_alphabet=200)
    return _bert_tokenizer(trainer.get_vocab(), lowercase)


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


def tokenize_reports(tokenizer, texts: Sequence[str], max_length: int = 128, max_sentences: int = 16) -> dict:
    """Tokenizes reports and locates every sentence's tokens.

    Args:
        tokenizer: a transformers fast tokenizer (BERT-style: [CLS] first).
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
    from mlip_fast.data.reports import split_sentences

    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of report strings, not a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize_reports: texts is empty")
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
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
