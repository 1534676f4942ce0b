"""Plot pages draw in a real browser with the network cut off.

`dvc plots show` and `dvc plots diff` run in a small git+DVC repository made here, with the
project's .dvc/config and .dvc/plots templates, and their index.html goes through headless
chromium. Needs Debian's chromium (`scripts/install.sh --test`, as root) and the npm packages
(`npm ci` in scripts/plots, also run by scripts/install.sh); tests skip without them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dvc_render.html import PAGE_HTML
from dvc_render.vega import VegaRenderer

ROOT = Path(__file__).resolve().parents[1]
PLOTS_DIR = ROOT / "scripts" / "plots"
CHROMIUM = shutil.which("chromium")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium: `scripts/install.sh --test` installs it (root, apt)"
)
needs_npm_packages = pytest.mark.skipif(
    not (PLOTS_DIR / "node_modules").is_dir(),
    reason="no scripts/plots/node_modules: `scripts/install.sh` runs `npm ci` there",
)

GIT_ENV = {
    "GIT_AUTHOR_NAME": "plots",
    "GIT_AUTHOR_EMAIL": "plots@example.invalid",
    "GIT_COMMITTER_NAME": "plots",
    "GIT_COMMITTER_EMAIL": "plots@example.invalid",
}

# The kinds of plots the project's dvc.yaml declares: a dvclive folder of TSVs, a scatter,
# the project's roc_by_class template and DVC's confusion template.
DVC_YAML = """\
stages:
  report:
    cmd: "true"
    plots:
      - plots/metrics:
          cache: false
          x: step
      - plots/vs_rho.json:
          cache: false
          template: scatter
          x: rho
          y: value
          title: Tune, validation accuracy vs rho
      - plots/roc.json:
          cache: false
          template: roc_by_class
          x: fpr
          y: tpr
          x_label: false positive rate
          y_label: true positive rate
          title: ROC, one-vs-rest per class (test split)
      - plots/confusion.json:
          cache: false
          template: confusion
          x: actual
          y: predicted
          title: Confusion matrix (test split)
"""
PLOT_COUNT = 5  # lr.tsv, val/accuracy.tsv, vs_rho, roc, confusion


def write_plot_data(repo: Path, version: int) -> None:
    """Small plot files; `version` changes every value, for `dvc plots diff`."""
    d = 0.05 * version
    metrics = repo / "plots" / "metrics"
    (metrics / "val").mkdir(parents=True, exist_ok=True)
    (metrics / "lr.tsv").write_text("step\tlr\n0\t0.1\n1\t0.05\n2\t%g\n" % (0.01 + d))
    (metrics / "val" / "accuracy.tsv").write_text("step\taccuracy\n0\t0.6\n1\t%g\n" % (0.8 + d))
    rows = {
        "vs_rho": [{"rho": 0.01 * i, "value": 0.7 + 0.02 * i + d} for i in range(5)],
        "roc": [
            {"class": name, "fpr": fpr, "tpr": min(1.0, tpr + d)}
            for name in ("T-shirt/top", "Trouser")
            for fpr, tpr in ((0.0, 0.0), (0.1, 0.7), (0.3, 0.9), (1.0, 1.0))
        ],
        "confusion": [
            {"actual": actual, "predicted": predicted}
            for actual, predicted in (("Coat", "Coat"), ("Coat", "Shirt"), ("Shirt", "Shirt"),
                                      ("Bag", "Bag"), ("Bag", "Coat" if version else "Bag"))
        ],
    }
    for name, data in rows.items():
        (repo / "plots" / f"{name}.json").write_text(json.dumps(data, indent=1))


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check)


def template_path(repo: Path) -> Path:
    """The page template the repository's DVC config names, resolved as DVC does."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        name = dvc_repo.config["plots"].get("html_template")
        assert name, ".dvc/config sets no plots.html_template: DVC's page loads vega from a CDN"
        return Path(dvc_repo.dvc_dir, name)


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's DVC config and templates; HEAD holds one version of the plot data and
    the workspace another. No page template yet."""
    repo = tmp_path_factory.mktemp("plots-repo")
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    write_plot_data(repo, 0)
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "commit.gpgsign=false", "commit", "-qm", "plots")
    write_plot_data(repo, 1)
    return repo


@pytest.fixture(scope="module")
def offline_repo(plots_repo: Path) -> Path:
    """`plots_repo` with the page template generated where its config says, as install.sh
    does in the project."""
    make_template = PLOTS_DIR / "make_template.py"
    run(ROOT, sys.executable, str(make_template), "--output", str(template_path(plots_repo)))
    return plots_repo


def plot_page(repo: Path, out: Path, *command: str) -> Path:
    dvc(repo, "plots", *command, "-o", str(out))
    return out / "index.html"


def plot_ids(page: Path) -> set[str]:
    """Ids of the elements the page asks vega-embed to draw into."""
    return set(re.findall(r"vegaEmbed\('#([^']+)'", page.read_text(encoding="utf-8")))


def browser_dom(page: Path, profile: Path) -> str:
    """The page's DOM after its scripts ran in headless chromium with every host unreachable."""
    assert CHROMIUM is not None
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
        "--virtual-time-budget=5000", "--dump-dom", page.as_uri(),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


class DrawnPlots(HTMLParser):
    """Which of `ids` hold a drawn vega view: a <canvas class="marks"> with a nonzero width and
    height, or an <svg class="marks"> with content. (vega-embed's action menu has its own svg
    icon; it carries no "marks" class.)"""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
            "source", "track", "wbr"}

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.ids = ids
        self.drawn: set[str] = set()
        self.open: list[tuple[str, str | None, bool]] = []  # (tag, plot id, is marks svg)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        plot = attr["id"] if attr.get("id") in self.ids else (
            self.open[-1][1] if self.open else None)
        marks = "marks" in (attr.get("class") or "").split()
        if plot is not None:
            size = [int(attr.get(side) or 0) for side in ("width", "height")]
            if tag == "canvas" and marks and min(size) > 0:
                self.drawn.add(plot)
            if self.open and self.open[-1][2]:  # a child of <svg class="marks">
                self.drawn.add(plot)
        if tag not in self.VOID:
            self.open.append((tag, plot, tag == "svg" and marks))

    def handle_endtag(self, tag: str) -> None:
        while self.open and self.open.pop()[0] != tag:
            pass


def drawn_plots(dom: str, ids: set[str]) -> set[str]:
    parser = DrawnPlots(ids)
    parser.feed(dom)
    parser.close()
    return parser.drawn


def test_pinned_libraries_are_the_ones_dvc_loads() -> None:
    dvc_cdn = dict(re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    package = json.loads((PLOTS_DIR / "package.json").read_text(encoding="utf-8"))
    assert package["dependencies"] == dvc_cdn


@pytest.mark.slow
@needs_chromium
@needs_npm_packages
@pytest.mark.parametrize("command", [("show",), ("diff", "HEAD")], ids=["show", "diff"])
def test_every_plot_draws_offline(offline_repo: Path, tmp_path: Path,
                                  command: tuple[str, ...]) -> None:
    page = plot_page(offline_repo, tmp_path / "dvc_plots", *command)
    ids = plot_ids(page)
    assert len(ids) == PLOT_COUNT
    assert drawn_plots(browser_dom(page, tmp_path / "profile"), ids) == ids


@pytest.mark.slow
@needs_chromium
def test_dvc_cdn_page_stays_blank_offline(plots_repo: Path, tmp_path: Path) -> None:
    """The check above can fail: DVC's own page, which loads vega from a CDN, draws nothing."""
    cdn_template = tmp_path / "cdn.html"
    cdn_template.write_text(PAGE_HTML)
    page = plot_page(plots_repo, tmp_path / "dvc_plots", "show",
                     "--html-template", str(cdn_template))
    ids = plot_ids(page)
    assert len(ids) == PLOT_COUNT
    assert drawn_plots(browser_dom(page, tmp_path / "profile"), ids) == set()


def test_missing_template_fails_without_a_page(plots_repo: Path, tmp_path: Path) -> None:
    """Before scripts/install.sh made the template, DVC exits with an error (that only says
    the template lacks '{plot_divs}') and writes no page, blank or online."""
    repo = tmp_path / "repo"
    shutil.copytree(plots_repo, repo)
    template_path(repo).unlink(missing_ok=True)
    out = tmp_path / "dvc_plots"
    proc = dvc(repo, "plots", "show", "-o", str(out), check=False)
    assert proc.returncode != 0
    assert "{plot_divs}" in proc.stderr
    assert not (out / "index.html").exists()
