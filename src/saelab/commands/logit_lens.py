"""`saelab logit-lens SAE --feature I [I ...]`: the tokens each feature's decoder direction
pushes up and down the most (through the final norm's linear part and the unembedding), and the
skew / kurtosis of its logit weights with the kind they suggest (prediction, suppression,
partition, other). Thresholds and the norm folding are documented in saelab.interpret.lens."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from saelab.interpret.lens import PARTITION_KURTOSIS, PREDICTION_KURTOSIS, SKEW_THRESHOLD, feature_lens
from saelab.lm.resolve import check_sae_fits, load_lm
from saelab.interpret.vocab import token_strings, used_token_ids, vocab_mask
from saelab.sae import SAE


def register(subparsers) -> None:
    p = subparsers.add_parser("logit-lens", help="top / bottom tokens and kind of SAE features (logit lens)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sae", type=Path, metavar="SAE", help="SAE folder (cfg.json + sae_weights.safetensors)")
    add_model_args(p)
    p.add_argument("-k", type=int, default=10, help="tokens listed each way (default: %(default)s)")
    p.add_argument("--no-fold-norm", action="store_true",
                   help="plain W_dec @ W_U, without the final norm's centering and gain")
    p.set_defaults(func=run)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options shared with `saelab tokens`."""
    p.add_argument("--model", default=None,
                   help="Hugging Face model folder or name (default: the SAE's model_name when it is a "
                        "folder, else the offline default LM)")
    p.add_argument("--feature", type=int, nargs="+", required=True, help="feature index(es)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--drop-high-norm", type=float, default=None, metavar="Z",
                   help="leave out tokens whose unembedding (logit-lens) or embedding (tokens) norm "
                        "has a robust z-score above Z")
    p.add_argument("--drop-unused", default=None, metavar="SOURCE",
                   help="leave out tokens that never occur in this text (e.g. stdlib; first 4096 contexts)")


def token_mask(lm, args, n: int, W):
    """Ids that may be listed, of the first n: inside the tokenizer, used in --drop-unused's
    text, not a --drop-high-norm outlier of W (d, n)."""
    used = None
    if args.drop_unused:
        from saelab.data.corpus import token_contexts

        contexts = token_contexts(args.drop_unused, lm.tokenizer, min(128, lm.context_length),
                                  split="all", max_contexts=4096)
        used = used_token_ids(contexts, n)
    return vocab_mask(n, tokenizer_size=len(lm.tokenizer), used=used, W=W, high_norm_z=args.drop_high_norm)


def run(args: argparse.Namespace) -> int:
    sae = SAE.load(args.sae).eval()
    lm = load_lm(args.model, sae)
    check_sae_fits(lm, sae)
    mask = token_mask(lm, args, lm.d_vocab, lm.W_U)
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
