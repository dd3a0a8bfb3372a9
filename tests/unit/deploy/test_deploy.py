"""The deployment files (deploy/, docker-compose.yml): their offline validation, and the facts that tie them
to the code: every service is deployed, probes ask the gRPC health service on the service's own port, ports
match the services' defaults, every MOEMESH_* variable is an option of the service it is given to, and the
dashboard shows the metrics the services export."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

from tests.paths import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the deployment files")

SERVICES = ("gateway", "kvtransfer", "eplb", "prefill", "decode")
WORKERS = ("prefill", "decode")
OBSERVABILITY = ("otel-collector", "jaeger", "prometheus", "grafana")

# The metrics the services export (histograms, counters, gauges): the dashboard must show every one, and
# name no other moemesh_ metric.
METRICS = (
    "moemesh_time_to_first_token_seconds",
    "moemesh_inter_token_latency_seconds",
    "moemesh_e2e_request_latency_seconds",
    "moemesh_request_queue_time_seconds",
    "moemesh_num_requests_running",
    "moemesh_num_requests_waiting",
    "moemesh_kv_pages_used",
    "moemesh_kv_pages_free",
    "moemesh_prefix_cache_hit_rate",
    "moemesh_kv_transfer_bytes_total",
    "moemesh_kv_transfer_latency_seconds",
    "moemesh_kv_transfer_failures_total",
    "moemesh_expert_load_balancedness",
)
HISTOGRAMS = (
    "moemesh_time_to_first_token_seconds",
    "moemesh_inter_token_latency_seconds",
    "moemesh_e2e_request_latency_seconds",
    "moemesh_request_queue_time_seconds",
    "moemesh_kv_transfer_latency_seconds",
)

# MOEMESH_* variables a process reads itself rather than through its option parser, and the file that does.
PROCESS_VARIABLES = {
    "MOEMESH_CACHE_DIR": "shared/model/default.py",
}

# Options the deployment sets already while they are being added to the services (each variable is
# ignored until its option exists). Drop an entry once its option has landed; rename it here and in the
# manifests if it lands under another name.
PENDING_OPTIONS = {
    "gateway": set(),
    "kvtransfer": set(),
    "eplb": set(),
    "prefill": set(),
    "decode": set(),
}
HTTP_PORT = 8000
# Variables the LeaderWorkerSet controller puts first in every container's env.
LWS_VARIABLES = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}


@pytest.fixture(scope="module")
def options() -> dict[str, dict[str, argparse.Action]]:
    """Each service's options by dest, with their defaults as the code has them (no MOEMESH_* set)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MOEMESH_")}
    out = {}
    with mock.patch.dict(os.environ, clean, clear=True):
        for name in SERVICES:
            module = importlib.import_module(f"moemesh.services.{name}.serve")
            if hasattr(module, "build_parser"):
                parser = module.build_parser()
            else:
                parser = argparse.ArgumentParser()
                module.add_arguments(parser)
            out[name] = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    return out


def _known_variables(service: str, options: dict[str, dict[str, argparse.Action]]) -> set[str]:
    dests = set(options[service]) | PENDING_OPTIONS[service]
    return {"MOEMESH_" + d.upper() for d in dests} | set(PROCESS_VARIABLES)


def _unknown(service: str, names, options) -> list[str]:
    known = _known_variables(service, options)
    return sorted(n for n in names if n.startswith("MOEMESH_") and n not in known)


def _default_port(service: str, options) -> int:
    return int(options[service]["port"].default)


# --- the validation script ------------------------------------------------------------------------------


def test_python_renderer_applies_patches_and_images(vd: ModuleType) -> None:
    # The base and each overlay render (kustomize itself is compared in test_validation[kustomize]).
    ids = {name: vd.by_identity(vd.render_python(path)) for name, path in vd.KUSTOMIZATIONS.items()}
    dev = ids["cpu-dev"][("apps/v1", "StatefulSet", "decode")]
    assert dev["spec"]["replicas"] == 1
    assert dev["spec"]["template"]["spec"]["containers"][0]["image"] == "moemesh:dev"
    ep = ids["ep-multinode"]
    assert ("apps/v1", "StatefulSet", "decode") not in ep and ("v1", "Service", "prefill") not in ep
    assert ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "decode-ep") in ep


def test_python_renderer_strategic_merge(vd: ModuleType) -> None:
    dst = {"spec": {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
                                    "args": ["p", "q"], "ports": [{"containerPort": 1, "name": "g"}]}],
                    "drop": 1}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}],
                                      "args": ["r"], "ports": [{"containerPort": 2, "name": "m"}]}],
                      "drop": None}}
    out = vd._merge(dst, patch)
    c = out["spec"]["containers"][0]
    assert [(e["name"], e["value"]) for e in c["env"]] == [("Y", "3"), ("Z", "4"), ("X", "1")]
    assert c["args"] == ["r"]
    assert [p["containerPort"] for p in c["ports"]] == [2, 1]
    assert "drop" not in out["spec"]
    assert dst["spec"]["containers"][0]["env"][1]["value"] == "2"  # the inputs are left alone


# --- the image ------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instr = _dockerfile()
    stages = [a for i, a in instr if i == "FROM"]
    assert len(stages) >= 2 and stages[-1].endswith("AS runtime")
    args = {a.split("=")[0] for i, a in instr if i == "ARG"}
    assert {"TORCH_VARIANT", "TORCH_VERSION", "MOEMESH_EXTRAS", "BASE_IMAGE"} <= args
    runs = [a for i, a in instr if i == "RUN"]
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in r for r in runs)
    # Layer caching: dependencies from pyproject.toml are installed before the sources are copied.
    first_source = min(n for n, (i, a) in enumerate(instr) if i == "COPY" and a.startswith(("shared", "services")))
    deps = min(n for n, (i, a) in enumerate(instr) if i == "RUN" and "requirements.txt" in a)
    pyproject = min(n for n, (i, a) in enumerate(instr) if i == "COPY" and "pyproject.toml" in a)
    assert pyproject < deps < first_source
    users = [a for i, a in instr if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert json.loads(dict(instr)["ENTRYPOINT"]) == ["moemesh", "serve"]
    healthcheck = dict(instr)["HEALTHCHECK"]
    assert "moemesh-healthcheck" in healthcheck
    assert any(i == "COPY" and a.startswith("deploy/healthcheck.py ") and "moemesh-healthcheck" in a for i, a in instr)
    # Only what .dockerignore lets through can be copied.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for i, a in instr:
        if i == "COPY" and not a.startswith("--from"):
            for src in shlex.split(a)[:-1]:
                assert src.rstrip("/") in allowed and (ROOT / src).exists(), src


def test_image_environment_is_known_to_every_service(options) -> None:
    env = " ".join(a for i, a in _dockerfile() if i == "ENV")
    names = re.findall(r"\b(MOEMESH_\w+)=", env)
    assert "MOEMESH_HOST" in names
    for service in SERVICES:
        assert not _unknown(service, names, options), service


# --- the health probe -----------------------------------------------------------------------------------


def test_probe_default_ports_match_the_services(probe: ModuleType, options) -> None:
    assert probe.DEFAULT_PORTS == {s: _default_port(s, options) for s in SERVICES}


def test_probe_finds_the_port(probe: ModuleType, tmp_path: Path) -> None:
    def proc(pid: int, *argv: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    (tmp_path / "self").mkdir()
    with pytest.raises(LookupError):
        probe.find_address({}, tmp_path)
    proc(1, "/sbin/docker-init", "--", "moemesh", "serve", "decode")
    assert probe.find_address({}, tmp_path) == "127.0.0.1:50070"
    assert probe.find_address({"MOEMESH_PORT": "6000", "MOEMESH_HOST": "0.0.0.0"}, tmp_path) == "127.0.0.1:6000"
    assert probe.find_address({"MOEMESH_PORT": "6000", "MOEMESH_HOST": "::1"}, tmp_path) == "[::1]:6000"
    (tmp_path / "1").rename(tmp_path / "gone")
    proc(7, "/opt/venv/bin/python", "/opt/venv/bin/moemesh", "serve", "gateway", "--port=7000", "--host", "127.0.0.2")
    assert probe.find_address({}, tmp_path) == "127.0.0.2:7000"


# --- docker-compose.yml ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_services(compose: dict, options) -> None:
    services = compose["services"]
    assert set(services) == set(SERVICES) | set(OBSERVABILITY)
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"]
    for name in SERVICES:
        svc = services[name]
        env = _environment(svc)
        assert "profiles" not in svc
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert svc["command"][0] == name
        assert not _unknown(name, env, options), name
        assert int(env["MOEMESH_PORT"]) == _default_port(name, options)
        assert svc["healthcheck"]["test"] == ["CMD", "moemesh-healthcheck"]
        # The tiny model is made once, in the volume every service shares.
        assert f"model-cache:{env['MOEMESH_CACHE_DIR']}" in svc["volumes"]
        assert env["MOEMESH_HOST"] == "0.0.0.0"
    gateway = services["gateway"]
    assert {"50051:50051", f"{HTTP_PORT}:{HTTP_PORT}"} <= set(gateway["ports"])
    assert int(_environment(gateway)["MOEMESH_HTTP_PORT"]) == HTTP_PORT
    if "http_port" in options["gateway"]:
        assert options["gateway"]["http_port"].default == HTTP_PORT
    for name in WORKERS:
        env = _environment(services[name])
        assert env["MOEMESH_ADVERTISE_HOST"] == name
        # Every gateway container the name resolves to (one unless scaled).
        assert env["MOEMESH_GATEWAY"] == f"dns:///gateway:{_default_port('gateway', options)}"
        assert env["MOEMESH_KVTRANSFER"] == f"kvtransfer:{_default_port('kvtransfer', options)}"
        for dep in ("gateway", "kvtransfer"):
            assert services[name]["depends_on"][dep]["condition"] == "service_healthy"
    assert _environment(services["decode"])["MOEMESH_KV_HOST"] == "decode"


def test_compose_mounts_the_observability_configs(compose: dict) -> None:
    services = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"] if v.startswith("./")}

    for host in [*mounts("otel-collector").values(), *mounts("prometheus").values(), *mounts("grafana").values()]:
        assert (ROOT / host).exists(), host
    assert mounts("otel-collector")[services["otel-collector"]["command"][0].split("=", 1)[1]] == \
        "./deploy/otel-collector.yaml"
    assert mounts("prometheus")["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yaml").read_text())
    assert mounts("grafana")[provider["providers"][0]["options"]["path"]] == "./deploy/grafana/dashboards"


def test_prometheus_scrapes_every_service(compose: dict) -> None:
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets: dict[str, set[str]] = {}
    for job in cfg["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets.setdefault(job["job_name"], set()).update(sc["targets"])
        for sd in job.get("dns_sd_configs", []):
            targets.setdefault(job["job_name"], set()).update(f"{n}:{sd['port']}" for n in sd["names"])
    for name in SERVICES:
        port = _environment(compose["services"][name])["MOEMESH_METRICS_PORT"]
        assert targets[name] == {f"{name}:{port}"}, name
        assert port in compose["services"][name]["expose"]
    assert "otel-collector:8889" in targets["otel-collector"]


# --- Kubernetes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renderings(vd: ModuleType) -> dict[str, list[dict]]:
    return {name: vd.render_python(path) for name, path in vd.KUSTOMIZATIONS.items()}


def _pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]]
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        return [t for t in (lwt.get("leaderTemplate"), lwt["workerTemplate"]) if t]
    return []


def _containers(docs: list[dict]):
    """(workload, pod template, container, its env as {name: EnvVar}, every MOEMESH name it gets) per
    moemesh container."""
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "ConfigMap"}
    for doc in docs:
        for tmpl in _pod_templates(doc):
            for c in tmpl["spec"]["containers"]:
                if not c["image"].startswith("moemesh"):
                    continue
                names = []
                for src in c.get("envFrom", []):
                    names.extend(configmaps[src["configMapRef"]["name"]])
                env = {e["name"]: e for e in c.get("env", [])}
                yield doc, tmpl, c, env, names + list(env)


@pytest.mark.parametrize("rendering", ["base", "cpu-dev", "ep-multinode"])
def test_k8s_workloads(renderings, options, rendering: str) -> None:
    docs = renderings[rendering]
    seen = set()
    for doc, tmpl, c, env, names in _containers(docs):
        service = c["args"][0]
        seen.add(service)
        assert c["name"] == service
        assert not _unknown(service, names, options), (rendering, service)
        port = int(env["MOEMESH_PORT"]["value"])
        assert port == _default_port(service, options)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port
        metrics = int(env["MOEMESH_METRICS_PORT"]["value"])
        assert ports["metrics"] == metrics == int(tmpl["metadata"]["annotations"]["prometheus.io/port"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (service, probe)
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
        pod_sc, sc = tmpl["spec"]["securityContext"], c["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        assert c["resources"]["limits"]["memory"]
        if service == "gateway":
            assert ports["http"] == int(env["MOEMESH_HTTP_PORT"]["value"]) == HTTP_PORT
        if service in WORKERS:
            assert env["MOEMESH_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        if service == "kvtransfer":  # rooms live in the one kvtransfer
            assert doc["spec"]["replicas"] == 1
        if service == "gateway":  # stateless replicas, every worker registered with each; one in cpu-dev
            assert doc["spec"]["replicas"] == (1 if rendering == "cpu-dev" else 2)
            assert doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        # $(VAR) refers only to variables set before it (or put first by the LeaderWorkerSet controller).
        defined = set(LWS_VARIABLES) if doc["kind"] == "LeaderWorkerSet" else set()
        for e in c.get("env", []):
            for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                assert ref in defined, (service, e["name"], ref)
            defined.add(e["name"])
    assert seen == set(SERVICES), rendering


@pytest.mark.parametrize("rendering", ["base", "cpu-dev", "ep-multinode"])
def test_k8s_services(renderings, options, rendering: str) -> None:
    docs = renderings[rendering]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    workloads = {d["metadata"]["name"]: d for d in docs if _pod_templates(d)}
    for name in ("gateway", "kvtransfer", "eplb"):
        ports = {p["name"]: p["port"] for p in services[name]["spec"]["ports"]}
        assert ports["grpc"] == _default_port(name, options)
    assert {p["port"] for p in services["gateway"]["spec"]["ports"]} >= {50051, HTTP_PORT}
    # The workers find every gateway pod through a headless Service over the same pods.
    peers = services["gateway-peers"]["spec"]
    assert peers["clusterIP"] == "None" and peers["selector"] == services["gateway"]["spec"]["selector"]
    worker_env = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "moemesh-worker")
    assert worker_env["MOEMESH_GATEWAY"] == f"dns:///gateway-peers:{peers['ports'][0]['port']}"
    for name in WORKERS:
        if rendering == "ep-multinode":
            assert name not in services and name not in workloads
            continue
        assert services[name]["spec"]["clusterIP"] == "None"  # headless: peers reach each worker
        assert workloads[name]["kind"] == "StatefulSet" and workloads[name]["spec"]["serviceName"] == name
    if rendering == "cpu-dev":
        assert all(w["spec"]["replicas"] == 1 for w in workloads.values())
        assert all("MOEMESH_MODEL" not in (d.get("data") or {}) for d in docs if d["kind"] == "ConfigMap")


def test_k8s_ep_multinode(renderings) -> None:
    docs = renderings["ep-multinode"]
    lws = {d["metadata"]["name"]: d for d in docs if d["kind"] == "LeaderWorkerSet"}
    assert set(lws) == {"prefill-ep", "decode-ep"}
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for doc in lws.values():
        assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        size = doc["spec"]["leaderWorkerTemplate"]["size"]
        assert size >= 2  # a leader (rank 0) and workers on other nodes
        (c,) = doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"]
        gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == gpus > 0
        env = {e["name"]: e for e in c["env"]}
        assert "$(LWS_LEADER_ADDRESS)" in env["MOEMESH_DIST_INIT_ADDR"]["value"]
        assert env["MOEMESH_NODE_RANK"]["value"] == "$(LWS_WORKER_INDEX)"
        assert env["MOEMESH_NNODES"]["value"] == "$(LWS_GROUP_SIZE)"
        assert int(env["MOEMESH_EP_SIZE"]["value"]) == size * gpus
        group = env["LWS_GROUP_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
        assert group == "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
        assert "$(LWS_GROUP_INDEX)" in env["MOEMESH_INSTANCE_ID"]["value"]
        volumes = doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["volumes"]
        assert {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v} <= claims
    model = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "moemesh-model")
    assert model["data"]["MOEMESH_MODEL"].startswith("/models/")
    worker = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "moemesh-worker")
    assert worker["data"]["MOEMESH_TRANSFER"] == "ucx"


def test_process_variables_are_read_where_listed() -> None:
    for name, path in PROCESS_VARIABLES.items():
        assert f'"{name}"' in (ROOT / path).read_text(), (name, path)


# --- the dashboard --------------------------------------------------------------------------------------


def test_dashboard_shows_every_metric(vd: ModuleType) -> None:
    exprs = [e for _, e in vd.promql_expressions()]
    text = "\n".join(exprs)
    for metric in METRICS:
        assert re.search(rf"\b{metric}(_bucket)?\b", text), f"no panel shows {metric}"
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\bmoemesh_\w+", text)}
    assert used <= set(METRICS), f"metrics not in METRICS: {sorted(used - set(METRICS))}"
    for metric in HISTOGRAMS:
        assert any("histogram_quantile(" in e and f"{metric}_bucket" in e for e in exprs), metric
    assert any("moemesh_expert_load_balancedness" in e and "by (layer)" in e for e in exprs)


def test_grafana_datasource_matches_prometheus(compose: dict) -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yaml").read_text())
    prom = next(d for d in ds["datasources"] if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
