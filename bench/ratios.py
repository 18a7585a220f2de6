"""The table every A/B benchmark prints: the median of each tunnel's rounds and ztun / sing-box."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def report(results: dict[str, list[dict[str, float]]], json_path: Path | None = None) -> None:
    """Print each metric's median over the rounds for ztun and sing-box, and their ratio (one
    tunnel alone: its medians as JSON); with `json_path`, also write rounds and medians."""
    summary: dict[str, dict[str, Any]] = {}
    for name, rounds in results.items():
        if rounds:
            keys = rounds[0].keys()
            summary[name] = {k: sorted(r[k] for r in rounds)[len(rounds) // 2] for k in keys}
    if len(summary) < 2:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'metric':24} {'ztun':>12} {'sing-box':>12} {'ratio':>8}")
        for k in summary["ztun"]:
            z, s = summary["ztun"][k], summary["sing-box"][k]
            ratio = z / s if s else float("nan")
            print(f"{k:24} {z:12.3f} {s:12.3f} {ratio:8.2f}")
    if json_path is not None:
        json_path.write_text(json.dumps({"rounds": results, "median": summary}, indent=2))
