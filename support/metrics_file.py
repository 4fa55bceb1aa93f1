"""support/metrics_file.py: used by train.py (start_metrics). metrics.jsonl is the history of the run that exists: a
resume from step S drops the rows of the steps after S, which the rolled-back run had logged and the resumed one
logs again (a loss curve, or bench.py --plot, would read them twice).

Rows are JSON objects, one a line: a step's row has "step", a start row "start_step". Kept: the rows of steps up to
S and the start rows of runs that started before S (the resumed run adds its own); dropped: the rest, and a line cut
short by a killed run. The
file is replaced whole (written beside it, then renamed), so a kill while rewinding leaves the old or the new one.
"""

import json
import os
from pathlib import Path


def rewind(path, step: int) -> int:
    """Drop the rows of metrics.jsonl at path that come after `step`; returns how many went (0 if none or no file)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or _number(row, "step") > step or _number(row, "start_step") >= step:
            dropped += bool(line.strip())
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def _number(row: dict, key: str) -> float:
    value = row.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else -1
