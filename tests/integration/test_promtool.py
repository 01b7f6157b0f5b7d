"""The metrics as Prometheus tooling sees them: a live router with every feature that adds metrics (GPUs
through the fake probe, the nodes of a synthetic cluster, sleep mode, adapters on a managed base,
replicas), driven through a load, a sleep, a wake, an eviction and requests, is scraped once; that
exposition must pass ``promtool check metrics`` without a word, use base units only, and carry every
metric the example Grafana dashboard (examples/grafana-dashboard.json) queries.

``promtool`` comes from Debian's ``prometheus`` package (scripts/setup_dev.sh installs it). Without it the
promtool checks are skipped locally and fail under CI=true, so a missing install step shows up; the
checks that need no promtool (units, suffixes, the dashboard's metric names) run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from tests.harness import engine, launch_router
from vllm_model_router.gpu.probe import FakeProbe
from vllm_model_router.gpu.ray_nodes import RayNodes, node_views
from vllm_model_router.http.metrics import families

from .test_cluster_views import ray_node

PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool") or "/usr/bin/promtool"
DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
GPU_GB = 80.0
LOAD_S = 30.0  # two cores shared by several fake engines: a cold start can take a few seconds

# a unit spelled short, or in a non-base unit (https://prometheus.io/docs/practices/naming/#base-units)
NON_BASE_UNIT = re.compile(
    r"_(?:[kmgtp]i?b|kilobytes?|megabytes?|gigabytes?|bits?|[mun]s|millis(?:econds)?|micros(?:econds)?"
    r"|nanos(?:econds)?|secs?|mins?|minutes?|hours?|days?|percent|pct)(?=_|$)")


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _promtool() -> str:
    if not os.access(PROMTOOL, os.X_OK):
        _unavailable(f"{PROMTOOL} missing: apt-get install -y --no-install-recommends prometheus")
    return PROMTOOL


# ------------------------------------------------------------------ one live router, scraped once
def _models(adapters: Path) -> dict[str, dict[str, Any]]:
    sleeper = ("--enable-sleep-mode", "--wake-delay", "0.05")
    return {
        "chat": engine(memory_gb=8, replicas={"min": 2, "max": 3, "target_in_flight": 8}),  # 2 from startup
        "a": engine(*sleeper, sleep=True, memory_gb=20),
        "b": engine(*sleeper, sleep=True, memory_gb=20),
        "base": engine("--enable-lora", memory_gb=10),
        "sql": {"adapter": str(adapters / "sql"), "base": "base"},
    }


async def _exercise(adapters: Path) -> str:
    """Start the router, drive the traffic, return ``GET /metrics``."""
    # max_resident 3: chat's two replicas and one more, so every other model's turn makes room
    async with launch_router(_models(adapters), uuid.uuid4().hex, probe=FakeProbe([GPU_GB, GPU_GB]),
                             capacity={"max_resident": 3, "memory_gb": 60}) as r:
        nodes = RayNodes(GPU_GB)  # GPUs 0 and 1 stand for the nodes n1 and n2; n3 was lost
        nodes.read([ray_node("n1", "10.0.0.1"), ray_node("n2", "10.0.0.2"), ray_node("n3", "10.0.0.3")])
        nodes.read([ray_node("n1", "10.0.0.1"), ray_node("n2", "10.0.0.2"),
                    ray_node("n3", "10.0.0.3", alive=False)])
        runtime = r.runtime
        runtime.nodes = lambda: node_views(nodes.known(), GPU_GB, runtime.views())
        await r.wait_model("chat", lambda m: [u["state"] for u in m.get("replicas", [])][:2] == ["loaded"] * 2,
                           LOAD_S, "chat's two replicas loaded at startup")
        # a: a load; b: a sleeps; a: b sleeps and a wakes; sql: its base loads; b: the base is evicted
        for model in ("chat", "a", "b", "a", "sql", "b"):
            reply = await r.chat(model)
            assert reply.status == 200, (model, reply.body)
        assert (await r.chat("no-such-model")).status == 404
        stream = await r.stream({"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert stream.status == 200
        reply = await r.get("/metrics")
        assert reply.status == 200
        return reply.body.decode()


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The text exposition of the router above (its own event loop: one router for the whole module)."""
    adapters = tmp_path_factory.mktemp("adapters")
    (adapters / "sql").mkdir()
    text = uvloop.run(_exercise(adapters))
    names = {name for name, _, _ in families(text)}
    # the traffic left children everywhere a family can have them, so the checks below see real samples
    wanted = {"router_requests_total", "router_request_seconds_bucket", "router_wait_seconds_bucket",
              "router_model_loads_total", "router_model_load_seconds_bucket", "router_model_evictions_total",
              "router_model_sleeps_total", "router_model_sleep_seconds_bucket", "router_model_wakes_total",
              "router_model_wake_seconds_bucket", "router_memory_budget_bytes", "router_gpu_memory_free_bytes",
              "router_node_gpu_memory_bytes", "router_replicas"}
    assert wanted <= names, sorted(wanted - names)
    return text


def exported(text: str) -> set[str]:
    """The series names a PromQL query can select, suffixes (_total, _bucket, ...) included: those with
    samples, and those a family without children yet (no exit so far, say) will have."""
    names = {name for name, _, _ in families(text)}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):  # a counter's TYPE names it with _total
        names |= {f"{name}_{part}" for part in ("bucket", "sum", "count")} if kind == "histogram" else {name}
    return names


# ------------------------------------------------------------------ promtool and the naming rules
def test_promtool_finds_nothing_to_say(exposition: str) -> None:
    done = subprocess.run([_promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout.strip(), done.stderr.strip()) == (0, "", "")


def test_promtool_would_object_to_an_abbreviated_unit() -> None:
    """The check above can fail: promtool flags the names the router used to export."""
    old = "# HELP router_memory_budget_gb x\n# TYPE router_memory_budget_gb gauge\nrouter_memory_budget_gb 40\n"
    done = subprocess.run([_promtool(), "check", "metrics"], input=old, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "abbreviated units" in done.stdout + done.stderr


def test_names_use_base_units_and_counters_end_in_total(exposition: str) -> None:
    """What promtool checks, and more, without promtool: no ``_gb``/``_ms``/... in a name, ``_total`` on
    counters only, ``_seconds``/``_bytes`` where a unit is named, and help for every family."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.+)$", exposition, re.M))
    assert types and set(types) == set(helps), set(types) ^ set(helps)
    assert all(name.startswith("router_") for name in types), sorted(types)
    assert not [n for n in exported(exposition) | set(types) if NON_BASE_UNIT.search(n)]
    assert not [n for n, t in types.items() if t == "counter" and not n.endswith("_total")]
    assert not [n for n, t in types.items() if t != "counter" and n.endswith("_total")]
    assert not [n for n in types if ("memory" in n) != n.endswith("_bytes")]  # all memory in bytes, bytes only
    assert not [n for n, t in types.items() if t == "histogram" and not n.endswith("_seconds")]
    assert all(h.strip() for h in helps.values())


@pytest.mark.parametrize("name", ["router_memory_budget_gb", "router_gpu_free_gb", "router_wait_ms",
                                  "router_load_secs", "router_x_mib", "router_gb_reserved"])
def test_the_unit_rule_catches_short_units(name: str) -> None:
    assert NON_BASE_UNIT.search(name)


# ------------------------------------------------------------------ the example Grafana dashboard
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves left out."""
    out: list[dict[str, Any]] = []
    for p in board["panels"]:
        if p.get("type") == "row":
            out.extend(panels({"panels": p.get("panels", [])}))
        else:
            out.append(p)
    return out


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    found = [t["expr"] for p in panels(board) for t in p["targets"]]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]
            found.append(q["query"] if isinstance(q, dict) else q)
    return found


def metric_names(expr: str) -> set[str]:
    """The router's series an expression selects (label names and values are never ``router_...``)."""
    return set(re.findall(r"(?<![\w\"'])router_[A-Za-z0-9_]+", expr))


def unknown_metrics(board: dict[str, Any], names: set[str]) -> dict[str, set[str]]:
    """Per panel title, the series its queries name that ``names`` lacks (a misspelling, a renamed metric)."""
    out: dict[str, set[str]] = {}
    for p in panels(board):
        missing = set().union(*(metric_names(t["expr"]) for t in p["targets"])) - names
        if missing:
            out[p["title"]] = missing
    return out


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert isinstance(board["title"], str) and board["uid"] and 36 <= board["schemaVersion"] <= 41
    assert [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    all_panels = panels(board)
    assert len(all_panels) >= 8
    ids = [p["id"] for p in all_panels] + [p["id"] for p in board["panels"] if p.get("type") == "row"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels:
        assert p["type"] in {"timeseries", "stat", "gauge", "table", "state-timeline", "bargauge"}, p["title"]
        assert p["title"] and {"h", "w", "x", "y"} <= set(p["gridPos"]), p
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"] and metric_names(t["expr"]), (p["title"], t)
    titles = " ".join(p["title"].lower() for p in all_panels)
    for topic in ("resident", "swaps", "wait", "gpu memory", "status"):
        assert topic in titles, topic


def test_every_metric_the_dashboard_queries_is_exported(exposition: str) -> None:
    names = exported(exposition)
    board = dashboard()
    assert unknown_metrics(board, names) == {}
    used = set().union(*(metric_names(q) for q in queries(board)))
    assert used <= names, sorted(used - names)
    # residency, swaps, waits, GPU memory, requests and the cluster, each on the metrics it is about
    gpu = {f"router_gpu_memory_{key}_bytes" for key in ("total", "budget", "reserved", "used_by_router",
                                                         "used_by_others", "free")}
    nodes = {"router_nodes", "router_cluster_gpus", "router_node_up", "router_node_gpus", "router_node_units",
             "router_node_gpu_memory_bytes", "router_node_gpu_memory_reserved_bytes"}
    lifecycle = {"router_model_state", "router_models_resident", "router_replicas", "router_model_evictions_total",
                 "router_model_loads_total", "router_model_sleeps_total", "router_model_wakes_total"}
    waits = {"router_wait_seconds_bucket", "router_request_seconds_bucket", "router_requests_total"}
    assert gpu | nodes | lifecycle | waits <= used


def test_a_misspelt_metric_in_a_panel_is_caught(exposition: str) -> None:
    board = dashboard()
    target = panels(board)[0]["targets"][0]
    name = sorted(metric_names(target["expr"]))[0]
    misspelt = name.replace("router_", "router_modle_", 1)
    target["expr"] = target["expr"].replace(name, misspelt)
    assert misspelt in unknown_metrics(board, exported(exposition)).get(panels(board)[0]["title"], set())


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, Grafana's variables replaced by what they stand for."""
    variables = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${model:regex}": ".*",
                 "$model": ".*"}
    exprs = []
    for q in queries(dashboard()):
        for var, value in variables.items():
            q = q.replace(var, value)
        assert "$" not in q, q
        exprs.append(q)
    promql = [e for e in exprs if not e.startswith("label_values(")]  # Grafana's own function
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                        for i, e in enumerate(promql)]}]}
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(promql)} rules found" in done.stdout


def test_the_metrics_documented_are_the_metrics_exported(exposition: str) -> None:
    """docs/operations.md's table lists every family the router exports, under the name it exports."""
    docs = (DASHBOARD.parents[1] / "docs" / "operations.md").read_text()
    section = docs.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `router_"))
    documented = set(re.findall(r"`(router_[a-z_]+)`", table))
    families_exported = {name for name in re.findall(r"^# TYPE (\S+) ", exposition, re.M)
                         if not name.endswith("_created")}  # prometheus_client's creation times
    assert documented == families_exported
