"""Rendering of the tables: CSV text and LaTeX ``booktabs`` tabulars, one row per method, arrows for each
metric's polarity.

Pure string functions of the tables' data frames; nothing here reads files or runs models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

ARROW = {True: r"$\uparrow$", False: r"$\downarrow$"}
FLOAT = "%.4f"  # every float of a CSV table


def csv_text(frame: pd.DataFrame) -> str:
    """A table as CSV text: no index, floats as :data:`FLOAT`, Unix line ends (the same bytes everywhere)."""
    return frame.to_csv(index=False, float_format=FLOAT, lineterminator="\n")


def escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (method names, data set names)."""
    out = []
    for ch in str(text):
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}.get(ch, ch))
    return "".join(out)


def _isnan(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _cell(row: pd.Series | None, digits: int, ci: bool) -> str:
    if row is None or _isnan(row["value"]):
        return "--"
    value = row["value"] if round(row["value"], digits) != 0 else 0.0  # no "-0.00"
    text = f"{value:.{digits}f}"
    if row["best"]:
        text = rf"\textbf{{{text}}}"
    elif row["not_different_from_best"]:
        text = rf"\underline{{{text}}}"
    if ci and not (_isnan(row["ci_low"]) or _isnan(row["ci_high"])):
        half = (row["ci_high"] - row["ci_low"]) / 2
        text += rf" {{\scriptsize$\pm${half:.{digits}f}}}"
    return text


def _begin(caption: str, label: str, columns: str) -> list[str]:
    return [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
            rf"\begin{{tabular}}{{{columns}}}", r"\toprule"]


def _end() -> list[str]:
    return [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]


def statistics_latex(long: pd.DataFrame, methods: Sequence[str], labels: dict[str, str], families: dict[str, str],
                     caption: str, label: str, *, digits: int = 2, ci: bool = True,
                     extra: dict[str, dict[str, str]] | None = None) -> str:
    """A wide booktabs table from a long statistics table (see :func:`maskbench.core.stats.statistics_table`).

    One row per method in ``methods`` order, a rule between the reference rows and the others; per statistic
    the value in bold when best, underlined when not significantly different from the best, with the half
    width of its 95% interval when ``ci``. ``extra`` adds plain columns {header: {method: text}}.
    """
    stats = list(dict.fromkeys(long["statistic"]))
    head_info = long.drop_duplicates("statistic").set_index("statistic")
    extra = extra or {}
    cells = {(r.statistic, r.method): r for r in long.itertuples(index=False)}
    header = ["Method"] + [f"{escape(head_info.loc[s, 'label'])} {ARROW[bool(head_info.loc[s, 'higher_is_better'])]}"
                           for s in stats] + [escape(h) for h in extra]
    lines = _begin(caption, label, "l" + "r" * (len(stats) + len(extra)))
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    prev = None
    for m in methods:
        fam = families.get(m, "")
        group = "reference" if fam in ("reference", "classifier") else "method"
        if prev is not None and group != prev:
            lines.append(r"\midrule")
        prev = group
        row = [escape(labels.get(m, m))]
        for s in stats:
            r = cells.get((s, m))
            row.append(_cell(pd.Series(r._asdict()) if r is not None else None, digits, ci))
        row += [extra[h].get(m, "--") for h in extra]
        lines.append(" & ".join(row) + r" \\")
    return "\n".join(lines + _end())


def plain_latex(frame: pd.DataFrame, columns: dict[str, str], caption: str, label: str,
                group_column: str | None = None) -> str:
    """A booktabs table of already formatted cells: ``columns`` maps frame columns to headers."""
    lines = _begin(caption, label, "l" + "r" * (len(columns) - 1))
    lines += [" & ".join(escape(h) if "$" not in h else h for h in columns.values()) + r" \\", r"\midrule"]
    prev = None
    for _, r in frame.iterrows():
        if group_column is not None:
            if prev is not None and r[group_column] != prev:
                lines.append(r"\midrule")
            prev = r[group_column]
        lines.append(" & ".join(str(r[c]) for c in columns) + r" \\")
    return "\n".join(lines + _end())


def matrix_latex(blocks: list[tuple[str, pd.DataFrame]], caption: str, label: str, digits: int = 1) -> str:
    """Stacked square tables (e.g. the class-specific masking table per method): one block per method.

    Each block is a frame indexed by row names with the same columns; a block starts with the method's name
    spanning the table, and the diagonal (row name == column name) is set in bold.
    """
    if not blocks:
        return ""
    cols = list(blocks[0][1].columns)
    lines = _begin(caption, label, "l" + "r" * len(cols))
    lines += [" & ".join(["Target"] + [escape(c) for c in cols]) + r" \\"]
    for name, frame in blocks:
        lines += [r"\midrule", rf"\multicolumn{{{len(cols) + 1}}}{{l}}{{\textit{{{escape(name)}}}}} \\"]
        for target, r in frame.iterrows():
            cells = [escape(target)]
            for c in cols:
                v = r[c]
                text = "--" if _isnan(v) else f"{v:.{digits}f}"
                cells.append(rf"\textbf{{{text}}}" if c == target and text != "--" else text)
            lines.append(" & ".join(cells) + r" \\")
    return "\n".join(lines + _end())
