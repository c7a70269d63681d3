"""`python -m bench`: run every bench module, print one table, write it as JSON.

    python -m bench [--quick] [--only MODULE ...] [--json PATH] [--threads N] [--gpu [--device D]]

Each module in MODULES gives rows (see bench/__init__.py); the table is printed as Markdown and
written to bench/results/<commit>.json (or --json PATH) with the machine it ran on, so figures
can be compared across commits. `--quick` runs small shapes (a smoke test, not a measurement).
`--gpu` runs the GPU rows instead: bf16 autocast and torch.compile against the bf16 roofline, and the
stacked sweep with its SAEs on the GPU (`--device cpu` runs them as a dry run of the code path).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["train_throughput", "sparse_kernels", "sweep_batched", "cache_throughput", "eval_throughput", "lm_side",
           "real_lm"]
RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table."""
    head = "| row | value | unit | reference | reference value | ratio | peak MiB | note |"
    lines = [head, "|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "—"
        lines.append(f"| {r['row']} | {_fmt(r['value'])} | {r['unit']} | {r['reference']} | "
                     f"{_fmt(r['reference_value'])} | {ratio} | {_fmt(r['peak_mib'], 4)} | {r['note']} |")
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(table(rows))


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import sae_lens
        info["sae_lens"] = sae_lens.__version__
    except ImportError:
        info["sae_lens"] = None
    return info


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def collect(modules: list[str], quick: bool) -> list[dict]:
    rows = []
    for name in modules:
        start = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += importlib.import_module(f"bench.{name}").rows(quick)
        print(f"[bench] {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def gpu_collect(quick: bool, device: str) -> list[dict]:
    """The --gpu rows: train_throughput's bf16 / compile rows, then the stacked sweep's."""
    from bench import sweep_batched
    from bench.train_throughput import gpu_rows

    return gpu_rows(quick, device) + sweep_batched.rows(quick, device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke test, not a measurement")
    ap.add_argument("--only", nargs="+", choices=MODULES, metavar="MODULE", help=f"run these modules only: {MODULES}")
    ap.add_argument("--json", type=Path, help="where to write the table as JSON (default: bench/results/<commit>.json)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)")
    ap.add_argument("--gpu", action="store_true",
                    help="the GPU rows: d_in 768, d_sae 24576, bf16 autocast, compile; the stacked sweep on the GPU")
    ap.add_argument("--device", help="where the --gpu rows run (default: cuda; cpu: a dry run that checks the code path)")
    args = ap.parse_args(argv)
    if args.device and not args.gpu:
        ap.error("--device says where the --gpu rows run; give it with --gpu (the other rows run on the CPU)")
    args.device = args.device or "cuda"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            ap.exit(2, "python -m bench: --gpu needs a CUDA device; none is visible (--device cpu: a dry run)\n")
        rows = gpu_collect(args.quick, args.device)
    else:
        rows = collect(args.only or MODULES, args.quick)
    print_table(rows)
    info = {"commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": args.quick, "gpu_rows_on": args.device if args.gpu else None, "machine": machine(), "rows": rows}
    kind = ("-gpu" if args.device.startswith("cuda") else "-gpu-dry-run") if args.gpu else ""
    path = args.json or RESULTS / f"{info['commit']}{kind}{'-quick' if args.quick else ''}.json"
    from saelab.atomic import write_json

    write_json(path, info)
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
