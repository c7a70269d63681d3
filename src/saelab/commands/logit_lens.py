"""`saelab logit-lens SAE --feature I [I ...]`: the tokens each feature's decoder direction
pushes up and down the most (through the final norm's linear part and the unembedding), and the
skew / kurtosis of its logit weights with the kind they suggest (prediction, suppression,
partition, other). Thresholds and the norm folding are documented in saelab.interpret.lens.

Prints a table per feature (or JSON with --json); writes no files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saelab.commands import options
from saelab.interpret.lens import PARTITION_KURTOSIS, PREDICTION_KURTOSIS, SKEW_THRESHOLD, feature_lens
from saelab.interpret.vocab import token_mask, token_strings


def register(subparsers) -> None:
    p = subparsers.add_parser("logit-lens", help="top / bottom tokens and kind of SAE features (logit lens)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, metavar="SAE", help="SAE folder (cfg.json + sae_weights.safetensors)")
    options.add_feature_list_options(p)
    p.add_argument("-k", type=int, default=10, help="tokens listed each way (default: %(default)s)")
    p.add_argument("--no-fold-norm", action="store_true",
                   help="plain W_dec @ W_U, without the final norm's centering and gain")
    options.add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sae, lm = options.sae_and_lm(args)
    mask = token_mask(lm, lm.d_vocab, lm.W_U, drop_unused=args.drop_unused, high_norm_z=args.drop_high_norm)
    res = feature_lens(sae, lm, args.feature, k=args.k, mask=mask, fold_norm=not args.no_fold_norm)
    vocab = token_strings(lm.tokenizer, lm.d_vocab)
    out = []
    for n, (j, kind) in enumerate(zip(res.features.tolist(), res.kinds())):
        out.append({"feature": j, "skew": float(res.skew[n]), "kurtosis": float(res.kurtosis[n]), "kind": kind,
                    "top": [[vocab[t], v] for t, v in zip(res.top_ids[n].tolist(), res.top_values[n].tolist())],
                    "bottom": [[vocab[t], v] for t, v in zip(res.bottom_ids[n].tolist(),
                                                             res.bottom_values[n].tolist())]})
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for item in out:
        print(f"feature {item['feature']}: {item['kind']} (skew {item['skew']:+.3f}, kurtosis "
              f"{item['kurtosis']:.3f}; prediction/suppression: kurtosis >= {PREDICTION_KURTOSIS} and "
              f"|skew| >= {SKEW_THRESHOLD}, partition: kurtosis <= {PARTITION_KURTOSIS})")
        print(f"  {'top':<28} {'bottom':<28}")
        for (ta, va), (tb, vb) in zip(item["top"], item["bottom"]):
            print(f"  {repr(ta):<20} {va:+7.3f} {repr(tb):<20} {vb:+7.3f}")
    return 0
