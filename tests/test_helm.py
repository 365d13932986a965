"""The Helm chart (helm/gptoss-vllm): rendered by Helm's own engine (helm-python-sdk embeds Helm's Go library),
linted strictly, every object valid against Kubernetes' OpenAPI schemas or its CRD's schema (RayService,
Prometheus Operator: tests/data/crds), the generated serveConfigV2 accepted by the project's config schema,
bad values refused at render time, and no failed checkov policy check."""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gptoss_vllm.observability import rules as rules_module
from gptoss_vllm.serve.app_names import APP_NAME, pool_app_name
from gptoss_vllm.serve.body_shape import ShapeLimits
from gptoss_vllm.serve.config import EFFORTS, BodyShape, ServeConfig
from gptoss_vllm.serve.config_load import parse_view
from gptoss_vllm.serve.proxy.settings import shape_limits
from helm import values_schema
from tests.support.chart import CHART, EXAMPLES, NAMESPACE, ROOT, by_kind, chart, example, merge, render

CRDS = Path(__file__).resolve().parent / "data" / "crds"
CHECKOV = ROOT / ".venv-tools" / "bin" / "checkov"
KUBE_VERSION = "1.37.0"
# Kinds validated against a CRD rather than Kubernetes' built-in schemas.
CRD_FILES = {
    ("ray.io/v1", "RayService"): "ray.io_rayservices.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"): "monitoring.coreos.com_scrapeconfigs.yaml",
}
# Gateway API kinds: no schema shipped here; their shape is checked by hand below.
UNCHECKED_KINDS = {("gateway.networking.k8s.io/v1", "HTTPRoute")}


def serve_apps(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Serve applications of the RayService's serveConfigV2, by name (checked by Ray's own schema)."""
    from ray.serve.schema import ServeDeploySchema

    (rayservice,) = by_kind(objects, "RayService")
    declared = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema(**declared)
    return {app["name"]: app for app in declared["applications"]}


def serve_app(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The ingress's application."""
    return serve_apps(objects)[APP_NAME]


def declared_config(objects: list[dict[str, Any]]) -> ServeConfig:
    """The whole serving config the chart deploys, gathered from its applications; the ingress's arguments
    must be the view Python derives from it (the chart computes it in its templates)."""
    from gptoss_vllm.serve.app import config_of

    apps = serve_apps(objects)
    ingress = apps[APP_NAME]
    assert (ingress["route_prefix"], ingress["import_path"]) == ("/", "gptoss_vllm.serve.app:build_app")
    config = config_of({"applications": list(apps.values())})
    for name in config.pools:
        app = apps[pool_app_name(name)]
        assert app["route_prefix"] is None and app["import_path"] == "gptoss_vllm.serve.app:build_pool_app"
        assert app["args"]["model_name"] == config.model_name
    assert len(apps) == len(config.pools) + 1
    return config


@functools.cache
def crd_validator(file: str, version: str) -> jsonschema.protocols.Validator:
    crd = yaml.load((CRDS / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(spec["schema"]["openAPIV3Schema"])
    _strict(schema)
    return jsonschema.Draft7Validator(schema)


def _strict(schema: dict[str, Any]) -> None:
    """Structural CRD schemas prune unknown fields; here an unknown field is an error (as kubectl --validate=strict)."""
    if not isinstance(schema, dict):
        return
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for sub in schema.get(key, {}).values():
            _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            _strict(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _strict(sub)


def validate(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in CRD_FILES:
            version = obj["apiVersion"].split("/")[1]
            errors = sorted(crd_validator(CRD_FILES[key], version).iter_errors(obj), key=str)
            assert not errors, f"{where}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
            )
        elif key in UNCHECKED_KINDS:
            continue
        else:
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{where}: {exc}") from None
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE


def check_serve_config(objects: list[dict[str, Any]], values: dict[str, Any]) -> None:
    config = declared_config(objects)
    (rayservice,) = by_kind(objects, "RayService")
    groups = {g["groupName"]: g for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == set(config.pools)
    merged = chart().merge_values(values)
    for name, pool in config.pools.items():
        resource = f"gptoss_pool_{name}"
        advertised = json.loads(json.loads(groups[name]["rayStartParams"]["resources"]))
        assert advertised == {resource: 1}
        assert pool.ray_actor_options["resources"][resource] == 1
        gpus = merged["workerGroups"][name].get("gpusPerReplica", 0)
        assert pool.ray_actor_options["num_gpus"] == gpus
        (container,) = groups[name]["template"]["spec"]["containers"]
        assert int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) == gpus
        if merged["model"]["source"] == "pvc" and "/" in merged["serve"]["pools"][name]["model"]:
            assert pool.model.startswith(merged["model"]["pvc"]["mountPath"] + "/")
    # Every effort has its pool, as the local `serve` requires.
    assert {config.pool_for(e) for e in EFFORTS} <= set(config.pools)


def test_the_ingress_view_follows_each_pools_floor_and_context_and_nothing_else():
    from gptoss_vllm.serve.app import serve_deploy_config

    def rendered(fast: dict[str, Any], deep: dict[str, Any]) -> tuple[ServeConfig, dict[str, Any]]:
        objects = render({"serve": {"pools": {"fast": fast, "deep": deep}}})
        return declared_config(objects), serve_apps(objects)

    # The floor: autoscaling's min_replicas (Ray's default 1 when absent; null drops the chart's default), or
    # replicas; the context: max_model_len in either spelling vLLM takes.
    fast = {
        "autoscaling": {"min_replicas": None, "max_replicas": 3},
        "engine_args": {"max_model_len": None, "max-model-len": 2048},
    }
    deep = {"autoscaling": {"min_replicas": 0, "max_replicas": 2}, "engine_args": {"max_model_len": 8192}}
    config, apps = rendered(fast, deep)
    view = apps[APP_NAME]["args"]["serve"]["pools"]
    assert (view["fast"]["min_replicas"], view["fast"]["max_model_len"]) == (1, 2048)
    assert (view["deep"]["min_replicas"], view["deep"]["max_model_len"]) == (0, 8192)
    assert config.view().pools["deep"].scales_from_zero
    assert (
        rendered({"autoscaling": None, "replicas": 3}, deep)[1][APP_NAME]["args"]["serve"]["pools"]["fast"][
            "min_replicas"
        ]
        == 3
    )
    # What the chart renders is what Python writes for the same config (defaults aside).
    python = {a["name"]: a for a in serve_deploy_config(config)["applications"]}
    assert set(python) == set(apps)
    assert parse_view(python[APP_NAME]["args"]["serve"]) == parse_view(apps[APP_NAME]["args"]["serve"])
    # A pool's scaling policy, engine or model is its application's alone: the ingress's arguments stay.
    _, changed = rendered(
        merge(fast, {"autoscaling": {"max_replicas": 5, "policy": "queue", "target": 2}}),
        merge(deep, {"engine_args": {"max_num_seqs": 3}}),
    )
    assert changed[APP_NAME] == apps[APP_NAME]
    assert changed[pool_app_name("fast")] != apps[pool_app_name("fast")]
    assert changed[pool_app_name("deep")] != apps[pool_app_name("deep")]


# -- values files and toggles -----------------------------------------------------------------------------------

KEYS = {"apiKeys": {"existingSecret": "gptoss-keys"}}
TOGGLES = {
    # A public route needs API keys (or apiKeys.allowAnonymous).
    "ingress": {"ingress": {"enabled": True, "className": "nginx"}, **KEYS},
    "httproute": {
        "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw", "namespace": "gateway"}]},
        **KEYS,
    },
    "pvc": {"model": {"source": "pvc", "hfTokenSecret": {"name": "hf-token"}}},
    "no-monitoring": {"monitoring": {"enabled": False}},
    "no-networkpolicy": {"networkPolicy": {"enabled": False}},
    "no-pdb": {"podDisruptionBudget": {"enabled": False, "head": False}},
    "no-ray-auth": {"rayAuth": {"enabled": False}},
    "existing-secrets": {
        "rayAuth": {"existingSecret": "ray-token"},
        "monitoring": {"tokenSecret": {"name": "prom-token", "key": "bearer"}},
    },
    "strict-egress": {
        "networkPolicy": {
            "egress": {
                "allowAll": False,
                "dnsTo": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                    }
                ],
                "rules": [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 443}]}],
            }
        }
    },
    "proxy-limits": {
        "ingress": {
            "maxBodyBytes": 8388608,
            "maxHeaderBytes": 16384,
            "bodyTimeoutSeconds": 12.5,
            "bodyShape": {
                "maxDepth": 32,
                "maxObjectMembers": 500,
                "maxArrayItems": 70000,
                "maxStringBytes": 4096,
                "maxWordBytes": 1000,
            },
        }
    },
    "autoscaling-fixed": {
        "serve": {"pools": {"fast": {"autoscaling": None, "replicas": 2}}},
        "workerGroups": {"fast": {"minReplicas": 2, "maxReplicas": 2}},
    },
    "redis-store": {
        "responseStore": {
            "backend": "redis",
            "url": "rediss://redis.data:6380/0",
            "passwordSecret": {"name": "redis-auth", "key": "password"},
            "tlsCaSecret": {"name": "redis-ca"},
            "ttlSeconds": 86400,
            "maxResponses": 5000,
        },
        "serve": {"ingress": {"replicas": 2}},
    },
    "tools": {
        "tools": {
            "python": {"enabled": True},
            "browser": {"enabled": True, "index": {"claimName": "docs-index"}},
        },
        "serve": {"pools": {"deep": {"tools": {"python": {}, "browser": {}}}}},
    },
    "keys-otel": {
        "apiKeys": {"existingSecret": "gptoss-keys"},
        "otel": {
            "endpoint": "http://otel-collector.observability:4317",
            "extraEnv": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
        },
        "podDisruptionBudget": {"head": True},
    },
}


CASES = {"default": {}} | {f"example:{p.stem}": example(p) for p in EXAMPLES}
# Each toggle on the default, and pairs of toggles, and every toggle on the 120b TP=2 example.
CASES |= {f"toggle:{name}": overlay for name, overlay in TOGGLES.items()}
CASES |= {
    f"toggles:{a}+{b}": merge(TOGGLES[a], TOGGLES[b])
    for a, b in itertools.combinations(
        ["ingress", "httproute", "pvc", "no-monitoring", "no-networkpolicy"], 2
    )
}
TP2 = ROOT / "deploy" / "helm" / "values-gpt-oss-120b-tp2.yaml"
if TP2.exists():
    CASES["example:tp2+all"] = merge(example(TP2), *TOGGLES.values())


def test_example_values_exist():
    assert {p.name for p in EXAMPLES} >= {
        "values-gpt-oss-20b.yaml",
        "values-gpt-oss-120b-h200.yaml",
        "values-gpt-oss-120b-tp2.yaml",
        "values-cpu-demo.yaml",
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_renders_valid_objects(case):
    values = CASES[case]
    objects = render(values)
    validate(objects)
    check_serve_config(objects, values)
    kinds = {o["kind"] for o in objects}
    merged = chart().merge_values(values)
    assert ("Ingress" in kinds) == merged["ingress"]["enabled"]
    assert ("HTTPRoute" in kinds) == merged["httpRoute"]["enabled"]
    assert ("NetworkPolicy" in kinds) == merged["networkPolicy"]["enabled"]
    assert ("Job" in kinds) == (merged["model"]["source"] == "pvc")
    monitoring = {"ScrapeConfig", "PodMonitor", "PrometheusRule"}
    assert (monitoring <= kinds) == merged["monitoring"]["enabled"]
    assert not (monitoring & kinds) or merged["monitoring"]["enabled"]


def test_httproute_shape():
    (route,) = by_kind(render(TOGGLES["httproute"]), "HTTPRoute")
    assert route["spec"]["parentRefs"] == [{"name": "gw", "namespace": "gateway"}]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "demo-gptoss-vllm", "port": 8000}]


@pytest.mark.parametrize("case", ["default", *[f"example:{p.stem}" for p in EXAMPLES]])
def test_lint_strict(case):
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


# -- what the chart wires -------------------------------------------------------------------------------------


def test_ray_cluster_shape():
    objects = render(TOGGLES["keys-otel"])
    (rayservice,) = by_kind(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    for group in cluster["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert group["minReplicas"] <= group["maxReplicas"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
        assert env["OTEL_SERVICE_NAME"] == "gptoss-vllm"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_always_on"
        assert env["GPTOSS_VLLM_METRICS_PORT"] == "9500"
        assert "api-keys" not in {m["name"] for m in container["volumeMounts"]}  # the ingress is on the head
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "api-keys", "mountPath": "/etc/gptoss/api-keys", "readOnly": True} in head["volumeMounts"]
    assert head["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert head["livenessProbe"]["httpGet"]["path"] == "/health"
    assert serve_app(objects)["args"]["serve"]["auth"]["api_keys_file"] == "/etc/gptoss/api-keys/keys"


def test_grace_period_covers_the_longest_stream():
    values = chart().merge_values({})
    (rayservice,) = by_kind(render(), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    serve, rate = values["serve"], values["minDecodeTokensPerSecond"]
    margin = values["terminationMarginSeconds"]
    graces = {}
    for group in cluster["workerGroupSpecs"]:
        pool = serve["pools"][group["groupName"]]
        longest = max(-(-serve["budgets"][e]["max_tokens"] // rate) for e in pool["efforts"])
        expected = max(longest, pool["drain_timeout_s"]) + margin
        graces[group["groupName"]] = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert graces[group["groupName"]] == expected
    # deep serves high effort: 65536 tokens at 20 tok/s outlast its 1800 s drain
    assert graces["deep"] == 65536 // 20 + 1 + margin
    assert cluster["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"] == max(
        graces.values()
    )


def test_monitoring_objects():
    objects = render()
    (scrape,) = by_kind(objects, "ScrapeConfig")
    (sd,) = scrape["spec"]["httpSDConfigs"]
    assert sd["url"] == f"http://demo-gptoss-vllm.{NAMESPACE}.svc:8000/metrics/targets"
    # GET /metrics/targets answers only the bearer of the monitoring token: the chart's Secret, whose key the
    # head's Ray container (where the ingress runs) gets as GPTOSS_VLLM_MONITORING_TOKEN; no worker does.
    token = {"name": "demo-gptoss-vllm-monitoring", "key": "token"}
    assert sd["authorization"] == {"type": "Bearer", "credentials": token}
    secret = secrets_by_name(objects)["demo-gptoss-vllm-monitoring"]
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    for container in ray_containers(objects):
        found = env_of(container).get("GPTOSS_VLLM_MONITORING_TOKEN")
        expected = {"secretKeyRef": token} if container["name"] == "ray-head" else None
        assert found == expected, container["name"]
    assert {"action": "replace", "targetLabel": "namespace", "replacement": NAMESPACE} in scrape["spec"][
        "relabelings"
    ]
    (pod_monitor,) = by_kind(objects, "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboards = [
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert {name for cm in dashboards for name in cm["data"]} == {
        p.name for p in (ROOT / "dashboards").glob("*.json")
    }
    for cm in dashboards:
        for name, text in cm["data"].items():
            assert json.loads(text) == json.loads((ROOT / "dashboards" / name).read_text())


def test_prometheus_rule_carries_the_tested_rules():
    (rule,) = by_kind(render(), "PrometheusRule")
    original = yaml.safe_load(rules_module.RULES_PATH.read_text())
    assert rule["spec"] == original


def test_chart_files_are_the_originals():
    # Symlinks (Helm reads only files inside the chart); a link replaced by a stale copy fails here.
    assert (CHART / "files" / "rules.yaml").read_bytes() == rules_module.RULES_PATH.read_bytes()
    originals = {p.name: p.read_bytes() for p in (ROOT / "dashboards").glob("*.json")}
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert copies == originals


def test_monitoring_token_from_an_existing_secret():
    values = {
        "monitoring": {"tokenSecret": {"name": "prom-token", "key": "bearer"}},
        "serve": {"ingress": {"monitoring_token_env": "SCRAPE_TOKEN"}},
    }
    objects = render(values)
    (scrape,) = by_kind(objects, "ScrapeConfig")
    ref = {"name": "prom-token", "key": "bearer"}
    assert scrape["spec"]["httpSDConfigs"][0]["authorization"]["credentials"] == ref
    assert "demo-gptoss-vllm-monitoring" not in secrets_by_name(objects)
    for container in ray_containers(objects):
        env = env_of(container)
        assert env.get("SCRAPE_TOKEN") == ({"secretKeyRef": ref} if container["name"] == "ray-head" else None)
        assert "GPTOSS_VLLM_MONITORING_TOKEN" not in env


# -- secure defaults -------------------------------------------------------------------------------------------


def secrets_by_name(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in by_kind(objects, "Secret")}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (a string) or valueFrom (a dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart renders, by role: head, worker:<group>, download."""
    out = {}
    for rayservice in by_kind(objects, "RayService"):
        cluster = rayservice["spec"]["rayClusterConfig"]
        out["head"] = cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster["workerGroupSpecs"]:
            out[f"worker:{group['groupName']}"] = group["template"]["spec"]
    for job in by_kind(objects, "Job"):
        out["download"] = job["spec"]["template"]["spec"]
    return out


def ray_containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for role, pod in pods(objects).items() if role != "download" for c in pod["containers"]]


def secrets_read_by_container(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    """'<role>/<container>' -> the Secrets it references: env secretKeyRef, envFrom, mounted secret volumes.
    KubeRay's autoscaler sidecar (built from autoscalerOptions, mounting the head pod's volumes) counts as a
    container of the head pod."""
    out: dict[str, set[str]] = {}
    for role, pod in pods(objects).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        containers = pod["containers"] + pod.get("initContainers", [])
        if role == "head":
            (rayservice,) = by_kind(objects, "RayService")
            containers = [
                *containers,
                {"name": "autoscaler", **rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]},
            ]
        mounted_anywhere = set()
        for container in containers:
            names = set()
            for value in env_of(container).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    names.add(value["secretKeyRef"]["name"])
            names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
            for mount in container.get("volumeMounts", []):
                mounted_anywhere.add(mount["name"])
                volume = volumes[mount["name"]]
                if "secret" in volume:
                    names.add(volume["secret"]["secretName"])
                for source in volume.get("projected", {}).get("sources", []):
                    if "secret" in source:
                        names.add(source["secret"]["name"])
            out[f"{role}/{container['name']}"] = names
        # A pod declares a Secret volume only for a container that mounts it.
        unused = {
            n for n, v in volumes.items() if ("secret" in v or "projected" in v) and n not in mounted_anywhere
        }
        assert not unused, (role, unused)
    return out


@pytest.mark.parametrize("source", ["hf", "pvc"])
def test_each_secret_reaches_only_the_containers_that_read_it(source):
    values = {
        "apiKeys": {"existingSecret": "gptoss-keys"},
        "model": {"source": source, "hfTokenSecret": {"name": "hf-token"}},
    }
    read = secrets_read_by_container(render(values))
    ray, monitoring = "demo-gptoss-vllm-ray-auth", "demo-gptoss-vllm-monitoring"
    # API keys and the monitoring token: the head, where the ingress runs (pinned there); the Ray token: every Ray
    # process including the autoscaler; the HF token: whatever downloads the model (the pool replicas on the
    # workers with model.source hf, the download Job alone with pvc).
    worker = {ray} | ({"hf-token"} if source == "hf" else set())
    expected = {
        "head/ray-head": {"gptoss-keys", monitoring, ray},
        "head/autoscaler": {ray},
        "worker:fast/ray-worker": worker,
        "worker:deep/ray-worker": worker,
    }
    if source == "pvc":
        expected |= {
            "worker:fast/wait-for-model": set(),
            "worker:deep/wait-for-model": set(),
            "download/download": {"hf-token"},
        }
    assert read == expected


def test_service_account_token_only_on_the_head():
    objects = render(TOGGLES["pvc"])
    specs = pods(objects)
    assert set(specs) == {"head", "worker:fast", "worker:deep", "download"}
    for role, pod in specs.items():
        if role == "head":
            # KubeRay's in-tree autoscaler sidecar in the head pod scales the worker groups through the API.
            assert pod.get("automountServiceAccountToken", True) is True
        else:
            assert pod["automountServiceAccountToken"] is False, role


def test_ray_token_auth_by_default():
    objects = render()
    (rayservice,) = by_kind(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    # KubeRay's own API (the operator authenticates its dashboard calls with this Secret) ...
    assert cluster["authOptions"] == {"mode": "token", "secretName": "demo-gptoss-vllm-ray-auth"}
    secret = secrets_by_name(objects)["demo-gptoss-vllm-ray-auth"]
    assert set(secret["data"]) == {"auth_token"}  # KubeRay's fixed key
    assert len(base64.b64decode(secret["data"]["auth_token"])) >= 32
    # ... and the env on every Ray container, the autoscaler sidecar included.
    ref = {"secretKeyRef": {"name": "demo-gptoss-vllm-ray-auth", "key": "auth_token"}}
    for container in [*ray_containers(objects), cluster["autoscalerOptions"]]:
        env = env_of(container)
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"] == ref


def test_ray_token_auth_existing_secret_and_opt_out():
    objects = render({"rayAuth": {"existingSecret": "ray-token"}})
    (rayservice,) = by_kind(objects, "RayService")
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "ray-token"
    assert "demo-gptoss-vllm-ray-auth" not in secrets_by_name(objects)
    for container in ray_containers(objects):
        assert env_of(container)["RAY_AUTH_TOKEN"]["secretKeyRef"] == {
            "name": "ray-token",
            "key": "auth_token",
        }

    objects = render(TOGGLES["no-ray-auth"])
    (rayservice,) = by_kind(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert "authOptions" not in cluster
    assert "demo-gptoss-vllm-ray-auth" not in secrets_by_name(objects)
    for container in [*ray_containers(objects), cluster["autoscalerOptions"]]:
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_of(container))


def network_policies(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"].removeprefix("demo-gptoss-vllm-"): o["spec"]
        for o in by_kind(render(values), "NetworkPolicy")
    }


def test_dashboard_ports_only_from_the_operator_and_the_ray_pods():
    assert chart().merge_values({})["networkPolicy"]["enabled"] is True
    ray = network_policies()["ray"]
    own = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "gptoss-vllm",
                "app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "ray",
            }
        }
    }
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    for port in (8265, 52365):
        peers = [
            peer
            for rule in ray["ingress"]
            if "ports" not in rule or any(p["port"] == port for p in rule["ports"])
            for peer in rule["from"]
        ]
        assert peers == [own, operator], port


def test_the_tools_run_apart_reached_by_the_engines_only_and_the_sandbox_with_no_egress():
    objects = render(TOGGLES["tools"])
    deployments = {o["metadata"]["name"]: o for o in by_kind(objects, "Deployment")}
    python = deployments["demo-gptoss-vllm-tools-python"]["spec"]["template"]["spec"]
    (container,) = python["containers"]
    assert container["command"][:3] == ["gptoss-vllm", "tools", "python"]
    assert "--wall-seconds=30" in container["args"] and "--memory-mib=512" in container["args"]
    assert python["securityContext"]["seccompProfile"] == {"type": "Unconfined"}  # bubblewrap's namespaces
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    browser = deployments["demo-gptoss-vllm-tools-browser"]["spec"]["template"]["spec"]
    assert browser["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "--index=/var/lib/gptoss/index/index.db" in browser["containers"][0]["args"]
    # deep's engines reach the chart's servers; the ingress knows deep offers both.
    config = declared_config(objects)
    assert config.pools["deep"].tools.python.url == "demo-gptoss-vllm-tools-python:8765"
    assert config.pools["deep"].tools.browser.url == "demo-gptoss-vllm-tools-browser:8766"
    assert config.view().pools["deep"].tools == ["python", "browser"]
    policies = network_policies(TOGGLES["tools"])
    sandbox = policies["tools-python"]
    assert sandbox["policyTypes"] == ["Ingress", "Egress"] and sandbox["egress"] == []
    (ingress,) = sandbox["ingress"]
    assert ingress["ports"] == [{"port": 8765, "protocol": "TCP"}]
    assert ingress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray"
    assert [rule.get("ports") for rule in policies["tools-browser"]["egress"]] == [
        [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    ]
    (monitor,) = [o for o in by_kind(objects, "PodMonitor") if o["metadata"]["name"].endswith("-tools")]
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "mcp", "path": "/metrics", "interval": "15s"}]
    ray_egress = policies["egress"]["egress"]
    assert {"port": 8765, "protocol": "TCP"} in [p for rule in ray_egress for p in rule.get("ports", [])]
    with pytest.raises(Exception, match=r"serve.pools.deep.tools.python has no url and tools.python.enabled"):
        render({"serve": {"pools": {"deep": {"tools": {"python": {}}}}}})


def test_egress_keeps_the_metadata_service_out():
    policies = network_policies(TOGGLES["pvc"])
    egress = policies["egress"]
    assert egress["policyTypes"] == ["Egress"]
    # The Ray pods and the download Job.
    assert egress["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["ray", "model-download"]}
    ]
    dns, own, anywhere = egress["egress"]
    assert dns == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    assert own["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "ray"
    assert anywhere["to"] == [
        {"namespaceSelector": {}},
        {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.169.254/32"]}},
        {"ipBlock": {"cidr": "::/0", "except": ["fd00:ec2::254/128"]}},
    ]
    # The Job takes no ingress at all.
    assert policies["download"]["ingress"] == []

    # Restricted further: no allow-all, DNS to kube-dns, the given rules.
    strict = network_policies(TOGGLES["strict-egress"])["egress"]["egress"]
    assert len(strict) == 3
    assert strict[0]["to"] == TOGGLES["strict-egress"]["networkPolicy"]["egress"]["dnsTo"]
    assert strict[2] == TOGGLES["strict-egress"]["networkPolicy"]["egress"]["rules"][0]
    assert not any("ipBlock" in peer for rule in strict[:2] for peer in rule.get("to", []))

    assert "egress" not in network_policies({"networkPolicy": {"egress": {"enabled": False}}})


def test_public_route_without_keys_renders_with_the_opt_out():
    for route in ("ingress", "httproute"):
        values = merge(TOGGLES[route], {"apiKeys": {"existingSecret": "", "allowAnonymous": True}})
        objects = render(values)
        validate(objects)
        assert "auth" not in serve_app(objects)["args"]["serve"]
    # Keys from the serving config's own env source count as keys.
    values = merge(
        TOGGLES["ingress"], {"apiKeys": {"existingSecret": ""}, "serve": {"auth": {"api_keys_env": "KEYS"}}}
    )
    render(values)


def test_proxy_gate_env_and_serving_config():
    objects = render()
    for container in ray_containers(objects):
        env = env_of(container)
        assert (
            env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "gptoss_vllm.serve.proxy.callback:middlewares"
        )
        assert env["GPTOSS_VLLM_MAX_HEADER_BYTES"] == "32768"
        assert env["GPTOSS_VLLM_BODY_TIMEOUT_S"] == "30"
        # Empty: the server computes the body limit from the largest pool's max_model_len.
        assert "GPTOSS_VLLM_MAX_BODY_BYTES" not in env
        # The body shape bounds: the serving config's defaults, on every proxy.
        names = ("DEPTH", "OBJECT_MEMBERS", "ARRAY_ITEMS", "STRING_BYTES", "WORD_BYTES")
        assert [env[f"GPTOSS_VLLM_MAX_JSON_{name}"] for name in names] == [
            "64", "10000", "262144", "1048576", "32768"
        ]  # fmt: skip
    ingress = serve_app(objects)["args"]["serve"]["ingress"]
    shape = {
        "max_depth": 64,
        "max_object_members": 10000,
        "max_array_items": 262144,
        "max_string_bytes": 1048576,
        "max_word_bytes": 32768,
    }
    assert shape == BodyShape().model_dump()
    assert ingress == {"max_header_bytes": 32768, "body_timeout_s": 30, "body_shape": shape}
    assert "GPTOSS_VLLM_MAX_BODY_BYTES" not in env_of(
        pods(render(TOGGLES["pvc"]))["download"]["containers"][0]
    )

    objects = render(TOGGLES["proxy-limits"])
    for container in ray_containers(objects):
        env = env_of(container)
        assert (env["GPTOSS_VLLM_MAX_BODY_BYTES"], env["GPTOSS_VLLM_MAX_HEADER_BYTES"]) == (
            "8388608",
            "16384",
        )
        assert env["GPTOSS_VLLM_BODY_TIMEOUT_S"] == "12.5"
    config = declared_config(objects)
    assert (config.ingress.max_body_bytes, config.ingress.max_header_bytes) == (8388608, 16384)
    assert config.ingress.body_timeout_s == 12.5
    assert config.ingress.body_shape.limits() == ShapeLimits(32, 500, 70000, 4096, 1000)
    for container in ray_containers(objects):
        assert shape_limits(env_of(container)) == ShapeLimits(32, 500, 70000, 4096, 1000)
    # Behind an Ingress, the failed-authentication limit counts the client the balancer names, not the balancer.
    public = serve_app(render(TOGGLES["ingress"]))["args"]["serve"]["ingress"]
    assert public["client_address_header"] == "x-forwarded-for"
    assert "client_address_header" not in ingress


def test_the_response_store_from_values_with_its_secrets():
    config = declared_config(render())
    assert config.response_store.backend == "embedded" and config.response_store.ttl_s == 30 * 86400
    for container in ray_containers(render()):
        assert "GPTOSS_VLLM_RESPONSE_STORE_PASSWORD" not in env_of(container)
    objects = render(TOGGLES["redis-store"])
    config = declared_config(objects)
    store = config.response_store
    assert (store.backend, store.url, store.ttl_s, store.max_responses) == (
        "redis", "rediss://redis.data:6380/0", 86400, 5000,
    )  # fmt: skip
    assert store.tls_ca_file == "/etc/gptoss/response-store-ca/ca.crt"
    read = secrets_read_by_container(objects)
    # The ingress (pinned to the head) reads the password and the CA bundle; no worker gets them.
    for container in ray_containers(objects):
        env = {e["name"]: e for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        if container["name"] == "ray-head":
            password = env["GPTOSS_VLLM_RESPONSE_STORE_PASSWORD"]
            assert password["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
            assert mounts["response-store-ca"] == "/etc/gptoss/response-store-ca"
        else:
            assert "GPTOSS_VLLM_RESPONSE_STORE_PASSWORD" not in env and "response-store-ca" not in mounts
    assert {role for role, names in read.items() if "redis-ca" in names or "redis-auth" in names} == {
        "head/ray-head"
    }
    assert "redis-ca" not in read["head/autoscaler"]


def test_the_drain_hook_reads_the_metrics_at_the_pod_ip():
    for container in ray_containers(render()):
        assert env_of(container)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        hook = container["lifecycle"]["preStop"]["exec"]["command"]
        assert hook == ["python3", "/etc/gptoss/hooks/drain.py"]


def test_values_schema_is_current():
    assert values_schema.main(["--check"]) == 0, "run: python -m helm.values_schema"


# -- bad values ------------------------------------------------------------------------------------------------

BAD = {
    "unknown top-level key": ({"replicaCount": 3}, ["replicaCount"]),
    "unknown nested key": ({"workerGroups": {"fast": {"gpuz": 1}}}, ["gpuz"]),
    "unknown serve key": ({"serve": {"pools": {"fast": {"replica": 2}}}}, ["replica"]),
    "wrong type": ({"workerGroups": {"fast": {"gpusPerReplica": "one"}}}, ["gpusPerReplica"]),
    "wrong serve type": ({"serve": {"budgets": {"low": {"max_tokens": "many"}}}}, ["max_tokens"]),
    "gpu pool without gpus": (
        {"workerGroups": {"deep": {"gpusPerReplica": 0}}},
        ["workerGroups.deep.gpusPerReplica"],
    ),
    "tensor parallel above gpus": (
        {"serve": {"pools": {"deep": {"engine_args": {"tensor_parallel_size": 2}}}}},
        ["serve.pools.deep.engine_args.tensor_parallel_size"],
    ),
    "effort without pool": (
        {"serve": {"pools": {"deep": {"efforts": ["medium"]}, "fast": {"efforts": ["low"]}}}},
        ["high"],
    ),
    "pool without group": (
        {"workerGroups": {"deep": None}},
        ["workerGroups.deep"],
    ),
    "keys file without secret": (
        {"serve": {"auth": {"api_keys_file": "/etc/keys"}}},
        ["apiKeys.existingSecret"],
    ),
    "serve replicas above the group": (
        {"workerGroups": {"deep": {"maxReplicas": 2}}},
        ["workerGroups.deep.maxReplicas"],
    ),
    "ingress without api keys": (
        {"ingress": {"enabled": True}},
        ["ingress", "apiKeys.existingSecret", "apiKeys.allowAnonymous"],
    ),
    "httproute without api keys": (
        {"httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]}},
        ["httpRoute", "apiKeys.existingSecret", "apiKeys.allowAnonymous"],
    ),
    "serve ingress limit besides the chart's": (
        {"serve": {"ingress": {"max_header_bytes": 65536}}},
        ["serve.ingress.max_header_bytes", "ingress.maxHeaderBytes"],
    ),
    "serve ingress body shape besides the chart's": (
        {"serve": {"ingress": {"body_shape": {"max_depth": 32}}}},
        ["serve.ingress.body_shape", "ingress.bodyShape"],
    ),
    "serve ingress body limit without the chart's": (
        {"serve": {"ingress": {"max_body_bytes": 65536}}},
        ["serve.ingress.max_body_bytes", "ingress.maxBodyBytes"],
    ),
    "ray auth on an old ray": ({"rayVersion": "2.46.0"}, ["rayAuth.enabled", "rayVersion"]),
    "body limit too small": ({"ingress": {"maxBodyBytes": 100}}, ["maxBodyBytes"]),
    "unknown egress key": ({"networkPolicy": {"egress": {"allow": True}}}, ["allow"]),
    "redis store without url": ({"responseStore": {"backend": "redis"}}, ["responseStore.url"]),
    "redis store url not redis": (
        {"responseStore": {"backend": "redis", "url": "https://user:pw@cache:6379"}},
        ["responseStore.url", "https://cache:6379"],
    ),
    "redis password in the url": (
        {"responseStore": {"backend": "redis", "url": "redis://:hunter2@cache:6379/0"}},
        ["responseStore.passwordSecret"],
    ),
    "embedded store for two ingress replicas": (
        {"serve": {"ingress": {"replicas": 2}}},
        ["serve.ingress.replicas", "responseStore.backend: redis"],
    ),
    "store set under serve": (
        {"serve": {"response_store": {"backend": "embedded"}}},
        ["serve.response_store", "responseStore"],
    ),
    "unknown store backend": ({"responseStore": {"backend": "memcached"}}, ["backend"]),
    "body shape depth beyond what parses": ({"ingress": {"bodyShape": {"maxDepth": 1000}}}, ["maxDepth"]),
    "unknown body shape key": ({"ingress": {"bodyShape": {"maxKeys": 10}}}, ["maxKeys"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_values_fail_with_a_message_naming_the_value(case):
    values, words = BAD[case]
    with pytest.raises(helm.HelmError) as raised:
        render(values)
    message = str(raised.value)
    for word in words:
        assert word in message, message


# -- policy scan -----------------------------------------------------------------------------------------------


def test_checkov_finds_no_failed_check(tmp_path):
    assert CHECKOV.exists(), "checkov lives in .venv-tools: run `make tools` (make test does)"
    # Everything on (a disabled NetworkPolicy is an opt-out the scan rightly flags).
    everything = merge(*(o for name, o in TOGGLES.items() if not name.startswith("no-")))
    cases = {"default": {}, **{p.stem: example(p) for p in EXAMPLES}, "all": everything}
    for name, values in cases.items():
        with (tmp_path / f"{name}.yaml").open("w") as out:
            yaml.safe_dump_all(render(values), out, sort_keys=False)
    result = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--quiet",
            "--compact",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    report = json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else {}
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]


def test_checkov_binary_is_isolated():
    # checkov's dependencies must not enter the project's venv (it pins what vLLM needs).
    assert shutil.which("checkov", path=str(ROOT / ".venv" / "bin")) is None
