"""Time to build the static dashboard for a 4096-feature SAE.

Uses `saelab.interpret.report.build_report` on the default model when that model is built (and
`--synthetic` is not given), with a random-init TopK SAE of that width: sparse like a trained
SAE, so the report has the sizes of a real one. Otherwise a synthetic report of the same size
whose tokens are pieces of real Python source; the output says which was timed. The time of
build_report itself is printed apart from the dashboard's.

    python bench/dashboard_build.py [--features 4096] [--contexts 256] [--synthetic] [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from saelab.evals.metrics import DENSE_THRESHOLD  # noqa: E402
from saelab.interpret.dashboard import write_dashboard  # noqa: E402
from saelab.interpret.schema import SCHEMA, Report  # noqa: E402

SIZES = dict(examples=20, context=64, bins=5, per_bin=4, ablations=4, logits=10, top_tokens=15, embedding=12)


def _vocabulary(n: int = 3000) -> list[str]:
    """Word / space / punctuation pieces of the stdlib's own source, like BPE tokens of it."""
    text = inspect.getsource(argparse) + inspect.getsource(random) + inspect.getsource(re)
    pieces = re.findall(r" ?[A-Za-z_]+|\d+|\n *|[^\sA-Za-z_\d]+| +", text)
    return sorted(set(pieces))[:n]


def _example(rng: random.Random, vocab: list[str], peak: float, context: int) -> dict:
    tokens = [rng.choice(vocab) for _ in range(SIZES["context"])]
    acts = [round(rng.random() * peak * 0.6, 3) if rng.random() < 0.08 else 0.0 for _ in tokens]
    pos = rng.randrange(8, len(tokens))
    acts[pos] = round(peak, 3)
    return {"context": context, "tokens": tokens, "acts": acts, "pos": pos, "act": round(peak, 3)}


def _tree(rng: random.Random, depth: int) -> dict:
    words = ["a", "kind", "of", "person", "used", "in", "the", "code", "number", "word"]
    node = {"text": " ".join(rng.choice(words) for _ in range(3)), "prob": round(rng.random(), 3), "children": []}
    if depth:
        node["children"] = [_tree(rng, depth - 1) for _ in range(2)]
    return node


def _feature(i: int, rng: random.Random, vocab: list[str]) -> dict:
    dead = rng.random() < 0.15
    density = 0.0 if dead else 10 ** rng.uniform(-5, -0.5)
    max_act = 0.0 if dead else rng.uniform(1, 20)
    pick = lambda n: [rng.choice(vocab) for _ in range(n)]  # noqa: E731
    feat = {"index": i, "density": density, "max_act": max_act, "mean_act": max_act / 3,
            "top_logits": pick(5), "bottom_logits": pick(5), "logit_skew": rng.gauss(0, 1),
            "logit_kurtosis": rng.uniform(2, 30), "kind": rng.choice(["prediction", "suppression", "partition", "other"]),
            "enc_dec_cos": rng.uniform(0, 1), "dead": dead}
    if dead:
        return feat
    examples = [_example(rng, vocab, max_act * (1 - n / 40), n) for n in range(SIZES["examples"])]
    edges = [max_act * k / 20 for k in range(21)]
    feat.update({
        "act_hist": {"edges": edges, "counts": sorted((rng.randrange(1000) for _ in range(20)), reverse=True)},
        "top_tokens": [{"token": t, "count": rng.randrange(1, 500), "mean_act": rng.uniform(0, max_act)} for t in pick(SIZES["top_tokens"])],
        "examples": examples,
        "quantiles": [{"lo": edges[4 * b], "hi": edges[4 * b + 4],
                       "examples": [_example(rng, vocab, rng.uniform(edges[4 * b], edges[4 * b + 4]), 0) for _ in range(SIZES["per_bin"])]}
                      for b in range(SIZES["bins"])],
        "logits": {"top": [{"token": t, "value": rng.uniform(0, 3)} for t in pick(SIZES["logits"])],
                   "bottom": [{"token": t, "value": -rng.uniform(0, 3)} for t in pick(SIZES["logits"])]},
        "ablation": [{"example": n, "quantile": None, "pos": ex["pos"], "tokens": ex["tokens"], "base_act": ex["act"],
                      "delta": [round(rng.gauss(0, 1), 3) if t < ex["pos"] else None for t in range(len(ex["tokens"]))]}
                     for n, ex in enumerate(examples[:SIZES["ablations"]])],
        "embedding": {"encoder": [{"token": t, "score": rng.random()} for t in pick(SIZES["embedding"])],
                      "decoder": [{"token": t, "score": rng.random()} for t in pick(SIZES["embedding"])],
                      "scale": 5.0, "exponent": 2.0, "overlap": {"k": SIZES["embedding"], "shared": 0, "jaccard": 0.0}},
        "tree": {"prompt": 'A typical definition of "<token>" would be \'', "vector": "encoder", "scale": 5.0,
                 "roots": {"encoder": _tree(rng, 3)}, "overlap": None},
    })
    return feat


def synthetic_report(n_features: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    vocab = _vocabulary()
    features = [_feature(i, rng, vocab) for i in range(n_features)]
    return {"schema": SCHEMA, "sae": {"path": "(synthetic)", "arch": "relu", "d_in": 128, "d_sae": n_features,
                                      "hook_name": "blocks.1.hook_resid_post", "model_name": "synthetic"},
            "n_tokens": 200_000, "dense_threshold": DENSE_THRESHOLD,
            "density_hist": {"edges": [-5 + 0.25 * k for k in range(21)], "counts": [rng.randrange(300) for _ in range(20)]},
            "options": None, "features": features}


def real_report(n_features: int, n_contexts: int):
    """(report, how) from build_report on the default model with a `n_features`-wide TopK SAE
    (k=32, random init: sparse like a trained one, not meaningful), or (None, why not)."""
    try:
        import torch

        from saelab.interpret.report import build_report
        from saelab.lm.default import default_lm_path
        from saelab.sae import SAE

        model = default_lm_path(build=False)  # never build it here: that takes minutes
    except Exception as err:  # noqa: BLE001 - any reason means: fall back to synthetic
        return None, f"{type(err).__name__}: {err}"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    sae = SAE(128, n_features, arch="topk", k=32, hook_name="blocks.1.hook_resid_post")
    t0 = time.perf_counter()
    report = build_report(sae, model, n_contexts=n_contexts, progress=False)
    how = (f"build_report on the default model ({n_contexts} held-out contexts, random-init TopK SAE k=32): "
           f"{time.perf_counter() - t0:.1f} s")
    return report, how


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--synthetic", action="store_true", help="skip build_report, time a synthetic report")
    parser.add_argument("--contexts", type=int, default=256, help="held-out contexts build_report scans")
    parser.add_argument("--out", type=Path, default=None, help="folder to build in (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the built dashboard")
    args = parser.parse_args(argv)
    report, source = (None, "--synthetic given") if args.synthetic else real_report(args.features, args.contexts)
    if report is None:
        why = source
        t0 = time.perf_counter()
        report = synthetic_report(args.features)
        source = f"SYNTHETIC report ({why}); generated in {time.perf_counter() - t0:.1f} s"
    out = args.out or Path(tempfile.mkdtemp(prefix="saelab-dash-"))
    t0 = time.perf_counter()
    index = write_dashboard(report, out, progress=False)
    seconds = time.perf_counter() - t0
    files = [p for p in out.rglob("*") if p.is_file()]
    pages = len(list((out / "features").glob("*.html")))
    size = sum(p.stat().st_size for p in files) / 2**20
    n_features = len(report.features if isinstance(report, Report) else report["features"])
    print(f"dashboard for {n_features} features ({source})")
    if source.startswith("SYNTHETIC"):
        print(f"  sizes per live feature: {SIZES}")
    print(f"  build: {seconds:.1f} s, {pages} feature pages ({pages / seconds:.0f} pages/s), "
          f"{len(files)} files, {size:.0f} MiB; index.html {index.stat().st_size / 2**20:.1f} MiB")
    if args.keep or args.out:
        print(f"  {index}")
    else:
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
