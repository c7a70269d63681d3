"""`saelab maximize`'s page (maximize.html): the synthetic texts and the dataset's top example,
shaded on one scale with the dashboard's own token view and stylesheet (inlined, so the page
opens from disk alone), and a link to the feature's dashboard page when one was given. With a
dashboard the same texts also go on the feature's page (`interpret.dashboard.write_synthetic`).
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from saelab.atomic import write_text


def maximize_html(result: dict, dashboard_page: str | None = None) -> str:
    """The page of a `MaximizeResult.to_dict()`; `dashboard_page`: the feature's page, relative."""
    from saelab.interpret.dashboard import _HERE, _usable_scale, example_html, visible_token

    css = (_HERE / "static" / "dashboard.css").read_text(encoding="utf-8")
    texts, top = result.get("texts") or [], result.get("dataset")
    scale = _usable_scale(None, [t["act"] for t in texts] + ([top["act"]] if top else []))

    def row(ex: dict, note: str = "") -> str:
        return (f'<div class="ex"><span class="v">{ex["act"]:.4g}</span>{note}'
                f'<div class="toks">{example_html(ex, scale)}</div></div>')

    rows = "".join(row(t, f'<span class="src">log p {t["mean_logprob"]:.2f}</span>') for t in texts)
    dataset = row(top, f'<span class="src">{escape(top["source"])}</span>') if top and top["tokens"] else ""
    verdict = ("" if result.get("beats") is None else "above the dataset's top example" if result["beats"]
               else f"not above the dataset's top example: {escape(result.get('why_not') or '')}")
    link = f' · <a href="{escape(dashboard_page)}">dashboard page</a>' if dashboard_page else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Feature {result['feature']}: synthetic text</title>
<style>{css}</style></head><body class="feature"><main style="padding:16px;max-width:1100px">
<h1>Feature {result['feature']} <small class="muted">{escape(result['hook'] or '')} · {escape(result['sae'])}{link}</small></h1>
<section class="panel"><h2>Synthetic max-activating text <small class="muted">{result['evaluated']} texts scored</small></h2>
{rows}<p class="muted">{verdict}</p></section>
<section class="panel"><h2>The dataset's top example</h2>{dataset or '<p class="muted">none</p>'}</section>
</main></body></html>
"""


def write_maximize_page(result: dict, out_dir: str | Path, dashboard: str | Path | None = None) -> Path:
    """maximize.html in `out_dir`, linking to the feature's page in `dashboard` if given."""
    out = Path(out_dir)
    page = None
    if dashboard is not None:
        page = os.path.relpath(Path(dashboard) / "features" / f"{result['feature']}.html", out)
    return write_text(out / "maximize.html", maximize_html(result, page))
