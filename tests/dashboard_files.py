"""Reading a dashboard folder back, for tests: what the files hold, as one report dict."""

from __future__ import annotations

import json
from pathlib import Path

from saelab.interpret.schema import Report


def read_dashboard_json(out_dir) -> dict:
    """The report a dashboard folder was built from: report.json with each feature's detail
    from features/<i>.json merged back in (features without a JSON file stay summaries),
    checked to be a report the typed reader (Report.from_dict) accepts."""
    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for n, feat in enumerate(report["features"]):
        path = out / "features" / f"{feat['index']}.json"
        if path.is_file():
            report["features"][n] = json.loads(path.read_text(encoding="utf-8"))
    Report.from_dict(report)
    return report
