#!/usr/bin/env python3
"""Validate rendered Kubernetes manifests (output of `kubectl kustomize`).

    kubectl kustomize deploy/k8s/base | python deploy/k8s/validate.py -
    python deploy/k8s/validate.py rendered.yaml [more.yaml ...]

* Built-in kinds are validated by kubernetes-validate in strict mode (unknown
  fields rejected) against every version in KUBERNETES_VERSIONS; a built-in
  kind for which kubernetes-validate has no schema is an error (a typo in
  apiVersion/kind must not pass as "unknown").
* kubernetes-validate ships no schemas for custom resources. The two CRD kinds
  used here (KEDA ScaledObject, Prometheus Operator ServiceMonitor) are checked
  against the structural schemas below instead: the fields ATV uses, their
  types and the fields the CRDs require. Any other custom kind is an error.

Exit status: 0 when every object is valid, 1 otherwise.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import jsonschema
import yaml

# Oldest Kubernetes minor still commonly run, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29", "latest")

_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_NUMBER_STRING = r"^[0-9]+(\.[0-9]+)?$"

_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}

_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "scalingModifiers": {"type": "object"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            # The CRD types metadata as map[string]string.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                        "if": {"properties": {"type": {"const": "prometheus"}}},
                        "then": {
                            "properties": {
                                "metadata": {
                                    "required": ["serverAddress", "query", "threshold"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "serverAddress": {"type": "string", "pattern": r"^https?://"},
                                        "query": {"type": "string", "minLength": 1},
                                        "threshold": {"type": "string", "pattern": _NUMBER_STRING},
                                        "activationThreshold": {"type": "string", "pattern": _NUMBER_STRING},
                                        "namespace": {"type": "string"},
                                        "customHeaders": {"type": "string"},
                                        "ignoreNullValues": {"enum": ["true", "false"]},
                                        "queryParameters": {"type": "string"},
                                        "unsafeSsl": {"enum": ["true", "false"]},
                                        "authModes": {"type": "string"},
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "namespaceSelector": {"type": "object"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "targetPort": {"type": ["string", "integer"]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "params": {"type": "object"},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                            "honorTimestamps": {"type": "boolean"},
                            "tlsConfig": {"type": "object"},
                            "authorization": {"type": "object"},
                            "basicAuth": {"type": "object"},
                            "bearerTokenSecret": {"type": "object"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                            "followRedirects": {"type": "boolean"},
                            "enableHttp2": {"type": "boolean"},
                            "filterRunning": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}


def load_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _name(doc: dict) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def validate_documents(docs: Iterable[dict], versions: Iterable[str] = KUBERNETES_VERSIONS) -> list[str]:
    """Return a list of error messages (empty when everything is valid)."""
    from kubernetes_validate import utils as kv

    errors: list[str] = []
    versions = [kv.latest_version() if v == "latest" else v for v in versions]
    for doc in docs:
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append(f"not a Kubernetes object: {str(doc)[:80]}")
            continue
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_SCHEMAS:
            validator = jsonschema.Draft202012Validator(CRD_SCHEMAS[key])
            for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                path = ".".join(str(p) for p in err.absolute_path) or "<root>"
                errors.append(f"{_name(doc)}: {path}: {err.message}")
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{_name(doc)} (k8s {exc.version}): {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                errors.append(f"{_name(doc)}: {exc.message} (unknown kind: add a schema to CRD_SCHEMAS?)")
    return errors


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for name in argv:
        text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
        docs = load_documents(text)
        if not docs:
            print(f"ERROR {name}: no objects", file=sys.stderr)
            failed = True
            continue
        errors = validate_documents(docs)
        for err in errors:
            print(f"ERROR {name}: {err}", file=sys.stderr)
        kinds = ", ".join(_name(d) for d in docs)
        print(f"{'FAIL' if errors else 'OK'} {name}: {len(docs)} objects ({kinds})")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
