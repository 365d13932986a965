"""Writes ``helm/gptoss-vllm/values.schema.json``: the chart's own keys by hand, and its ``serve:`` section from the
project's serving schema (``gptoss_vllm.serve.config.ServeConfig``), so that the chart and ``gptoss-vllm serve``
accept exactly the same pool configuration. Every object the chart defines forbids unknown keys.

    python -m helm.values_schema          # rewrite the file
    python -m helm.values_schema --check  # exit 1 when the committed file is stale (tests/test_helm.py does this)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parent / "gptoss-vllm" / "values.schema.json"
K8S_NAME = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT0 = {"type": "integer", "minimum": 0}
INT1 = {"type": "integer", "minimum": 1}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# Kubernetes types (resources, affinity, probes, peers...): checked by the API server, not re-specified here.
K8S_OBJECT = {"type": "object"}
K8S_LIST = {"type": "array", "items": {"type": "object"}}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
QUANTITY = {"type": ["string", "integer"]}


def chart_schema() -> dict[str, Any]:
    scheduling = {
        "nodeSelector": STR_MAP,
        "tolerations": K8S_LIST,
        "affinity": K8S_OBJECT,
        "runtimeClassName": STR,
        "priorityClassName": STR,
        "resources": K8S_OBJECT,
        "shmSize": QUANTITY,
        "rayStartParams": STR_MAP,
        "podLabels": STR_MAP,
        "podAnnotations": STR_MAP,
    }
    worker_group = _obj(
        {
            "gpu": {**BOOL, "description": "The pool runs on GPUs: gpusPerReplica must be at least 1"},
            "gpusPerReplica": {**INT0, "description": "GPUs of one replica (one replica per worker pod)"},
            "minReplicas": INT0,
            "maxReplicas": INT1,
            "terminationGracePeriodSeconds": {
                **INT1,
                "description": "Overrides the computed grace period (see the chart README)",
            },
            **scheduling,
        },
        required=["gpu", "minReplicas", "maxReplicas"],
    )
    probe = _obj(
        {
            "periodSeconds": INT1,
            "timeoutSeconds": INT1,
            "failureThreshold": INT1,
        }
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gptoss-vllm chart values",
        "type": "object",
        "additionalProperties": False,
        "required": ["image", "serve", "workerGroups", "model"],
        "properties": {
            "nameOverride": STR,
            "fullnameOverride": STR,
            "commonLabels": STR_MAP,
            "image": _obj(
                {"repository": {**STR, "minLength": 1}, "tag": STR, "digest": STR, "pullPolicy": STR},
                required=["repository"],
            ),
            "imagePullSecrets": K8S_LIST,
            "rayVersion": {**STR, "minLength": 1},
            "gpuResourceName": {**STR, "minLength": 1},
            "securityContext": _obj(
                {"runAsUser": INT1, "runAsGroup": INT1, "fsGroup": INT1, "readOnlyRootFilesystem": BOOL}
            ),
            "minDecodeTokensPerSecond": {
                "type": "number",
                "exclusiveMinimum": 0,
                "description": "Slowest decode rate a stream may see; sizes each group's termination grace period",
            },
            "terminationMarginSeconds": INT0,
            "metricsPort": {
                **PORT,
                "description": "GPTOSS_VLLM_METRICS_PORT: first port of every replica's metrics",
            },
            "metricsPortCount": {**INT1, "maximum": 64},
            "extraEnv": K8S_LIST,
            "head": _obj(
                {
                    **scheduling,
                    "startupTimeoutSeconds": INT1,
                    "readinessProbe": probe,
                    "livenessProbe": probe,
                }
            ),
            "workerGroups": {
                "type": "object",
                "minProperties": 1,
                "description": "One Ray worker group per serve pool, keyed by the pool's name",
                "propertyNames": {"pattern": "^[a-z][a-z0-9-]{0,30}$"},
                "additionalProperties": worker_group,
            },
            "serve": {"$ref": "#/$defs/ServeConfig"},
            "model": _obj(
                {
                    "source": {"enum": ["hf", "pvc"]},
                    "hfTokenSecret": _obj({"name": STR, "key": {**STR, "minLength": 1}}),
                    "cacheSizeLimit": QUANTITY,
                    "pvc": _obj(
                        {
                            "create": BOOL,
                            "existingClaim": STR,
                            "size": QUANTITY,
                            "storageClassName": STR,
                            "mountPath": {**STR, "pattern": "^/"},
                        }
                    ),
                    "download": _obj(
                        {
                            "resources": K8S_OBJECT,
                            "backoffLimit": INT0,
                            "activeDeadlineSeconds": INT1,
                            "extraArgs": {"type": "array", "items": STR},
                            "nodeSelector": STR_MAP,
                            "tolerations": K8S_LIST,
                        }
                    ),
                },
                required=["source"],
            ),
            "apiKeys": _obj(
                {
                    "existingSecret": STR,
                    "key": {**STR, "minLength": 1},
                    "mountPath": {**STR, "pattern": "^/"},
                    "allowAnonymous": {
                        **BOOL,
                        "description": "Serve an Ingress/HTTPRoute without API keys (else the render fails)",
                    },
                }
            ),
            "responseStore": _obj(
                {
                    "backend": {
                        "enum": ["embedded", "redis"],
                        "description": "embedded: SQLite on the ingress's node (one ingress replica); redis: shared",
                    },
                    "url": {**STR, "description": "redis://host:6379/0, or rediss:// for TLS"},
                    "passwordSecret": _obj({"name": STR, "key": {**STR, "minLength": 1}}),
                    "tlsCaSecret": _obj({"name": STR, "key": {**STR, "minLength": 1}}),
                    "ttlSeconds": {"type": "number", "exclusiveMinimum": 0},
                    "maxResponses": INT1,
                }
            ),
            "rayAuth": _obj(
                {
                    "enabled": {**BOOL, "description": "Ray token authentication (KubeRay authOptions)"},
                    "existingSecret": {
                        **STR,
                        "description": "Secret with the token under auth_token; empty: the chart makes one",
                    },
                }
            ),
            "service": _obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "port": PORT,
                    "annotations": STR_MAP,
                }
            ),
            "ingress": _obj(
                {
                    "enabled": BOOL,
                    "className": STR,
                    "annotations": STR_MAP,
                    "hosts": {
                        "type": "array",
                        "items": _obj(
                            {
                                "host": STR,
                                "paths": {
                                    "type": "array",
                                    "items": _obj(
                                        {
                                            "path": STR,
                                            "pathType": {
                                                "enum": ["Prefix", "Exact", "ImplementationSpecific"]
                                            },
                                        },
                                        required=["path"],
                                    ),
                                },
                            },
                            required=["host"],
                        ),
                    },
                    "tls": K8S_LIST,
                    "maxBodyBytes": {
                        "anyOf": [{"type": "integer", "minimum": 1024}, {"const": ""}],
                        "description": "GPTOSS_VLLM_MAX_BODY_BYTES; empty: computed from the pools' max_model_len",
                    },
                    "maxHeaderBytes": {
                        **INT1,
                        "minimum": 1024,
                        "description": "GPTOSS_VLLM_MAX_HEADER_BYTES",
                    },
                    "bodyTimeoutSeconds": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "description": "GPTOSS_VLLM_BODY_TIMEOUT_S",
                    },
                    "bodyShape": body_shape_schema(),
                }
            ),
            "httpRoute": _obj(
                {
                    "enabled": BOOL,
                    "annotations": STR_MAP,
                    "parentRefs": K8S_LIST,
                    "hostnames": {"type": "array", "items": STR},
                    "pathPrefix": {**STR, "pattern": "^/"},
                    "timeouts": K8S_OBJECT,
                }
            ),
            "monitoring": _obj(
                {
                    "enabled": BOOL,
                    "labels": STR_MAP,
                    "scrapeInterval": STR,
                    "scrapeConfig": _obj({"enabled": BOOL, "refreshInterval": STR}),
                    "podMonitor": _obj({"enabled": BOOL}),
                    "prometheusRule": _obj({"enabled": BOOL}),
                    "dashboards": _obj({"enabled": BOOL, "labels": STR_MAP, "annotations": STR_MAP}),
                    "tokenSecret": _obj(
                        {"name": STR, "key": {**STR, "minLength": 1}},
                        description="The bearer token of GET /metrics/targets; name empty: the chart makes one",
                    ),
                }
            ),
            "otel": _obj(
                {
                    "endpoint": STR,
                    "protocol": {"enum": ["grpc", "http/protobuf", "http/json"]},
                    "serviceName": STR,
                    "extraEnv": STR_MAP,
                }
            ),
            "tools": _obj(
                {
                    "python": _obj(
                        {
                            "enabled": BOOL,
                            "replicas": INT1,
                            "port": PORT,
                            "cpuSeconds": INT1,
                            "wallSeconds": INT1,
                            "memoryMib": {"type": "integer", "minimum": 64},
                            "processes": INT1,
                            "outputKib": INT1,
                            "slots": INT1,
                            "tmpSize": QUANTITY,
                            "resources": K8S_OBJECT,
                            "seccompProfile": _obj(
                                {
                                    "type": {"enum": ["RuntimeDefault", "Unconfined", "Localhost"]},
                                    "localhostProfile": STR,
                                },
                                required=["type"],
                            ),
                            "nodeSelector": STR_MAP,
                            "tolerations": K8S_LIST,
                        }
                    ),
                    "browser": _obj(
                        {
                            "enabled": BOOL,
                            "replicas": INT1,
                            "port": PORT,
                            "searchUrl": {"type": "string", "pattern": "^(https?://.+)?$"},
                            "index": _obj({"claimName": STR, "path": STR}),
                            "tmpSize": QUANTITY,
                            "egressTo": K8S_LIST,
                            "resources": K8S_OBJECT,
                            "nodeSelector": STR_MAP,
                            "tolerations": K8S_LIST,
                        }
                    ),
                }
            ),
            "networkPolicy": _obj(
                {
                    "enabled": BOOL,
                    "ingressFrom": K8S_LIST,
                    "monitoringFrom": K8S_LIST,
                    "operatorFrom": K8S_LIST,
                    "egress": _obj(
                        {
                            "enabled": BOOL,
                            "allowAll": {
                                **BOOL,
                                "description": "Any pod and address but deniedCIDRs; false: DNS, Ray pods, rules",
                            },
                            "deniedCIDRs": {
                                "type": "array",
                                "items": {**STR, "pattern": "^[0-9a-fA-F.:]+/[0-9]+$"},
                            },
                            "dnsTo": K8S_LIST,
                            "rules": K8S_LIST,
                        }
                    ),
                }
            ),
            "podDisruptionBudget": _obj({"enabled": BOOL, "maxUnavailable": INT0, "head": BOOL}),
            "rayService": _obj(
                {
                    "serviceUnhealthySecondThreshold": INT1,
                    "deploymentUnhealthySecondThreshold": INT1,
                    "rayClusterDeletionDelaySeconds": INT0,
                    "autoscalerIdleTimeoutSeconds": INT0,
                    "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                }
            ),
        },
    }


# ingress.bodyShape's keys and the serving config's (serve.ingress.body_shape), which the chart writes from them.
BODY_SHAPE_KEYS = {
    "maxDepth": "max_depth",
    "maxObjectMembers": "max_object_members",
    "maxArrayItems": "max_array_items",
    "maxStringBytes": "max_string_bytes",
    "maxWordBytes": "max_word_bytes",
}


def body_shape_schema() -> dict[str, Any]:
    """ingress.bodyShape: the serving config's bounds (gptoss_vllm.serve.config.BodyShape) under the chart's names."""
    from gptoss_vllm.serve.config import BodyShape
    from gptoss_vllm.serve.proxy.settings import SHAPE_ENV

    fields = BodyShape.model_json_schema()["properties"]
    properties = {}
    for chart_key, field in BODY_SHAPE_KEYS.items():
        found = fields[field]
        properties[chart_key] = {
            "type": "integer",
            **{k: found[k] for k in ("minimum", "maximum") if k in found},
            "description": f"{SHAPE_ENV[field]}: {found['description']}",
        }
    return _obj(properties)


def serve_defs() -> dict[str, Any]:
    from gptoss_vllm.serve.config import ServeConfig

    schema = ServeConfig.model_json_schema()
    defs = schema.pop("$defs")
    defs["ServeConfig"] = schema
    # In the chart a pool's tool may leave out its url: the chart fills in its own server's (tools.<tool>).
    defs["ToolServer"].pop("required", None)
    return defs


def build() -> dict[str, Any]:
    schema = chart_schema()
    schema["$defs"] = serve_defs()
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python -m helm.values_schema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
