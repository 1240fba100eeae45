"""The one-page HTML report: self-contained, complete, and rendered by a real headless browser."""

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fastres.grid.plan import register
from fastres.report.command import main
from fastres.run.cell import Cell, GridProtocol
from fastres.run.records import EpochMetrics, RunResult, best_of
from fastres.run.results import ResultsDB, new_owner
from fastres.study.structures import STRUCTURES

PNG = b"\x89PNG\r\n\x1a\n"
ENV = {"fastres": "0.1.0", "git_commit": "0123456789abcdef0123", "torch": "2.14.1",
       "python": "3.11.2", "device": "cuda:0", "device_name": "NVIDIA H200"}
KERNEL_PLAN = ["conv1: 3->16 k3 s1 p1: triton implicit-GEMM conv + BN stats epilogue",
               "layer1.0.conv1: 16->16 k3 s1 p1: aten conv2d (cuDNN) + triton BN stats pass"]


def record(db: ResultsDB, cell: Cell, protocol: GridProtocol, accs: list[float] | None,
           env: dict) -> None:
    """A run through the store's real API (accs=None: registered, not run)."""
    rid = register(db, cell, protocol, "test")
    if accs is None:
        return
    owner = new_owner()
    assert db.acquire(rid, owner) == "acquired"
    ckpt = db.folder / "checkpoints" / rid / "epoch.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"")
    rng = np.random.default_rng(len(accs))
    eps = [EpochMetrics(i + 1, 0.1, 1.0, a, float(2.0 - a + rng.uniform(0, 0.1)), a, 1.5)
           for i, a in enumerate(accs)]
    for m in eps:
        db.commit_epoch(rid, owner, m, ckpt, "0")
    db.finish(rid, owner, RunResult({}, "completed", eps, *best_of(eps), None, env, {}))


@pytest.fixture
def results(tmp_path) -> Path:
    """Structure 1: sgd and adam finished with and without augmentation, adagrad pending, and
    the Figure 7 and 8 variants; one run recorded a Triton kernel plan."""
    db = ResultsDB(tmp_path / "runs")
    p = GridProtocol(epochs=3, data="d", data_kind="test")
    s1 = STRUCTURES[1]
    for aug in (True, False):
        record(db, Cell(s1, 1, "sgd", aug), p, [0.5, 0.9510, 0.94],
               {**ENV, "kernels": KERNEL_PLAN})
        record(db, Cell(s1, 1, "adam", aug), p, [0.80, 0.85, 0.93], ENV)
        record(db, Cell(s1, 1, "adagrad", aug), p, None, ENV)
    record(db, Cell(s1, 1, "sgd", True, normalize=False), p, [0.4, 0.6, 0.7], ENV)
    record(db, Cell(s1, 1, "sgd", False, normalize=False), p, [0.3, 0.5, 0.6], ENV)
    for tmax in (0, 100, 300):
        record(db, Cell(s1, 1, "sgd", True, tmax=tmax), p, [0.2, 0.4, 0.6], ENV)
    db.close()
    return tmp_path / "runs"


class Tags(HTMLParser):
    """Every start tag with its attributes, in order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(html: str) -> list[tuple[str, dict]]:
    p = Tags()
    p.feed(html)
    return p.tags


@pytest.fixture
def page(results, tmp_path, capsys) -> Path:
    out = tmp_path / "report.html"
    assert main(["--results", str(results), "--format", "html", "--out", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    assert not (results / "figures").exists()  # drawn aside and embedded, not left behind
    return out


def test_page_is_self_contained(page):
    html = page.read_text()
    tags = parse(html)
    # Nothing the page would fetch: no URL in any attribute or style, not even protocol-relative.
    for tag, attrs in tags:
        for k, v in attrs.items():
            assert not re.match(r"\s*(https?:)?//", v or ""), (tag, k, v[:80])
    assert not re.search(r"url\(|@import|https?://", html)
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == 4  # Figures 5-8
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


def test_page_holds_tables_figures_protocol_environment_and_what_is_missing(page):
    html = page.read_text()
    tags = parse(html)
    assert sum(t == "table" for t, _ in tags) >= 1 + 2 * 2 + 2 * 2 + 1  # protocol, 3, 4, ...
    # Table 3: ours, the paper's value and the difference, green above the paper, red below.
    assert "95.10" in html and "paper 95.03" in html
    assert re.search(r'rgba\(26,152,80,0\.\d+\); color: #\w+">\+0\.07<', html)
    assert re.search(r'rgba\(215,48,39,0\.\d+\); color: #\w+">-0\.10<', html)  # adam 93.00
    # Bigger differences get a stronger colour: -210 epochs is at full strength.
    assert re.search(r'rgba\(230,85,13,0\.90\); color: #fff">-210<', html)
    assert "missing<br>pending 0/3" in html  # the adagrad cells
    for caption in ("Figure 5", "Figure 6", "Figure 7", "Figure 8"):
        assert caption in html
    assert "Protocol id" in html and "data_kind" in html
    assert "NVIDIA H200" in html and "0123456789ab" in html and "torch 2.14.1" in html
    assert "Triton, 2 layers" in html and "implicit-GEMM" in html  # the kernel plan
    assert "eager (PyTorch reference path)" in html
    assert "2 of 11 runs not finished" in html
    assert "4 of 90 cells have a result here" in html


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI needs Debian's chromium for the browser test (scripts/setup.sh test "
                    "installs it)")
    pytest.skip("no chromium here: apt-get install chromium (scripts/setup.sh test does)")


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless, as root, and kept off the network (no sync, updates, or background calls)."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_renders_in_headless_chromium(page, tmp_path):
    browser = find_chromium()
    shot = tmp_path / "report.png"
    url = page.resolve().as_uri()
    r = chromium(browser, tmp_path / "profile1", f"--screenshot={shot}",
                 "--window-size=1400,3000", url)
    assert shot.is_file(), r.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # a blank page compresses to a few KB

    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 3000)
    small = np.asarray(img.resize((350, 750)))
    colours = len(np.unique(small.reshape(-1, 3), axis=0))
    ink = (small.min(axis=2) < 200).mean()  # share of pixels that are not (near) white
    assert colours > 200 and ink > 0.03, (colours, ink)
    # Colour where the coloured differences and plots are, not only grey text.
    assert (np.ptp(small.astype(int), axis=2) > 60).mean() > 0.002

    dom = chromium(browser, tmp_path / "profile2", "--dump-dom", url).stdout
    assert dom.count("<table") == page.read_text().count("<table") >= 10
    assert dom.count('<img alt="Figure') == 4
    assert 'data-figures-shown="4/4"' in dom  # every figure decoded by the browser
