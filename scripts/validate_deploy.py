#!/usr/bin/env python3
"""Offline checks of the deployment files: docker-compose.yml, deploy/k8s/, the observability configs.

    python scripts/validate_deploy.py            # every check whose tool is installed; the rest SKIP
    python scripts/validate_deploy.py --strict   # a missing tool fails (what CI runs)

Checks, each with the tool it needs:
  compose      `docker compose config -q` (the v2 plugin) or `docker-compose config -q` (Debian's package)
  kustomize    renders base/ and every overlay with `kustomize build` or `kubectl kustomize`, else with the
               small renderer below (resources, strategic-merge `patches`, `$patch: delete`, `images`), and
               checks that the two agree where both are available
  k8s          every rendered manifest against the Kubernetes OpenAPI schemas of the PyPI package
               `kubernetes-validate` (strict: unknown fields fail); the LeaderWorkerSet custom resource
               against deploy/k8s/schemas/, whose pod templates refer to those same schemas
  prometheus   `promtool check config` on deploy/prometheus.yml, and every PromQL expression of the
               Grafana dashboards through `promtool check rules`
  otel         the collector's pipelines name only receivers, processors and exporters it defines
  grafana      the provisioning files and dashboards parse, and every panel has a query

Nothing here needs a container engine, a cluster or the network.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "cpu-dev": K8S / "overlays" / "cpu-dev",
    "ep-multinode": K8S / "overlays" / "ep-multinode",
}
# The oldest Kubernetes the manifests target (gRPC probes are GA since 1.27).
K8S_VERSION = "1.30.0"
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): K8S / "schemas" / "leaderworkerset-v1.json",
}
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
OTEL_CONFIG = DEPLOY / "otel-collector.yaml"
GRAFANA = DEPLOY / "grafana"
# Grafana's template variables, replaced by plain values before PromQL is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


class Skip(Exception):
    """A check's tool is not installed."""


# --- compose --------------------------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """The compose CLI installed here: the docker v2 plugin, else the standalone docker-compose."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def check_compose() -> str:
    cmd = compose_command()
    if cmd is None:
        raise Skip("no compose CLI: apt-get install docker-compose (or the docker compose plugin)")
    # Every profile, so the observability services are checked too; no variable from this shell leaks in.
    proc = subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "--profile", "observability", "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT, env=_clean_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[-2:])} config: {(proc.stderr or proc.stdout).strip()}")
    return " ".join(Path(c).name for c in cmd)


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep}


# --- kustomize ------------------------------------------------------------------------------------------

# List fields merged item by item (by this key) in a strategic-merge patch; other lists are replaced.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath", "imagePullSecrets": "name",
    "hostAliases": "ip", "resourceClaims": "name",
}
SUPPORTED_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}


def render_python(directory: Path) -> list[dict]:
    """A kustomize build of `directory` for the subset of kustomize this repository uses."""
    kfile = next((directory / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if (directory / n).is_file()), None)
    if kfile is None:
        raise FileNotFoundError(f"no kustomization file in {directory}")
    k = yaml.safe_load(kfile.read_text()) or {}
    unsupported = set(k) - SUPPORTED_KUSTOMIZATION_FIELDS
    if unsupported:
        raise ValueError(f"{kfile}: the Python renderer does not support {sorted(unsupported)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render_python(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for entry in k.get("patches", []):
        if set(entry) - {"path", "patch"}:
            raise ValueError(f"{kfile}: patches support only `path` or `patch`, not {sorted(entry)}")
        text = (directory / entry["path"]).read_text() if "path" in entry else entry["patch"]
        for patch in yaml.safe_load_all(text):
            if patch:
                docs = _apply_patch(docs, patch, kfile)
    for image in k.get("images", []):
        for doc in docs:
            _set_images(doc, image)
    return docs


def _same_group(a: str, b: str) -> bool:
    """apiVersions that name the same group (a patch may name another version of it)."""
    return a.rpartition("/")[0] == b.rpartition("/")[0]


def _apply_patch(docs: list[dict], patch: dict, origin: Path) -> list[dict]:
    kind, name = patch.get("kind"), (patch.get("metadata") or {}).get("name")
    hits = [i for i, d in enumerate(docs) if d.get("kind") == kind and d["metadata"].get("name") == name
            and _same_group(d.get("apiVersion", ""), patch.get("apiVersion", ""))]
    if len(hits) != 1:
        raise ValueError(f"{origin}: a patch of {kind}/{name} matches {len(hits)} resources")
    patch = dict(patch)
    directive = patch.pop("$patch", None)
    if directive == "delete":
        return [d for i, d in enumerate(docs) if i != hits[0]]
    if directive not in (None, "merge"):
        raise ValueError(f"{origin}: unsupported $patch: {directive}")
    docs = list(docs)
    docs[hits[0]] = _merge(docs[hits[0]], patch)
    return docs


def _merge(dst: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of `patch` into `dst` (a new object; neither input changes)."""
    if isinstance(dst, dict) and isinstance(patch, dict):
        out = copy.deepcopy(dst)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(dst, list) and isinstance(patch, list):
        key = _merge_key(field, dst + patch)
        if key is not None:
            # As kustomize orders them: the patch's items (merged with their originals) first, then the rest.
            originals = {item[key]: item for item in dst}
            merged, named = [], set()
            for item in patch:
                named.add(item[key])
                if item.get("$patch") == "delete":
                    continue
                merged.append(_merge(originals[item[key]], item) if item[key] in originals
                              else copy.deepcopy(item))
            return merged + [copy.deepcopy(item) for item in dst if item[key] not in named]
    return copy.deepcopy(patch)


def _merge_key(field: str, items: list) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":  # a container's ports merge by containerPort, a Service's by port
        key = "containerPort" if all("containerPort" in i for i in items) else "port"
    else:
        key = MERGE_KEYS.get(field)
    return key if key is not None and all(key in i for i in items) else None


def _split_image(ref: str) -> tuple[str, str, str]:
    """"name[:tag][@digest]" -> (name, ":tag" or "", "@digest" or "")."""
    ref, _, digest = ref.partition("@")
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon:], "@" + digest if digest else ""
    return ref, "", "@" + digest if digest else ""


def _set_images(node: Any, image: dict) -> None:
    """kustomize's `images`: every container (of any resource kind) whose image has that name."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str):
                        name, tag, digest = _split_image(c["image"])
                        if name == image["name"]:
                            if "newTag" in image:
                                tag = f":{image['newTag']}"
                            if "digest" in image:
                                tag, digest = "", f"@{image['digest']}"
                            c["image"] = image.get("newName", name) + tag + digest
            _set_images(value, image)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image)


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return [shutil.which("kustomize"), "build"]
    kubectl = shutil.which("kubectl")
    if kubectl and subprocess.run([kubectl, "kustomize", "--help"], capture_output=True).returncode == 0:
        return [kubectl, "kustomize"]
    return None


def render_kustomize(directory: Path) -> list[dict] | None:
    """The real kustomize's build of `directory`, or None when none is installed."""
    cmd = kustomize_command()
    if cmd is None:
        return None
    proc = subprocess.run([*cmd, str(directory)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(Path(c).name for c in cmd)} {directory}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_identity(docs: Iterable[dict]) -> dict[tuple[str, str, str], dict]:
    out = {}
    for d in docs:
        ident = (d["apiVersion"], d["kind"], d["metadata"]["name"])
        if ident in out:
            raise AssertionError(f"two resources are {ident}")
        out[ident] = d
    return out


def render(name: str) -> list[dict]:
    """The manifests of one kustomization (base, cpu-dev, ep-multinode): kustomize's when installed."""
    return render_kustomize(KUSTOMIZATIONS[name]) or render_python(KUSTOMIZATIONS[name])


def check_kustomize() -> str:
    tool = kustomize_command()
    for name, directory in KUSTOMIZATIONS.items():
        ours = by_identity(render_python(directory))
        if tool is None:
            continue
        theirs = by_identity(render_kustomize(directory) or [])
        if ours != theirs:
            diff = sorted(set(ours) ^ set(theirs)) or [i for i in ours if ours[i] != theirs[i]]
            raise AssertionError(f"{name}: the Python renderer and kustomize disagree on {diff}")
    if tool is None:
        return "Python renderer only (no kustomize or kubectl to compare with)"
    return f"{' '.join(Path(c).name for c in tool)} and the Python renderer agree"


# --- Kubernetes schemas ---------------------------------------------------------------------------------


def validate_manifest(doc: dict, version: str = K8S_VERSION) -> None:
    """Raise (a jsonschema.ValidationError, or LookupError for an unknown kind) when `doc` is invalid."""
    try:
        import kubernetes_validate
    except ImportError:
        raise Skip("kubernetes-validate is not installed: pip install kubernetes-validate") from None
    schema_path = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema_path is None:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as e:
            raise LookupError(e.message) from None
        return
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    schema = json.loads(schema_path.read_text())
    definitions = schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version)
    registry = Registry().with_resources([(schema["$id"], Resource.from_contents(schema)),
                                          (definitions["$id"], Resource.from_contents(definitions))])
    jsonschema.Draft202012Validator(schema, registry=registry).validate(doc)


def check_k8s() -> str:
    count = 0
    for name in KUSTOMIZATIONS:
        for doc in render(name):
            try:
                validate_manifest(doc)
            except Skip:
                raise
            except Exception as e:
                where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
                raise AssertionError(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {where}: "
                                     f"{getattr(e, 'message', e)}") from None
            count += 1
    return f"{count} manifests valid for Kubernetes {K8S_VERSION}"


# --- Prometheus and the dashboards' PromQL ---------------------------------------------------------------


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included (rows themselves left out)."""
    out = []
    for p in dashboard.get("panels", []):
        if p.get("type") == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every query of every dashboard panel."""
    return [(f"{name}: {p.get('title')!r} {t.get('refId')}", t["expr"])
            for name, d in dashboards().items() for p in panels(d) for t in p.get("targets", []) if "expr" in t]


def _grafana_to_promql(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    if "$" in expr:
        raise AssertionError(f"unknown Grafana variable in {expr!r}")
    return expr


def check_prometheus() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise Skip("no promtool: apt-get install prometheus")
    proc = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"promtool check config: {(proc.stderr or proc.stdout).strip()}")
    exprs = promql_expressions()
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr{i}", "expr": _grafana_to_promql(e)} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yml"
        path.write_text(yaml.safe_dump(rules))
        proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"dashboard PromQL: {(proc.stderr or proc.stdout).strip()}")
    return f"prometheus.yml and {len(exprs)} dashboard queries parse"


# --- OpenTelemetry collector and Grafana -----------------------------------------------------------------


def check_otel() -> str:
    cfg = yaml.safe_load(OTEL_CONFIG.read_text())
    service = cfg["service"]
    for ext in service.get("extensions", []):
        assert ext in (cfg.get("extensions") or {}), f"extension {ext} is not defined"
    pipelines = service["pipelines"]
    for name, pipe in pipelines.items():
        assert pipe.get("receivers") and pipe.get("exporters"), f"pipeline {name} needs receivers and exporters"
        for section in ("receivers", "processors", "exporters"):
            for comp in pipe.get(section, []):
                assert comp in (cfg.get(section) or {}), f"pipeline {name}: {section[:-1]} {comp} is not defined"
    used = {c for p in pipelines.values() for s in ("receivers", "processors", "exporters") for c in p.get(s, [])}
    unused = {c for s in ("receivers", "processors", "exporters") for c in (cfg.get(s) or {})} - used
    assert not unused, f"defined but in no pipeline: {sorted(unused)}"
    return f"{len(pipelines)} pipelines"


def check_grafana() -> str:
    for path in sorted((GRAFANA / "provisioning").rglob("*.y*ml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg.get("apiVersion") == 1, f"{path}: apiVersion 1"
        assert cfg.get("datasources") or cfg.get("providers"), f"{path}: no datasources or providers"
    boards = dashboards()
    assert boards, "no dashboards"
    for name, d in boards.items():
        assert d.get("uid") and d.get("title"), f"{name}: uid and title"
        ids = [p["id"] for p in d["panels"]] + [q["id"] for p in d["panels"] for q in p.get("panels", [])]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels(d):
            assert p.get("targets") and all(t.get("expr") for t in p["targets"]), f"{name}: {p.get('title')}"
    return f"{len(boards)} dashboard(s)"


# --- main ------------------------------------------------------------------------------------------------

CHECKS: dict[str, Callable[[], str]] = {
    "compose": check_compose,
    "kustomize": check_kustomize,
    "k8s": check_k8s,
    "prometheus": check_prometheus,
    "otel": check_otel,
    "grafana": check_grafana,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strict", action="store_true", help="fail when a check's tool is missing")
    p.add_argument("checks", nargs="*", metavar="CHECK", help=f"checks to run: {', '.join(CHECKS)} (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.checks) - set(CHECKS)
    if unknown:
        p.error(f"unknown checks {sorted(unknown)}: choose from {', '.join(CHECKS)}")
    failed = skipped = 0
    for name in args.checks or CHECKS:
        try:
            print(f"ok    {name}: {CHECKS[name]()}")
        except Skip as e:
            skipped += 1
            print(f"SKIP  {name}: {e}")
        except (AssertionError, ValueError, OSError, yaml.YAMLError) as e:
            failed += 1
            print(f"FAIL  {name}: {e}")
    if failed or (args.strict and skipped):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
