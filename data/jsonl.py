"""Tiny JSONL reader/writer shared by every data script and by the trainers.

Why a helper at all: bad data should fail loudly and point at the exact line
(`train.jsonl:1234: invalid JSON ...`), not as a KeyError three stack frames later.
With `skip_bad_rows=True` bad lines are skipped instead and counted on stderr.

    from data.jsonl import read_jsonl, write_jsonl
    rows = read_jsonl("data/tiny/train.jsonl")
"""

import json
import os
import sys


def iter_jsonl(path, skip_bad_rows=False, required=()):
    """Yield (lineno, row) for each JSON-object line; bad lines raise ValueError("path:lineno: why")
    (invalid JSON, not an object, a `required` field missing) or, with skip_bad_rows, are skipped.
    Blank lines are ignored. A file with no good rows raises too."""
    n_good, skipped = 0, 0
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
                    n_good += 1
                    yield lineno, row
                    continue
            if not skip_bad_rows:
                raise ValueError(error)
            skipped += 1
    if skipped:
        print(f"warning: skipped {skipped} bad row(s) in {path}", file=sys.stderr)
    if not n_good:
        raise ValueError(f"{path}: no rows (empty file{' after skipping bad rows' if skipped else ''})")


def read_jsonl(path, skip_bad_rows=False, required=()):
    """All rows of a JSONL file as a list of dicts (errors as in iter_jsonl)."""
    return [row for _, row in iter_jsonl(path, skip_bad_rows, required)]


def convert_jsonl(path, convert, skip_bad_rows=False):
    """[convert(row) for each row], where convert raises ValueError/KeyError/TypeError on a bad row
    and returns None to drop a row on purpose (a filter); the error is re-raised naming path:lineno."""
    out, skipped = [], 0
    for lineno, row in iter_jsonl(path, skip_bad_rows):
        try:
            converted = convert(row)
        except (ValueError, KeyError, TypeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            if not skip_bad_rows:
                raise ValueError(f"{path}:{lineno}: {why}") from e
            skipped += 1
            continue
        if converted is not None:
            out.append(converted)
    if skipped:
        print(f"warning: skipped {skipped} row(s) of {path} that could not be converted", file=sys.stderr)
    return out


def write_jsonl(path, rows):
    """Write rows (dicts) one JSON object per line; UTF-8 kept readable, creates parent dirs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def download(url, dest, hint="--src=FILE"):
    """Fetch url to dest (stdlib urllib), or reuse dest if it is already there. On failure print
    what failed and how to supply the file by hand, then exit non-zero (scripts work offline via --src)."""
    import urllib.request

    if os.path.isfile(dest):
        print(f"using cached {dest}")
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    print(f"downloading {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest + ".part", "wb") as f:
            f.write(response.read())
    except Exception as e:  # URLError, HTTPError, timeouts, DNS failures...
        if os.path.exists(dest + ".part"):
            os.remove(dest + ".part")
        sys.exit(f"error: could not download {url}\n  ({type(e).__name__}: {e})\n"
                 f"  No network? Download that file elsewhere, copy it here and pass it with {hint}.")
    os.replace(dest + ".part", dest)
    return dest
