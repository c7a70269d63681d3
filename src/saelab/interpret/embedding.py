"""A feature vector read in the model's input-embedding space: nearest tokens, and the model's
own "definition" of a ghost token placed at that vector. Plus encoder / decoder agreement: the
cosine of the two vectors, and `overlap` of the views built from each (a feature whose encoder
and decoder read and write different directions shows different token lists and trees).

The vector. v = scale * r * w / ||w||, with w the feature's encoder column or decoder row and
r the mean norm of the (used) token embeddings: scale 1 puts v as far from the origin as a
typical token, so one scale means the same for encoder and decoder vectors and across SAEs
whose raw norms differ. (Both need d_model-wide vectors: residual-stream-like hook points.)

Token list score, for token embedding e_t (rows of W_E):

    score_t = sign(c_t) * |c_t| ** p / ||v - e_t||,    c_t = cos(v, e_t)

The numerator rewards direction, the denominator nearness; the exponent p trades one against
the other (large p: direction only) and the scale moves v along its ray (small: tokens near
the origin win; large: the denominator flattens and direction dominates).

Definition tree: the prompt `A typical definition of <ghost> is "` with the ghost position's
input embedding set to v (the model adds its position embedding as for any token). The most
probable continuations are expanded breadth-first, one batched forward per depth level, each
node carrying the cumulative probability of its path; a branch stops at a token containing the
closing quote.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.errors import ConfigError

DEFAULT_PROMPT = 'A typical definition of <ghost> is "'
GHOST = "<ghost>"


def enc_dec_cosine(sae) -> Tensor:
    """(d_sae,) cosine between each feature's encoder column and decoder row (d_in == d_out)."""
    if sae.cfg.d_in != sae.cfg.d_out:
        raise ConfigError(f"encoder ({sae.cfg.d_in}) and decoder ({sae.cfg.d_out}) vectors live in "
                          "different spaces: no cosine for a transcoder with d_in != d_out")
    enc, dec = sae.W_enc.detach().T.float(), sae.W_dec.detach().float()
    return torch.nn.functional.cosine_similarity(enc, dec, dim=1, eps=1e-12)


def overlap(a, b) -> dict:
    """{"shared": |A & B|, "jaccard": |A & B| / |A | B|} of two lists taken as sets (1.0 when both
    are empty): how far two views of one feature agree, e.g. its encoder and decoder top-k
    token ids, or the first-level continuations of its two definition trees."""
    sa, sb = set(a), set(b)
    shared, union = len(sa & sb), len(sa | sb)
    return {"shared": shared, "jaccard": shared / union if union else 1.0}


def feature_vectors(lm, sae, features, which: str = "encoder", scale: float = 1.0,
                    mask: Tensor | None = None) -> Tensor:
    """v = scale * r * w / ||w|| for each feature, (n, d_model); r = mean norm of the token
    embeddings of ids in `mask` (all ids if None)."""
    feats = torch.as_tensor(features).long().flatten()
    if feats.numel() and (feats.min() < 0 or feats.max() >= sae.cfg.d_sae):
        raise ConfigError(f"feature index out of range (valid: 0..{sae.cfg.d_sae - 1}), got "
                          f"{feats.tolist()}")
    if which not in ("encoder", "decoder"):
        raise ConfigError(f"vector must be 'encoder' or 'decoder', got {which!r}")
    W = sae.W_enc.detach().T if which == "encoder" else sae.W_dec.detach()
    if W.shape[1] != lm.d_model:
        raise ConfigError(f"the {which} vectors are {W.shape[1]} wide but token embeddings are "
                          f"{lm.d_model}: embedding views need a d_model-wide hook point")
    E = lm.W_E.detach().float()
    radius = (E[mask.to(E.device)] if mask is not None else E).norm(dim=1).mean()
    w = W[feats.to(W.device)].float().to(E.device)
    return scale * radius * w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest_tokens(lm, vectors: Tensor, *, k: int = 20, exponent: float = 1.0,
                   mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k token ids and scores, (n, k) each, for vectors (n, d_model) (or (d_model,) -> (k,)),
    among ids in `mask`; the score is in the module docstring."""
    E = lm.W_E.detach().float()
    v = vectors.to(E.device, E.dtype)
    single = v.ndim == 1
    v = v[None] if single else v
    cos = (v @ E.T) / (v.norm(dim=1, keepdim=True) * E.norm(dim=1)).clamp_min(1e-12)
    dist = torch.cdist(v, E).clamp_min(1e-12)
    score = cos.sign() * cos.abs().pow(exponent) / dist
    if mask is not None:
        score = score.masked_fill(~mask.to(score.device), float("-inf"))
    n_ok = int(mask.sum()) if mask is not None else E.shape[0]
    top = score.topk(min(k, n_ok), dim=1)
    ids, values = top.indices.cpu(), top.values.cpu()
    return (ids[0], values[0]) if single else (ids, values)


def ghost_prompt(lm, prompt: str = DEFAULT_PROMPT, prepend_bos: bool = True) -> tuple[Tensor, int]:
    """Token ids of the prompt with a placeholder id at the ghost, and the ghost's position.

    Spaces just before the ghost are dropped: the ghost stands for a word token, which in a
    BPE vocabulary carries its own leading space."""
    if prompt.count(GHOST) != 1:
        raise ConfigError(f"the prompt must contain {GHOST} exactly once, got {prompt!r}")
    before, after = prompt.split(GHOST)
    before = before.rstrip(" ")
    tok = lm.tokenizer
    ids_b = tok.encode(before, add_special_tokens=False) if before else []
    ids_a = tok.encode(after, add_special_tokens=False) if after else []
    bos = [lm.bos_token_id] if prepend_bos and lm.bos_token_id is not None else []
    ids = bos + ids_b + [0] + ids_a
    return torch.tensor(ids, dtype=torch.long), len(bos) + len(ids_b)


@torch.no_grad()
def definition_tree(lm, vector: Tensor, *, depth: int = 3, breadth: int = 3,
                    prompt: str = DEFAULT_PROMPT, stop: str = '"', min_prob: float = 0.0,
                    max_batch: int = 256) -> dict:
    """{"text": prompt, "prob": 1.0, "children": [...]}: the most probable continuations after the
    ghost prompt, `breadth` per node to `depth` tokens; nodes below `min_prob` (cumulative) and
    nodes whose text contains `stop` are leaves."""
    return definition_trees(lm, vector[None], depth=depth, breadth=breadth, prompt=prompt, stop=stop,
                            min_prob=min_prob, max_batch=max_batch)[0]


@torch.no_grad()
def definition_trees(lm, vectors: Tensor, *, depth: int = 3, breadth: int = 3,
                     prompt: str = DEFAULT_PROMPT, stop: str = '"', min_prob: float = 0.0,
                     max_batch: int = 256) -> list[dict]:
    """`definition_tree` of each of vectors (n, d_model), grown together: one batched forward
    per depth level and up to `max_batch` sequences, whichever tree they belong to."""
    if depth < 1 or breadth < 1:
        raise ConfigError(f"depth and breadth must be >= 1, got {depth} and {breadth}")
    ids, ghost = ghost_prompt(lm, prompt)
    if len(ids) + depth > lm.context_length:
        raise ConfigError(f"prompt ({len(ids)} tokens) + depth {depth} exceeds the model's "
                          f"context length {lm.context_length}")
    base = lm.embed(ids)[0]
    bases = base[None].repeat(len(vectors), 1, 1)
    bases[:, ghost] = vectors.to(base.device, base.dtype)
    roots = [{"text": prompt, "prob": 1.0, "children": []} for _ in range(len(vectors))]
    frontier = [(root, [], n) for n, root in enumerate(roots)]  # (node, token ids after the prompt, tree)
    for level in range(depth):
        children = []
        for start in range(0, len(frontier), max_batch):
            children += _expand(lm, bases, frontier[start:start + max_batch], breadth)
        frontier = [(node, path, n) for node, path, n in children
                    if level + 1 < depth and stop not in node["text"] and node["prob"] >= min_prob]
        if not frontier:
            break
    return roots


def _expand(lm, bases: Tensor, nodes, breadth: int) -> list:
    """One batched forward for nodes whose paths all have the same length; attach children."""
    paths = torch.tensor([path for _, path, _ in nodes], dtype=torch.long).view(len(nodes), -1)
    embeds = bases[torch.tensor([n for _, _, n in nodes], device=bases.device)]
    if paths.shape[1]:
        embeds = torch.cat([embeds, lm.embed(paths.to(bases.device))], dim=1)
    probs = lm.forward(inputs_embeds=embeds)[:, -1].float().softmax(-1)
    top = probs.topk(min(breadth, probs.shape[1]), dim=-1)
    out = []
    for (node, path, n), p_row, id_row in zip(nodes, top.values.tolist(), top.indices.tolist()):
        for p, t in zip(p_row, id_row):
            child = {"text": lm.tokenizer.decode([t]), "prob": node["prob"] * p, "children": []}
            node["children"].append(child)
            out.append((child, path + [t], n))
    return out
