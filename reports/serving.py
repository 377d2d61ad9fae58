"""The serving figure: LoadGen's latency percentiles against offered QPS, one panel per
serving setting (precision, workers, batching), the latency bound marked."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from matplotlib.figure import Figure

from bench.records import STATUS_OK, ResultRow
from reports.canvas import log_scale, panel_grid

PERCENTILES = (("p50_s", "p50", ":"), ("p90_s", "p90", "-."), ("p99_s", "p99", "-"),
               ("p999_s", "p99.9", "--"))


def serving_points(rows: list[ResultRow]) -> dict[str, list[dict]]:
    """Server-scenario rows grouped by setting label: offered QPS, percentiles, validity, SLA."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.op != "serve" or row.status != STATUS_OK:
            continue
        params, metrics = json.loads(row.params), json.loads(row.metrics)
        if params.get("scenario") != "server":
            continue
        label = (f"{row.impl} {row.precision}, {params['workers']} worker(s), "
                 f"batching {params['batching_label']}")
        groups[label].append({"qps": params["target_qps"], "valid": metrics["valid"],
                              "sla_s": params["sla_ms"] / 1e3,
                              **{name: metrics.get(name, math.nan)
                                 for name, _, _ in PERCENTILES}})
    return dict(sorted(groups.items()))


def latency_figure(rows: list[ResultRow]) -> Figure | None:
    """The figure, or None when there are no Server-scenario rows."""
    groups = serving_points(rows)
    if not groups:
        return None
    figure, axes = panel_grid(len(groups), "LoadGen latency percentiles vs offered QPS "
                                           "(filled: VALID, hollow: INVALID)")
    for axis, (label, points) in zip(axes, groups.items()):
        points = sorted(points, key=lambda point: point["qps"])
        qps = [point["qps"] for point in points]
        for name, text, style in PERCENTILES:
            values = [point[name] * 1e3 for point in points]
            line = axis.plot(qps, values, linestyle=style, label=text)[0]
            for point, value in zip(points, values):
                axis.plot([point["qps"]], [value], marker="o", color=line.get_color(),
                          markerfacecolor=line.get_color() if point["valid"] else "none")
        for sla_s in sorted({point["sla_s"] for point in points}):
            axis.axhline(sla_s * 1e3, color="red", linewidth=0.8)
            axis.annotate(f"SLA {sla_s * 1e3:g} ms", (qps[0], sla_s * 1e3), color="red",
                          fontsize=7, va="bottom")
        log_scale(axis, "y")
        axis.set_title(label, fontsize=8)
        axis.set_xlabel("offered QPS (Poisson)")
        axis.set_ylabel("latency (ms)")
        axis.legend(fontsize=7)
    return figure
