"""The results pages: built from stored files, and checked in a real headless browser (Chromium) as a reader
would use them: every table and image loads, and a click on a column header sorts it."""

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from maskbench.benchmark import page
from maskbench.benchmark.figures import figure_caption, figure_order, write_figures

PUBLISHED = Path(__file__).resolve().parent.parent / "results" / "synthetic" / "smallcnn"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Census(HTMLParser):
    """Counts the tables, images and links of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.links, self.headers = 0, [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "sortable" in (a.get("class") or ""):
            self.tables += 1
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "th":
            self.headers += 1


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A copy of the published default run (tables, sidecars, run files) with its figures and pages."""
    results = tmp_path_factory.mktemp("results")
    run_dir = results / "synthetic" / "smallcnn"
    run_dir.mkdir(parents=True)
    for p in PUBLISHED.iterdir():
        if p.is_file():
            shutil.copy(p, run_dir / p.name)
    shutil.copytree(PUBLISHED / "per_image", run_dir / "per_image")
    write_figures(run_dir)
    page.write_pages(results)
    return results, run_dir


def test_run_page_shows_every_table_figure_and_method_with_links(site):
    results, run_dir = site
    census = Census()
    census.feed((run_dir / "index.html").read_text())
    csvs = sorted(run_dir.glob("*.csv"))
    assert census.tables == len(csvs) + 1  # every CSV, plus the methods table
    for p in csvs:
        assert p.name in census.links
        if p.with_suffix(".tex").is_file():
            assert p.with_suffix(".tex").name in census.links
    pngs = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert sorted(Path(s).name for s in census.images) == pngs and pngs
    shown = [Path(s).stem for s in census.images]  # grid, forest plots, curves, class table, sanity: in that order
    assert shown == sorted(shown, key=figure_order) and shown.index("forest_iou") < shown.index("curves_insertion")
    assert figure_caption("curves_mf") in html.unescape((run_dir / "index.html").read_text())
    text = (run_dir / "index.html").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git"]["commit"] in text  # traceable to a revision
    for meta in (run_dir / "per_image").glob("*.json"):
        assert f">{json.loads(meta.read_text())['method']}<" in text


def test_statistics_tables_are_wide_with_intervals_and_the_best_bold():
    board = pd.read_csv(PUBLISHED / "leaderboard.csv")
    out = page.wide_statistics(board)
    rows = re.findall(r"<tr>(.*?)</tr>", out, flags=re.S)[1:]  # the header row first
    assert len(rows) == board["method"].nunique()
    best = board[board["best"]]
    for _, r in best.iterrows():
        assert f'data-sort="{r["value"]}" class="best">{r["value"]:.4g} <span class="ci">' in out
    assert out.count("<th>") == 2 + board["statistic"].nunique()


def test_index_lists_every_run(site):
    results, _ = site
    census = Census()
    census.feed((results / "index.html").read_text())
    assert census.links == ["synthetic/smallcnn/index.html"]


PROBE = """<pre id="probe"></pre><script>
window.addEventListener('load', function(){
  var out = {tables: document.querySelectorAll('table.sortable').length, broken: [], images: 0, sorts: []};
  Array.from(document.images).forEach(function(i){
    out.images++; if(!(i.complete && i.naturalWidth > 0)) out.broken.push(i.src); });
  function column(t, c){ return Array.from(t.tBodies[0].rows).map(function(r){ return r.cells[c].dataset.sort; }); }
  document.querySelectorAll('table.sortable').forEach(function(t){
    var ths = t.querySelectorAll('th'), c = ths.length - 1;
    ths[c].click(); var up = column(t, c); var upState = ths[c].getAttribute('aria-sort');
    ths[c].click(); var down = column(t, c); var downState = ths[c].getAttribute('aria-sort');
    out.sorts.push({up: up, down: down, upState: upState, downState: downState});
  });
  document.getElementById('probe').textContent = JSON.stringify(out);
});
</script>"""


def _ordered(values, descending):
    """Undefined cells last, numbers in order (text columns follow the browser's locale order: not checked)."""
    defined = [v for v in values if v != ""]
    if values[: len(defined)] != defined:
        return False
    try:
        keys = [float(v) for v in defined]
    except ValueError:
        return True
    return keys == sorted(keys, reverse=descending)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Chromium not installed (.ci/run installs it)")
def test_page_in_headless_chromium_loads_every_image_and_sorts_every_table(site, tmp_path):
    assert CHROMIUM, "CI must have Chromium: .ci/run installs the Debian package"
    _, run_dir = site
    probe = run_dir / "probe.html"
    probe.write_text((run_dir / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert m and m.group(1), f"no probe output: {proc.stderr[-2000:]}"
    out = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert out["tables"] == len(list(run_dir.glob("*.csv"))) + 1
    assert out["images"] == len(list((run_dir / "figures").glob("*.png"))) > 0
    assert out["broken"] == []
    for s in out["sorts"]:
        assert sorted(s["up"]) == sorted(s["down"])  # the same cells, reordered
        assert s["upState"] == "ascending" and s["downState"] == "descending"
        assert _ordered(s["up"], descending=False) and _ordered(s["down"], descending=True)
    # at least one numeric column really changed order
    assert any(s["up"] != s["down"] and s["up"][0] != "" for s in out["sorts"])
