"""Tiny JSONL reader/writer shared by every data script and by the trainers.

Why a helper at all: bad data should fail loudly and point at the exact line
(`train.jsonl:1234: invalid JSON ...`), not as a KeyError three stack frames later.
With `skip_bad_rows=True` bad lines are skipped instead and counted in the log.

    from data.jsonl import read_jsonl, write_jsonl
    rows = read_jsonl("data/tiny/train.jsonl")
"""

import json
import os
import sys


def read_jsonl(path, skip_bad_rows=False, required=()):
    """Read a JSONL file into a list of dicts.

    Raises ValueError("path:lineno: why") for a line that is not valid JSON, is not a JSON
    object, or lacks one of the `required` fields; and for a file with no rows at all.
    Blank lines are ignored. With skip_bad_rows=True bad lines are skipped (and counted on stderr).
    """
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                error = f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            else:
                missing = [k for k in required if k not in row] if isinstance(row, dict) else None
                if missing is None:
                    error = f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                elif missing:
                    error = f"{path}:{lineno}: missing field(s) {', '.join(map(repr, missing))}"
                else:
                    rows.append(row)
                    continue
            if not skip_bad_rows:
                raise ValueError(error)
            skipped += 1
    if skipped:
        print(f"read_jsonl: skipped {skipped} bad row(s) in {path}", file=sys.stderr)
    if not rows:
        raise ValueError(f"{path}: no rows (empty file{' after skipping bad rows' if skipped else ''})")
    return rows


def write_jsonl(path, rows):
    """Write rows (dicts) one JSON object per line; UTF-8 kept readable, creates parent dirs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
