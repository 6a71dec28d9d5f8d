"""The vllm-kvevict Grafana dashboard, built with Grafana's own SDK (``grafana-foundation-sdk``).

    python deploy/grafana/dashboard.py            # writes the files below
    python deploy/grafana/dashboard.py --check    # exit 1 if any is out of date

Writes ``deploy/grafana/dashboards/vllm-kvevict.json`` (provisioned into Grafana by
``deploy/grafana/provisioning/``) and ``deploy/kubernetes/grafana-dashboard.yaml`` (the same JSON
in a ConfigMap). Never edit those by hand: change this file and run it.

Panel queries use two Grafana variables: ``$model_name`` (vLLM's ``model_name`` label) and
``$__rate_interval``. :func:`queries` lists every PromQL expression, for the test that runs
each one against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD_JSON = HERE / "dashboards" / "vllm-kvevict.json"
CONFIGMAP_YAML = HERE.parent / "kubernetes" / "grafana-dashboard.yaml"
UID = "vllm-kvevict"
DATASOURCE_UID = "prometheus"  # provisioning/datasources/prometheus.yml gives Prometheus this uid

M = 'model_name=~"$model_name"'
RATE = "$__rate_interval"


@dataclass
class Query:
    expr: str
    legend: str


@dataclass
class PanelSpec:
    """One panel: ``kind`` is ``timeseries`` or ``stat``; ``w``, ``h`` in Grafana grid units."""

    title: str
    kind: str
    unit: str
    queries: list[Query]
    description: str = ""
    w: int = 8
    h: int = 8
    stacked: bool = False
    extra: dict = field(default_factory=dict)


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _ratio_mean(metric: str, by: str) -> str:
    return (
        f"sum by ({by}) (rate({metric}_sum{{{M}}}[{RATE}]))"
        f" / sum by ({by}) (rate({metric}_count{{{M}}}[{RATE}]))"
    )


def _quantile(p: float, metric: str, by: str = "policy") -> str:
    return f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{M}}}[{RATE}])))"


STOCK_TOKENS = f"sum by (model_name) (kvevict_cache_blocks{{{M}}} * kvevict_block_size_tokens{{{M}}})"
#: Mean kept / logical share of the requests evicted so far (cumulative: defined when idle too).
MEAN_KEPT = (
    f"(sum by (model_name) (kvevict_compression_ratio_sum{{{M}}})"
    f" / sum by (model_name) (kvevict_compression_ratio_count{{{M}}}))"
)

#: Rows of panels: (row title, panels).
ROWS: list[tuple[str, list[PanelSpec]]] = [
    (
        "Savings (vllm-kvevict)",
        [
            PanelSpec(
                "KV cache returned to the pool", "stat", "bytes",
                [q(f"sum(kvevict_bytes_returned_total{{{M}}})", "bytes returned")],
                "KV-cache bytes that eviction gave back to vLLM's block pool since the server started.",
                w=6, h=6,
            ),
            PanelSpec(
                "Tokens evicted", "stat", "short",
                [q(f"sum(kvevict_tokens_evicted_total{{{M}}})", "tokens")],
                "Token positions whose keys and values were dropped, since the server started.",
                w=6, h=6,
            ),
            PanelSpec(
                "Mean kept share (evicted requests)", "stat", "percentunit",
                [q(f"sum(kvevict_compression_ratio_sum{{{M}}}) / sum(kvevict_compression_ratio_count{{{M}}})", "kept")],
                "Kept / prompt tokens, averaged over the requests that evicted.",
                w=6, h=6,
            ),
            PanelSpec(
                "Effective KV capacity vs stock", "stat", "short",
                [q(f"{STOCK_TOKENS} / {MEAN_KEPT}", "effective tokens"), q(STOCK_TOKENS, "stock tokens")],
                "Tokens the pool holds at the mean kept share of evicted requests, against stock vLLM's.",
                w=6, h=6,
            ),
            PanelSpec(
                "Bytes returned to the pool per second", "timeseries", "Bps",
                [q(f"sum by (model_name) (rate(kvevict_bytes_returned_total{{{M}}}[{RATE}]))", "{{model_name}}")],
            ),
            PanelSpec(
                "Tokens held: stock vs after eviction", "timeseries", "short",
                [
                    q(f"sum by (policy) (kvevict_logical_tokens{{{M}}})", "stock {{policy}}"),
                    q(f"sum by (policy) (kvevict_held_tokens{{{M}}})", "held {{policy}}"),
                ],
                "Running requests that evicted: the tokens stock vLLM would hold for them, and what they hold.",
            ),
            PanelSpec(
                "Effective capacity (tokens)", "timeseries", "short",
                [q(f"{STOCK_TOKENS} / {MEAN_KEPT}", "effective"), q(STOCK_TOKENS, "stock")],
            ),
            PanelSpec(
                "Kept share per request", "timeseries", "percentunit",
                [
                    q(_quantile(0.5, "kvevict_compression_ratio"), "p50 {{policy}}"),
                    q(_quantile(0.9, "kvevict_compression_ratio"), "p90 {{policy}}"),
                ],
                "Kept / prompt tokens of each evicted request (histogram quantiles).",
            ),
            PanelSpec(
                "Memory efficiency (ideal / held blocks)", "timeseries", "percentunit",
                [q(_ratio_mean("kvevict_memory_efficiency", "policy, granularity"), "{{policy}} {{granularity}}")],
            ),
            PanelSpec(
                "Per-head budget spread (latest eviction)", "timeseries", "short",
                [q(f"max by (policy, granularity, stat) (kvevict_last_head_kept_tokens{{{M}}})", "{{stat}} {{policy}} {{granularity}}")],
                "Kept tokens per (layer, KV head): min, mean and max over the heads of the latest eviction.",
            ),
        ],
    ),
    (
        "Traffic and latency",
        [
            PanelSpec(
                "Requests by policy and outcome", "timeseries", "reqps",
                [q(f"sum by (policy, outcome) (rate(kvevict_requests_total{{{M}}}[{RATE}]))", "{{policy}} {{outcome}}")],
                "evicted, skipped_short (nothing worth evicting), opted_out, decode_only (prompt kept whole, evicted during decode), rejected (HTTP 400), error.",
                stacked=True,
            ),
            PanelSpec(
                "Tokens evicted per second", "timeseries", "short",
                [q(f"sum by (policy) (rate(kvevict_tokens_evicted_total{{{M}}}[{RATE}]))", "{{policy}}")],
            ),
            PanelSpec(
                "Decode-time evictions", "timeseries", "short",
                [
                    q(f"sum by (policy, granularity) (rate(kvevict_decode_evictions_total{{{M}}}[{RATE}]))",
                      "evictions/s {{policy}} {{granularity}}"),
                    q(f"sum by (policy, granularity) (rate(kvevict_decode_blocks_returned_total{{{M}}}[{RATE}]))",
                      "blocks returned/s {{policy}} {{granularity}}"),
                ],
                "Re-evictions of running requests every --kv-decode-interval generated tokens, and the blocks they "
                "gave back to vLLM's pool.",
            ),
            PanelSpec(
                "Eviction latency", "timeseries", "s",
                [
                    q(_quantile(0.5, "kvevict_eviction_seconds"), "pass p50 {{policy}}"),
                    q(_quantile(0.99, "kvevict_eviction_seconds"), "pass p99 {{policy}}"),
                    q(_quantile(0.5, "kvevict_scoring_seconds"), "scoring p50 {{policy}}"),
                ],
                "One eviction pass (scoring and page choice) and its scoring part, per request.",
            ),
            PanelSpec(
                "Eviction errors", "timeseries", "short",
                [q(f"sum by (stage) (increase(kvevict_errors_total{{{M}}}[{RATE}]))", "{{stage}}")],
                "Requests left whole because scoring or freeing failed (see the server log).",
            ),
        ],
    ),
    (
        "vLLM KV cache",
        [
            PanelSpec(
                "KV-cache usage", "timeseries", "percentunit",
                [q(f"max by (model_name) (vllm:kv_cache_usage_perc{{{M}}})", "{{model_name}}")],
                "vLLM's own gauge: share of the block pool in use.",
            ),
            PanelSpec(
                "Requests running / waiting", "timeseries", "short",
                [
                    q(f"sum by (model_name) (vllm:num_requests_running{{{M}}})", "running"),
                    q(f"sum by (model_name) (vllm:num_requests_waiting{{{M}}})", "waiting"),
                ],
            ),
            PanelSpec(
                "Preemptions per second", "timeseries", "short",
                [q(f"sum by (model_name) (rate(vllm:num_preemptions_total{{{M}}}[{RATE}]))", "{{model_name}}")],
                "Requests pushed out of a full pool (eviction should lower this at the same load).",
            ),
            PanelSpec(
                "Prefix-cache hit rate", "timeseries", "percentunit",
                [
                    q(
                        f"sum by (model_name) (rate(vllm:prefix_cache_hits_total{{{M}}}[{RATE}]))"
                        f" / sum by (model_name) (rate(vllm:prefix_cache_queries_total{{{M}}}[{RATE}]))",
                        "{{model_name}}",
                    )
                ],
            ),
            PanelSpec(
                "Token throughput", "timeseries", "short",
                [
                    q(f"sum by (model_name) (rate(vllm:prompt_tokens_total{{{M}}}[{RATE}]))", "prompt tokens/s"),
                    q(f"sum by (model_name) (rate(vllm:generation_tokens_total{{{M}}}[{RATE}]))", "generated tokens/s"),
                ],
            ),
        ],
    ),
]  # fmt: skip


def queries() -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every query of the dashboard."""
    return [(p.title, query.expr) for _, panels in ROWS for p in panels for query in p.queries]


def build() -> dict:
    """The dashboard as Grafana JSON (a dict), through grafana-foundation-sdk's builders."""
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.common import BigValueGraphMode, LegendDisplayMode, LegendPlacement, StackingMode
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh

    datasource = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
    board = (
        dashboard.Dashboard("vLLM KV-cache eviction (vllm-kvevict)")
        .uid(UID)
        .tags(["vllm", "vllm-kvevict", "kv-cache"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .with_variable(
            dashboard.QueryVariable("model_name")
            .label("model")
            .datasource(datasource)
            .query("label_values(vllm:num_requests_running, model_name)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )
    panel_id, y = 1, 0
    for row_title, panels in ROWS:
        board = board.with_row(dashboard.Row(row_title).id(panel_id).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        panel_id, y, x, row_h = panel_id + 1, y + 1, 0, 0
        for spec in panels:
            if x + spec.w > 24:
                x, y, row_h = 0, y + row_h, 0
            if spec.kind == "stat":
                panel = stat.Panel().graph_mode(BigValueGraphMode.AREA)
            else:
                panel = timeseries.Panel().fill_opacity(15 if spec.stacked else 5).line_width(1)
                if spec.stacked:
                    panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
                legend = common.VizLegendOptions().show_legend(True).display_mode(LegendDisplayMode.LIST)
                panel = panel.legend(legend.placement(LegendPlacement.BOTTOM))
            panel = panel.id(panel_id).title(spec.title).unit(spec.unit).datasource(datasource)
            if spec.description:
                panel = panel.description(spec.description)
            for i, query in enumerate(spec.queries):
                target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + i)).datasource(datasource)
                if query.legend:
                    target = target.legend_format(query.legend)
                panel = panel.with_target(target)
            board = board.with_panel(panel.grid_pos(GridPos(h=spec.h, w=spec.w, x=x, y=y)))
            panel_id, x, row_h = panel_id + 1, x + spec.w, max(row_h, spec.h)
        y += row_h
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))


def dashboard_json() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def configmap_yaml(text: str) -> str:
    """A ConfigMap holding the dashboard JSON (labelled for Grafana's dashboard sidecar)."""
    body = "".join(f"    {line}\n" if line else "\n" for line in text.splitlines())
    return (
        "# Generated by deploy/grafana/dashboard.py from the same JSON as\n"
        "# deploy/grafana/dashboards/vllm-kvevict.json; do not edit.\n"
        "apiVersion: v1\n"
        "kind: ConfigMap\n"
        "metadata:\n"
        "  name: vllm-kvevict-dashboard\n"
        "  labels:\n"
        "    app.kubernetes.io/name: vllm-kvevict\n"
        '    grafana_dashboard: "1"\n'
        "data:\n"
        "  vllm-kvevict.json: |\n" + body
    )


def outputs() -> dict[Path, str]:
    text = dashboard_json()
    return {DASHBOARD_JSON: text, CONFIGMAP_YAML: configmap_yaml(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"out of date: {path} (run python deploy/grafana/dashboard.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
