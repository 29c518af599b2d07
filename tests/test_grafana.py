"""grafana/onspec.json queries only what the server exports: every metric name (and every label a query groups or
filters by) must appear in the /metrics exposition of a real app after some stub traffic, with a trainer and a
registry (real redis-server) behind it."""
import json
import re
from pathlib import Path

from fastapi.testclient import TestClient
from onspec.cluster.api import create_app
from prometheus_client.parser import text_string_to_metric_families

# The stub backend and the registry fixtures (reg and the fixtures it uses) are test_dashboard's.
from test_dashboard import (  # noqa: F401
    TRAINER,
    StubBackend,
    complete,
    config,
    rclient,
    reg,
    server,
    target,
    usage,
)

DASHBOARD = Path(__file__).resolve().parents[1] / "grafana" / "onspec.json"
METRIC = re.compile(r"\b(onspec_[A-Za-z0-9_]+)(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
LABEL_VALUES = re.compile(r"label_values\((onspec_[A-Za-z0-9_]+),\s*([A-Za-z_][A-Za-z0-9_]*)\)")


def queries(node) -> list[str]:
    """Every PromQL string in the dashboard: panel targets, annotations, template variables."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "query", "definition") and isinstance(v, str) and "onspec_" in v:
                found.append(v)
            else:
                found += queries(v)
    elif isinstance(node, list):
        for v in node:
            found += queries(v)
    return found


def exported(tmp_path, reg) -> dict[str, set[str]]:  # noqa: F811
    """{sample name: its label names} of /metrics after traffic of two versions, two labels, streams too."""
    backend = StubBackend(TRAINER)
    backend.usages = [usage("v1"), usage("v2", drafted=6, accepted=5, steps=4)]
    with TestClient(create_app(config(tmp_path), backend, registry=reg)) as c:
        complete(c, "math")
        complete(c, "code", stream=True)
        complete(c)
        assert c.post("/v1/completions", json={"prompt": "x", "n": 9}).status_code == 400
        text = c.get("/metrics").text
    names: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            names.setdefault(s.name, set()).update(s.labels)
    return names


def test_every_grafana_query_names_an_exported_metric(tmp_path, reg):  # noqa: F811
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 20 and all(t.get("expr") for t in targets), "a panel without a query"
    names = exported(tmp_path, reg)
    for expr in exprs:
        used = METRIC.findall(expr)
        assert used, f"no onspec metric in {expr!r}"
        labels = set().union(*(names.get(m, set()) for m, _ in used))
        for metric, selector in used:
            assert metric in names, f"{metric} (in {expr!r}) is not exported"
            for label in MATCHER.findall(selector or ""):
                assert label in names[metric], f"{metric} has no label {label!r} (in {expr!r})"
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels, f"no metric of {expr!r} has the label {label!r}"
        for metric, label in LABEL_VALUES.findall(expr):
            assert label in names[metric], f"{metric} has no label {label!r}"


def test_the_dashboard_covers_the_issue(tmp_path):
    text = DASHBOARD.read_text()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for needle in ("acceptance rate by drafter version", "acceptance rate by traffic label", "drift",
                   "tokens per second", "trainer loss", "paused for serving load", "promotions"):
        assert needle in titles, needle
    annotations = [a["expr"] for a in dashboard["annotations"]["list"]]
    assert any("promotions" in a for a in annotations) and any("rollbacks" in a for a in annotations)
