"""Write deploy/helm/meshpush/values.schema.json: what the chart accepts, so Helm refuses the rest.

The ``config`` part is derived from meshpush/settings.py (every setting the chart does not set
itself, typed as the node parses it, with ranges); tests/test_deploy_files.py fails when the
file and this generator differ. After changing a setting or a value run

    .venv/bin/python deploy/helm/values_schema.py
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from meshpush.settings import Settings

CHART = Path(__file__).resolve().parent / "meshpush"
SCHEMA = CHART / "values.schema.json"
HELPERS = CHART / "templates" / "_helpers.tpl"

# inclusive bounds of numeric settings (None: unbounded)
RANGES: dict[str, tuple[float | None, float | None]] = {
    "lease_ttl": (1, 3600),
    "stream_replicas": (1, 5),  # JetStream's maximum
    "backlog_user": (-1, None),
    "backlog_broadcast": (-1, None),
    "max_frame_bytes": (1, None),
    "max_body_bytes": (1, None),
    "session_queue": (1, None),
    "max_msgs_per_user": (1, None),
    "handshake_burst": (1, None),
    "frame_burst": (1, None),
    "max_connections_per_ip": (1, None),
    "max_connections": (1, None),
    "max_sessions_per_user": (1, None),
}
ENUMS = {
    "log_level": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    "log_format": ["text", "json"],
}
PATTERNS = {"cluster": "^[A-Za-z0-9_-]{1,64}$", "etcd": "^.+:[0-9]{1,5}$"}
CIDR = r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?"  # the node checks each one exactly when it starts
ITEM_PATTERNS = {"trusted_proxies": CIDR}  # list settings whose items have a shape
INT = "^-?[0-9]+$"
FLOAT = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
BOOLS = ["1", "true", "yes", "on", "0", "false", "no", "off", ""]


def chart_managed() -> set[str]:
    """The settings the chart sets itself (listed in _helpers.tpl's meshpush.validate)."""
    match = re.search(r'range \$key := list ((?:"[a-z_]+" ?)+)', HELPERS.read_text())
    assert match, "the list of chart-managed settings was not found in _helpers.tpl"
    return set(re.findall(r'"([a-z_]+)"', match.group(1)))


def setting_schema(f: dataclasses.Field[Any]) -> dict[str, Any]:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    out: dict[str, Any] = {"description": f.metadata.get("help", "")}
    low, high = RANGES.get(f.name, (0, None))
    bounds = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
    if kind == "int":
        out["anyOf"] = [{"type": "integer", **bounds}, {"type": "string", "pattern": INT}]
    elif kind == "float":
        out["anyOf"] = [{"type": "number", **bounds}, {"type": "string", "pattern": FLOAT}]
    elif kind == "bool":
        out["anyOf"] = [{"type": "boolean"}, {"type": "string", "enum": BOOLS}]
    elif kind.startswith("tuple"):
        out["anyOf"] = list_schema(ITEM_PATTERNS.get(f.name))
    elif f.name in ENUMS:
        values = ENUMS[f.name]
        out["enum"] = values + [v.lower() for v in values if v.lower() not in values]
    else:
        out["type"] = "string"
        if f.name in PATTERNS:
            out["pattern"] = PATTERNS[f.name]
    return out


def list_schema(item: str | None) -> list[dict[str, Any]]:
    """A list setting: one comma-separated string, or an array of strings."""
    if item is None:
        return [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
    joined = rf"^( *{item} *(, *{item} *)*)?$"
    items = {"type": "string", "pattern": f"^ *{item} *$"}
    return [{"type": "string", "pattern": joined}, {"type": "array", "items": items}]


def config_schema() -> dict[str, Any]:
    managed = chart_managed()
    return {
        "type": "object",
        "description": "Node settings (docs/operations.md, section 6): MESHPUSH_<KEY> env vars",
        "additionalProperties": False,
        "properties": {
            f.name: setting_schema(f) for f in dataclasses.fields(Settings) if f.name not in managed
        },
    }


def obj(properties: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An object with known keys only (typos are refused)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties or {},
        **extra,
    }


ANY_OBJECT = {"type": "object"}  # a Kubernetes type (resources, affinity, ...): not re-checked
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
LIST = {"type": "array"}
STRINGS = {"type": "array", "items": STR}
TRAFFIC_POLICY = {"enum": ["", "Local", "Cluster"]}
SERVICE_TYPE = {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}
PROBE = {"type": "object", "required": ["httpGet"]}


def schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "meshpush Helm chart values",
        **obj(
            {
                "global": ANY_OBJECT,
                "replicaCount": {"type": "integer", "minimum": 1},
                "image": obj(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": STR,
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    }
                ),
                "imagePullSecrets": LIST,
                "nameOverride": STR,
                "fullnameOverride": STR,
                "command": {"type": "array", "items": STR, "minItems": 1},
                "config": config_schema(),
                "publicWsUrl": {"type": "string", "pattern": "^(wss?://.+)?$"},
                "publicHttpUrl": {"type": "string", "pattern": "^(https?://.+)?$"},
                "clusterDomain": {"type": "string", "minLength": 1},
                "ports": obj({"ws": PORT, "http": PORT}, required=["ws", "http"]),
                "auth": obj(
                    {
                        "existingSecret": STR,
                        "tokenSecretKey": {"type": "string", "minLength": 1},
                        "apiKeysKey": {"type": "string", "minLength": 1},
                        "tokenOldSecretsKey": {"type": "string", "minLength": 1},
                        "tokenSecret": STR,
                        "tokenOldSecrets": STRINGS,
                        "apiKeys": STRINGS,
                        "jwks": obj({"configMap": STR, "jwksKey": STR, "publicKeyKey": STR}),
                    }
                ),
                "tls": obj({"secretName": STR}),
                "ipFilter": obj({"rules": STR}),
                "extraEnv": LIST,
                "service": obj(
                    {
                        "type": SERVICE_TYPE,
                        "wsPort": PORT,
                        "httpPort": PORT,
                        "annotations": STRING_MAP,
                        "labels": STRING_MAP,
                        "loadBalancerSourceRanges": STRINGS,
                        "externalTrafficPolicy": TRAFFIC_POLICY,
                    }
                ),
                "perPodService": obj(
                    {
                        "enabled": BOOL,
                        "type": SERVICE_TYPE,
                        "annotations": STRING_MAP,
                        "externalTrafficPolicy": TRAFFIC_POLICY,
                    }
                ),
                "ingress": obj(
                    {
                        "enabled": BOOL,
                        "className": STR,
                        "annotations": STRING_MAP,
                        "host": {"type": "string", "pattern": r"^(.*\$\(POD_NAME\).*)?$"},
                        "entryHost": STR,
                        "tls": obj({"secretName": STR}),
                    }
                ),
                "httpRoute": obj(
                    {
                        "enabled": BOOL,
                        "annotations": STRING_MAP,
                        "parentRefs": {"type": "array", "items": ANY_OBJECT},
                        "host": {"type": "string", "pattern": r"^(.*\$\(POD_NAME\).*)?$"},
                        "entryHost": STR,
                    }
                ),
                "networkPolicy": obj(
                    {
                        "enabled": BOOL,
                        "wsFrom": {"type": "array", "items": ANY_OBJECT},
                        "httpFrom": {"type": "array", "items": ANY_OBJECT},
                        "egress": {"type": "array", "items": ANY_OBJECT},
                    }
                ),
                "autoscaling": obj(
                    {
                        "enabled": BOOL,
                        "minReplicas": {"type": "integer", "minimum": 1},
                        "maxReplicas": {"type": "integer", "minimum": 1},
                        "targetCPUUtilizationPercentage": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 100,
                        },
                        "behavior": ANY_OBJECT,
                    }
                ),
                "serviceAccount": obj(
                    {
                        "create": BOOL,
                        "name": STR,
                        "annotations": STRING_MAP,
                        "automountServiceAccountToken": BOOL,
                    }
                ),
                "podAnnotations": STRING_MAP,
                "podLabels": STRING_MAP,
                "podManagementPolicy": {"enum": ["OrderedReady", "Parallel"]},
                "updateStrategy": ANY_OBJECT,
                "minReadySeconds": {"type": "integer", "minimum": 0},
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 1},
                "resources": ANY_OBJECT,
                "podSecurityContext": ANY_OBJECT,
                "securityContext": ANY_OBJECT,
                "readinessProbe": PROBE,
                "livenessProbe": PROBE,
                "startupProbe": PROBE,
                "nodeSelector": STRING_MAP,
                "tolerations": LIST,
                "affinity": ANY_OBJECT,
                "topologySpreadConstraints": LIST,
                "priorityClassName": STR,
                "podDisruptionBudget": obj(
                    {
                        "enabled": BOOL,
                        "maxUnavailable": {
                            "anyOf": [
                                {"type": "integer", "minimum": 1},
                                {"type": "string", "pattern": "^[0-9]+%$"},
                            ]
                        },
                    }
                ),
                "serviceMonitor": obj(
                    {
                        "enabled": BOOL,
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        "labels": STRING_MAP,
                        "tlsConfig": ANY_OBJECT,
                        "bearerTokenSecret": obj({"name": STR, "key": STR}),
                    }
                ),
                "prometheusRule": obj(
                    {
                        "enabled": BOOL,
                        "labels": STRING_MAP,
                        "runbookUrl": {"type": "string", "pattern": "^https?://"},
                        "selector": STR,
                        "expectedNodes": {"type": "integer", "minimum": 0},
                        "publishErrorRatio": {"type": "number", "minimum": 0, "maximum": 1},
                        "slowConsumerClosesPerSecond": {"type": "number", "minimum": 0},
                        "deliveryLatencyP99Seconds": {"type": "number", "exclusiveMinimum": 0},
                        "backendErrorsPerSecond": {"type": "number", "minimum": 0},
                        "backendDownFor": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                        "retentionDroppedPer15m": {"type": "number", "minimum": 0},
                    }
                ),
            }
        ),
    }


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA}")
