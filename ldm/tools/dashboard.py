"""The HTML dashboard of ``ldm runs compare``: one self-contained ``dashboard.html`` for people without W&B.

One file and no network: the run data are embedded as JSON, the sample grids as base64 data URIs, and the
script and style are inline and written here (no chart library, no CDN), so the page opens from a mail
attachment or a cluster's scratch folder. It holds

- the curves of any metric found in the runs' ``metrics.csv`` (a selector), the runs overlaid with a legend
  (click a run to hide it), step on x, log-y and smoothing (TensorBoard's debiased exponential moving
  average) toggles, a hover read-out; drawn as inline SVG by the page's script;
- the final table: the final and best value per run and metric (best per the ``lower_is_better`` rule of
  :mod:`ldm.tools.runs`, highlighted per column), sortable by clicking a column header;
- the config keys whose values differ between the runs;
- the newest sample grids of each run side by side, one column per run: ``images/samples-step<N>.png``
  (``SampleLogger``), ``images/reconstructions-step<N>.png`` (``ReconstructionLogger``),
  ``images/eval-step<N>.png`` (``GenerationEvalCallback``) and ``eval/samples.png`` (``ldm eval``).

Size stays sane for many runs: each curve keeps at most :data:`MAX_POINTS` points (uniform subsample, the
first and last point kept; the page says so; the table's values come from all points) and images wider or
taller than :data:`MAX_IMAGE_SIDE` are downscaled. The view (metric, log-y, smoothing, sort, filter,
hidden runs) lives in the URL fragment, e.g. ``dashboard.html#metric=val/loss&logy=1&smooth=0.8``, so a
view can be bookmarked or sent. When the script has rendered everything it sets ``data-state="rendered"``
on ``#status``; an exception anywhere sets ``data-state="error"`` and lists the message in ``#errors``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: points per curve and run embedded in the page (uniform subsample beyond)
MAX_POINTS = 2000
#: longest side of an embedded image in pixels (larger ones are downscaled)
MAX_IMAGE_SIDE = 1024
#: an embedded PNG larger than this (bytes, after downscaling) is stored as JPEG instead
MAX_PNG_BYTES = 400_000
#: (caption, glob inside the run folder) of the images a run writes; the newest by step is shown
IMAGE_KINDS: tuple[tuple[str, str], ...] = (
    ("samples", "images/samples-step*.png"),
    ("reconstructions", "images/reconstructions-step*.png"),
    ("eval samples (training)", "images/eval-step*.png"),
    ("ldm eval report", "eval/samples.png"),
)
#: tab10, then golden-angle hues for more runs
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def color(i: int) -> str:
    return PALETTE[i] if i < len(PALETTE) else f"hsl({(i * 137.508) % 360:.0f}, 65%, 45%)"


def subsample(points: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most ``limit`` points, evenly spaced by index, the first and the last always kept."""
    n = len(points)
    if n <= limit:
        return list(points)
    if limit < 2:
        return [points[-1]]
    return [points[round(i * (n - 1) / (limit - 1))] for i in range(limit)]


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Short, distinct names: the run paths without their common leading folders, at least two parts kept."""
    parts = [Path(r).resolve().parts for r in runs]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    keep = [max(2, len(p) - common) for p in parts]
    labels = ["/".join(p[-k:]) for p, k in zip(parts, keep, strict=True)]
    if len(set(labels)) < len(labels):  # the same folder given twice
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


def _step_of(path: Path) -> int | None:
    match = re.search(r"step(\d+)", path.stem)
    return int(match.group(1)) if match else None


def newest_images(run: Path) -> dict[str, Path]:
    """{kind: the newest image of that kind} a run folder holds (by the step in the name, else by mtime)."""
    found: dict[str, Path] = {}
    for kind, pattern in IMAGE_KINDS:
        files = [p for p in run.glob(pattern) if p.is_file()]
        if files:
            found[kind] = max(files, key=lambda p: (-1 if _step_of(p) is None else _step_of(p), p.stat().st_mtime,
                                                     p.name))
    return found


def embed_image(path: Path, max_side: int = MAX_IMAGE_SIDE) -> dict[str, Any]:
    """A data URI of the image (downscaled to ``max_side``), its shown and original sizes; None where unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            original = im.size
            raw = path.read_bytes()
            mime = Image.MIME.get(im.format or "", "")
            if max(im.size) > max_side or mime not in ("image/png", "image/jpeg"):
                im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
                im.thumbnail((max_side, max_side), Image.LANCZOS)
                buffer = io.BytesIO()
                im.save(buffer, format="PNG", optimize=True)
                raw, mime = buffer.getvalue(), "image/png"
                if len(raw) > MAX_PNG_BYTES:
                    buffer = io.BytesIO()
                    im.convert("RGB").save(buffer, format="JPEG", quality=85)
                    raw, mime = buffer.getvalue(), "image/jpeg"
            size = im.size
    except OSError as e:
        return {"error": f"{path.name}: unreadable ({e})"}
    return {"uri": f"data:{mime};base64,{base64.b64encode(raw).decode()}", "width": size[0], "height": size[1],
            "original": list(original)}


def _number(value: float) -> float | str:
    """JSON-safe: non-finite values as the strings 'nan', 'inf', '-inf'."""
    if math.isfinite(value):
        return float(f"{value:.6g}")
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _curve(points: list[tuple[int, float]]) -> dict[str, Any]:
    """A subsampled series; values rounded to 6 digits (enough to draw), non-finite ones as gaps."""
    kept = subsample(points)
    return {"steps": [s for s, _ in kept], "values": [float(f"{v:.6g}") if math.isfinite(v) else None for _, v in kept],
            "total": len(points)}


def _rank(metric: str) -> int:
    """Order of the metrics beyond ``--metrics`` (the first is shown first): validation, evaluation, test, train."""
    prefixes = ("val/", "eval/", "test/", "train/")
    return next((i for i, p in enumerate(prefixes) if metric.startswith(p)), len(prefixes))


def dashboard_data(runs: Sequence[Path], series: Sequence[dict[str, list[tuple[int, float]]]],
                   configs: Sequence[dict[str, Any]], diff: Sequence[str], primary: Sequence[str],
                   lower_is_better: Callable[[str], bool]) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data (curves subsampled, images embedded)."""
    others = sorted(set().union(*series) - set(primary), key=lambda m: (_rank(m), m)) if series else []
    metrics = []
    for m in [*primary, *others]:
        final, best = [], []
        for s in series:
            values = [v for _, v in s.get(m, [])]
            finite = [v for v in values if math.isfinite(v)]
            final.append(_number(values[-1]) if values else None)
            best.append(_number((min if lower_is_better(m) else max)(finite)) if finite else None)
        metrics.append({"name": m, "lower": lower_is_better(m), "primary": m in primary, "final": final, "best": best,
                        "series": [_curve(s[m]) if m in s else None for s in series]})
    images = []
    found = [newest_images(Path(r)) for r in runs]
    for kind, _ in IMAGE_KINDS:
        if not any(kind in f for f in found):
            continue
        cells = []
        for f in found:
            if kind not in f:
                cells.append(None)
                continue
            path = f[kind]
            cells.append({"file": f"{path.parent.name}/{path.name}", "step": _step_of(path), **embed_image(path)})
        images.append({"kind": kind, "cells": cells})
    labels = run_labels(runs)
    return {
        "runs": [{"name": n, "path": str(r), "color": color(i)}
                 for i, (n, r) in enumerate(zip(labels, runs, strict=True))],
        "metrics": metrics,
        "max_points": MAX_POINTS,
        "max_image_side": MAX_IMAGE_SIDE,
        "config": {"keys": list(diff), "values": [[_config_text(c.get(k)) for k in diff] for c in configs]},
        "images": images,
    }


def _config_text(value: Any) -> str:
    return "(unset)" if value is None else (json.dumps(value) if isinstance(value, (list, dict)) else str(value))


def render(data: dict[str, Any], title: str = "Run comparison") -> str:
    """The page: style, data (``</`` escaped so no value can close the script element), script."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__STYLE__", STYLE)
            .replace("__SCRIPT__", SCRIPT).replace("__DATA__", payload))


def write_dashboard(path: Path, runs: Sequence[Path], series: Sequence[dict[str, list[tuple[int, float]]]],
                    configs: Sequence[dict[str, Any]], diff: Sequence[str], primary: Sequence[str],
                    lower_is_better: Callable[[str], bool]) -> Path:
    data = dashboard_data(runs, series, configs, diff, primary, lower_is_better)
    path.write_text(render(data, title=f"Run comparison: {len(runs)} run{'s' if len(runs) != 1 else ''}"))
    return path


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<script>
window.onerror = function (message, source, line) {
  var box = document.getElementById("errors"), status = document.getElementById("status");
  if (box) { var li = document.createElement("li"); li.className = "js-error";
             li.textContent = message + " (line " + line + ")"; box.appendChild(li); box.hidden = false; }
  if (status) { status.setAttribute("data-state", "error"); status.textContent = "the page failed to render"; }
};
</script>
<style>__STYLE__</style></head>
<body>
<header><h1>__TITLE__</h1><p id="status" data-state="loading">rendering...</p><ul id="errors" hidden></ul>
<nav><a href="#curves-section">curves</a> · <a href="#table-section">final table</a> ·
<a href="#config-section">differing config</a> · <a href="#images-section">sample grids</a></nav></header>
<section id="curves-section"><h2>Curves</h2>
<div class="controls">
<label>metric <select id="metric"></select></label>
<label>filter metrics <input id="filter" type="search" placeholder="e.g. val/"></label>
<label><input id="logy" type="checkbox"> log y</label>
<label><input id="smooth" type="checkbox"> smoothing</label>
<input id="smooth-weight" type="range" min="0" max="0.99" step="0.01" value="0.6" title="smoothing weight">
<span id="smooth-value"></span>
</div>
<div id="chart"></div><div id="tooltip" hidden></div>
<div id="legend"></div>
<p class="note" id="points-note"></p>
</section>
<section id="table-section"><h2>Final and best values</h2>
<p class="note">Best of each column highlighted (lower is better for losses, FID, KID, FD-CLIP, LPIPS...;
higher for the rest). Click a column header to sort. Values from all logged points.</p>
<div class="scroll"><table id="final-table"></table></div></section>
<section id="config-section"><h2>Config keys that differ</h2><div class="scroll" id="config"></div></section>
<section id="images-section"><h2>Sample grids (newest of each run)</h2>
<p class="note">Click an image for its full size.</p><div class="scroll" id="images"></div></section>
<footer>Written by <code>ldm runs compare</code>; self-contained (no network).</footer>
<script type="application/json" id="data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 0 16px 40px; color: #222; }
h1 { font-size: 20px; margin: 16px 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
nav, .note, footer { color: #666; font-size: 13px; }
#status[data-state="error"], .js-error { color: #b00020; font-weight: 600; }
#status[data-state="rendered"] { display: none; }
.controls { display: flex; flex-wrap: wrap; gap: 6px 16px; align-items: center; margin-bottom: 6px; }
select { max-width: 420px; }
#chart svg { width: 100%; height: auto; background: #fff; border: 1px solid #ddd; }
.axis text { font-size: 11px; fill: #555; } .grid line { stroke: #eee; } .frame { fill: none; stroke: #bbb; }
.curve { fill: none; stroke-width: 1.6; } .raw { fill: none; stroke-width: 1; opacity: 0.25; }
#tooltip { position: absolute; background: rgba(255,255,255,0.95); border: 1px solid #bbb; padding: 4px 8px;
           font-size: 12px; pointer-events: none; }
#legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin: 6px 0; }
.legend-item { cursor: pointer; user-select: none; white-space: nowrap; }
.legend-item.hidden-run { opacity: 0.35; text-decoration: line-through; }
.swatch { display: inline-block; width: 14px; height: 4px; margin-right: 5px; vertical-align: middle; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f5f5f5; } th.sortable { cursor: pointer; } th.sorted-asc::after { content: " \\25B2"; }
th.sorted-desc::after { content: " \\25BC"; }
td.run, th.run { text-align: left; position: sticky; left: 0; background: #fafafa; }
td.best { background: #d7f0d2; font-weight: 600; } td.missing { color: #aaa; }
#config td { text-align: left; }
.images td, .images th { vertical-align: top; text-align: center; }
.images img { max-width: 360px; image-rendering: auto; cursor: zoom-in; }
.images img.zoomed { max-width: none; cursor: zoom-out; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; white-space: normal; max-width: 360px; }
"""

SCRIPT = r"""
"use strict";
var DATA = JSON.parse(document.getElementById("data").textContent);
var SVGNS = "http://www.w3.org/2000/svg";
var state = { metric: null, logy: false, smooth: false, weight: 0.6, sort: null, filter: "", hidden: {} };

function el(tag, attrs, text) {
  var e = document.createElement(tag);
  for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function sv(tag, attrs) {
  var e = document.createElementNS(SVGNS, tag);
  for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
  return e;
}
function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "string") return v;
  return String(Number(v.toPrecision(4)));
}
function numeric(v) { return typeof v === "number" && isFinite(v); }
function metricByName(name) {
  for (var i = 0; i < DATA.metrics.length; i++) if (DATA.metrics[i].name === name) return DATA.metrics[i];
  return null;
}
function visibleMetrics() {
  var f = state.filter.toLowerCase();
  return DATA.metrics.filter(function (m) { return !f || m.name.toLowerCase().indexOf(f) >= 0; });
}

/* ---- the view in the URL fragment: metric, logy, smooth (weight), sort (final|best:metric:asc|desc), filter,
        hide (run indices) ---- */
function readHash() {
  var params = new URLSearchParams(location.hash.slice(1));
  if (params.get("metric") && metricByName(params.get("metric"))) state.metric = params.get("metric");
  state.logy = params.get("logy") === "1";
  if (params.get("smooth") !== null) {
    var w = parseFloat(params.get("smooth"));
    state.smooth = w > 0; if (w > 0) state.weight = Math.min(w, 0.99);
  }
  if (params.get("sort")) state.sort = params.get("sort");
  if (params.get("filter")) state.filter = params.get("filter");
  (params.get("hide") || "").split(",").forEach(function (i) { if (i !== "") state.hidden[+i] = true; });
}
function writeHash() {
  var parts = ["metric=" + encodeURIComponent(state.metric || "")];
  if (state.logy) parts.push("logy=1");
  if (state.smooth) parts.push("smooth=" + state.weight);
  if (state.sort) parts.push("sort=" + encodeURIComponent(state.sort));
  if (state.filter) parts.push("filter=" + encodeURIComponent(state.filter));
  var hidden = Object.keys(state.hidden).filter(function (k) { return state.hidden[k]; });
  if (hidden.length) parts.push("hide=" + hidden.join(","));
  history.replaceState(null, "", "#" + parts.join("&"));
}

/* ---- curves ---- */
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { var pad = Math.abs(lo) * 0.1 || 1; lo -= pad; hi += pad; }
  var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
  var err = (hi - lo) / count / step;
  step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
  var ticks = [];  // integer multiples of the step: no 0.30000000000000004, no -5.6e-17 for 0
  for (var i = Math.ceil(lo / step - 1e-9); i * step <= hi + step * 1e-9; i++)
    ticks.push(Number((i * step).toPrecision(12)));
  return { lo: Math.min(lo, ticks[0]), hi: Math.max(hi, ticks[ticks.length - 1]), ticks: ticks };
}
function logTicks(lo, hi) {
  // lo, hi in log10: decades where the range spans some (with 2 and 5 where it spans few), else nice values
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  var ticks = [];
  if (hi - lo >= 1) {
    var mults = hi - lo < 3 ? [1, 2, 5] : [1];
    for (var k = Math.floor(lo); k <= Math.ceil(hi); k++) mults.forEach(function (m) {
      var t = k + Math.log10(m); if (t >= lo - 1e-9 && t <= hi + 1e-9) ticks.push(t);
    });
  } else {
    ticks = niceTicks(Math.pow(10, lo), Math.pow(10, hi), 5).ticks
      .filter(function (v) { return v > 0; }).map(Math.log10)
      .filter(function (t) { return t >= lo - 1e-9 && t <= hi + 1e-9; });
  }
  return { lo: lo, hi: hi, ticks: ticks };
}
function smoothed(values, weight) {
  // TensorBoard's smoothing: an exponential moving average, debiased for the first points
  var out = [], last = 0, n = 0;
  for (var i = 0; i < values.length; i++) {
    var v = values[i];
    if (v === null) { out.push(null); continue; }
    last = last * weight + (1 - weight) * v; n++;
    out.push(last / (1 - Math.pow(weight, n)));
  }
  return out;
}
function drawCurves() {
  var metric = metricByName(state.metric), chart = document.getElementById("chart");
  chart.innerHTML = ""; document.getElementById("legend").innerHTML = "";
  if (!metric) { chart.appendChild(el("p", { "class": "note" }, "no metrics logged")); return; }
  var W = 960, H = 440, L = 70, R = 20, T = 16, B = 42;
  var lines = [], xs = [], ys = [], dropped = 0, thinned = [];
  metric.series.forEach(function (s, i) {
    if (!s) return;
    if (s.total > s.steps.length) thinned.push(DATA.runs[i].name + " (" + s.steps.length + " of " + s.total + ")");
    if (state.hidden[i]) return;
    var vals = s.values.map(function (v) {
      if (v === null) return null;
      if (state.logy && v <= 0) { dropped++; return null; }
      return state.logy ? Math.log10(v) : v;
    });
    var shown = state.smooth ? smoothed(vals, state.weight) : vals;
    lines.push({ run: i, steps: s.steps, raw: vals, values: shown });
    s.steps.forEach(function (x, j) {  // the range holds what is drawn: the smoothed and the faint raw curve
      if (shown[j] !== null) { xs.push(x); ys.push(shown[j]); }
      if (vals[j] !== null) ys.push(vals[j]);
    });
  });
  var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, id: "curves", "data-metric": metric.name });
  chart.appendChild(svg);
  var xa = niceTicks(xs.length ? Math.min.apply(null, xs) : 0, xs.length ? Math.max.apply(null, xs) : 1, 8);
  var ylo = ys.length ? Math.min.apply(null, ys) : 0, yhi = ys.length ? Math.max.apply(null, ys) : 1;
  var ya = state.logy ? logTicks(ylo, yhi) : niceTicks(ylo, yhi, 6);
  function px(x) { return L + (x - xa.lo) / (xa.hi - xa.lo) * (W - L - R); }
  function py(y) { return H - B - (y - ya.lo) / (ya.hi - ya.lo) * (H - T - B); }
  var grid = sv("g", { "class": "grid" }), axis = sv("g", { "class": "axis" });
  xa.ticks.forEach(function (t) {
    grid.appendChild(sv("line", { x1: px(t), x2: px(t), y1: T, y2: H - B }));
    var label = sv("text", { x: px(t), y: H - B + 16, "text-anchor": "middle" }); label.textContent = fmt(t);
    axis.appendChild(label);
  });
  ya.ticks.forEach(function (t) {
    grid.appendChild(sv("line", { x1: L, x2: W - R, y1: py(t), y2: py(t) }));
    var label = sv("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end" });
    label.textContent = state.logy ? fmt(Math.pow(10, t)) : fmt(t);
    axis.appendChild(label);
  });
  var xlabel = sv("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }); xlabel.textContent = "step";
  var ylabel = sv("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle",
                            transform: "rotate(-90 14 " + (T + H - B) / 2 + ")" });
  ylabel.textContent = metric.name + (state.logy ? " (log)" : "") + (state.smooth ? " (smoothed)" : "");
  axis.appendChild(xlabel); axis.appendChild(ylabel);
  svg.appendChild(grid); svg.appendChild(axis);
  svg.appendChild(sv("rect", { "class": "frame", x: L, y: T, width: W - L - R, height: H - T - B }));
  var clip = sv("clipPath", { id: "plot-area" });
  clip.appendChild(sv("rect", { x: L - 3, y: T - 3, width: W - L - R + 6, height: H - T - B + 6 }));
  svg.appendChild(clip);
  var plot = sv("g", { "clip-path": "url(#plot-area)" });
  svg.appendChild(plot);
  function pathOf(steps, values) {
    var d = [], pen = false, n = 0;
    for (var j = 0; j < steps.length; j++) {
      if (values[j] === null) { pen = false; continue; }
      d.push((pen ? "L" : "M") + px(steps[j]).toFixed(1) + " " + py(values[j]).toFixed(1)); pen = true; n++;
    }
    return { d: d.join(""), n: n };
  }
  lines.forEach(function (line) {
    var c = DATA.runs[line.run].color;
    if (state.smooth) {
      var raw = pathOf(line.steps, line.raw);
      plot.appendChild(sv("path", { "class": "raw", d: raw.d, stroke: c }));
    }
    var p = pathOf(line.steps, line.values);
    plot.appendChild(sv("path", { "class": "curve", d: p.d, stroke: c, "data-run": line.run, "data-n": p.n }));
    if (p.n < 30) line.steps.forEach(function (x, j) {
      if (line.values[j] !== null)
        plot.appendChild(sv("circle", { cx: px(x), cy: py(line.values[j]), r: 2.5, fill: c, "data-run": line.run }));
    });
  });
  var cursor = sv("line", { y1: T, y2: H - B, stroke: "#999", "stroke-dasharray": "3 3", visibility: "hidden" });
  svg.appendChild(cursor);
  svg.addEventListener("mousemove", function (ev) {
    var box = svg.getBoundingClientRect(), x = (ev.clientX - box.left) / box.width * W;
    var step = xa.lo + (x - L) / (W - L - R) * (xa.hi - xa.lo), tip = document.getElementById("tooltip");
    var rows = [];
    lines.forEach(function (line) {
      var best = -1;
      for (var j = 0; j < line.steps.length; j++) if (line.values[j] !== null &&
          (best < 0 || Math.abs(line.steps[j] - step) < Math.abs(line.steps[best] - step))) best = j;
      if (best >= 0) rows.push([line.run, line.steps[best], state.logy ? Math.pow(10, line.values[best])
                                                                       : line.values[best]]);
    });
    if (!rows.length) return;
    cursor.setAttribute("x1", px(rows[0][1])); cursor.setAttribute("x2", px(rows[0][1]));
    cursor.setAttribute("visibility", "visible");
    tip.innerHTML = "";
    rows.forEach(function (r) {
      var line = el("div"); var sw = el("span", { "class": "swatch" }); sw.style.background = DATA.runs[r[0]].color;
      line.appendChild(sw); line.appendChild(document.createTextNode(DATA.runs[r[0]].name + "  step " + r[1] +
                                                                      ": " + fmt(r[2])));
      tip.appendChild(line);
    });
    tip.hidden = false; tip.style.left = (ev.pageX + 14) + "px"; tip.style.top = (ev.pageY + 10) + "px";
  });
  svg.addEventListener("mouseleave", function () {
    document.getElementById("tooltip").hidden = true; cursor.setAttribute("visibility", "hidden");
  });
  var legend = document.getElementById("legend");
  DATA.runs.forEach(function (run, i) {
    var item = el("span", { "class": "legend-item" + (state.hidden[i] ? " hidden-run" : ""), "data-run": i,
                            title: run.path + " (click to hide or show)" });
    var sw = el("span", { "class": "swatch" }); sw.style.background = run.color;
    item.appendChild(sw);
    item.appendChild(document.createTextNode(run.name + (metric.series[i] ? "" : " (not logged)")));
    item.addEventListener("click", function () { state.hidden[i] = !state.hidden[i]; writeHash(); drawCurves(); });
    legend.appendChild(item);
  });
  var note = "Each curve embeds at most " + DATA.max_points + " points per run (uniform subsample, first and last " +
             "point kept); the table below uses all points.";
  note += thinned.length ? " Subsampled here: " + thinned.join(", ") + "." : " No curve of this metric is subsampled.";
  if (dropped) note += " " + dropped + " values <= 0 are not shown on the log scale.";
  document.getElementById("points-note").textContent = note;
}
function fillSelector() {
  var select = document.getElementById("metric"), shown = visibleMetrics();
  select.innerHTML = "";
  [["compared (--metrics)", true], ["other metrics", false]].forEach(function (group) {
    var members = shown.filter(function (m) { return m.primary === group[1]; });
    if (!members.length) return;
    var og = el("optgroup", { label: group[0] });
    members.forEach(function (m) { og.appendChild(el("option", { value: m.name }, m.name)); });
    select.appendChild(og);
  });
  if (shown.length && !shown.some(function (m) { return m.name === state.metric; })) state.metric = shown[0].name;
  select.value = state.metric;
}

/* ---- the final table ---- */
function bestValue(values, lower) {
  // the best of a column, or null where fewer than two runs have a value or all values are equal (nothing to tell)
  var finite = values.filter(numeric);
  if (finite.length < 2 || Math.min.apply(null, finite) === Math.max.apply(null, finite)) return null;
  return lower ? Math.min.apply(null, finite) : Math.max.apply(null, finite);
}
function drawTable() {
  var table = document.getElementById("final-table"), metrics = visibleMetrics();
  table.innerHTML = "";
  var head = el("thead"), top = el("tr"), sub = el("tr");
  top.appendChild(el("th", { "class": "run", rowspan: 2 }, "run"));
  var columns = [];
  metrics.forEach(function (m) {
    top.appendChild(el("th", { colspan: 2, title: m.lower ? "lower is better" : "higher is better" },
                       m.name + (m.lower ? " \u2193" : " \u2191")));
    ["final", "best"].forEach(function (which) {
      var key = which + ":" + m.name;
      var th = el("th", { "class": "sortable", "data-sort": key }, which);
      if (state.sort && state.sort.indexOf(key + ":") === 0)
        th.className += state.sort.slice(-4) === "desc" ? " sorted-desc" : " sorted-asc";
      th.addEventListener("click", function () {
        var asc = m.lower;  // first click: best first
        if (state.sort && state.sort.indexOf(key + ":") === 0) asc = state.sort.slice(-4) === "desc";
        state.sort = key + ":" + (asc ? "asc" : "desc"); writeHash(); drawTable();
      });
      sub.appendChild(th);
      columns.push({ metric: m, which: which, values: m[which], best: bestValue(m[which], m.lower) });
    });
  });
  head.appendChild(top); head.appendChild(sub); table.appendChild(head);
  var order = DATA.runs.map(function (_, i) { return i; });
  if (state.sort) {
    var bits = state.sort.split(":"), which = bits[0], dir = bits[bits.length - 1];
    var m = metricByName(bits.slice(1, -1).join(":"));
    if (m) order.sort(function (a, b) {
      var va = m[which][a], vb = m[which][b];
      if (!numeric(va) || !numeric(vb)) return numeric(va) ? -1 : numeric(vb) ? 1 : a - b;
      return (dir === "desc" ? vb - va : va - vb) || a - b;
    });
  }
  var body = el("tbody");
  order.forEach(function (i) {
    var tr = el("tr", { "data-run": i }), name = el("td", { "class": "run", title: DATA.runs[i].path });
    var sw = el("span", { "class": "swatch" }); sw.style.background = DATA.runs[i].color;
    name.appendChild(sw); name.appendChild(document.createTextNode(DATA.runs[i].name)); tr.appendChild(name);
    columns.forEach(function (c) {
      var v = c.values[i];
      var td = el("td", { "data-metric": c.metric.name, "data-which": c.which }, v === null ? "-" : fmt(v));
      if (v !== null) td.setAttribute("data-value", String(v));
      if (c.best !== null && v === c.best) td.className = "best"; else if (v === null) td.className = "missing";
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  table.appendChild(body);
}

/* ---- differing config keys ---- */
function drawConfig() {
  // one row per key, one column per run: keys are long dotted paths, and there may be hundreds
  var box = document.getElementById("config"), keys = DATA.config.keys;
  if (!keys.length) { box.appendChild(el("p", { "class": "note" }, "The runs' configs do not differ.")); return; }
  var table = el("table", { id: "config-table" }), head = el("tr");
  head.appendChild(el("th", { "class": "run" }, "key"));
  DATA.runs.forEach(function (run, i) { head.appendChild(el("th", { title: run.path, "data-run": i }, run.name)); });
  table.appendChild(head);
  keys.forEach(function (key, j) {
    var tr = el("tr", { "data-key": key });
    tr.appendChild(el("td", { "class": "run" }, key));
    DATA.runs.forEach(function (_, i) { tr.appendChild(el("td", { "data-run": i }, DATA.config.values[i][j])); });
    table.appendChild(tr);
  });
  box.appendChild(table);
}

/* ---- sample grids, one column per run ---- */
function drawImages() {
  var box = document.getElementById("images");
  if (!DATA.images.length) { box.appendChild(el("p", { "class": "note" }, "No run wrote images.")); return; }
  var table = el("table", { "class": "images" }), head = el("tr");
  head.appendChild(el("th", { "class": "run" }, ""));
  DATA.runs.forEach(function (run) { head.appendChild(el("th", { title: run.path }, run.name)); });
  table.appendChild(head);
  DATA.images.forEach(function (row) {
    var tr = el("tr", { "data-kind": row.kind });
    tr.appendChild(el("th", { "class": "run" }, row.kind));
    row.cells.forEach(function (cell, i) {
      var td = el("td", { "data-run": i });
      if (!cell) { td.className = "missing"; td.textContent = "none"; }
      else if (cell.error) { td.className = "missing"; td.textContent = cell.error; }
      else {
        var fig = el("figure"), img = el("img", { src: cell.uri, alt: row.kind + " of " + DATA.runs[i].name,
                                                  width: cell.width, height: cell.height });
        img.addEventListener("click", function () { img.classList.toggle("zoomed"); });
        var caption = DATA.runs[i].name + " \u00b7 " + cell.file;
        if (cell.step !== null) caption += " \u00b7 step " + cell.step;
        if (cell.original[0] !== cell.width || cell.original[1] !== cell.height)
          caption += " \u00b7 downscaled from " + cell.original[0] + "\u00d7" + cell.original[1];
        fig.appendChild(img); fig.appendChild(el("figcaption", {}, caption)); td.appendChild(fig);
      }
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  box.appendChild(table);
}

function main() {
  readHash();
  document.getElementById("filter").value = state.filter;
  fillSelector();
  var logy = document.getElementById("logy"), smooth = document.getElementById("smooth");
  var weight = document.getElementById("smooth-weight"), weightText = document.getElementById("smooth-value");
  logy.checked = state.logy; smooth.checked = state.smooth; weight.value = state.weight;
  weightText.textContent = state.smooth ? state.weight : "";
  document.getElementById("metric").addEventListener("change", function (e) {
    state.metric = e.target.value; writeHash(); drawCurves();
  });
  document.getElementById("filter").addEventListener("input", function (e) {
    state.filter = e.target.value; fillSelector(); writeHash(); drawCurves(); drawTable();
  });
  logy.addEventListener("change", function () { state.logy = logy.checked; writeHash(); drawCurves(); });
  smooth.addEventListener("change", function () {
    state.smooth = smooth.checked; weightText.textContent = state.smooth ? state.weight : ""; writeHash(); drawCurves();
  });
  weight.addEventListener("input", function () {
    state.weight = parseFloat(weight.value); state.smooth = smooth.checked = true;
    weightText.textContent = state.weight; writeHash(); drawCurves();
  });
  drawCurves(); drawTable(); drawConfig(); drawImages();
  var status = document.getElementById("status");
  if (status.getAttribute("data-state") !== "error") {
    status.setAttribute("data-state", "rendered"); status.textContent = "rendered";
  }
}
main();
"""
