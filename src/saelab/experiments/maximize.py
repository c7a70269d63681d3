"""Synthetic max-activating text (seed 003): short texts on which one SAE feature fires most,
found by a search the language model guides, shown beside the dataset's top example.

Beam search left to right over tokens. Each beam proposes next tokens from two sources: the
LM's most likely continuations (so the text stays plausible) and the tokens whose embedding has
the largest dot product with the gradient of the feature's value at the new position with
respect to that position's input embedding (the first-order gain of putting the token there, as
in coordinate / GCG-style searches; the gradient is taken at the mean embedding). Every
candidate is then scored exactly by a forward pass:

    objective = value_last + lm_weight * mean log p(text)

with value_last the feature's activation at the text's last token where it fires, else how far
its pre-activation is below firing there (`Scorer.value`), and the mean next-token
log-probability of the text's tokens (nats). After the beam reaches `length` tokens,
`refine_rounds` rounds of coordinate search try, at every position of the best texts, the tokens
with the largest gradient there and keep a swap that raises the objective.
Every text is reported with its activation (`sae.encode` at its last token), so a text counts as
reaching X only if the SAE itself says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.lm.hooked import HookedLM


@dataclass
class MaximizeConfig:
    feature: int
    length: int = 8  # tokens after BOS, at most
    beam: int = 8  # texts kept per step
    lm_candidates: int = 16  # the LM's most likely next tokens proposed per beam
    grad_candidates: int = 16  # the tokens with the largest gradient proposed per beam (and per position when refining)
    lm_weight: float = 0.1  # activation units per nat of mean log-probability; 0: activation alone
    refine_rounds: int = 2
    top: int = 5  # texts reported
    batch_size: int = 256  # candidate texts per forward pass

    def __post_init__(self) -> None:
        for name in ("length", "beam", "top", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lm_candidates < 0 or self.grad_candidates < 0 or self.lm_candidates + self.grad_candidates < 1:
            raise ConfigError("lm_candidates and grad_candidates must be >= 0, and one of them >= 1")
        if self.refine_rounds < 0 or self.lm_weight < 0:
            raise ConfigError("refine_rounds and lm_weight must be >= 0")


@dataclass
class SyntheticText:
    text: str
    tokens: list[str]  # BOS first
    token_ids: list[int]
    acts: list[float]  # the feature's activation at every token (BOS: 0, not scored)
    act: float  # at the last token: what the text reaches
    pre_act: float  # the pre-activation there
    mean_logprob: float  # mean log p of the tokens after BOS under the LM (nats)
    pos: int = 0  # the scored position (the last), for the dashboard's example view

    def __post_init__(self) -> None:
        self.pos = len(self.tokens) - 1


@dataclass
class DatasetTop:
    """The dataset's top example of the feature: where it comes from and what it reaches."""

    act: float
    tokens: list[str]  # its context up to and including the example's position
    acts: list[float]
    pos: int
    source: str  # "dashboard DIR" or "N held-out contexts"


@dataclass
class MaximizeResult:
    feature: int
    hook: str
    sae: str
    model: str
    config: dict
    texts: list[SyntheticText]  # best first
    dataset: DatasetTop | None
    beats: bool | None  # the best text's activation is above the dataset's top (None: no dataset)
    why_not: str | None = None
    evaluated: int = 0  # texts scored by the search

    def to_dict(self) -> dict:
        return asdict(self)


class Scorer:
    """The feature on the LM: pre-activations and activations at every position of token ids."""

    def __init__(self, lm: HookedLM, sae, feature: int):
        if not 0 <= feature < sae.cfg.d_sae:
            raise ConfigError(f"feature {feature} is out of range: this SAE has features 0..{sae.cfg.d_sae - 1}")
        self.lm, self.sae, self.feature, self.hook = lm, sae, feature, sae.cfg.hook_name
        vocab = min(lm.W_E.shape[0], len(lm.tokenizer)) if lm.tokenizer is not None else lm.W_E.shape[0]
        banned = set(getattr(lm.tokenizer, "all_special_ids", []) or []) | {lm.bos_token_id}
        self.allowed = torch.tensor([t not in banned for t in range(vocab)] + [False] * (lm.W_E.shape[0] - vocab))

    def value(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(searched value, pre-activation z, activation) of the feature on rows x (N, d_in).

        The searched value is the activation where the feature fires, else how far its z is
        below the level at which it would: the k-th largest z of the row (at least 0) for an
        architecture with k features per token, else its threshold (0 for relu). z alone would
        send a topk search to rows on which every z is large but this feature loses."""
        x = x.to(self.sae.W_enc.dtype)
        z, f = self.sae.pre_acts(x), self.sae.encode(x)
        zi, act = z[:, self.feature], f[:, self.feature]
        if self.sae.activation.per_token_k:
            cut = z.detach().topk(self.sae.cfg.k, -1).values[:, -1].clamp(min=0)
        else:
            threshold = self.sae.threshold
            cut = threshold[self.feature].detach() if threshold is not None else torch.zeros((), dtype=z.dtype)
        return torch.where(act > 0, act, (zi - cut).clamp(max=0)), zi, act

    @torch.no_grad()
    def score(self, ids: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """(searched value, pre-activation, activation) at the last token of each row of ids (B, S)."""
        parts = [self.value(self.lm.run_with_cache(chunk, [self.hook])[self.hook][:, -1]) for chunk in ids.split(batch)]
        return tuple(torch.cat(p).double() for p in zip(*parts))

    @torch.no_grad()
    def all_positions(self, ids: Tensor) -> Tensor:
        """The activation at every position of ids (B, S)."""
        x = self.lm.run_with_cache(ids, [self.hook])[self.hook]
        return self.sae.encode(x.to(self.sae.W_enc.dtype))[..., self.feature].double()

    def gradient_tokens(self, embeds: Tensor, k: int) -> Tensor:
        """(B, S, k): per position the allowed tokens whose embedding has the largest dot product
        with d z_last / d embedding there (embeds (B, S, d): the input embeddings)."""
        embeds = embeds.detach().requires_grad_(True)
        x = self.lm.run_with_cache(inputs_embeds=embeds, names=[self.hook], grad=True)[self.hook][:, -1]
        (grad,) = torch.autograd.grad(self.value(x)[0].sum(), embeds)
        gain = grad @ self.lm.W_E.detach().T
        gain[..., ~self.allowed] = -torch.inf
        return gain.topk(min(k, int(self.allowed.sum())), dim=-1).indices

    @torch.no_grad()
    def next_logprobs(self, ids: Tensor) -> Tensor:
        """(B, vocab) log p(next token | ids), disallowed tokens at -inf."""
        logq = torch.log_softmax(self.lm.forward(ids)[:, -1].double(), -1)
        logq[:, ~self.allowed] = -torch.inf
        return logq

    @torch.no_grad()
    def text_logprob(self, ids: Tensor) -> Tensor:
        """(B,) summed log p of every token after the first."""
        logq = torch.log_softmax(self.lm.forward(ids)[:, :-1].double(), -1)
        return logq.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


# ---- the search -----------------------------------------------------------------------------
Pool = dict  # token ids (tuple, BOS first) -> (objective, pre-activation, activation, summed log p)


def _add(pool: Pool, keys: list[tuple], scored: tuple[Tensor, Tensor, Tensor], lp: Tensor, lm_weight: float) -> Tensor:
    """Score `keys` into the pool (scored: `Scorer.score`'s value, z, act); returns their objectives."""
    value, z, act = scored
    n = torch.tensor([len(k) - 1 for k in keys], dtype=torch.float64)
    obj = value + lm_weight * lp / n
    for k, o, zz, a, p in zip(keys, obj.tolist(), z.tolist(), act.tolist(), lp.tolist()):
        pool[k] = (o, zz, a, p)
    return obj


def beam_search(scorer: Scorer, start: tuple[int, ...], cfg: MaximizeConfig, progress: bool | None = None) -> Pool:
    """Grow texts from `start` one token at a time; every candidate scored lands in the pool."""
    from saelab.progress import progress_bar

    lm, pool = scorer.lm, {}
    mean_embed = lm.W_E.detach()[scorer.allowed].mean(0)
    beams = [(start, 0.0)]
    for _ in progress_bar(range(cfg.length), desc="beam", unit="token", enabled=progress):
        ids = torch.tensor([b[0] for b in beams], device=lm.device)
        logq = scorer.next_logprobs(ids)
        proposals = [logq.topk(cfg.lm_candidates, -1).indices] if cfg.lm_candidates else []
        if cfg.grad_candidates:
            embeds = torch.cat([lm.embed(ids), mean_embed.expand(len(beams), 1, -1)], 1)
            proposals.append(scorer.gradient_tokens(embeds, cfg.grad_candidates)[:, -1])
        cands: dict[tuple, float] = {}
        for b, (seq, lp) in enumerate(beams):
            for t in set(torch.cat([p[b] for p in proposals]).tolist()):
                cands[seq + (t,)] = lp + float(logq[b, t])
        keys = list(cands)
        scored = scorer.score(torch.tensor(keys, device=lm.device), cfg.batch_size)
        obj = _add(pool, keys, scored, torch.tensor([cands[k] for k in keys], dtype=torch.float64), cfg.lm_weight)
        beams = [(keys[i], cands[keys[i]]) for i in obj.argsort(descending=True)[:cfg.beam].tolist()]
    return pool


def refine(scorer: Scorer, pool: Pool, cfg: MaximizeConfig) -> Pool:
    """Coordinate search: at every position after BOS of the best texts, try the tokens with the
    largest gradient there; stop early when a round finds nothing better."""
    lm = scorer.lm
    for _ in range(cfg.refine_rounds):
        best = sorted(pool, key=lambda k: -pool[k][0])[:cfg.beam]
        before = pool[best[0]][0]
        cands: set[tuple] = set()
        for seq in best:
            ids = torch.tensor([seq], device=lm.device)
            tops = scorer.gradient_tokens(lm.embed(ids), cfg.grad_candidates or cfg.lm_candidates)[0].tolist()
            cands |= {seq[:p] + (t,) + seq[p + 1:] for p in range(1, len(seq)) for t in tops[p]}
        for length in sorted({len(c) for c in cands - pool.keys()}):
            keys = [c for c in cands if len(c) == length and c not in pool]
            ids = torch.tensor(keys, device=lm.device)
            lp = torch.cat([scorer.text_logprob(chunk) for chunk in ids.split(cfg.batch_size)])
            _add(pool, keys, scorer.score(ids, cfg.batch_size), lp, cfg.lm_weight)
        if max(v[0] for v in pool.values()) <= before:
            break
    return pool


def synthetic_texts(scorer: Scorer, pool: Pool, top: int) -> list[SyntheticText]:
    """The `top` texts of the pool by objective, with the activation at every token."""
    lm, out = scorer.lm, []
    for key in sorted(pool, key=lambda k: -pool[k][0])[:top]:
        _, z, act, lp = pool[key]
        acts = scorer.all_positions(torch.tensor([key], device=lm.device))[0].tolist()
        acts[0] = 0.0
        out.append(SyntheticText(text=lm.tokenizer.decode(list(key[1:])), tokens=lm.tokenizer.batch_decode([[i] for i in key]),
                                 token_ids=list(key), acts=acts, act=act, pre_act=z, mean_logprob=lp / (len(key) - 1)))
    return out


# ---- the dataset's top example --------------------------------------------------------------
def dataset_top_from_dashboard(folder, feature: int) -> DatasetTop:
    """The top example of `feature` in a `saelab dashboard` folder (features/<i>.json)."""
    import json
    from pathlib import Path

    from saelab.errors import MissingFileError

    path = Path(folder) / "features" / f"{feature}.json"
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist: is {folder} this SAE's dashboard, with feature {feature} in it?")
    data = json.loads(path.read_text())
    examples = data.get("examples") or []
    if not examples:
        return DatasetTop(0.0, [], [], 0, f"dashboard {folder} (no examples: the feature never fired in its scan)")
    ex = examples[0]
    pos = int(ex["pos"])
    return DatasetTop(float(ex["act"]), ex["tokens"][:pos + 1], [a or 0.0 for a in ex["acts"][:pos + 1]], pos,
                      f"dashboard {folder}")


@torch.no_grad()
def dataset_top_from_scan(scorer: Scorer, contexts: Tensor, batch: int = 16) -> DatasetTop:
    """The top activation of the feature over held-out `contexts` (B, S), BOS position left out."""
    best = (-1.0, 0, 1)
    for start in range(0, contexts.shape[0], batch):
        acts = scorer.all_positions(contexts[start:start + batch].to(scorer.lm.device))[:, 1:]
        value, flat = acts.flatten().max(0)
        if float(value) > best[0]:
            best = (float(value), start + int(flat) // acts.shape[1], int(flat) % acts.shape[1] + 1)
    act, row, pos = best
    ids = contexts[row, :pos + 1].tolist()
    acts = scorer.all_positions(torch.tensor([ids], device=scorer.lm.device))[0].tolist()
    return DatasetTop(max(act, 0.0), scorer.lm.tokenizer.batch_decode([[i] for i in ids]), acts, pos,
                      f"{contexts.shape[0]} held-out contexts of {contexts.shape[1]} tokens")


TIE = 5e-4  # relative: a dashboard keeps 4 significant digits, so closer than this is the same activation


def beats(best: float, top: float) -> bool:
    return best > top + TIE * abs(top)


def why_not(best: SyntheticText, top: DatasetTop, cfg: MaximizeConfig) -> str:
    """Why the search did not beat the dataset's top example, from what is known about both."""
    if abs(best.act - top.act) <= TIE * abs(top.act) and best.act > 0:
        return (f"it reaches the same activation ({best.act:.4g}, equal to the 4 digits a dashboard keeps): the search "
                "found the dataset's peak, likely the most this feature gives for the token it fires on")
    if best.act <= 0:
        return ("no text found fires the feature (its best pre-activation was "
                f"{best.pre_act:.3g}); it may need a context the search's candidates never reach: widen --beam and "
                "the candidates, or raise --length")
    if top.pos > cfg.length:
        return (f"the dataset's top example fires at token {top.pos} of its context, after {top.pos} tokens; these texts "
                f"have at most {cfg.length}: the feature may need the longer context (raise --length)")
    if cfg.lm_weight > 0:
        return (f"the log-probability term (--lm-weight {cfg.lm_weight:g}) keeps the texts likely under the model; "
                "--lm-weight 0 searches for activation alone")
    return "the search's candidates did not reach it: widen --beam, --lm-candidates or --grad-candidates"


# ---- the experiment -------------------------------------------------------------------------
def run_maximize(lm: HookedLM, sae, cfg: MaximizeConfig, sae_path: str = "", dataset: DatasetTop | None = None,
                 progress: bool | None = None) -> MaximizeResult:
    """Search for the feature's synthetic max-activating texts; compare with `dataset`."""
    scorer = Scorer(lm, sae, cfg.feature)
    if lm.bos_token_id is None or lm.tokenizer is None:
        raise ConfigError("maximize needs a model with a tokenizer and a BOS token to start texts from")
    if cfg.length + 1 > lm.context_length:
        raise ConfigError(f"length {cfg.length} does not fit the model's context of {lm.context_length} (with BOS)")
    pool = beam_search(scorer, (int(lm.bos_token_id),), cfg, progress)
    pool = refine(scorer, pool, cfg)
    texts = synthetic_texts(scorer, pool, cfg.top)
    best = max(texts, key=lambda t: t.act)
    beat = None if dataset is None else beats(best.act, dataset.act)
    return MaximizeResult(feature=cfg.feature, hook=sae.cfg.hook_name, sae=str(sae_path), model=lm.name,
                          config=asdict(cfg), texts=texts, dataset=dataset, beats=beat,
                          why_not=why_not(best, dataset, cfg) if beat is False else None, evaluated=len(pool))


def format_maximize(result: MaximizeResult) -> str:
    """What the command prints: each text with its activation, then the dataset's top example."""
    from saelab.interpret.dashboard import visible_token

    lines = [f"feature {result.feature} at {result.hook}: {result.evaluated} texts scored", ""]
    for t in result.texts:
        lines.append(f"  act {t.act:8.4g}  (pre {t.pre_act:8.4g}, mean log p {t.mean_logprob:6.2f})  "
                     + "".join(visible_token(s) for s in t.tokens[1:]))
    if result.dataset is not None:
        d = result.dataset
        shown = "".join(visible_token(s) for s in d.tokens[-12:])
        lines += ["", f"dataset's top example ({d.source}): act {d.act:.4g} at token {d.pos}: …{shown}",
                  f"best synthetic text: act {max(t.act for t in result.texts):.4g} — "
                  + ("higher than the dataset's top example" if result.beats else f"not higher: {result.why_not}")]
    return "\n".join(lines)
