"""The feature report's shape, shared by its writer (report.py) and its renderer (dashboard.py)
so the two can never disagree. Kept free of torch: the dashboard renders without it."""

SCHEMA = 1
# keys only features given detail carry; the index (report.json) holds entries without them
DETAIL_KEYS = ("act_hist", "top_tokens", "examples", "quantiles", "logits", "ablation", "embedding", "tree")


def has_detail(feat: dict) -> bool:
    return any(k in feat for k in DETAIL_KEYS)


def index_entry(feat: dict) -> dict:
    """A feature's index summary: its entry without the per-feature detail."""
    return {k: v for k, v in feat.items() if k not in DETAIL_KEYS}
