"""Draw the dashboard's panels from a real Prometheus into a PNG (no Grafana server needed).

    python deploy/grafana/render.py --prometheus http://127.0.0.1:9090 --minutes 15 \
        --out deploy/grafana/dashboard.png

Every panel of ``deploy/grafana/dashboards/vllm-kvevict.json`` is laid out at its ``gridPos``;
each target's PromQL (``$model_name`` -> all models, ``$__rate_interval`` -> ``--rate``) is
run as a range query (time series) or an instant query at the end (stat panels). It is the same
queries Grafana runs, drawn with matplotlib: Grafana itself cannot be installed here (Debian
does not package it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import requests

HERE = Path(__file__).resolve().parent
DASHBOARD_JSON = HERE / "dashboards" / "vllm-kvevict.json"


def substitute(expr: str, rate: str = "1m", model_name: str = ".+") -> str:
    """A panel query with Grafana's variables filled in."""
    return expr.replace("$__rate_interval", rate).replace("$model_name", model_name)


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p.get("type") != "row"]


def query_range(prom: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    r = requests.get(f"{prom}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]


def query(prom: str, expr: str, at: Optional[float] = None) -> list[dict]:
    params = {"query": expr}
    if at is not None:
        params["time"] = at
    r = requests.get(f"{prom}/api/v1/query", params=params, timeout=30)
    r.raise_for_status()
    return r.json()["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def human(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "percentunit":
        return f"{100 * value:.1f}%"
    if unit in ("bytes", "Bps"):
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or suffix == "TiB":
                return f"{value:.1f} {suffix}" + ("/s" if unit == "Bps" else "")
            value /= 1024
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f} M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f} k"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def render(prom: str, out: Path, start: float, end: float, rate: str = "1m", dashboard: Optional[dict] = None) -> dict[str, int]:
    """Draw every panel; returns ``{panel title: number of series drawn}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dashboard = dashboard or json.loads(DASHBOARD_JSON.read_text())
    rows = [p for p in dashboard["panels"] if p.get("type") == "row"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    unit_w, unit_h = 0.8, 0.42
    fig = plt.figure(figsize=(24 * unit_w, height * unit_h), facecolor="#111217")
    step = max(1.0, (end - start) / 240)
    drawn: dict[str, int] = {}

    def box(grid: dict[str, int], pad: float = 0.004, left: float = 0.0) -> list[float]:
        """Axes rectangle of a grid position (``left``: room for the y tick labels)."""
        x, y, w, h = grid["x"] / 24, grid["y"] / height, grid["w"] / 24, grid["h"] / height
        return [x + pad + left, 1 - y - h + pad * 2.5, w - 2 * pad - left, h - pad * 5]

    for row in rows:
        g = row["gridPos"]
        fig.text(0.005, 1 - (g["y"] + 0.7) / height, row["title"], color="#d8d9da", fontsize=13, weight="bold")
    for panel in panels(dashboard):
        ax = fig.add_axes(box(panel["gridPos"], left=0.0 if panel["type"] == "stat" else 0.03), facecolor="#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#9fa7b3", labelsize=7)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        count = 0
        if panel["type"] == "stat":
            ax.set_xticks([])
            ax.set_yticks([])
            lines = []
            for target in panel["targets"]:
                for series in query(prom, substitute(target["expr"], rate), at=end):
                    lines.append((legend(target.get("legendFormat", ""), series["metric"]), float(series["value"][1])))
            for i, (name, value) in enumerate(lines[:3]):
                y = 0.62 - i * 0.42 if len(lines) > 1 else 0.45
                size = 26 if i == 0 else 15
                ax.text(0.5, y, human(value, unit), color="#73bf69", fontsize=size, ha="center", va="center", transform=ax.transAxes, weight="bold")
                ax.text(0.5, y - 0.2, name, color="#9fa7b3", fontsize=8, ha="center", va="center", transform=ax.transAxes)
            count = len(lines)
        else:
            for target in panel["targets"]:
                for series in query_range(prom, substitute(target["expr"], rate), start, end, step):
                    points = [(datetime.fromtimestamp(float(t)), float(v)) for t, v in series["values"]]
                    points = [(t, v) for t, v in points if not math.isnan(v)]
                    if not points:
                        continue
                    ts, vs = zip(*points)
                    ax.plot(ts, vs, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
                    count += 1
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p, u=unit: human(v, u)))
            ax.grid(color="#2c3235", linewidth=0.5)
            if count:
                ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#d8d9da")
            else:
                ax.text(0.5, 0.5, "no data", color="#9fa7b3", ha="center", va="center", transform=ax.transAxes)
        drawn[panel["title"]] = count
    fig.text(0.995, 0.003, f"Prometheus {prom}, {datetime.fromtimestamp(start):%Y-%m-%d %H:%M}-{datetime.fromtimestamp(end):%H:%M}; rendered by deploy/grafana/render.py",
             color="#6e7580", fontsize=7, ha="right")  # fmt: skip
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    plt.close(fig)
    return drawn


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range ending now")
    parser.add_argument("--rate", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--out", type=Path, default=HERE / "dashboard.png")
    args = parser.parse_args(argv)
    end = time.time()
    drawn = render(args.prometheus, args.out, end - 60 * args.minutes, end, args.rate)
    for title, n in drawn.items():
        print(f"{n:3d} series  {title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

