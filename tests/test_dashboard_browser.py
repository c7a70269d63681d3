"""The dashboard in a real browser (headless Chromium): feature pages render shaded example
tokens, the index sorts and filters from its URL hash, hostile strings never run, and the page
script raises no error. Skipped only where Chromium is not installed (CI's .ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from saelab.interpret.dashboard import visible_token, write_dashboard
from tests.test_dashboard import make_report

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if BROWSER is None:
        pytest.skip("chromium is not installed (apt-get install chromium); CI's .ci/run installs it")
    report = make_report()
    out = tmp_path_factory.mktemp("site")
    write_dashboard(report, out, progress=False)
    return report, out, tmp_path_factory.mktemp("chromium-profile")


def _browse(site, page: str, *extra: str) -> tuple[str, str]:
    """(stdout, stderr) of Chromium opening file://<site>/<page> with `extra` flags."""
    _, out, profile = site
    path, _, fragment = page.partition("#")
    url = (out / path).as_uri() + (f"#{fragment}" if fragment else "")
    run = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console  # no script error, no log line: nothing injected ran
    return run.stdout, run.stderr


class _Dom(HTMLParser):
    """Start tags with attributes, in order, plus the text inside each <tr>'s first cell."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.first_cells: list[str] = []
        self._cell = -1
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._cell = 0
        elif tag == "td" and self._cell >= 0:
            self._cell += 1
            if self._cell == 1:
                self.first_cells.append("")

    def handle_data(self, data):
        if self._cell == 1:
            self.first_cells[-1] += data.strip()

    def attrs(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


def _no_injection(dom: _Dom) -> None:
    assert not dom.attrs("img")
    assert all("data-pwned" not in a for _, a in dom.tags)
    assert len(dom.attrs("script")) == 1


def test_feature_page_renders_shaded_examples(site):
    report, _, _ = site
    dom = _Dom(_browse(site, "features/7.html", "--dump-dom")[0])
    _no_injection(dom)
    assert "feature" in dom.attrs("body")[0]["class"]
    shaded = [a for a in dom.attrs("span") if re.fullmatch(r"a\d+( m)?", a.get("class", ""))]
    feat = report["features"][0]
    active = sum(1 for ex in feat["examples"] + [e for q in feat["quantiles"] for e in q["examples"]]
                 for v in ex["acts"] if v)
    assert len(shaded) == active
    top = feat["examples"][0]
    assert {"class": "a20 m", "title": f"{visible_token(top['tokens'][top['pos']])} = {top['act']:.3g}"} in shaded
    deltas = [a for a in dom.attrs("span") if re.fullmatch(r"[np]\d+", a.get("class", ""))]
    assert len(deltas) == 4  # top: -3.0, +1.5, -0.5; quantile: +0.25 (0.0 and None are plain text)


def test_full_context_toggle_and_arrow_keys_are_wired(site):
    dom = _Dom(_browse(site, "features/2.html", "--dump-dom")[0])
    assert {"id": "full", "type": "button", "aria-pressed": "false"} in dom.attrs("button")
    assert {"id": "next", "href": "7.html"} in dom.attrs("a")


def test_index_sorts_and_filters_from_hash(site):
    report, _, _ = site
    by_act = [str(f["index"]) for f in sorted(report["features"], key=lambda f: -f["max_act"])]
    dom = _Dom(_browse(site, "index.html#sort=max_act&dir=desc&dead=show", "--dump-dom")[0])
    _no_injection(dom)
    assert dom.first_cells == by_act
    assert {"data-key": "max_act", "data-type": "num", "aria-sort": "descending"} in dom.attrs("th")
    assert not [a for a in dom.attrs("tr") if "hidden" in a.get("class", "")]

    dom = _Dom(_browse(site, "index.html#sort=index&dir=desc&kind=prediction", "--dump-dom")[0])
    assert dom.first_cells == ["11", "7", "3", "2"]
    hidden = [cell for cell, a in zip(dom.first_cells, dom.attrs("tr")[1:]) if "hidden" in a.get("class", "")]
    assert hidden == ["3", "2"]  # 3 is dead (hidden by default) and a suppression feature, 2 suppression


def _hidden_and_count(html: str) -> tuple[list[str], str]:
    """(first cells of the hidden rows, the "N of M features" text) of a dumped index page."""
    dom = _Dom(html)
    hidden = [cell for cell, a in zip(dom.first_cells, dom.attrs("tr")[1:]) if "hidden" in a.get("class", "")]
    return hidden, re.search(r'<span id="count"[^>]*>([^<]*)</span>', html).group(1)


@pytest.mark.parametrize("hash_, shown", [
    ("dead=show&min_density=0.01&max_density=0.03", {"7"}),  # densities: 2 .009, 3 0, 7 .024, 11 .036
    ("dead=show&max_density=0.01", {"2", "3"}),
    ("min_max_act=12", {"7", "11"}),  # max acts: 2 10, 3 0 (dead, hidden anyway), 7 15, 11 19
    ("dead=show&min_density=0.001&min_max_act=10&kind=prediction", {"7", "11"}),
    ("dead=show&min_density=abc", {"2", "3", "7", "11"}),  # not a number: no bound
])
def test_index_numeric_filters_from_hash(site, hash_, shown):
    report, _, _ = site
    all_rows = {str(f["index"]) for f in report["features"]}
    hidden, count = _hidden_and_count(_browse(site, f"index.html#{hash_}", "--dump-dom")[0])
    assert set(hidden) == all_rows - shown
    assert count == f"{len(shown)} of {len(all_rows)} features"


def test_screenshot_shows_activation_shading(site, tmp_path):
    import numpy as np
    from PIL import Image

    shot = tmp_path / "feature.png"
    _browse(site, "features/7.html", "--window-size=1200,900", f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    r, g, b = np.asarray(image).astype(int).transpose(2, 0, 1)
    orange = int(((r > 235) & (g > 110) & (g < 215) & (b < 150)).sum())
    assert orange > 500  # the shaded tokens (rgba(255,128,0,a) on white) are on screen
