"""The static dashboard: hostile corpus strings come out as text, pages and links exist, the
JSON beside the pages is the report it was built from."""

from __future__ import annotations

import copy
import json
import math
import re
import unicodedata
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from saelab.errors import DataError
from saelab.interpret.dashboard import fmt, histogram_svg, safe_text, tokens_html, visible_token, write_dashboard
from saelab.interpret.schema import Report
from tests.dashboard_files import read_dashboard_json

# Strings a corpus or byte-level tokenizer can produce; each must render as inert text.
HOSTILE = [
    "<script>alert(1)</script>",
    '"onmouseover=alert(1) x="',
    "' onclick='alert(1)",
    "&amp;",
    "</span></div><img src=x onerror=\"document.body.dataset.pwned='img'\">",
    "<script>document.body.dataset.pwned='script'</script>",
    "\x00\x07\x1b[31m\x7f\x85",
    "\ud83d",  # lone high surrogate (half an emoji)
    "\udce2",  # surrogateescape'd byte 0xE2
    "\u202eevil\u202c",  # right-to-left override
    "\u2028",
    " the",
    "\n",
    "\t\t",
    "{{ 7*7 }}",
]


def _example(context: int, tokens: list, peak: float, pos: int) -> dict:
    acts = [0.0] * len(tokens)
    acts[pos] = peak
    if pos:
        acts[pos - 1] = peak / 2
    return {"context": context, "tokens": tokens, "acts": acts, "pos": pos, "act": peak}


def _feature(index: int, tokens: list, dead: bool = False, detail: bool = True) -> dict:
    feat = {"index": index, "density": 0.0 if dead else 0.003 * (index + 1), "max_act": 0.0 if dead else 8.0 + index,
            "mean_act": 0.0 if dead else 2.5, "top_logits": tokens[:5], "bottom_logits": tokens[5:10],
            "logit_skew": 1.25, "logit_kurtosis": 6.5, "kind": "prediction" if index % 2 else "suppression",
            "enc_dec_cos": 0.75, "dead": dead}
    if not detail:
        return feat
    peak = feat["max_act"]
    examples = [] if dead else [_example(n, tokens, peak - n, (3 * n + 2) % len(tokens)) for n in range(3)]
    if examples:  # its first token is the BOS position, which the scan left out
        examples[0].update(excluded=[0], acts=[None, *examples[0]["acts"][1:]])
    feat.update({
        "act_hist": {"edges": [0.0, 2.0, 4.0, 6.0, 8.0], "counts": [10, 4, 2, 1]},
        "top_tokens": [{"token": t, "count": 9 - n, "mean_act": 3.5 - n / 4} for n, t in enumerate(tokens[:6])],
        "examples": examples,
        "quantiles": [] if dead else [{"lo": 0.0, "hi": 4.0, "examples": examples[2:], "count": 30, "share": 0.75},
                                      {"lo": 4.0, "hi": peak, "examples": examples[:2], "count": 10, "share": 0.25}],
        "logit_hist": {"edges": [-2.0, -1.0, 0.0, 1.0, 2.0], "counts": [3, 40, 50, 7]},
        "coactive": [] if dead else [{"index": 7 if index == 2 else 2, "count": 12, "correlation": 0.41},
                                     {"index": 11, "count": 3, "correlation": 0.12}],
        "logits": {"top": [{"token": t, "value": 2.0 - n / 10} for n, t in enumerate(tokens[:8])],
                   "bottom": [{"token": t, "value": -2.0 + n / 10} for n, t in enumerate(tokens[8:])]},
        "ablation": [] if dead else [
            {"example": 0, "quantile": None, "pos": 4, "tokens": tokens, "base_act": 6.0,
             "delta": [-3.0, 1.5, -0.5, 0.0] + [None] * (len(tokens) - 4)},
            {"example": 0, "quantile": 1, "pos": 2, "tokens": tokens[:3], "base_act": 4.5, "delta": [0.25, 0.0, None]}],
        "embedding": {"encoder": [{"token": t, "score": 0.9 - n / 20} for n, t in enumerate(tokens[:7])],
                      "decoder": [{"token": t, "score": 0.8 - n / 20} for n, t in enumerate(tokens[7:])],
                      "scale": 4.0, "exponent": 2.0, "overlap": {"k": 7, "shared": 2, "jaccard": 0.1667}},
        "tree": None if dead else {
            "prompt": 'A typical definition of "<token>" would be \'', "vector": "both", "scale": 5.0,
            "roots": {"encoder": _tree_root(), "decoder": _tree_root("<b>")},
            "overlap": {"k": 2, "shared": 1, "jaccard": 0.3333}},
    })
    return feat


def _tree_root(first: str = "a word \u202e") -> dict:
    return {"text": "<script>alert(1)</script>", "prob": 1.0, "children": [
        {"text": first, "prob": 0.6, "children": [{"text": "\x1b used in \n code", "prob": 0.3, "children": []}]},
        {"text": "&amp; other", "prob": 0.2, "children": []}]}


def make_report() -> dict:
    """Four features: two full, one dead, one with index data only; indices not contiguous."""
    tokens = HOSTILE + ["def", " foo", "(", "):", "\n   ", " return"]
    return {
        "schema": 4,
        "sae": {"path": "/runs/<b>x</b>/saes/\u202ereverse", "arch": "relu", "d_in": 128, "d_sae": 16,
                "hook_name": "blocks.1.hook_resid_post", "model_name": "tiny \"model\" <i>"},
        "n_tokens": 4096,
        "dense_threshold": 0.025,
        "density_hist": {"edges": [-4.0, -3.0, -2.0, -1.0, 0.0], "counts": [1, 2, 0, 1]},
        "options": {"n_contexts": 8, "window": None},
        "features": [_feature(7, tokens), _feature(2, list(reversed(tokens))), _feature(3, tokens, dead=True),
                     _feature(11, tokens, detail=False)],
    }


class _Collector(HTMLParser):
    """Every start tag with its attributes, and all text, of one HTML page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_bytes().decode("utf-8"))  # strict: an unencodable surrogate would fail here
    parser.close()
    return parser


ALLOWED_TAGS = {"html", "head", "meta", "title", "link", "body", "header", "a", "span", "b", "code", "nav", "main",
                "section", "div", "h1", "h2", "h3", "p", "small", "aside", "table", "thead", "tbody", "tr", "th",
                "td", "i", "ul", "li", "button", "svg", "g", "rect", "line", "text", "input", "select", "option",
                "label", "script"}
ALLOWED_ATTRS = {"lang", "charset", "name", "content", "rel", "href", "class", "title", "id", "style", "type",
                 "aria-pressed", "aria-label", "data-key", "data-type", "data-default", "placeholder", "value",
                 "checked", "viewbox", "width", "height", "role", "fill", "x", "y", "x1", "y1", "x2", "y2",
                 "text-anchor", "src", "step", "data-density", "data-max-act"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    report = make_report()
    out = tmp_path_factory.mktemp("dash")
    index = write_dashboard(copy.deepcopy(report), out, progress=False)
    return report, out, index


def _pages(out: Path) -> list[Path]:
    return [out / "index.html", *sorted((out / "features").glob("*.html"))]


def test_pages_exist_for_features_with_detail(built):
    report, out, index = built
    assert index == out / "index.html" and index.is_file()
    assert sorted(p.name for p in (out / "features").glob("*.html")) == ["2.html", "7.html"]  # 3 is dead, 11 has no detail
    assert sorted(p.name for p in (out / "features").glob("*.json")) == ["2.json", "3.json", "7.json"]
    assert (out / "static" / "dashboard.css").is_file() and (out / "static" / "dashboard.js").is_file()
    assert not list(out.rglob("*.tmp"))


def test_include_dead_writes_dead_pages(tmp_path):
    write_dashboard(make_report(), tmp_path, include_dead=True, progress=False)
    assert (tmp_path / "features" / "3.html").is_file()
    assert 'href="7.html"' in (tmp_path / "features" / "3.html").read_text()


def assert_inert(page: Path) -> str:
    """What every dashboard page must be, whatever its data: only our tags and attributes, no
    event handler or javascript: URL, one script (ours), no <img>, only our width styles, and no
    raw control, bidi or surrogate character. Returns the page's text (what a reader sees)."""
    parsed = _parse(page)
    for tag, attrs in parsed.tags:
        assert tag in ALLOWED_TAGS, (page.name, tag)
        assert set(attrs) <= ALLOWED_ATTRS, (page.name, tag, attrs)
        assert not any(k.startswith("on") for k in attrs)
        assert not any("javascript:" in (v or "") for v in attrs.values())
    scripts = [a for t, a in parsed.tags if t == "script"]
    assert len(scripts) == 1 and scripts[0]["src"].endswith("static/dashboard.js")
    assert not [a for t, a in parsed.tags if t == "img"]
    styles = [a["style"] for _, a in parsed.tags if "style" in a]
    assert all(re.fullmatch(r"width: [\d.]+px", s) for s in styles), styles
    html = page.read_bytes().decode("utf-8")
    bad = {ch for ch in html if unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in "\n\t"}
    assert not bad, (page.name, bad)
    return "".join(parsed.text)


def test_no_injected_elements_or_attributes(built):
    _, out, _ = built
    for page in _pages(out):
        text = assert_inert(page)
        if page.name != "index.html":  # hostile tokens survive as visible text, entities included
            assert "<script>alert(1)</script>" in text
            assert "&amp;" in text and '"onmouseover=alert(1)' in text
            assert "{{·7*7·}}" in text  # template syntax in data is shown, not evaluated


def test_no_raw_control_bidi_or_surrogate_characters(built):
    _, out, _ = built
    feature = (out / "features" / "7.html").read_text()
    assert "\\x00\\x07\\x1b[31m\\x7f\\x85" in feature and "\\u202eevil\\u202c" in feature
    assert "\\xe2" in feature and "\ufffd" in feature and "\\u2028" in feature


def test_links_resolve(built):
    _, out, _ = built
    for page in _pages(out):
        for tag, attrs in _parse(page).tags:
            ref = attrs.get("href") or attrs.get("src")
            if tag in ("a", "link", "script") and ref:
                parts = urlsplit(ref)
                assert not parts.scheme and not parts.netloc, ref  # nothing leaves the folder
                assert (page.parent / parts.path).resolve().is_file(), (page.name, ref)
    prev_next = _parse(out / "features" / "2.html").tags
    assert ("a", {"id": "next", "href": "7.html"}) in prev_next
    assert not any(a.get("id") == "prev" for _, a in prev_next)


def test_index_lists_every_feature_and_links_pages(built):
    report, out, _ = built
    parsed = _parse(out / "index.html")
    rows = [a for t, a in parsed.tags if t == "tr"]
    assert len(rows) == 1 + len(report["features"])  # header + one per feature
    dead = [a for t, a in parsed.tags if t == "tr" and a.get("class") == "dead"]
    assert dead == [{"id": "f3", "class": "dead", "data-density": "0.0", "data-max-act": "0.0"}]  # f3: a link target
    hrefs = {a["href"] for t, a in parsed.tags if t == "a" and a.get("href", "").startswith("features/")}
    assert hrefs == {"features/2.html", "features/7.html"}
    assert len([1 for t, a in parsed.tags if t == "rect"]) == len(report["density_hist"]["counts"])


def test_index_caption_and_numeric_filter_inputs(built):
    report, out, _ = built
    parsed = _parse(out / "index.html")
    text = " ".join("".join(parsed.text).split())
    assert "dead features (density 0: 1 here) are counted in the leftmost bin" in text
    assert "dense (> 0.025)1" in text  # the report's threshold: only feature 11 (density 0.036) is above
    assert "left out" not in text
    rows = [a for t, a in parsed.tags if t == "tr"][1:]
    want = sorted((f["index"], f["density"], f["max_act"]) for f in report["features"])
    assert [(float(a["data-density"]), float(a["data-max-act"])) for a in rows] == [w[1:] for w in want]
    inputs = {a["id"]: a for t, a in parsed.tags if t == "input"}
    assert all(inputs[i]["type"] == "number" and inputs[i]["step"] == "any" for i in ("dmin", "dmax", "amin"))


def test_feature_page_shows_overlaps_ablation_sources_and_both_trees(built):
    _, out, _ = built
    parsed = _parse(out / "features" / "7.html")
    text = " ".join("".join(parsed.text).split())
    assert "the two lists share 2 of 7 tokens · Jaccard 0.167" in text
    assert "first-level continuations shared by the two trees: 1 of 2 · Jaccard 0.333" in text
    assert "encoder vector" in text and "decoder vector" in text and "Definition trees" in text
    assert text.count("<script>alert(1)</script>") >= 2 and "<b>" in text  # both roots, as text
    sources = [d.strip() for d in _texts_of_class(out / "features" / "7.html", "src")]
    assert sources == ["top 1", "quantile 4 – 15"]  # feature 7's bin 1 is [4, max_act 15]


def _texts_of_class(page: Path, cls: str) -> list[str]:
    """Text of every <span class=cls> of a page (no nested spans inside)."""
    html = page.read_text(encoding="utf-8")
    return [unescape(m) for m in re.findall(rf'<span class="{cls}">([^<]*)</span>', html)]


def test_exported_json_equals_input(built):
    report, out, _ = built
    assert read_dashboard_json(out) == report
    summary = json.loads((out / "report.json").read_text())
    assert summary["features"][0] == {k: v for k, v in report["features"][0].items()
                                      if k in ("index", "density", "max_act", "mean_act", "top_logits", "bottom_logits",
                                               "logit_skew", "logit_kurtosis", "kind", "enc_dec_cos", "dead")}
    assert json.loads((out / "features" / "7.json").read_text()) == report["features"][0]


def test_non_finite_numbers_become_null_json(tmp_path):
    report = make_report()
    report["features"][0]["max_act"] = math.nan
    write_dashboard(report, tmp_path, progress=False)
    strict = json.loads((tmp_path / "features" / "7.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["max_act"] is None


def test_visible_token_known_answers():
    assert visible_token(" the\n") == "·the↵"
    assert visible_token("\t\r") == "⇥␍"
    assert visible_token("\x00\x1b\x7f\x9f") == "\\x00\\x1b\\x7f\\x9f"
    assert visible_token("\u202eab") == "\\u202eab"
    assert visible_token("\ud83d") == "\ufffd"
    assert visible_token("\udcff") == "\\xff"
    assert visible_token("héllo 日本 😀") == "héllo·日本·😀"
    assert visible_token("\U000e0001") == "\\U000e0001"  # a format character outside the BMP
    for token in HOSTILE:
        visible_token(token).encode("utf-8")


def test_safe_text_keeps_spacing_drops_controls():
    assert safe_text("a b\n\tc") == "a b\n\tc"
    assert safe_text("x\x1by\u202ez\udcc3") == "x\\x1by\\u202ez\\xc3"
    assert safe_text(3.5) == 3.5


def test_tokens_html_shading_window_and_titles():
    tokens = [f"t{n}" for n in range(40)]
    acts = [0.0] * 40
    acts[30], acts[29], acts[2] = 10.0, 5.0, 0.4
    html = str(tokens_html(tokens, acts, 10.0, pos=30))
    hidden_before = "t0t1" + '<span class="a1" title="t2 = 0.4">t2</span>' + "".join(f"t{n}" for n in range(3, 6))
    shown = "".join(f"t{n}" for n in range(6, 29)) + '<span class="a10" title="t29 = 5">t29</span>' \
        + '<span class="a20 m" title="t30 = 10">t30</span>' + "".join(f"t{n}" for n in range(31, 39))
    assert html == (f'<span class="x">{hidden_before}</span><span class="el">… </span>{shown}'
                    '<span class="el"> …</span><span class="x">t39</span>')  # window: 30 - 24 .. 30 + 8
    whole = str(tokens_html([" <a>", "\n"], [1.0, 0.0], 4.0))
    assert whole == '<span class="a5" title="·&lt;a&gt; = 1"><i>·</i>&lt;a&gt;</span><i>↵</i>'
    deltas = str(tokens_html(["a", "b", "c", "d"], [-2.0, 1.0, 0.0, None], 2.0, pos=3, delta=True))
    assert deltas == ('<span class="n20" title="a Δ= -2">a</span><span class="p10" title="b Δ= +1">b</span>'
                      'c<span class="m" title="d Δ= –">d</span>')


def test_histogram_svg_bars_proportional():
    svg = str(histogram_svg({"edges": [0, 1, 2, 3], "counts": [2, 4, 1]}, "x", width=110, height=138))
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert heights == pytest.approx([50.0, 100.0, 25.0])  # plot height = 138 - 30 - 8
    assert "no histogram" in str(histogram_svg({"edges": [0, 1], "counts": [1, 2]}, "x"))


def test_fmt():
    assert [fmt(None), fmt(math.nan), fmt(3), fmt(0.000123456), fmt(1234.5678, 3), fmt(True), fmt("<b>")] == \
        ["–", "–", "3", "0.0001235", "1.23e+03", "True", "<b>"]


def test_odd_values_in_lists_still_render(tmp_path):
    """The reader checks keys and scalar fields, not each of the millions of list elements: an
    odd activation shows as not measured, an ablation row naming a missing bin as "quantile"."""
    report = make_report()
    feat = report["features"][0]
    feat["examples"][0]["acts"] = ["x"] * len(feat["examples"][0]["acts"])
    feat["ablation"][1]["quantile"] = 9
    write_dashboard(report, tmp_path, progress=False)
    page = (tmp_path / "features" / "7.html").read_text()
    assert 'title="def = –">def</span>' in page
    assert "quantile" in [d.strip() for d in _texts_of_class(tmp_path / "features" / "7.html", "src")]


def _schema1(report: dict) -> dict:
    """`report` as schema 1 wrote it: no dense threshold or options; feature 7's tree as one
    "vector" + "root" (as reports did before "roots")."""
    old = {k: v for k, v in copy.deepcopy(report).items() if k not in ("dense_threshold", "options")}
    tree = old["features"][0]["tree"]
    old["features"][0]["tree"] = {"prompt": tree["prompt"], "vector": "decoder", "scale": tree["scale"],
                                  "root": tree["roots"]["decoder"]}
    return {**old, "schema": 1}


def test_schema_1_reports_are_read(tmp_path):
    """Their dense threshold was the renderer's 0.1, and a one-tree "root" becomes "roots"."""
    old = _schema1(make_report())
    report = Report.from_dict(old)
    assert report.schema == 4 and report.dense_threshold == 0.1 and report.options is None
    tree = report.features[0].tree
    assert list(tree.roots) == ["decoder"] and tree.overlap is None and tree.vector == "decoder"
    write_dashboard(old, tmp_path, progress=False)
    text = " ".join("".join(_parse(tmp_path / "features" / "7.html").text).split())
    assert "decoder vector" in text and "encoder vector" not in text
    index = " ".join("".join(_parse(tmp_path / "index.html").text).split())
    assert "dense (> 0.1)0" in index
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == 4


def test_schema_2_reports_are_read_and_outlier_rows_are_shown(tmp_path):
    """Schema 2 had no outlier rows; a schema-3 report shows how many the scan skipped."""
    old = {k: v for k, v in make_report().items() if k != "outliers"}
    report = Report.from_dict({**old, "schema": 2})
    assert report.schema == 4 and report.outliers is None
    write_dashboard({**old, "schema": 2}, tmp_path / "old", progress=False)
    assert "outlier rows" not in " ".join(_parse(tmp_path / "old" / "index.html").text)
    new = {**old, "outliers": {"multiple": 10.0, "skipped": 37, "positions": [[1, 30], [57, 7]],
                               "tokens": [{"token": "<|endoftext|>", "count": 7}]}}
    assert Report.from_dict(new).outliers.skipped == 37
    write_dashboard(new, tmp_path / "new", progress=False)
    index = " ".join("".join(_parse(tmp_path / "new" / "index.html").text).split())
    assert "outlier rows skipped37" in index


@pytest.mark.parametrize("bad, what", [
    ([], "is a JSON object (a dict), got list"),
    ({"schema": 5, "features": []}, "schema 5 is not supported; this saelab reads schemas 1, 2, 3, 4"),
    ({**make_report(), "features": None}, "report.features: expected a list, got null"),
    ({**make_report(), "features": [{"density": 0.1}]}, "report.features[0]: missing key 'index'"),
    ({**make_report(), "features": [make_report()["features"][3]] * 2}, "feature index 11 appears twice"),
    ({**make_report(), "n_tokens": "4096"}, "report.n_tokens: expected integer, got str"),
    ({**make_report(), "dense": 1}, "report: unknown key 'dense'"),
    ({k: v for k, v in make_report().items() if k != "sae"}, "report: missing key 'sae'"),
])
def test_bad_reports_are_rejected(bad, what, tmp_path):
    with pytest.raises(DataError, match=re.escape(what)):
        Report.from_dict(bad)
    with pytest.raises(DataError, match=re.escape(what)):
        write_dashboard(bad, tmp_path / "x", progress=False)


def test_bad_feature_fields_are_named_where_they_are(tmp_path):
    report = make_report()
    report["features"][0]["examples"][1]["pos"] = "2"
    with pytest.raises(DataError, match=re.escape("report.features[0].examples[1].pos: expected integer, got str")):
        write_dashboard(report, tmp_path, progress=False)
    report = make_report()
    report["features"][1]["tree"]["roots"]["encoder"]["children"][0]["prob"] = "high"
    with pytest.raises(DataError, match=re.escape("features[1].tree.roots.encoder.children[0].prob: expected number")):
        write_dashboard(report, tmp_path, progress=False)


def test_rebuild_removes_pages_the_new_report_lacks(tmp_path):
    write_dashboard(make_report(), tmp_path, include_dead=True, progress=False)
    (tmp_path / "features" / "notes.html").write_text("mine")
    smaller = make_report()
    smaller["features"] = smaller["features"][:1]
    write_dashboard(smaller, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["7.html", "7.json", "notes.html"]
    assert read_dashboard_json(tmp_path) == smaller


def test_bad_positions_and_short_values_do_not_break_rendering():
    for pos in (-3, 5, None, "1"):
        html = str(tokens_html(["a", "b", "c"], [0.0, 2.0], 2.0, pos=pos))
        assert html == 'a<span class="a20" title="b = 2">b</span>c'


def test_command_finds_sae_folders_of_a_run(tmp_path):
    from saelab.commands.dashboard import out_dirs
    from saelab.sae.format import sae_folders
    from saelab.errors import MissingFileError
    from saelab.sae import SAE

    run = tmp_path / "run"
    for name in ("b_l1", "a_l1"):
        SAE(8, 16).save(run / "saes" / name)
    (run / "saes" / "notes").mkdir()
    assert sae_folders(run) == [run / "saes" / "a_l1", run / "saes" / "b_l1"]
    assert out_dirs(run, sae_folders(run), None) == [run / "dashboard" / "a_l1", run / "dashboard" / "b_l1"]
    one = run / "saes" / "a_l1"
    assert sae_folders(one) == [one]
    assert out_dirs(one, [one], None) == [one / "dashboard"]
    assert out_dirs(one, [one], tmp_path / "o") == [tmp_path / "o"]
    with pytest.raises(MissingFileError, match="neither an SAE folder"):
        sae_folders(run / "saes" / "notes")


@pytest.mark.slow
def test_command_builds_a_dashboard_per_sae_of_a_run(tmp_path, save_tiny_hf, capsys):
    """`saelab dashboard RUN` end to end on a tiny random LM: one dashboard per SAE, the
    report JSON beside it equal to build_report's with the same options."""
    from saelab.cli import main
    from saelab.interpret.report import build_report
    from saelab.sae import SAE

    model = save_tiny_hf("gpt_neox", tmp_path / "lm")
    text = tmp_path / "corpus.jsonl"
    words = [f"w{(7 * n * n + 3 * n) % 62 + 2}" for n in range(8000)]
    text.write_text("".join(json.dumps({"text": " ".join(words[i:i + 40])}) + "\n" for i in range(0, len(words), 40)))
    run = tmp_path / "run"
    for seed, name in enumerate(("a", "b")):
        torch_seed(seed)
        SAE(32, 24, arch="topk", k=4, hook_name="blocks.0.hook_resid_post", model_name=str(model)).save(run / "saes" / name)
    opts = ["--source", str(text), "--scan-contexts", "6", "--context-length", "16", "--lm-batch-size", "4",
            "--ablate", "1", "--ablate-quantile", "0", "--ablate-back", "0", "--embedding-exponent", "2",
            "--window", "4", "2"]
    assert main(["dashboard", str(run), *opts]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(run / "dashboard" / n / "index.html") for n in ("a", "b")]
    expected = build_report(run / "saes" / "b", str(model), n_contexts=6, context_length=16, corpus=str(text), batch_size=4,
                            n_ablate=1, n_ablate_quantile=0, ablate_max_back=None, embedding_exponent=2.0,
                            window=(4, 2)).to_dict()
    assert all(len(f["ablation"]) <= 1 and f["embedding"]["exponent"] == 2.0 for f in expected["features"] if "ablation" in f)
    assert read_dashboard_json(run / "dashboard" / "b") == json.loads(json.dumps(expected))
    live = [f["index"] for f in expected["features"] if not f["dead"]]
    assert sorted(int(p.stem) for p in (run / "dashboard" / "b" / "features").glob("*.html")) == live


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def test_feature_page_shows_logit_histogram_band_shares_coactive_links_and_bos_excluded(built):
    report, out, _ = built
    page = _parse(out / "features" / "7.html")
    text = " ".join("".join(page.text).split())
    assert len([a for t, a in page.tags if t == "svg"]) == 2  # activations, and every token's logit weight
    assert "logit weight (tokens per bin)" in text
    assert "· 75.0% of its activations" in text and "· 25.0% of its activations" in text
    links = [a["href"] for t, a in page.tags if t == "a"]
    assert "2.html" in links  # a co-active feature with a page
    assert "../index.html#f11" in links  # one without: its row of the index
    assert "Fires with" in text
    bos = [a for t, a in page.tags if t == "span" and a.get("class") == "xb"]
    assert len(bos) == 2 and all("BOS, left out of the scan" in a["title"] for a in bos)  # top 1, and in a quantile bin
    index = _parse(out / "index.html")
    assert {"f2", "f3", "f7", "f11"} <= {a.get("id") for t, a in index.tags if t == "tr"}


def test_an_outlier_row_in_an_example_is_marked_as_such():
    from saelab.interpret.dashboard import excluded_tokens

    assert excluded_tokens({"excluded": [0, 3]}) == {0: "BOS, left out of the scan (no activation)",
                                                     3: "outlier row (massive activation), left out of the scan "
                                                        "(no activation)"}
    assert list(excluded_tokens({"excluded": [0], "start": 5}).values())[0].startswith("outlier row")
    assert excluded_tokens({}) == {}
