"""
A picture of a run: its metrics.jsonl drawn as small line charts in one SVG file (plain text, no dependency; it shows
in a browser and on GitHub). Every trainer writes out_dir/curves.svg at each eval and at the end; any run's file
can be drawn the same way:

    python plot.py out/grpo/metrics.jsonl            # -> out/grpo/curves.svg

The panels follow the run's kind, told by its metrics: GRPO (reward, held-out accuracy, completion length, KL and
the sampler/trainer mismatch, the share of completions that re-check a step and how often they are right, and with
tools the share that call one), distillation (its loss, held-out accuracy) or SFT / reward-model training (train and
eval loss, pairwise accuracy). A panel with no data is left out, and so is a behaviour's panel (self-checks, tool use)
whose first series is nothing but zeros: the run never showed it.
"""
import json
import os
import sys
from html import escape

PANELS = {  # kind -> [(title, [(metric, label)])]
    "grpo": [("reward (train)", [("reward", "reward"), ("accuracy", "accuracy of the samples")]),
             ("held-out accuracy", [("eval_accuracy", "greedy pass@1"), ("eval_pass1", "sampled pass@1"),
                                    ("eval_pass_at_k", "pass@k"), ("eval_maj_at_k", "maj@k")]),
             ("completion length (tokens)", [("completion_len", "mean"), ("completion_len_max", "max")]),
             ("KL and sampler mismatch", [("kl", "k3 KL"), ("mismatch_kl", "KL(sampler || trainer)")]),
             ("self-checks", [("recheck_frac", "samples that re-check"), ("eval_recheck_frac", "held-out greedy"),
                              ("accuracy_recheck", "right among them"), ("accuracy_no_recheck", "right, the others")]),
             ("tool use", [("tool_use", "samples that call"), ("eval_tool_use", "held-out greedy")])],
    "distill": [("distillation loss", [("kd_loss", "forward KL"), ("reverse_kl", "reverse KL")]),
                ("held-out accuracy", [("eval_accuracy", "greedy pass@1")])],
    "sft": [("loss", [("loss", "train"), ("eval_loss", "eval")]),
            ("pairwise accuracy", [("pair_acc", "train"), ("eval_pair_acc", "eval")])],
}
BEHAVIOURS = {"self-checks", "tool use"}  # panels of something a run may never do
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
W, H, PAD = 420, 230, 56  # one panel, and its margin for the axis labels


def read_metrics(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_kind(records):
    keys = {k for r in records for k in r}
    return "grpo" if "reward" in keys else "distill" if keys & {"kd_loss", "reverse_kl"} else "sft"


def curves_svg(records, title=""):
    """The SVG text: the run kind's panels side by side, each with its series against the step."""
    panels = []
    for name, series in PANELS[run_kind(records)]:
        lines = [(label, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))])
                 for key, label in series]
        never = name in BEHAVIOURS and not any(v for _, v in lines[0][1])
        lines = [(label, pts) for label, pts in lines if pts]
        if lines and not never:
            panels.append(_panel(name, lines, len(panels) * W))
    head = f'<text x="8" y="16" font-size="13" font-weight="bold">{escape(title)}</text>' if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{max(1, len(panels)) * W}" height="{H + 24}" '
            f'font-family="sans-serif" font-size="11">{head}<g transform="translate(0, 24)">'
            + "".join(panels) + "</g></svg>\n")


def _panel(name, lines, x0):
    steps = [s for _, pts in lines for s, _ in pts]
    values = [v for _, pts in lines for _, v in pts]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    v0, v1 = min(values), max(values)
    v0, v1 = (v0 - 0.5, v1 + 0.5) if v0 == v1 else (v0, v1)
    left, top, right, bottom = x0 + PAD, 22, x0 + W - 12, H - 40

    def xy(s, v):
        return left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - v0) / (v1 - v0) * (bottom - top)

    out = [f'<text x="{x0 + W / 2}" y="14" text-anchor="middle" font-weight="bold">{escape(name)}</text>',
           f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>',
           f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{v1:.3g}</text>',
           f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{v0:.3g}</text>',
           f'<text x="{left}" y="{bottom + 14}">step {s0}</text>',
           f'<text x="{right}" y="{bottom + 14}" text-anchor="end">step {s1}</text>']
    for i, (label, pts) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in pts))
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(pts) < 12:  # a few points (evaluations): mark each
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>' for x, y in (xy(s, v) for s, v in pts)]
        out.append(f'<text x="{left + 110 * i}" y="{bottom + 30}" fill="{color}">{escape(label)} '
                   f'({pts[-1][1]:.3g})</text>')
    return "".join(out)


def write_curves(metrics_path, svg_path=None, title=""):
    """metrics.jsonl -> curves.svg beside it (or svg_path), written whole and renamed into place."""
    svg_path = svg_path or os.path.join(os.path.dirname(metrics_path), "curves.svg")
    with open(svg_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(curves_svg(read_metrics(metrics_path), title))
    os.replace(svg_path + ".tmp", svg_path)
    return svg_path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or not os.path.isfile(sys.argv[1]):
        raise SystemExit("usage: python plot.py RUN/metrics.jsonl [OUT.svg]")
    print(f"wrote {write_curves(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None, sys.argv[1])}")
