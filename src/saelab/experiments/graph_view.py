"""The attribution graph as one self-contained HTML page (inline SVG, CSS and a few lines of JS;
opens from disk, offline). Layers run bottom to top (token embeddings, each layer's features
and error nodes, the logit), positions left to right. A node's size is its influence on the
logit; an edge is blue when it raises its target, red when it lowers it, thicker when larger.
Hovering a node lights its edges; a feature with a dashboard page links to it. Every token is
untrusted text: shown through `visible_token` and escaped.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from saelab.atomic import write_text

COL_MIN, ROW_H, STEP, MARGIN = 90, 120, 15, 60

STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 6px} p{margin:4px 0} .warn{color:#b7410e;font-weight:600}
svg text{font:11px monospace;fill:#333} .lay{fill:#777;font:12px system-ui}
line{stroke-linecap:round} line.p{stroke:#2563eb} line.n{stroke:#dc2626}
svg.focus line{opacity:.06} svg.focus line.hi{opacity:.95}
.node circle,.node rect,.node path{stroke:#333;stroke-width:1} .feature circle{fill:#f6ad55}
.error rect{fill:#cbd5e0} .embedding rect{fill:#9ae6b4} .logit path{fill:#b794f4}
a .node circle{fill:#ed8936} .node:hover *{stroke-width:2.5}
table{border-collapse:collapse;margin-top:12px} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
code{background:#f3f3f3;padding:0 3px}
"""

SCRIPT = """
const svg=document.querySelector('svg');
document.querySelectorAll('.node').forEach(n=>{
 n.addEventListener('mouseenter',()=>{svg.classList.add('focus');
  svg.querySelectorAll(`line[data-s="${n.id}"],line[data-t="${n.id}"]`).forEach(l=>l.classList.add('hi'));});
 n.addEventListener('mouseleave',()=>{svg.classList.remove('focus');
  svg.querySelectorAll('line.hi').forEach(l=>l.classList.remove('hi'));});});
"""


def _tok(token: str) -> str:
    from saelab.interpret.dashboard import visible_token

    return escape(visible_token(token))


def layout(result) -> tuple[dict[str, tuple[float, float]], int, int, list[float]]:
    """(node key -> (x, y), width, height, column x centres): rows by layer, columns by position."""
    rows = result.n_layers + 2
    row = {n.key(): 0 if n.kind == "embedding" else rows - 1 if n.kind == "logit" else n.layer + 1 for n in result.nodes}
    cells: dict[tuple[int, int], list] = {}
    for n in sorted(result.nodes, key=lambda n: -n.influence):
        cells.setdefault((row[n.key()], n.pos), []).append(n.key())
    seq = len(result.tokens)
    widths = [max([COL_MIN] + [len(v) * STEP + 20 for (r, p), v in cells.items() if p == pos]) for pos in range(seq)]
    centres, x = [], MARGIN
    for w in widths:
        centres.append(x + w / 2)
        x += w
    height = rows * ROW_H + 40
    where = {}
    for (r, pos), keys in cells.items():
        for i, key in enumerate(keys):
            where[key] = (centres[pos] + (i - (len(keys) - 1) / 2) * STEP, height - 50 - r * ROW_H)
    return where, int(x + 20), height, centres


def _shape(n, x: float, y: float, r: float) -> str:
    if n.kind == "feature":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}"/>'
    if n.kind == "logit":
        return f'<path d="M{x:.1f} {y - r - 3:.1f}l{r + 3:.1f} {r + 3:.1f}l{-r - 3:.1f} {r + 3:.1f}l{-r - 3:.1f} {-r - 3:.1f}z"/>'
    return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}"/>'


def _node(n, x: float, y: float, link: str | None) -> str:
    r = 3 + 6 * min(1.0, (n.influence * 4) ** 0.5) if n.kind != "logit" else 7
    what = {"feature": f"L{n.layer} feature {n.feature} = {n.value:.3g}", "error": f"L{n.layer} error (norm {n.value:.3g})",
            "embedding": f"embedding (norm {n.value:.3g})", "logit": f"logit {n.value:.3g}"}[n.kind]
    title = f"{what} at {n.pos} {_tok(n.token)}; influence {n.influence:.3f}" + (
        f"; bias {n.bias:.3g}" if n.bias is not None else "")
    label = f'<text x="{x:.1f}" y="{y + 22:.1f}" text-anchor="middle">{_tok(n.token)}</text>' if n.kind in (
        "embedding", "logit") else ""
    body = f'<g class="node {n.kind}" id="{escape(n.key())}"><title>{title}</title>{_shape(n, x, y, r)}{label}</g>'
    return f'<a href="{escape(link)}">{body}</a>' if link else body


def graph_svg(result) -> str:
    where, width, height, centres = layout(result)
    big = max((abs(e.weight) for e in result.edges), default=1.0) or 1.0
    lines = []
    for e in sorted(result.edges, key=lambda e: abs(e.weight)):
        (x1, y1), (x2, y2) = where[e.source], where[e.target]
        w = abs(e.weight) / big
        lines.append(f'<line class="{"p" if e.weight > 0 else "n"}" data-s="{escape(e.source)}" data-t="{escape(e.target)}" '
                     f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke-width="{0.5 + 4 * w:.2f}" '
                     f'opacity="{0.2 + 0.7 * w:.2f}"><title>{e.weight:+.4g}</title></line>')
    names = ["embeddings"] + [f"layer {i}" for i in range(result.n_layers)] + ["logit"]
    rows = [f'<text class="lay" x="4" y="{height - 46 - r * ROW_H}">{name}</text>' for r, name in enumerate(names)]
    toks = [f'<text x="{c:.1f}" y="{height - 8}" text-anchor="middle">{p}: {_tok(t)}</text>'
            for p, (c, t) in enumerate(zip(centres, result.tokens))]
    nodes = [_node(n, *where[n.key()], result.links.get(n.key())) for n in result.nodes]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            + "".join(rows + toks + lines + nodes) + "</svg>")


def graph_html(result) -> str:
    top = sorted((n for n in result.nodes if n.kind != "logit"), key=lambda n: -n.influence)[:25]
    table = "".join(f"<tr><td>{n.kind}</td><td>{'' if n.layer is None else n.layer}</td><td>{n.pos}</td>"
                    f"<td><code>{_tok(n.token)}</code></td><td>{'' if n.feature is None else n.feature}</td>"
                    f"<td>{n.value:.3g}</td><td>{n.influence:.3f}</td></tr>" for n in top)
    warn = f'<p class="warn">{escape(result.warning)}</p>' if result.warning else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Attribution graph</title>
<style>{STYLE}</style></head><body>
<h1>Attribution graph: <code>{_tok(result.logit_token)}</code> after
<code>{"".join(_tok(t) for t in result.tokens)}</code></h1>
<p>{escape(result.model)} · logit {result.logit:.4g} (p = {result.logit_prob:.3f}) · {result.total_nodes} nodes,
{result.total_edges} edges; kept {len(result.nodes)} nodes and {len(result.edges)} edges carrying
{result.kept_fraction:.1%} of the influence on the logit · error nodes {result.error_fraction:.1%}</p>{warn}
<p>blue edges raise their target, red lower it · size: influence on the logit · squares: token embeddings (green) and
error nodes (grey) · circles: transcoder features (darker ones link to their dashboard page) · hover a node to see its edges</p>
{graph_svg(result)}
<table><tr><th>kind</th><th>layer</th><th>pos</th><th>token</th><th>feature</th><th>value</th><th>influence</th></tr>
{table}</table>
<script>{SCRIPT}</script></body></html>
"""


def write_graph_page(result, path: str | Path) -> Path:
    return write_text(path, graph_html(result))
