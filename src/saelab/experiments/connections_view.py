"""What `saelab connections` keeps and shows: the typed result (records, so connections.json
has a JSON Schema beside it), the text table, and the HTML page listing each strong connection
with both features' top examples and links to their dashboard pages.

A feature's dashboard page is `<dashboard>/features/<i>.html`, with <dashboard> the folder
`saelab dashboard SAE` writes (by default `<SAE folder>/dashboard`); the page links there
relative to itself and says how to build the dashboard when it is not there yet."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from saelab.atomic import write_json
from saelab.experiments.connections import spearman, spliced_late_acts
from saelab.interpret.records import OMIT_NONE, Record, json_schema
from saelab.interpret.schema import Example
from saelab.interpret.vocab import token_strings
from saelab.tables import Column, format_rows

SCHEMA = 1
RESULT_FILE = "connections.json"


@dataclass
class DictionaryInfo(Record):
    """One of the two dictionaries: where it was loaded from and where it sits."""

    path: str | None
    hook_in: str
    hook_out: str  # the activation its nodes write (an SAE: its hook)
    d_sae: int
    dashboard: str | None = field(default=None, metadata=OMIT_NONE)  # its dashboard folder


@dataclass
class Connection(Record):
    """Early feature -> late feature: activation x gradient summed over tokens, and (for the
    strongest) the change of the late feature's total when the early one is ablated."""

    early: int
    late: int
    attribution: float
    ablation: float | None = field(default=None, metadata=OMIT_NONE)  # absent: not ablated


@dataclass
class LateFeature(Record):
    """A late feature's total F_j over the counted tokens and how its attribution splits."""

    feature: int
    total: float  # F_j = sum over tokens of its activation
    features: float  # sum of the attributions to every early feature
    error: float  # the attribution to the error node
    error_share: float  # |error| / (sum_i |A_ji| + |error|): how much the dictionary misses
    top: list[Connection]  # its strongest early features


@dataclass
class Agreement(Record):
    """Attribution against ablation over the ablated connections."""

    n: int
    sign_agreement: float | None  # share whose signs agree
    spearman: float | None  # rank correlation of attribution and ablation effect
    median_ratio: float | None  # median of ablation / attribution


@dataclass
class FeatureExamples(Record):
    feature: int
    total: float
    examples: list[Example]


@dataclass
class ConnectionsResult(Record):
    """connections.json: the two dictionaries, the late features' attributions, the strongest
    connections with their ablation effects, the agreement, and the features' top examples."""

    model: str | None
    early: DictionaryInfo
    late: DictionaryInfo
    n_contexts: int
    n_tokens: int  # tokens counted as nodes and targets (BOS and outlier rows left out)
    outlier_rows: int  # rows the outlier rule left out (massive activations at either hook)
    options: dict  # the ConnectionsConfig
    late_features: list[LateFeature]
    strongest: list[Connection]
    agreement: Agreement
    early_examples: list[FeatureExamples]
    late_examples: list[FeatureExamples]
    schema: int = field(default=SCHEMA, kw_only=True, metadata={"const": SCHEMA})


def _r(x: float) -> float:
    return float(f"{float(x):.5g}")


def build_result(lm, pair, contexts, scan, late_feats, attribution, delta: dict, cfg,
                 folders=(None, None), dashboards=(None, None)) -> ConnectionsResult:
    """The result from run_connections' pieces: `attribution` (A, A_err, F), `delta` {(row of
    A, early feature): ablation effect}, the dictionaries' folders and dashboard folders."""
    A, A_err, F = attribution
    lates = []
    for r, j in enumerate(late_feats):
        mass = A[r].abs().sum().item() + abs(A_err[r].item())
        top = A[r].abs().topk(min(cfg.per_late, int((A[r] != 0).sum()))).indices.tolist()
        lates.append(LateFeature(j, _r(F[r]), _r(A[r].sum()), _r(A_err[r]), _r(abs(A_err[r].item()) / mass if mass else 0),
                                 [Connection(i, j, _r(A[r, i]), _opt(delta.get((r, i)))) for i in top]))
    links = [Connection(i, late_feats[r], _r(A[r, i]), _r(d)) for (r, i), d in delta.items()]
    early_ids = list(dict.fromkeys(c.early for c in links))
    late_ids = list(dict.fromkeys(c.late for c in links)) or late_feats
    ex_early, ex_late = feature_examples(lm, pair, contexts, scan, early_ids, late_ids, cfg.n_examples)
    return ConnectionsResult(
        model=lm.name, early=_info(pair.early, pair.early_in, pair.early_out, folders[0], dashboards[0]),
        late=_info(pair.late, pair.late_in, pair.late.cfg.hook_name_out or pair.late_in, folders[1], dashboards[1]),
        n_contexts=int(contexts.shape[0]), n_tokens=int(scan.counted.sum()),
        outlier_rows=int(contexts.shape[0] * (contexts.shape[1] - int(cfg.exclude_bos)) - scan.counted.sum()),
        options=asdict(cfg), late_features=lates, strongest=links, agreement=agreement(links),
        early_examples=ex_early, late_examples=ex_late)


def _opt(x):
    return None if x is None else _r(x)


def _info(sae, hook_in: str, hook_out: str, folder, dashboard) -> DictionaryInfo:
    """`dashboard` defaults to `<folder>/dashboard`, where `saelab dashboard` writes."""
    dashboard = dashboard or (Path(folder) / "dashboard" if folder else None)
    return DictionaryInfo(str(folder) if folder else None, hook_in, hook_out, sae.cfg.d_sae,
                          str(dashboard) if dashboard else None)


def agreement(links: list[Connection]) -> Agreement:
    a = torch.tensor([c.attribution for c in links], dtype=torch.float64)
    d = torch.tensor([c.ablation for c in links], dtype=torch.float64)
    if not links:
        return Agreement(0, None, None, None)
    nonzero = a != 0
    ratio = (d[nonzero] / a[nonzero]).median().item() if bool(nonzero.any()) else None
    rho = spearman(a, d)
    return Agreement(len(links), _r((a.sign() == d.sign()).double().mean()),
                     None if rho is None else _r(rho), None if ratio is None else _r(ratio))


@torch.no_grad()
def feature_examples(lm, pair, contexts, scan, early_ids, late_ids, n: int):
    """(early, late) lists of FeatureExamples: each feature's n contexts with the largest max,
    with its activation on every token (one more clean pass over just those contexts)."""
    want = {("early", i): scan.early_max[:, i].topk(min(n, len(contexts))) for i in early_ids}
    want.update({("late", j): scan.late_max[:, j].topk(min(n, len(contexts))) for j in late_ids})
    rows = sorted({int(c) for top in want.values() for c, v in zip(top.indices, top.values) if v > 0})
    vocab = token_strings(lm.tokenizer, lm.W_E.shape[0])
    acts = {}
    for s in range(0, len(rows), 8):
        chunk = rows[s:s + 8]
        f, _, g = spliced_late_acts(lm, pair, contexts[chunk])
        for k, row in enumerate(chunk):
            acts[row] = (f[k].float().cpu(), g[k].float().cpu())
    out = {"early": [], "late": []}
    for (side, feat), top in want.items():
        at = 0 if side == "early" else 1
        pos = scan.early_pos if side == "early" else scan.late_pos
        total = scan.early_total if side == "early" else scan.late_total
        examples = [Example(int(c), [vocab[t] for t in contexts[int(c)].tolist()],
                            [_r(a) for a in acts[int(c)][at][:, feat].tolist()], int(pos[int(c), feat]), _r(v))
                    for c, v in zip(top.indices, top.values) if v > 0]
        out[side].append(FeatureExamples(feat, _r(total[feat]), examples))
    return out["early"], out["late"]


# ---- text -------------------------------------------------------------------------------------
TABLE = (Column("early", "early"), Column("late", "late"), Column("attribution", "attribution", ".4g"),
         Column("ablation", "ablation effect", ".4g"))
LATE_TABLE = (Column("feature", "late"), Column("total", "F (total act)", ".4g"),
              Column("features", "sum A (features)", ".4g"), Column("error", "A (error)", ".4g"),
              Column("error_share", "error share", ".3f"), Column("rest", "rest", ".4g"))


def format_text(result: ConnectionsResult) -> str:
    ag = result.agreement
    lines = [f"{result.early.hook_out} -> {result.late.hook_in} on {result.model or 'the default LM'}: "
             f"{result.n_contexts} contexts, {result.n_tokens} tokens ({result.outlier_rows} outlier rows left out)", "",
             format_rows([{**c.to_dict(), "rest": c.total - c.features - c.error} for c in result.late_features],
                         LATE_TABLE),
             "rest = F - sum A - A(error): what the nodes' first-order terms leave to biases, other paths "
             "(embeddings, attention) and curvature", "",
             "strongest connections (activation x gradient; ablation: F(clean) - F(early feature ablated))",
             format_rows([c.to_dict() for c in result.strongest], TABLE), "",
             f"agreement over {ag.n} ablated: signs {_pct(ag.sign_agreement)}, Spearman {_num(ag.spearman)}, "
             f"median ablation/attribution {_num(ag.median_ratio)}"]
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---- files --------------------------------------------------------------------------------------
def dashboard_href(dashboard: str | None, feature: int, page_dir: Path) -> str | None:
    """The relative link from `page_dir` to a feature's dashboard page (None without a folder)."""
    if not dashboard:
        return None
    return Path(os.path.relpath(Path(dashboard) / "features" / f"{feature}.html", page_dir)).as_posix()


def write_outputs(result: ConnectionsResult, out: Path) -> Path:
    """connections.json (+ its schema) and index.html in `out`; returns index.html."""
    from saelab.interpret.dashboard import render_page

    out = Path(out)
    write_json(out / RESULT_FILE, result.to_dict())
    write_json(out / "connections.schema.json", json_schema(ConnectionsResult, title="saelab connections result"))
    return render_page("connections.html", out / "index.html", r=result, page=_page_data(result, out))


def _page_data(result: ConnectionsResult, out: Path) -> dict:
    """Lookups the template needs: examples by feature, dashboard links and whether they exist."""
    def links(info: DictionaryInfo, ids) -> dict:
        """Every feature's page, or, of a dashboard already built, the pages it has."""
        built = bool(info.dashboard) and (Path(info.dashboard) / "index.html").exists()
        return {i: dashboard_href(info.dashboard, i, out) for i in ids
                if not built or (Path(info.dashboard) / "features" / f"{i}.html").exists()}

    early = {e.feature: e for e in result.early_examples}
    late = {e.feature: e for e in result.late_examples}
    listed = [c.early for lf in result.late_features for c in lf.top]
    return {"early": early, "late": late, "early_links": links(result.early, [*early, *listed]),
            "late_links": links(result.late, [*late, *(lf.feature for lf in result.late_features)]),
            "early_built": bool(result.early.dashboard) and (Path(result.early.dashboard) / "index.html").exists(),
            "late_built": bool(result.late.dashboard) and (Path(result.late.dashboard) / "index.html").exists()}
