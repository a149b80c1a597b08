"""The results pages: ``<run>/index.html`` per stored run and ``results/index.html`` listing the runs.

Static HTML that opens from disk (no server, no network: the few lines of sorting script and the style are
inline), a pure function of the run's stored files: its tables (``*.csv``, each shown and linked with its LaTeX
twin), its figures (``figures/*.png``, each linked to its PDF), ``run.json`` and ``manifest.json`` (what the
numbers are conditional on: data, classifier, preset, git revision) and the method sidecars
(``per_image/<method>.json``: configuration, preset, compute and training time).

Statistics tables (long format: one row per method and statistic, with ``value``, ``ci_low``, ``ci_high``) are
shown wide, one column per statistic, each cell "value [low, high]", the best method bold as in the LaTeX
tables; every other CSV is shown as it is. Every column sorts on a click on its header (numerically when all its
cells are numbers; ``aria-sort`` says the current order); an undefined cell is shown as "–" and sorts last.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from maskbench.benchmark.figures import figure_caption, figure_order
from maskbench.core.storage import atomic_write, read_json
from maskbench.core.store import RowStore

LONG = {"statistic", "method", "value", "ci_low", "ci_high"}
TABLE_ORDER = ["leaderboard", "segmentation", "class_contrast", "faithfulness", "explainability", "pointing",
               "masked_classifier", "compute_time", "road", "grid", "sanity", "randomisation", "leakage",
               "meta_agreement", "meta_separation", "meta_vs_random", "meta_ranks"]

STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:12px}th,td{padding:2px 6px;border-bottom:1px solid #ddd;
text-align:right;white-space:nowrap}th{cursor:pointer;background:#f3f3f3;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
.ci{color:#777}.best{font-weight:bold}figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figure img{max-width:560px;border:1px solid #eee}code{font-size:12px}.ref{color:#666}"""

SCRIPT = """document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
var table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
var asc=th.getAttribute('aria-sort')!=='ascending';
table.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
th.setAttribute('aria-sort',asc?'ascending':'descending');
var rows=Array.from(body.rows);
var num=rows.every(function(r){var v=r.cells[col].dataset.sort;return v===''||!isNaN(parseFloat(v))});
rows.sort(function(a,b){var x=a.cells[col].dataset.sort,y=b.cells[col].dataset.sort;
if(x==='')return 1;if(y==='')return -1;
var c=num?parseFloat(x)-parseFloat(y):x.localeCompare(y);return asc?c:-c});
rows.forEach(function(r){body.appendChild(r)})})});"""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "–" if value is None else str(value)


def _sort_key(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def _cell(value, text: str | None = None, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    shown = text if text is not None else html.escape(_fmt(value))
    return f'<td data-sort="{html.escape(_sort_key(value))}"{c}>{shown}</td>'


def _table_html(header: list[str], rows: list[list[str]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<table class="sortable">{cap}<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def wide_statistics(table: pd.DataFrame) -> str:
    """A long statistics table as one row per method, one column per statistic: "value [low, high]"."""
    methods = list(dict.fromkeys(table["method"]))
    stats = list(dict.fromkeys(table["statistic"]))
    first = table.drop_duplicates("method").set_index("method")
    label = first["method_label"] if "method_label" in first else pd.Series(methods, index=methods)
    family = first["family"] if "family" in first else pd.Series("", index=methods)
    names = table.drop_duplicates("statistic").set_index("statistic")
    header = ["method", "family"]
    for s in stats:
        arrow = ""
        if "higher_is_better" in names:
            arrow = " ↑" if str(names.loc[s, "higher_is_better"]) == "True" else " ↓"
        header.append(f"{names.loc[s, 'label'] if 'label' in names else s}{arrow}")
    cells = table.set_index(["method", "statistic"])
    rows = []
    for m in methods:
        row = [_cell(str(label[m]), cls="ref" if family[m] == "reference" else ""), _cell(str(family[m]))]
        for s in stats:
            if (m, s) not in cells.index:
                row.append(_cell(float("nan")))
                continue
            r = cells.loc[(m, s)]
            if isinstance(r, pd.DataFrame):
                r = r.iloc[0]
            v, lo, hi = (float(r[k]) if pd.notna(r[k]) else float("nan") for k in ("value", "ci_low", "ci_high"))
            text = html.escape(_fmt(v))
            if not math.isnan(lo):
                text += f' <span class="ci">[{_fmt(lo)}, {_fmt(hi)}]</span>'
            best = "best" in r and str(r["best"]) == "True"
            row.append(_cell(v, text, "best" if best else ""))
        rows.append(row)
    return _table_html(header, rows)


def plain_table(table: pd.DataFrame) -> str:
    """Any other CSV, column for column."""
    rows = [[_cell(v) for v in rec] for rec in table.itertuples(index=False, name=None)]
    return _table_html([str(c) for c in table.columns], rows)


def _tables(run_dir: Path) -> list[Path]:
    found = {p.stem: p for p in run_dir.glob("*.csv")}
    order = [found.pop(n) for n in TABLE_ORDER if n in found]
    return order + [found[k] for k in sorted(found)]


def _methods_section(run_dir: Path) -> str:
    rows = []
    store = RowStore(run_dir)
    for stem in store.methods():
        meta = store.load_meta(stem)
        timing = meta.get("timing", {})
        setup = meta.get("setup", {}) or {}
        rows.append([
            _cell(str(meta.get("label", meta.get("method", stem)))), _cell(str(meta.get("method", stem))),
            _cell(str(meta.get("family", ""))), _cell(str(meta.get("preset", ""))),
            _cell(str(meta.get("paper", "") or "")),
            _cell(float(timing.get("explain_seconds", float("nan")))),
            _cell(float(timing.get("images", float("nan")))),
            _cell(float(setup.get("train_seconds", float("nan")))),
            f"<td data-sort=\"\"><code>{html.escape(json.dumps(meta.get('config', {}), sort_keys=True))}</code></td>",
        ])
    return _table_html(["method", "name", "family", "preset", "paper", "mask seconds", "images", "training seconds",
                        "configuration"], rows)


def run_page(run_dir: Path) -> str:
    """The HTML of one stored run's page."""
    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    manifest = read_json(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else {}
    identity = run.get("identity", {})
    git = manifest.get("git", {})
    title = f"maskbench: {identity.get('dataset', run_dir.parent.name)} / {identity.get('classifier', run_dir.name)}"
    facts = {"data set": identity.get("dataset"), "split": identity.get("split"), "images": identity.get("images"),
             "image size": identity.get("image_size"), "classifier": identity.get("classifier"),
             "classifier sha256": identity.get("classifier_sha256"), "preset": identity.get("preset"),
             "seed": identity.get("seed"), "git commit": git.get("commit"),
             "uncommitted changes": git.get("dirty"), "created": manifest.get("created"),
             "wall seconds": manifest.get("wall_seconds"), "device": manifest.get("device")}
    parts = [f"<h1>{html.escape(title)}</h1>", "<p><a href=\"../../index.html\">all runs</a></p>",
             "<table class=\"facts\">" + "".join(
                 f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts.items()
                 if v is not None) + "</table>"]
    tables = _tables(run_dir)
    parts.append("<h2>Tables</h2><p>" + " · ".join(f'<a href="#{p.stem}">{p.stem}</a>' for p in tables) + "</p>")
    for p in tables:
        t = pd.read_csv(p)
        links = f'<a href="{p.name}">CSV</a>'
        if p.with_suffix(".tex").is_file():
            links += f' · <a href="{p.with_suffix(".tex").name}">LaTeX</a>'
        body = wide_statistics(t) if LONG <= set(t.columns) else plain_table(t)
        parts.append(f'<h3 id="{p.stem}">{html.escape(p.stem)}</h3><p>{links}</p>{body}')
    figs = sorted((run_dir / "figures").glob("*.png"), key=lambda f: figure_order(f.stem))
    if figs:
        parts.append("<h2>Figures</h2>")
        for f in figs:
            pdf = f.with_suffix(".pdf")
            link = f' · <a href="figures/{pdf.name}">PDF</a>' if pdf.is_file() else ""
            caption = figure_caption(f.stem)
            parts.append(f'<figure><img src="figures/{f.name}" alt="{html.escape(f.stem)}">'
                         f"<figcaption><b>{html.escape(f.stem)}</b>{link}"
                         f"{'. ' + html.escape(caption) if caption else ''}</figcaption></figure>")
    if (run_dir / "per_image").is_dir():
        parts.append("<h2>Methods</h2>" + _methods_section(run_dir))
    notes = [p for p in ("deviations.md",) if (run_dir / p).is_file()]
    if notes:
        parts.append("<p>" + " · ".join(f'<a href="{n}">{n}</a>' for n in notes) + "</p>")
    return _document(title, "\n".join(parts))


def _document(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")


def runs(results_dir: Path) -> list[Path]:
    """The stored runs under ``results_dir``: ``<dataset>/<model>/`` folders with a ``run.json``."""
    return sorted(p.parent for p in Path(results_dir).glob("*/*/run.json"))


def index_page(results_dir: Path) -> str:
    """``results/index.html``: one row per run with its size, preset, methods and a link to its page."""
    rows = []
    for r in runs(results_dir):
        identity = read_json(r / "run.json").get("identity", {})
        methods = len(list((r / "per_image").glob("*.json")))
        rel = r.relative_to(results_dir).as_posix()
        rows.append([f'<td data-sort="{html.escape(rel)}"><a href="{rel}/index.html">{html.escape(rel)}</a></td>',
                     _cell(str(identity.get("dataset", ""))), _cell(str(identity.get("classifier", ""))),
                     _cell(str(identity.get("preset", ""))), _cell(float(identity.get("images", float("nan")))),
                     _cell(float(methods))])
    body = "<h1>maskbench results</h1>" + _table_html(["run", "data set", "classifier", "preset", "images",
                                                          "methods"], rows)
    return _document("maskbench results", body)


def write_pages(results_dir: Path) -> list[Path]:
    """Every run's ``index.html`` and ``results_dir/index.html``; returns the files written."""
    results_dir = Path(results_dir)
    written = [atomic_write(r / "index.html", run_page(r)) for r in runs(results_dir)]
    written.append(atomic_write(results_dir / "index.html", index_page(results_dir)))
    return written
