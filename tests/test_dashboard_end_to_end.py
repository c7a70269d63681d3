"""Hostile text end to end: .txt files holding HTML, control characters, bidi overrides and
invalid UTF-8 -> a byte-level BPE tokenizer trained on them -> a tiny LM -> build_report on
held-out contexts -> write_dashboard. Every page must stay inert whatever the tokenizer cut the
text into, show the hostile text as text, and the JSON beside the pages must round-trip."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from saelab.data.corpus import load_text_files
from saelab.interpret.dashboard import write_dashboard
from saelab.interpret.report import build_report
from saelab.lm.default import train_tokenizer
from saelab.lm.hooked import HookedLM
from saelab.sae import SAE
from tests.dashboard_files import read_dashboard_json
from tests.test_dashboard import assert_inert

HOOK = "blocks.0.hook_resid_post"
LINES = [
    b"<script>alert(1)</script>",
    b'"><img src=x onerror=alert(1)>',
    b"ctrl \x00\x07\x1b[31m\x7f end",
    "bidi \u202eevil\u202c and \u2066isolate\u2069".encode(),
    b"bad bytes \xff\xfe\xc3\x28\xe2\x82 here",
    b"{{ 7*7 }} &amp; it",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(20):  # several documents: the held-out split is by document
        lines = [LINES[(d + n) % len(LINES)] + b" word%d" % (n % 7) for n in range(60)]
        (corpus / f"doc{d:02d}.txt").write_bytes(b"\n".join(lines))
    docs = load_text_files(corpus).documents
    tokenizer = train_tokenizer(docs, vocab_size=400, context_length=32)
    torch.manual_seed(0)
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                        bos_token_id=0, eos_token_id=0)
    GPTNeoXForCausalLM(cfg).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    lm = HookedLM.load(root / "lm")
    sae = SAE(lm.d_model, 8, arch="relu", hook_name=HOOK)
    with torch.no_grad():
        sae.W_enc.normal_()  # dense features: every context shows up among the examples
    report = build_report(sae, lm, corpus=str(corpus), n_contexts=8, context_length=32, batch_size=8,
                          tree=True, tree_vector="both", tree_depth=2, tree_breadth=2, tree_filter=False,
                          progress=False).to_dict()
    out = root / "dashboard"
    write_dashboard(report, out, include_dead=True, progress=False)
    return report, out


def _example_tokens(report: dict) -> set[str]:
    return {t for f in report["features"] for ex in f.get("examples", []) for t in ex["tokens"]}


def test_hostile_text_reaches_the_report(built):
    """Guard: the pages below are only a test of escaping if the tokens really are hostile."""
    report, _ = built
    tokens = _example_tokens(report)
    joined = "".join(tokens)
    assert "<" in joined and ">" in joined and '"' in joined
    categories = {unicodedata.category(ch) for t in tokens for ch in t}
    assert "Cc" in categories and "Cf" in categories  # control and bidi characters
    assert "\ufffd" in joined  # the invalid bytes


def test_pages_are_inert_and_show_the_text(built):
    report, out = built
    pages = [out / "index.html", *sorted((out / "features").glob("*.html"))]
    assert len(pages) == 1 + len(report["features"])
    texts = [assert_inert(page) for page in pages]
    shown = "".join(texts[1:])
    assert "<script>alert(1)</script>" in shown
    assert '"><img·src=x·onerror=alert(1)>' in shown
    assert "\\u202e" in shown and "\\x1b" in shown


def test_json_round_trips(built):
    report, out = built
    assert read_dashboard_json(out) == json.loads(json.dumps(report))
    for page in (out / "features").glob("*.json"):
        json.loads(page.read_text(encoding="utf-8"), parse_constant=pytest.fail)
