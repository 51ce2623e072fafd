"""``index.html``: one static page with relative links, readable from disk without a server.

No script, no external style or font: the page and the PNG files beside it are the whole
report, so the folder can be zipped, mailed or opened from a USB stick.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from autoseg import __version__
from autoseg.report.record import CaseEntry, ReportRecord

MARKER = "<!-- autoseg report -->"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child, td.case { text-align: left; }
figure { margin: 1em 0 2em; }
figure img, p img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #666; font-size: 0.85em; }
"""


def link(path: str) -> str:
    """A relative URL for a file in the report folder (spaces, '#', non-ASCII characters escaped)."""
    return escape(quote(path), quote=True)


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _summary_table(record: ReportRecord) -> str:
    rows = []
    for name in record.classes:
        c = record.per_class[name]
        hd95 = f"{_number(c.mean['hd95'], 2)} ± {_number(c.std['hd95'], 2)}"
        rows.append(f"<tr><td>{escape(name)}</td><td>{_number(c.mean['dice'], 4)} ± {_number(c.std['dice'], 4)}</td>"
                    f"<td>{hd95}</td><td>{c.n_undefined_hd95}</td></tr>")
    return ("<table><tr><th>class</th><th>Dice</th><th>HD95 (mm)</th><th>HD95 undefined</th></tr>"
            + "".join(rows) + "</table>")


def _case_figure(rank: int, case: CaseEntry) -> str:
    return (f'<figure><a href="{link(case.figure)}">'
            f'<img src="{link(case.figure)}" alt="{escape(case.case_id, quote=True)}"></a>'
            f"<figcaption>{rank}. {escape(case.case_id)}: mean Dice {case.mean_dice:.3f}; "
            f"cut through the {escape(case.slice_reason)}; intensity window {case.window[0]:.4g} to "
            f"{case.window[1]:.4g} ({escape(case.window_source)})</figcaption></figure>")


def _cases_table(record: ReportRecord) -> str:
    folds = any(case.fold is not None for case in record.cases)
    header = "<tr><th>#</th><th>case</th>" + ("<th>fold</th>" if folds else "") + "<th>mean Dice</th>"
    header += "".join(f"<th>{escape(n)} Dice</th><th>{escape(n)} HD95</th>" for n in record.classes) + "</tr>"
    rows = []
    for rank, case in enumerate(record.cases, start=1):
        cells = [str(rank), f'<a href="{link(case.figure)}">{escape(case.case_id)}</a>']
        cells += [escape(case.fold or "")] if folds else []
        cells.append(f"{case.mean_dice:.4f}")
        for name in record.classes:
            cells += [f"{case.dice[name]:.4f}", _number(case.hd95[name], 2)]
        rows.append("<tr>" + "".join(f'<td{" class=case" if i == 1 else ""}>{c}</td>'
                                     for i, c in enumerate(cells)) + "</tr>")
    return "<table>" + header + "".join(rows) + "</table>"


def _shown(record: ReportRecord) -> str:
    channel = f"channel {record.channel or 0} ({record.channel_name})"
    if any(case.shown == "RGB colour" for case in record.cases):
        return "RGB colour" if all(case.shown == "RGB colour" for case in record.cases) else f"RGB colour, else {channel}"
    return channel


def render_page(record: ReportRecord) -> str:
    worst = record.cases[: record.num_worst_shown]
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>autoseg report: {escape(record.dataset_name)}</title>", f"<style>{STYLE}</style>", "</head>",
        "<body>", MARKER,
        f"<h1>{escape(record.dataset_name)}</h1>",
        f"<p>{escape(record.title)}; {len(record.cases)} case(s); drawn: {escape(_shown(record))}.</p>",
        f'<p class="note">Per-case metrics from {escape("; ".join(record.metrics_from))}. HD95 is undefined where '
        "exactly one of reference and prediction is empty. In the figures, solid outlines are the reference, dashed "
        "the prediction, yellow the voxels where they disagree.</p>",
        "<h2>Summary</h2>", _summary_table(record),
        f'<p><img src="{link(record.boxplots)}" alt="Dice and HD95 per class"></p>',
    ]
    if record.training_curves:
        parts.append("<h2>Training</h2>")
        parts += [f'<figure><img src="{link(png)}" alt="training curves of fold {escape(fold, quote=True)}">'
                  f"<figcaption>fold {escape(fold)}</figcaption></figure>" for fold, png in record.training_curves.items()]
    parts.append(f"<h2>The {len(worst)} worst case{'s' if len(worst) != 1 else ''}</h2>")
    parts += [_case_figure(rank, case) for rank, case in enumerate(worst, start=1)]
    parts += ["<h2>All cases, worst first</h2>", _cases_table(record),
              f'<p class="note">autoseg {escape(__version__)}; the same numbers are in report.json.</p>',
              "</body>", "</html>", ""]
    return "\n".join(parts)
