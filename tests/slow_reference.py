"""Slow, obvious float64 implementations (explicit loops over pairs) used as independent references."""
import math

import torch


def slow_scores(patches, sentences, sentence_mask=None, patch_mask=None):
    """(i2t [B, G], t2i [B, G]) by explicit loops in float64; empty sets score 0."""
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    p = patches.double()
    s = sentences.double()
    i2t = torch.zeros(B, G, dtype=torch.float64)
    t2i = torch.zeros(B, G, dtype=torch.float64)
    for b in range(B):
        vp = [k for k in range(K) if patch_mask is None or bool(patch_mask[b, k])]
        for g in range(G):
            vq = [q for q in range(S) if sentence_mask is None or bool(sentence_mask[g, q])]
            if not vp or not vq:
                continue
            sim = [[float(p[b, k] @ s[g, q]) for q in vq] for k in vp]
            i2t[b, g] = sum(max(row) for row in sim) / len(vp)
            t2i[b, g] = sum(max(sim[i][j] for i in range(len(vp))) for j in range(len(vq))) / len(vq)
    return i2t, t2i


def slow_ce(logits_row, target):
    m = max(logits_row)
    lse = m + math.log(sum(math.exp(x - m) for x in logits_row))
    return lse - logits_row[target]


def slow_infonce(scores_rows, scores_cols_t, scale, weights=None):
    """1/2 [mean_i w_i CE(row i of scale*A, i) + mean_j w_j CE(row j of scale*C, j)] for square A, C."""
    n = len(scores_rows)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    mw = sum(w) / n
    w = [x / mw for x in w]
    a = sum(w[i] * slow_ce([scale * x for x in scores_rows[i]], i) for i in range(n)) / n
    c = sum(w[j] * slow_ce([scale * x for x in scores_cols_t[j]], j) for j in range(n)) / n
    return 0.5 * (a + c)


def normalize_rows(x):
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True)
