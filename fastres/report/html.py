"""The report as one self-contained HTML page: nothing is fetched, figures are data URIs.

    python -m fastres.report --results runs --format html --out report.html

It holds Tables 3 and 4 beside the paper's values with each difference coloured by its sign and
size, Figures 5-8, the protocol, the environment each run recorded (device, versions, git
commit, kernel plan) and what a partial grid is still missing. Built from report.py's cells and
figures; this module only lays them out.
"""

from __future__ import annotations

import base64
import json
import time
from html import escape
from pathlib import Path

from fastres.report.tables import FIELDS, fmt, row_average, table_blocks
from fastres.run.results import DONE
from fastres.study.paper import OPTIMIZER_ORDER, TABLE3

FIGURES = {
    "fig5_optimizers_augmented": "Figure 5: test loss of each optimizer, augmented data",
    "fig6_optimizers_not_augmented": "Figure 6: test loss of each optimizer, non-augmented data",
    "fig7_augment_normalize": "Figure 7: augmentation and normalisation (SGD)",
    "fig8_tmax": "Figure 8: cosine T_max (SGD)",
}
# Differences at or beyond this size get the full colour: 2 points of accuracy, 100 epochs.
FULL_COLOUR = {"acc": 2.0, "epoch": 100.0}
# (positive, negative) RGB: accuracy above the paper's is good (green) and below bad (red); a
# later or earlier best epoch is neither, so blue and orange.
COLOURS = {"acc": ((26, 152, 80), (215, 48, 39)), "epoch": ((49, 130, 189), (230, 85, 13))}

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px 32px;
       color: #1d1d1f; background: #fff; max-width: 1320px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #ddd;
padding-bottom: 4px; } h3 { margin: 20px 0 6px; font-size: 15px; }
table { border-collapse: collapse; margin: 6px 0 10px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: center; vertical-align: top; }
th { background: #f2f2f5; } td.name { text-align: left; font-weight: 600; }
.ours { font-weight: 700; font-size: 15px; } .paper { color: #666; font-size: 12px; }
.diff { display: inline-block; min-width: 44px; border-radius: 4px; padding: 0 4px;
        font-size: 12px; font-weight: 600; }
td.missing { background: repeating-linear-gradient(45deg, #fafafa, #fafafa 6px, #f0f0f0 6px,
             #f0f0f0 12px); color: #888; font-size: 12px; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: 6px 10px; border-radius: 4px; }
.legend span { margin-right: 14px; } .kv td { text-align: left; }
table.env td { text-align: left; font-size: 12px; } code { font-size: 12px; }
figure { display: inline-block; width: 620px; margin: 8px 16px 8px 0; vertical-align: top; }
figure img { border: 1px solid #ddd; width: 100%; }
figcaption { font-size: 13px; color: #444; } td.yes { background: #d9f0d3; }
td.no { background: #f7f7f7; color: #aaa; }
"""
# Counts the figures the browser could decode (a test reads it back from the rendered page).
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  document.body.setAttribute("data-figures-shown", ok + "/" + imgs.length);
});
"""


def diff_badge(diff: float | None, what: str, digits: int) -> str:
    """The difference ours - paper, its colour by sign, its strength by size."""
    if diff is None:
        return ""
    pos, neg = COLOURS[what]
    r, g, b = pos if diff > 0 else neg
    alpha = 0.0 if diff == 0 else 0.15 + 0.75 * min(1.0, abs(diff) / FULL_COLOUR[what])
    ink = "#fff" if alpha > 0.55 else "#111"
    return (f'<span class="diff" style="background: rgba({r},{g},{b},{alpha:.2f}); '
            f'color: {ink}">{diff:+.{digits}f}</span>')


def table_html(cells: list[dict], what: str) -> str:
    """Table 3 (what='acc') or Table 4 (what='epoch') analog, one table per (T_max, augment)."""
    ours, paper, diff, digits = FIELDS[what]
    out = []
    for block in table_blocks(cells, what):
        opts = block.opts
        out.append(f"<h3>{block.title}</h3>")
        head = "".join(f"<th>{escape(o)}</th>" for o in opts)
        out.append(f'<table class="t-{what}"><tr><th>structure</th>{head}'
                   + ("<th>average</th>" if what == "acc" else "") + "</tr>")
        for row, by_opt in block.rows.items():
            tds = [f'<td class="name">{escape(row)}</td>']
            for o in opts:
                c = by_opt.get(o)
                if c is None:
                    tds.append('<td class="missing">not in grid</td>')
                elif c[ours] is None:
                    tds.append(f'<td class="missing">missing<br>{escape(c["status"])}'
                               + (f'<br><span class="paper">paper {fmt(c[paper], digits)}'
                                  "</span>" if c[paper] is not None else "") + "</td>")
                else:
                    seeds = f" <small>n={c['seeds']}</small>" if c["of_seeds"] > 1 else ""
                    tds.append(f'<td><span class="ours">{fmt(c[ours], digits)}</span>{seeds}'
                               f'<br><span class="paper">paper {fmt(c[paper], digits)}</span>'
                               f"<br>{diff_badge(c[diff], what, digits)}</td>")
            if what == "acc":
                avg, pav, partial = row_average(by_opt, len(opts))
                star = "*" if partial else ""
                badge = diff_badge(None if avg is None or pav is None else avg - pav, what, 2)
                tds.append(f'<td><span class="ours">{fmt(avg, 2)}{star}</span><br>'
                           f'<span class="paper">paper {fmt(pav, 2)}</span><br>{badge}</td>')
            out.append("<tr>" + "".join(tds) + "</tr>")
        out.append("</table>")
    if what == "acc":
        out.append('<p class="paper">* average over the optimizers finished so far; the '
                   "paper's value beside it is its mean over the same optimizers.</p>")
    return "\n".join(out)


def legend() -> str:
    parts = []
    for what, label in (("acc", "accuracy (points)"), ("epoch", "epoch of the best")):
        parts.append(f"<br><span>{label}:</span>")
        for v in (FULL_COLOUR[what], FULL_COLOUR[what] / 4, -FULL_COLOUR[what] / 4,
                  -FULL_COLOUR[what]):
            parts.append(diff_badge(v, what, 2 if what == "acc" else 0))
    return ('<p class="legend">Difference ours − paper, coloured by sign and size (full colour '
            f"at ±{FULL_COLOUR['acc']:g} points or ±{FULL_COLOUR['epoch']:g} epochs): "
            + " ".join(parts) + "</p>")


def figures_html(fig_dir: Path | None, fig_notes: list[str]) -> str:
    """Figures 5-8 as PNG data URIs; a figure that was skipped says why."""
    if fig_dir is None:
        return "<p>Figures not drawn (--no-figures).</p>"
    out = []
    for note in fig_notes:
        name = note.partition(":")[0]
        caption = FIGURES.get(name, name)
        path = fig_dir / f"{name}.png"
        if "skipped" in note or not path.is_file():
            out.append(f"<p><b>{escape(caption)}</b>: {escape(note.partition(': ')[2])}</p>")
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        out.append(f'<figure><img alt="{escape(caption)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{escape(caption)}</figcaption></figure>")
    return "\n".join(out)


def protocol_html(chosen: str, protocol: dict) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(json.dumps(v))}</code></td></tr>"
                   for k, v in protocol.items())
    return f'<p>Protocol id <code>{escape(chosen)}</code></p><table class="kv">{rows}</table>'


def environment_html(runs: list[dict]) -> str:
    """One row per run: what it recorded when it finished."""
    head = ("<tr><th>run</th><th>status</th><th>epochs</th><th>best acc (%)</th><th>device</th>"
            "<th>versions</th><th>git commit</th><th>kernel plan</th><th>train time</th></tr>")
    rows = []
    for r in runs:
        env = json.loads(r["environment"]) if r["environment"] else None
        best = fmt(None if r["best_acc"] is None else 100 * r["best_acc"], 2)
        cols = [escape(r["label"]), escape(r["status"]), f"{r['epochs_done']}/{r['epochs']}",
                best]
        if env is None:
            cols += ['<span class="paper">not recorded yet (run not finished)</span>', "", "",
                     "", ""]
        else:
            versions = ", ".join(f"{k} {env[k]}" for k in ("fastres", "torch", "python")
                                 if env.get(k))
            plan = env.get("kernels")
            plan_html = (f"<details><summary>Triton, {len(plan)} layers</summary><code>"
                         + "<br>".join(escape(line) for line in plan) + "</code></details>"
                         if plan else "eager (PyTorch reference path)")
            cols += [escape(f"{env.get('device', '?')} ({env.get('device_name', '')})"),
                     escape(versions), f"<code>{escape((env.get('git_commit') or '—')[:12])}"
                     "</code>", plan_html, f"{r['train_seconds']:.1f} s"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cols) + "</tr>")
    return f'<table class="env">{head}{"".join(rows)}</table>'


def missing_html(runs: list[dict], cells: list[dict]) -> str:
    """Unfinished runs, and which of the paper's cells (T_max 200) have no result here."""
    out = []
    pending = [r for r in runs if r["status"] not in DONE]
    if pending:
        out.append(f"<p>{len(pending)} of {len(runs)} runs not finished:</p><table class='env'>"
                   "<tr><th>run</th><th>status</th><th>epochs</th><th>attempts</th>"
                   "<th>error</th></tr>")
        for r in pending:
            out.append(f"<tr><td>{escape(r['label'])}</td><td>{escape(r['status'])}</td>"
                       f"<td>{r['epochs_done']}/{r['epochs']}</td><td>{r['attempts']}</td>"
                       f"<td>{escape(r['error'] or '')}</td></tr>")
        out.append("</table>")
    else:
        out.append(f"<p>All {len(runs)} runs of this protocol are finished.</p>")
    have = {(int(c["structure"]), c["optimizer"], c["augment"]) for c in cells
            if c["tmax"] == 200 and c["best_acc"] is not None and c["structure"].isdigit()}
    lacking = sorted(set(TABLE3) - have)
    out.append(f"<p>The paper's grid (Table 3: 9 structures × 5 optimizers × augmentation on/off,"
               f" T_max 200): {len(TABLE3) - len(lacking)} of {len(TABLE3)} cells have a result "
               "here.</p>")
    head = "".join(f"<th>{o}<br>aug {a}</th>" for a in ("on", "off") for o in OPTIMIZER_ORDER)
    rows = []
    for s in sorted({k[0] for k in TABLE3}):
        tds = "".join('<td class="yes">✓</td>' if (s, o, a == "on") in have
                      else '<td class="no">—</td>'
                      for a in ("on", "off") for o in OPTIMIZER_ORDER)
        rows.append(f'<tr><td class="name">{s}</td>{tds}</tr>')
    out.append(f'<table class="coverage"><tr><th>structure</th>{head}</tr>{"".join(rows)}'
               "</table>")
    return "\n".join(out)


def page(*, chosen: str, protocol: dict, notes: list[str], cells: list[dict], runs: list[dict],
         fig_dir: Path | None, fig_notes: list[str]) -> str:
    """The whole page, as a string."""
    note_items = "".join(
        f'<li class="{"warn" if n.startswith("WARNING") else ""}">{escape(n)}</li>'
        for n in notes)
    made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fastres report: protocol {escape(chosen)}</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>Constrained ResNets on CIFAR-10: fastres results against the paper</h1>
<p class="paper">Generated {made} by <code>python -m fastres.report --format html</code>.</p>
<ul>{note_items}</ul>
<h2>Tables 3 and 4</h2>
{legend()}
{table_html(cells, "acc")}
{table_html(cells, "epoch")}
<h2>Figures 5–8</h2>
{figures_html(fig_dir, fig_notes)}
<h2>Protocol</h2>
{protocol_html(chosen, protocol)}
<h2>What is missing</h2>
{missing_html(runs, cells)}
<h2>Environment of each run</h2>
{environment_html(runs)}
</body></html>
"""
