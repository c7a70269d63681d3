"""Static HTML dashboard for a feature report (a `Report`, interpret/schema.py, as
`saelab.interpret.report.build_report` returns it): `index.html` lists every feature,
`features/<i>.html` shows one feature, and the same data goes beside them as `report.json` and
`features/<i>.json`, with `report.schema.json` describing both. This is the one writer of
those files.

Static files because researchers open them from disk (file://), offline, and pass folders around:
no server, no CDN, plain JS. Every string in a report comes from a corpus or a tokenizer and is
untrusted: Jinja2 escapes everything, and `visible_token` / `safe_text` turn whitespace,
control characters, bidi overrides and lone surrogates into visible, harmless text first.

Speed (a 4096-feature SAE has ~10^7 example tokens): token spans are built in Python from a
cache keyed by token string (a vocabulary is small, contexts are long), shading is a class
(`a1`..`a20`) rather than a computed style, tokens where a feature is 0 are
plain text, and every feature page uses one compiled template.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from functools import lru_cache
from html import escape
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, Undefined
from markupsafe import Markup

from saelab.atomic import json_default, write_text
from saelab.interpret.schema import SCHEMA_FILE, FeatureDetail, FeatureSummary, Report, report_schema
from saelab.progress import progress_bar

LEVELS = 20  # shading steps; static/dashboard.css defines .a1-.a20 (activation), .p/.n1-20 (delta)
WINDOW = (24, 8)  # tokens shown before / after an example's position until "full contexts" is on
_HERE = Path(__file__).parent
_WHITESPACE = {" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"}
_ESCAPED_CATEGORIES = {"Cc", "Cf", "Cs", "Cn", "Zl", "Zp"}


# ---- untrusted strings -> safe, visible text --------------------------------------------------
@lru_cache(maxsize=4096)
def _char_form(ch: str) -> str:
    """How one non-printable-ASCII character is shown: itself when harmless, else an escape.

    Lone surrogates from `errors="surrogateescape"` (U+DC80-U+DCFF) stand for one raw byte and
    are shown as that byte, `\\xNN`; other surrogates cannot be encoded and become U+FFFD."""
    if ch in _WHITESPACE:
        return _WHITESPACE[ch]
    cp = ord(ch)
    category = unicodedata.category(ch)
    if category == "Cs":
        return f"\\x{cp - 0xDC00:02x}" if 0xDC80 <= cp <= 0xDCFF else "\ufffd"
    if category not in _ESCAPED_CATEGORIES and cp not in (0xFFFE, 0xFFFF):
        return ch
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


_SPECIAL = re.compile(r"[^\x21-\x7e]")  # candidates: everything but printable ASCII


def _pieces(token: str) -> list[tuple[str, bool]]:
    """Split a token into (text, special) runs; special runs are whitespace glyphs / escapes."""
    out: list[tuple[str, bool]] = []
    for ch in token:
        form = _char_form(ch) if _SPECIAL.match(ch) else ch
        special = form != ch or ch == "\ufffd"
        if out and out[-1][1] == special:
            out[-1] = (out[-1][0] + form, special)
        else:
            out.append((form, special))
    return out


def visible_token(token: str) -> str:
    """A token as plain text: · space, ↵ newline, ⇥ tab, ␍ CR; control, format (bidi) and
    unencodable characters as `\\xNN` / `\\uNNNN`. The result is safe to encode as UTF-8."""
    return "".join(text for text, _ in _pieces(str(token)))


def safe_text(value):
    """Finalizer for every template output: strings keep their spaces and newlines but lose
    control, bidi and unencodable characters (as escapes); other values pass through."""
    if not isinstance(value, str) or isinstance(value, Markup):
        return value
    if value.isascii() and value.isprintable():
        return value
    return "".join(ch if ch in " \n\t" else (_char_form(ch) if _SPECIAL.match(ch) else ch) for ch in value)


@lru_cache(maxsize=1 << 17)
def _token_parts(token) -> tuple[str, str]:
    """(inner HTML, escaped title text) of one token; special runs are dimmed by <i>."""
    token = str(token)
    inner = "".join(f"<i>{escape(t)}</i>" if special else escape(t) for t, special in _pieces(token))
    return inner, escape(visible_token(token), quote=True)


def token_chip(token) -> Markup:
    """One token as an inline chip (logit tables, token lists)."""
    inner, title = _token_parts(token)
    return Markup(f'<code class="tok" title="{title}">{inner or "&#8709;"}</code>')


def _level(value: float, scale: float) -> int:
    """Shading step 1..LEVELS of |value| relative to `scale`; 0 for zero or unusable numbers."""
    ratio = abs(value) / scale if value and scale else 0.0
    return max(1, min(LEVELS, math.ceil(ratio * LEVELS))) if math.isfinite(ratio) and ratio > 0 else 0


def _usable_scale(scale, values: list) -> float:
    """`scale` when it is a positive finite number, else the largest |value| (or 1)."""
    if isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0:
        return float(scale)
    finite = [abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite, default=0.0) or 1.0


def _token_run(tokens: list, values: list, start: int, stop: int, scale: float, pos, delta: bool,
               excluded: dict | None = None) -> str:
    """HTML of tokens[start:stop]: plain text where the value is 0 or None (most tokens of a
    sparse feature, so pages stay small), else a shaded span titled `token = value`; tokens in
    `excluded` ({index: why}) are marked as left out of the scan, not as an activation of 0."""
    parts, parts_of = [], _token_parts
    append = parts.append
    values = values if len(values) >= stop else list(values) + [None] * (stop - len(values))
    for t in range(start, stop):
        v = values[t]
        if excluded and t in excluded:
            inner, title = parts_of(tokens[t])
            append(f'<span class="xb" title="{title}: {excluded[t]}">{inner}</span>')
            continue
        if not v and t != pos:
            append(parts_of(tokens[t])[0])
            continue
        inner, title = parts_of(tokens[t])
        v = v if isinstance(v, (int, float)) else None  # not a number: shown as not measured
        level = _level(v, scale) if v is not None else 0
        cls = (("n" if v < 0 else "p") if delta else "a") + str(level) if level else ""
        if t == pos:
            cls = f"{cls} m" if cls else "m"
        shown = "–" if v is None else f"{v:+.3g}" if delta else f"{v:.3g}"
        append(f'<span class="{cls}" title="{title} {"Δ" if delta else ""}= {shown}">{inner}</span>')
    return "".join(parts)


def tokens_html(tokens: list, values: list, scale: float, pos: int | None = None, delta: bool = False,
                excluded: dict | None = None) -> Markup:
    """Tokens shaded by `values`: orange for activations; red / blue for negative / positive
    ablation deltas (None = not measured); `excluded` ({index: why}) dashed and grey, as not
    scanned. `pos` is boxed; tokens more than WINDOW before / after it sit in `span.x` wrappers,
    hidden until the page shows full contexts."""
    n = len(tokens)
    if not isinstance(pos, int) or not 0 <= pos < n:
        pos = None
    lo, hi = (max(pos - WINDOW[0], 0), min(pos + WINDOW[1] + 1, n)) if pos is not None else (0, n)
    run = lambda a, b: _token_run(tokens, values, a, b, scale, pos, delta, excluded)  # noqa: E731
    html = run(lo, hi)
    if lo > 0:
        html = f'<span class="x">{run(0, lo)}</span><span class="el">… </span>{html}'
    if hi < n:
        html = f'{html}<span class="el"> …</span><span class="x">{run(hi, n)}</span>'
    return Markup(html)


def excluded_tokens(example: dict) -> dict[int, str]:
    """{index into tokens: why} for an example's positions the scan left out: context position 0
    is the BOS position, any other an outlier row (interpret/sources.py)."""
    first = example.get("start") or 0
    out = {}
    for i in example.get("excluded") or []:
        if isinstance(i, int):
            out[i] = "BOS, left out of the scan (no activation)" if first + i == 0 else \
                "outlier row (massive activation), left out of the scan (no activation)"
    return out


def example_html(example: dict, scale: float) -> Markup:
    acts = example.get("acts", [])
    return tokens_html(example.get("tokens", []), acts, _usable_scale(scale, acts), example.get("pos"),
                       excluded=excluded_tokens(example))


def ablation_source(row: dict, quantiles) -> str:
    """Which example an ablation row ablates (report.py): "top N", or "quantile lo – hi" for one
    sampled from that activation interval; tolerant of odd rows, like the rest of the page."""
    b, i = row.get("quantile"), row.get("example")
    if b is None:
        return f"top {i + 1}" if isinstance(i, int) else "top"
    try:
        return f"quantile {fmt(quantiles[b]['lo'], 3)} – {fmt(quantiles[b]['hi'], 3)}"
    except (TypeError, KeyError, IndexError):
        return "quantile"


def ablation_html(row: dict) -> Markup:
    deltas = row.get("delta", [])
    scale = _usable_scale(None, [row.get("base_act") or 0.0, *(d for d in deltas if d is not None)])
    return tokens_html(row.get("tokens", []), deltas, scale, row.get("pos"), delta=True)


# ---- small inline SVG charts ------------------------------------------------------------------
def histogram_svg(hist: dict | None, xlabel: str, width: int = 560, height: int = 170, color: str = "#e8833a") -> Markup:
    """Bar chart of {"edges": [n+1], "counts": [n]} with axis ticks; each bar has a hover title."""
    edges, counts = (hist or {}).get("edges") or [], (hist or {}).get("counts") or []
    if len(counts) == 0 or len(edges) != len(counts) + 1:
        return Markup('<p class="muted">no histogram</p>')
    left, bottom, top = 44, 30, 8
    pw, ph = width - left - 10, height - bottom - top
    x0, x1, cmax = float(edges[0]), float(edges[-1]), max(max(counts), 1)
    span = (x1 - x0) or 1.0
    sx = lambda v: left + (float(v) - x0) / span * pw  # noqa: E731
    bars = []
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        h = c / cmax * ph
        bars.append(f'<rect x="{sx(a):.1f}" y="{top + ph - h:.1f}" width="{max(sx(b) - sx(a) - 1, 0.5):.1f}" '
                    f'height="{h:.1f}"><title>[{float(a):.3g}, {float(b):.3g}): {int(c)}</title></rect>')
    ticks = []
    for k in range(5):
        v = x0 + span * k / 4
        ticks.append(f'<text x="{sx(v):.1f}" y="{height - bottom + 14}" text-anchor="middle">{v:.3g}</text>')
    axes = (f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>'
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>'
            f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{cmax}</text>'
            f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>'
            f'<text x="{left + pw / 2:.0f}" y="{height - 2}" text-anchor="middle">{escape(xlabel)}</text>')
    return Markup(f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">'
                  f'<g fill="{color}">{"".join(bars)}</g><g class="axis">{axes}{"".join(ticks)}</g></svg>')


# ---- formatting filters -----------------------------------------------------------------------
def fmt(value, digits: int = 4) -> str:
    """A number to `digits` significant digits; None / NaN as a dash."""
    if value is None or isinstance(value, Undefined) or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, (bool, int)) or not isinstance(value, float):
        return str(value)
    return f"{value:.{digits}g}"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True,
                      finalize=safe_text, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, chip=token_chip, visible=visible_token)
    env.globals.update(example_html=example_html, ablation_html=ablation_html, ablation_source=ablation_source,
                       histogram_svg=histogram_svg)
    return env


# ---- report -> files --------------------------------------------------------------------------
def _dumps(obj) -> str:
    """Compact JSON; NaN/Inf (invalid JSON) become null rather than breaking a browser's parser."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=json_default)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False, default=json_default)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_dashboard(report: Report | dict, out_dir, include_dead: bool = False, progress: bool | None = None) -> Path:
    """Write the dashboard for `report` into `out_dir`; return the path of index.html.

    `report` is a Report, or its JSON as a dict (read by Report.from_dict: a DataError says what
    is wrong with it). Writes index.html, report.json (the report with index summaries only),
    report.schema.json, static/, and for each feature carrying detail: features/<i>.json, plus
    features/<i>.html unless it is dead and `include_dead` is False. Every file is written
    atomically (temporary file, then rename); per-feature files skip the fsync (thousands of
    rebuildable files), index.html comes last."""
    report = report if isinstance(report, Report) else Report.from_dict(report)
    out = Path(out_dir)
    (out / "features").mkdir(parents=True, exist_ok=True)
    _copy_static(out / "static")
    env = _environment()
    features = sorted(report.features, key=lambda f: f.index)
    paged = [f.index for f in features if isinstance(f, FeatureDetail) and (include_dead or not f.dead)]
    sae = report.sae.to_dict()
    written = _write_features(env, out / "features", features, paged, sae, progress)
    _remove_stale(out / "features", written)
    summary = report.index_dict()
    write_text(out / "report.json", _dumps(summary))
    write_text(out / SCHEMA_FILE, json.dumps(report_schema(), indent=1) + "\n")
    index_html = env.get_template("index.html").render(
        report=summary, sae=sae, root="", features=[f.summary_dict() for f in features], paged=set(paged),
        stats=report.stats())
    return write_text(out / "index.html", index_html)


SYNTHETIC = "synthetic"  # <dashboard>/synthetic/<i>.json: `saelab maximize`'s texts, shown on the feature's page


def _synthetic(out: Path, index: int, max_act) -> dict | None:
    """The synthetic texts `saelab maximize` put beside the dashboard for feature `index`, with
    the shading scale shared by them and the dataset's examples; None when there are none."""
    path = out / SYNTHETIC / f"{index}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    acts = [t.get("act") for t in data.get("texts") or []] + [max_act]
    return {**data, "scale": _usable_scale(None, [a for a in acts if isinstance(a, (int, float))])}


def write_synthetic(out_dir, index: int, data: dict) -> Path:
    """Put `saelab maximize`'s result for feature `index` beside the dashboard in `out_dir`
    (synthetic/<i>.json) and redraw that feature's page with it; returns the page's path."""
    from saelab.errors import MissingFileError

    out = Path(out_dir)
    feature_json, report_json = out / "features" / f"{index}.json", out / "report.json"
    if not feature_json.is_file() or not report_json.is_file():
        raise MissingFileError(f"{out} has no page for feature {index} (features/{index}.json): give the dashboard "
                               "`saelab dashboard` wrote for this SAE, with that feature in it")
    write_text(out / SYNTHETIC / f"{index}.json", _dumps(data))
    paged = sorted(int(p.stem) for p in (out / "features").glob("*.html") if p.stem.isdigit())
    n = paged.index(index) if index in paged else None
    prev = paged[n - 1] if n else None
    nxt = paged[n + 1] if n is not None and n + 1 < len(paged) else None
    f = json.loads(feature_json.read_text(encoding="utf-8"))
    sae = json.loads(report_json.read_text(encoding="utf-8")).get("sae") or {}
    page = _environment().get_template("feature.html").render(
        f=f, sae=sae, prev=prev, next=nxt, root="../", synthetic=_synthetic(out, index, f.get("max_act")))
    return write_text(out / "features" / f"{index}.html", page)


def _write_features(env: Environment, folder: Path, features: list[FeatureSummary], paged: list[int], sae: dict,
                    progress: bool | None) -> set[str]:
    """features/<i>.json of every feature with detail, and <i>.html of the `paged` ones (linked
    to their neighbours); returns the names written."""
    neighbours = {i: (paged[n - 1] if n else None, paged[n + 1] if n + 1 < len(paged) else None)
                  for n, i in enumerate(paged)}
    page = env.get_template("feature.html")
    written, paged_set = set(), set(paged)
    for feat in progress_bar(features, desc="dashboard", unit="feature", enabled=progress):
        if not isinstance(feat, FeatureDetail):
            continue
        i, data = feat.index, feat.to_dict()
        written.add(write_text(folder / f"{i}.json", _dumps(data), fsync=False).name)
        if i in neighbours:
            prev, nxt = neighbours[i]
            synthetic = _synthetic(folder.parent, i, data.get("max_act"))
            html = page.render(f=data, sae=sae, prev=prev, next=nxt, root="../", paged=paged_set, synthetic=synthetic)
            written.add(write_text(folder / f"{i}.html", html, fsync=False).name)
    return written


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete feature pages / JSON a previous build left that this report does not have."""
    for path in folder.iterdir():
        if re.fullmatch(r"\d+\.(html|json)", path.name) and path.name not in keep:
            path.unlink()


def _copy_static(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted((_HERE / "static").iterdir()):
        if src.is_file():
            write_text(dest / src.name, src.read_text(encoding="utf-8"))


def render_page(template: str, path, **context) -> Path:
    """One page of templates/ written atomically to `path`, with static/ copied beside it: an
    experiment's view (e.g. connections.html) shaded and escaped exactly as the dashboard is."""
    path = Path(path)
    _copy_static(path.parent / "static")
    context.setdefault("sae", {})
    return write_text(path, _environment().get_template(template).render(root="", **context))
