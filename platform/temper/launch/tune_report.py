"""The search's summary on its parent run: the trials table (trials.md, trials.json), the
plot of the metric against each hyperparameter (trials.png), and the best trial."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

log = logging.getLogger(__name__)


def best_trial(trials: list, *, mode: str):
    """The trial with the best last reported metric (finished or stopped early), or None."""
    scored = [t for t in trials if t.value is not None and math.isfinite(t.value) and t.status != "failed"]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t.value)


def format_trials(result) -> str:
    keys = sorted({k for t in result.trials for k in t.params})
    head = ["trial", *keys, result.metric, "step", "status", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ordered = sorted(result.trials, key=lambda t: (t.value is None, -(t.value or 0) if result.mode == "max"
                                                   else (t.value or 0)))
    for t in ordered:
        mark = " (best)" if result.best is not None and t.trial_id == result.best.trial_id else ""
        cells = [t.trial_id + mark, *(_show(t.params.get(k)) for k in keys),
                 "-" if t.value is None else f"{t.value:.4f}", "-" if t.step is None else str(t.step),
                 t.status, t.run_id or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_report(result, *, client) -> None:
    """trials.md/json/png on the parent run; a failure is a warning (the trials exist)."""
    from temper.figures import search_png

    table = format_trials(result)
    result.table = table
    parent = result.parent_run_id
    try:
        client.log_text(parent, table + "\n", "trials.md")
        client.log_text(parent, json.dumps([t.__dict__ for t in result.trials], indent=1), "trials.json")
        points: dict[str, list] = {}
        for t in result.trials:
            if t.value is None:
                continue
            for k, v in t.params.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    points.setdefault(k, []).append((float(v), t.value, t.status == "early-stopped"))
        if points:
            log_keys = [k for k, pts in points.items() if min(p[0] for p in pts) > 0
                        and max(p[0] for p in pts) / min(p[0] for p in pts) > 20]
            png = search_png(points, metric=result.metric, title=result.name, log_keys=log_keys)
            _log_png(client, parent, png, "trials.png")
    except Exception as e:  # noqa: BLE001 - the summary is a convenience
        log.warning("search report not fully logged to run %s: %s", parent, e)


def _log_png(client, run_id: str, data: bytes, name: str) -> None:
    import io

    from PIL import Image

    client.log_image(run_id, Image.open(io.BytesIO(data)), name)
