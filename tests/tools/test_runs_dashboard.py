"""`ldm runs compare` writes `dashboard.html`: checked as data (self-contained, subsampled, downscaled) and as the DOM
a real headless browser (Debian's chromium) renders from it after the page's script ran.

The runs are two folders laid out like real ones (`config.yaml`, a CSVLogger `metrics.csv` with empty cells where a
metric was not logged at a step, `images/samples-step<N>.png` from the SampleLogger, `eval/samples.png` from
`ldm eval`), differing in the learning rate. The browser tests skip, saying why, only where no chromium binary exists
(`make test` installs it with apt as root)."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ldm.tools.dashboard import MAX_IMAGE_SIDE, MAX_POINTS, run_labels, subsample
from tests.conftest import run_ldm

CHROMIUM = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (root: `make test` installs "
                                   "Debian's chromium; else `apt-get install chromium`)")

TRAIN_STEPS = 3000  # > MAX_POINTS: run a's train/loss is subsampled in the page
#: val/loss and eval/clip_score per run: (step, value); run b never logged val/psnr
VAL = {"a": [(1000, 0.5), (2000, 0.25), (3000, 0.375)], "b": [(1000, 0.75), (2000, 0.5), (3000, 0.125)]}
CLIP = {"a": [(1500, 0.25), (3000, 0.5)], "b": [(3000, 0.125)]}


def make_run(root: Path, name: str, lr: float, train_steps: int, images: dict[str, tuple[int, int, int]]) -> Path:
    run = root / "runs" / "exp" / name
    run.mkdir(parents=True)
    config = {"model": {"class_path": "ldm.systems.LatentDiffusion", "init_args": {"lr": lr, "cond_drop": 0.1}},
              "trainer": {"max_steps": TRAIN_STEPS}, "run": {"name": "exp", "version": name}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows: dict[int, dict[str, str]] = {}
    for step in range(1, train_steps + 1):
        loss = math.nan if (name == "b" and step == 7) else 2.0 / math.sqrt(step)
        rows[step] = {"train/loss": repr(loss)}
    for step, v in VAL[name]:
        rows.setdefault(step, {})["val/loss"] = repr(v)
        if name == "a":
            rows[step]["val/psnr"] = repr(20.0 + step / 1000)
    for step, v in CLIP[name]:
        rows.setdefault(step, {})["eval/clip_score"] = repr(v)
    fields = ["epoch", "step", "train/loss", "val/loss", "val/psnr", "eval/clip_score"]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({"epoch": "0", "step": str(step), **rows[step]})
    for rel, (w, h, shade) in images.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (shade, 255 - shade, 128)).save(run / rel)
    return run


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dashboard")
    a = make_run(root, "a", 0.01, TRAIN_STEPS, {"images/samples-step0000100.png": (64, 32, 10),
                                                  "images/samples-step0002000.png": (64, 32, 200)})
    b = make_run(root, "b", 0.05, 400, {"images/samples-step0000300.png": (48, 48, 90),
                                          "eval/samples.png": (2400, 600, 30)})
    res = run_ldm(["runs", "compare", str(a), str(b), "--out", str(root / "cmp")], cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    page = (root / "cmp/dashboard.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    return {"root": root, "runs": [a, b], "path": root / "cmp/dashboard.html", "page": page, "data": data,
            "stdout": res.stdout}


# ---------------------------------------------------------------- the file itself, no browser

def test_the_page_is_one_self_contained_file(dashboard):
    page = dashboard["page"]
    assert "dashboard.html" in dashboard["stdout"]
    # nothing is fetched: no external script, style, image, font or frame (the SVG namespace URI is a name)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)|@import|url\(\s*["']?https?:|<link|<iframe""", page)
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert page.count("<script") == 3  # the error hook, the data, the script: all inline
    assert len(page) < 2_000_000


def test_the_embedded_data_subsample_curves_and_keep_all_points_for_the_table(dashboard):
    data = dashboard["data"]
    assert [r["name"] for r in data["runs"]] == ["exp/a", "exp/b"]
    metrics = {m["name"]: m for m in data["metrics"]}
    # --metrics default (every val/ and eval/ metric all runs logged) first, then the rest, val/ before train/
    assert [m["name"] for m in data["metrics"]] == ["eval/clip_score", "val/loss", "val/psnr", "train/loss"]
    train_a, train_b = metrics["train/loss"]["series"]
    assert train_a["total"] == TRAIN_STEPS and len(train_a["steps"]) == MAX_POINTS == len(train_a["values"])
    assert train_a["steps"][0] == 1 and train_a["steps"][-1] == TRAIN_STEPS
    assert train_b["total"] == len(train_b["steps"]) == 400 and train_b["values"][6] is None  # the NaN: a gap
    assert metrics["val/loss"]["final"] == [0.375, 0.125] and metrics["val/loss"]["best"] == [0.25, 0.125]
    assert metrics["eval/clip_score"]["best"] == [0.5, 0.125] and not metrics["eval/clip_score"]["lower"]
    assert metrics["val/psnr"]["series"][1] is None and metrics["val/psnr"]["final"] == [23.0, None]
    # train/loss of b: the best ignores the NaN; the final is the last value
    assert metrics["train/loss"]["best"][1] == pytest.approx(2.0 / math.sqrt(400), rel=1e-5)
    assert data["config"] == {"keys": ["model.init_args.lr"], "values": [["0.01"], ["0.05"]]}


def test_the_newest_images_are_embedded_and_large_ones_downscaled(dashboard):
    a, b = dashboard["runs"]
    rows = {row["kind"]: row["cells"] for row in dashboard["data"]["images"]}
    assert set(rows) == {"samples", "ldm eval report"}
    newest_a, newest_b = rows["samples"]
    assert newest_a["file"] == "images/samples-step0002000.png" and newest_a["step"] == 2000
    assert newest_a["uri"] == "data:image/png;base64," + base64.b64encode(
        (a / "images/samples-step0002000.png").read_bytes()).decode()
    assert newest_b["step"] == 300
    report_a, report_b = rows["ldm eval report"]
    assert report_a is None and report_b["original"] == [2400, 600]
    assert (report_b["width"], report_b["height"]) == (MAX_IMAGE_SIDE, MAX_IMAGE_SIDE // 4)


def test_subsample_and_run_labels():
    points = [(i, float(i)) for i in range(10)]
    assert subsample(points, 20) == points
    kept = subsample(points, 4)
    assert kept == [(0, 0.0), (3, 3.0), (6, 6.0), (9, 9.0)]
    assert len(subsample(list(range(100_001)), MAX_POINTS)) == MAX_POINTS
    assert run_labels([Path("/x/runs/ldm/version_0"), Path("/x/runs/ldm/version_1")]) == ["ldm/version_0",
                                                                                         "ldm/version_1"]
    assert run_labels([Path("/x/runs/ae/v"), Path("/x/runs/ldm/deep/v")]) == ["ae/v", "ldm/deep/v"]
    assert run_labels([Path("/x/r"), Path("/x/r")]) == ["x/r (1)", "x/r (2)"]


# ---------------------------------------------------------------- rendered by chromium

class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.parent, self.children, self.parts = tag, attrs, parent, [], []

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k) == v if v is not True else k in n.attrs for k, v in want.items())]

    def find(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag} {attrs}> in the rendered DOM"
        return found[0]

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class DOM(HTMLParser):
    """The dumped DOM as a tree (the standard library has no HTML tree builder)."""
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(node)
        self.node.parts.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.node = self.node.parent

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.parts.append(data)


def render(path: Path, fragment: str = "") -> Node:
    """The DOM after the page's script ran, from headless chromium."""
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                              f"--user-data-dir={profile}", "--dump-dom", path.resolve().as_uri() + fragment],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "<html" in res.stdout, res.stderr[-3000:]
    return DOM(res.stdout).root


def assert_rendered(dom: Node) -> None:
    errors = [n.text() for n in dom.find_all("li") if "js-error" in n.classes()]
    assert errors == [] and dom.find(id="status").attrs["data-state"] == "rendered", errors


def path_points(path: Node) -> int:
    d = path.attrs["d"]
    return d.count("M") + d.count("L")


def cells(dom: Node, metric: str, which: str) -> list[Node]:
    """The table cells of one column, in row order."""
    return [td for tr in dom.find("table", id="final-table").find_all("tr") for td in tr.find_all("td")
            if td.attrs.get("data-metric") == metric and td.attrs.get("data-which") == which]


@needs_browser
def test_chromium_renders_curves_table_config_and_images(dashboard):
    dom = render(dashboard["path"])
    assert_rendered(dom)
    # the curves of the default metric, one path per run, every point drawn (no metric here has > 2,000)
    svg = dom.find("svg", id="curves")
    assert svg.attrs["data-metric"] == "eval/clip_score"
    curves = {int(p.attrs["data-run"]): p for p in svg.find_all("path") if "curve" in p.classes()}
    assert set(curves) == {0, 1}
    assert [path_points(curves[i]) for i in (0, 1)] == [int(curves[i].attrs["data-n"]) for i in (0, 1)] == [2, 1]
    assert {p.attrs["stroke"] for p in curves.values()} == {r["color"] for r in dashboard["data"]["runs"]}
    assert [n.text() for n in dom.find("div", id="legend").find_all("span") if "legend-item" in n.classes()] == [
        "exp/a", "exp/b"]
    options = [o.text() for o in dom.find("select", id="metric").find_all("option")]
    assert options == ["eval/clip_score", "val/loss", "val/psnr", "train/loss"]
    # the final table: values and the best of each column highlighted (val/loss lower, clip score higher is better)
    final, best = cells(dom, "val/loss", "final"), cells(dom, "val/loss", "best")
    assert [td.text() for td in final] == ["0.375", "0.125"] and [td.text() for td in best] == ["0.25", "0.125"]
    assert [float(td.attrs["data-value"]) for td in final] == [0.375, 0.125]
    assert ["best" in td.classes() for td in final] == [False, True]
    assert ["best" in td.classes() for td in cells(dom, "eval/clip_score", "final")] == [True, False]
    assert [td.text() for td in cells(dom, "val/psnr", "final")] == ["23", "-"]
    assert [tr.find("td").text() for tr in dom.find("table", id="final-table").find_all("tr")[2:]] == ["exp/a",
                                                                                                      "exp/b"]
    # the differing config key, one column per run
    row = dom.find("tr", data_key="model.init_args.lr")
    assert [td.text() for td in row.find_all("td")] == ["model.init_args.lr", "0.01", "0.05"]
    # both runs' newest samples side by side, with captions; b's `ldm eval` grid, a has none
    samples = dom.find("tr", data_kind="samples")
    images = samples.find_all("img")
    assert [img.attrs["src"] for img in images] == [c["uri"] for c in dashboard["data"]["images"][0]["cells"]]
    assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in images)
    captions = [c.text() for c in samples.find_all("figcaption")]
    assert captions == ["exp/a · images/samples-step0002000.png · step 2000",
                        "exp/b · images/samples-step0000300.png · step 300"]
    report = dom.find("tr", data_kind="ldm eval report")
    assert [td.text() for td in report.find_all("td")][0] == "none"
    assert "downscaled from 2400×600" in report.find("figcaption").text()


@needs_browser
def test_the_view_in_the_fragment_log_smoothing_subsampling_hiding_and_sorting(dashboard):
    dom = render(dashboard["path"], "#metric=train/loss&logy=1&smooth=0.9&sort=final:val/loss:asc&hide=1")
    assert_rendered(dom)
    svg = dom.find("svg", id="curves")
    assert svg.attrs["data-metric"] == "train/loss"
    curves = [p for p in svg.find_all("path") if "curve" in p.classes()]
    raw = [p for p in svg.find_all("path") if "raw" in p.classes()]
    assert [p.attrs["data-run"] for p in curves] == ["0"] and len(raw) == 1  # run b hidden; the raw curve faint
    assert path_points(curves[0]) == int(curves[0].attrs["data-n"]) == MAX_POINTS
    assert "(log) (smoothed)" in svg.text()
    assert "exp/a (2000 of 3000)" in dom.find(id="points-note").text()
    legend = [n for n in dom.find("div", id="legend").find_all("span") if "legend-item" in n.classes()]
    assert ["hidden-run" in n.classes() for n in legend] == [False, True]
    rows = dom.find("table", id="final-table").find_all("tr")[2:]
    assert [tr.attrs["data-run"] for tr in rows] == ["1", "0"]  # final val/loss ascending: b (0.125), a (0.375)
    assert "sorted-asc" in dom.find("th", data_sort="final:val/loss").classes()
    dom = render(dashboard["path"], "#metric=val/psnr&sort=best:eval/clip_score:desc&filter=psnr")
    assert_rendered(dom)
    curves = [p for p in dom.find("svg", id="curves").find_all("path") if "curve" in p.classes()]
    assert [p.attrs["data-run"] for p in curves] == ["0"]  # b never logged val/psnr
    assert [o.text() for o in dom.find("select", id="metric").find_all("option")] == ["val/psnr"]
    assert {td.attrs["data-metric"] for td in dom.find("table", id="final-table").find_all("td")
            if "data-metric" in td.attrs} == {"val/psnr"}


@needs_browser
def test_a_script_error_is_reported_in_the_page(dashboard, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text(dashboard["page"].replace('"metrics":[', '"metrics":[{"name":"x","series":7},', 1))
    dom = render(broken)
    assert dom.find(id="status").attrs["data-state"] == "error"
    assert [n for n in dom.find_all("li") if "js-error" in n.classes()]
