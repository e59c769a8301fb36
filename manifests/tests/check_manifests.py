#!/usr/bin/env python3
"""Checks podid's deployment artefacts. Run from the repository root:

    target/venv/bin/python manifests/tests/check_manifests.py [--update] [-v]

What it checks (each failure is printed with where it is; exit status 1):

1. The Helm chart (manifests/helm/podid) lints and renders with the real Helm
   engine (helm-python-sdk) for the default values and for every scenario in
   SCENARIOS, and values.schema.json rejects the values in INVALID_VALUES.
2. Every rendered object validates against the Kubernetes JSON schemas of the
   newest release kubernetes-validate ships (strict: unknown fields fail).
   Every custom resource of ours, in the chart and anywhere in manifests/ and
   docs/ (YAML files, and ```yaml blocks in Markdown), validates against the
   openAPIV3Schema in manifests/crds/aadpodidentity.k8s.io.yaml, with unknown
   fields reported as the API server would prune them. Calico, Prometheus
   Operator and LocalWorkload objects are checked against the subset schemas in
   manifests/tests/schemas.py.
3. Policy: each component's RBAC is exactly the permissions listed in
   AGENT_PERMISSIONS / CONTROLLER_PERMISSIONS (no more, no less); the agent
   is never `privileged` and adds only the capabilities in
   ALLOWED_AGENT_CAPABILITIES; the controller runs as non-root with a
   read-only root filesystem; the agent's mounts, probes and flags match the
   operator interface.
4. Drift: the chart's copy of the generated CRDs and the plain manifests in
   manifests/deploy/ are what the chart renders. `--update` rewrites them.

A Markdown ```yaml block whose first line is `# fragment` is not validated.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
import schemas  # noqa: E402  (manifests/tests/schemas.py)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "manifests/helm/podid"
CRD_FILE = REPO / "manifests/crds/aadpodidentity.k8s.io.yaml"
CHART_CRD_COPY = CHART / "crds/aadpodidentity.k8s.io.yaml"
DEPLOY = REPO / "manifests/deploy/podid.yaml"
DEPLOY_DETACH = REPO / "manifests/deploy/podid-detach-redirect.yaml"

RELEASE = "podid"
NAMESPACE = "podid"
GROUP = "aadpodidentity.k8s.io"
GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# The form aad-pod-identity's MIC requires of a type-0 identity (it skips others).
MSI_RESOURCE_ID = re.compile(
    r"^/subscriptions/[0-9a-fA-F-]{36}/resourcegroups/[^/]+/providers/"
    r"Microsoft\.ManagedIdentity/userAssignedIdentities/[^/]+$",
    re.IGNORECASE,
)

# ---------------------------------------------------------------------------
# RBAC: what each component calls. ONE place per component; the chart's
# ClusterRoles/Roles must grant exactly these for the given values.
# Each entry: (condition on values, apiGroup, resource, verbs, resourceNames
# or None, namespace: None for cluster-wide, else a function of the values).
# ---------------------------------------------------------------------------
Cond = Callable[[dict], bool]
ALWAYS: Cond = lambda v: True  # noqa: E731


def _standard(v: dict) -> bool:
    return v["mode"] == "standard"


def _controller_enabled(v: dict) -> bool:
    return v["mode"] == "standard" and v["controller"]["enabled"]


def _lease_namespace(v: dict) -> str:
    return v["controller"]["leaderElection"]["namespace"] or NAMESPACE


def _lease_name(v: dict) -> str:
    return v["controller"]["leaderElection"]["name"] or f"{RELEASE}-controller"


AGENT_PERMISSIONS: list[tuple] = [
    # Reconciled with podid-agent/src/workloads/kubernetes (source.rs,
    # secrets.rs, taint.rs, events.rs); the fake API server in the agent's
    # tests records every call and checks it against this list.
    # Node-local pod reflector (field selector spec.nodeName): cgroup -> pod.
    (ALWAYS, "", "pods", ["list", "watch"], None, None),
    # Reflectors for pod -> binding -> identity, and exceptions.
    (ALWAYS, GROUP, "azureidentities", ["list", "watch"], None, None),
    (ALWAYS, GROUP, "azureidentitybindings", ["list", "watch"], None, None),
    (ALWAYS, GROUP, "azurepodidentityexceptions", ["list", "watch"], None, None),
    # Standard mode: reflector on this node's assignments (label nodename).
    (_standard, GROUP, "azureassignedidentities", ["list", "watch"], None, None),
    # Service-principal identities: Api<Secret>::get_opt of clientPassword.
    (lambda v: v["agent"]["rbac"]["readSecrets"], "", "secrets", ["get"], None, None),
    # --startup-taint: Api<Node>::get + merge patch of its own node.
    (lambda v: v["agent"]["startupTaint"]["enabled"], "", "nodes", ["get", "patch"], None, None),
    # kube-runtime Recorder (events.k8s.io/v1 create, patch): IdentityRefused
    # on AzureIdentity objects always, denials on pods with --emit-denial-events.
    (ALWAYS, "events.k8s.io", "events", ["create", "patch"], None, None),
]

# Reconciled with podid-controller/src as first written: stores.rs
# (reflectors), assign.rs, leader.rs, events.rs.
CONTROLLER_PERMISSIONS: list[tuple] = [
    # stores.rs: watcher on Pods and Nodes (cluster-wide).
    (ALWAYS, "", "pods", ["list", "watch"], None, None),
    (ALWAYS, "", "nodes", ["list", "watch"], None, None),
    # stores.rs: watchers on identities and bindings.
    (ALWAYS, GROUP, "azureidentities", ["list", "watch"], None, None),
    (ALWAYS, GROUP, "azureidentitybindings", ["list", "watch"], None, None),
    # stores.rs watcher; assign.rs create, replace, merge patch (status,
    # finalizer), delete. No plain get.
    (ALWAYS, GROUP, "azureassignedidentities",
     ["list", "watch", "create", "update", "patch", "delete"], None, None),
    # events.rs: kube-runtime Recorder (events.k8s.io/v1 create, patch).
    (ALWAYS, "events.k8s.io", "events", ["create", "patch"], None, None),
    # leader.rs: get_opt, create, replace of one Lease.
    (ALWAYS, "coordination.k8s.io", "leases", ["create"], None, _lease_namespace),
    (ALWAYS, "coordination.k8s.io", "leases", ["get", "update"], _lease_name, _lease_namespace),
]

# Capabilities the agent may add (docs/install.md and values.yaml say why).
REQUIRED_AGENT_CAPABILITIES = {"BPF", "NET_ADMIN"}
ALLOWED_AGENT_CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_RESOURCE", "PERFMON"}
# (workload, container) -> why it must be privileged. Empty: nothing is.
PRIVILEGED_JUSTIFIED: dict[tuple[str, str], str] = {}

# ---------------------------------------------------------------------------
# Scenarios rendered and checked.
# ---------------------------------------------------------------------------
SCENARIOS: list[tuple[str, dict]] = [
    ("default", {}),
    ("managed", {"mode": "managed"}),
    ("standard-namespaced", {"namespaced": True}),
    ("block-instance-metadata", {"agent": {"blockInstanceMetadata": True}}),
    ("startup-taint", {"agent": {"startupTaint": {"enabled": True}}}),
    ("service-monitor", {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}),
    ("managed-service-monitor", {"mode": "managed", "serviceMonitor": {"enabled": True}}),
    ("events-no-secrets", {"agent": {"emitDenialEvents": True, "rbac": {"readSecrets": False}}}),
    ("controller-disabled", {"controller": {"enabled": False}}),
    ("detach-redirect", {"agent": {"detachRedirect": {"enabled": True}}}),
    ("zero-policy", {"agent": {"listenMode": "pod-netns", "egressGuard": True}}),
    ("no-boot-guard", {"agent": {"bootGuard": {"enabled": False}, "imdsGuardInterfaces": ["eth0", "eth1"]}}),
    ("everything", {
        "namespaced": True,
        "logging": {"level": "debug", "format": "json"},
        "identityRules": {
            "nodeIdentities": ["0b7e4f4c-1111-4e3f-9a3b-2c6f6d1e0002"],
            "allowNodeIdentities": False,
            "allowedAuthorities": ["https://login.example.internal"],
            "sameNamespaceSecrets": True,
        },
        "agent": {
            "blockInstanceMetadata": True,
            "forward": ["GET /metadata/instance", "GET|POST /metadata/scheduledevents"],
            "cloudConfigHostPath": "/etc/kubernetes/azure.json",
            "startupTaint": {"enabled": True, "key": "example.com/podid-not-ready"},
            "emitDenialEvents": True,
            "cgroupRoot": "kubepods.slice",
            "capabilities": ["BPF", "NET_ADMIN", "SYS_RESOURCE"],
            "audit": {"enabled": False},
        },
        "controller": {
            "immutableUserMSIs": ["0b7e4f4c-1111-4e3f-9a3b-2c6f6d1e0001"],
            "leaderElection": {"name": "podid-leader", "namespace": "kube-system"},
            "cloudConfig": {"create": True, "azureJson": {
                "cloud": "AzurePublicCloud",
                "tenantId": "72f988bf-0000-0000-0000-000000000000",
                "subscriptionId": "11111111-2222-3333-4444-555555555555",
                "resourceGroup": "MC_rg_cluster_westeurope",
                "useManagedIdentityExtension": True,
                "userAssignedIdentityID": "0b7e4f4c-1111-4e3f-9a3b-2c6f6d1e0002",
            }},
        },
        "serviceMonitor": {"enabled": True},
        "imagePullSecrets": [{"name": "regcred"}],
    }),
]

# Values the chart must refuse (schema or template): (why, values, a string the
# error must contain, so a value refused for another reason does not pass).
INVALID_VALUES: list[tuple[str, dict, str]] = [
    ("unknown mode", {"mode": "hybrid"}, "/mode"),
    ("SYS_ADMIN capability", {"agent": {"capabilities": ["BPF", "NET_ADMIN", "SYS_ADMIN"]}}, "/agent/capabilities"),
    ("missing NET_ADMIN", {"agent": {"capabilities": ["BPF", "PERFMON"]}}, "/agent/capabilities"),
    ("typo in a key", {"agent": {"blockInstanceMetdata": True}}, "blockInstanceMetdata"),
    ("port out of range", {"agent": {"listenPort": 70000}}, "/agent/listenPort"),
    ("bad log format", {"logging": {"format": "xml"}}, "/logging/format"),
    ("non-GUID immutable MSI", {"controller": {"immutableUserMSIs": ["my-identity"]}}, "/controller/immutableUserMSIs"),
    ("cloud config create without content", {"controller": {"cloudConfig": {"create": True}}}, "azureJson must be set"),
    ("IMDS endpoint not a URL", {"azure": {"imdsEndpoint": "169.254.169.254"}}, "/azure/imdsEndpoint"),
    ("privileged via extra capabilities", {"agent": {"capabilities": ["BPF", "NET_ADMIN", "ALL"]}}, "/agent/capabilities"),
]


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
class Report:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.passed = 0

    def ok(self, message: str) -> None:
        self.passed += 1
        if self.verbose:
            print(f"  ok    {message}")

    def fail(self, message: str) -> None:
        self.failures.append(message)
        print(f"  FAIL  {message}")

    def note(self, message: str) -> None:
        self.notes.append(message)
        print(f"  note  {message}")

    def check(self, condition: bool, message: str) -> bool:
        if condition:
            self.ok(message)
        else:
            self.fail(message)
        return condition


def section(title: str) -> None:
    print(f"\n== {title}")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def k8s_objects(text: str, where: str, report: Report) -> list[dict]:
    """Kubernetes objects (dicts with apiVersion and kind) in a YAML stream."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        report.fail(f"{where}: not valid YAML: {error}")
        return []
    out = []
    for doc in docs:
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
            out.append(doc)
        elif isinstance(doc, list):
            out.extend(d for d in doc if isinstance(d, dict) and "kind" in d)
    return out


def name_of(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


# ---------------------------------------------------------------------------
# Schemas: Kubernetes (kubernetes-validate) and our CRDs
# ---------------------------------------------------------------------------
K8S_VERSION = kv_utils.latest_version()


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema. Objects with
    `properties` and neither `additionalProperties` nor
    `x-kubernetes-preserve-unknown-fields` get `additionalProperties: false`:
    the API server would silently prune such fields, which is a bug in a
    manifest (a typo like `resourceId`)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "default"):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: openapi_to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = openapi_to_jsonschema(value) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(v) for v in value]
        else:
            out[key] = value
    if node.get("format") == "int32":
        out["minimum"], out["maximum"] = -(2**31), 2**31 - 1
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


def load_crd_schemas(report: Report) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> JSON schema, from the generated CRD file."""
    found: dict[tuple[str, str], dict] = {}
    for crd in k8s_objects(CRD_FILE.read_text(), str(CRD_FILE), report):
        spec = crd["spec"]
        for version in spec["versions"]:
            body = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            api_version = f"{spec['group']}/{version['name']}"
            kind = spec["names"]["kind"]
            body.setdefault("properties", {})
            body["properties"]["apiVersion"] = {"const": api_version}
            body["properties"]["kind"] = {"const": kind}
            body["properties"]["metadata"] = schemas.OBJECT_META_NAMESPACED
            body["required"] = sorted(set(body.get("required", [])) | {"apiVersion", "kind", "metadata"})
            body["additionalProperties"] = False
            found[(api_version, kind)] = body
    return found


def jsonschema_errors(schema: dict, obj: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    errors = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in error.absolute_path) or "(root)"
        errors.append(f"{path}: {error.message}")
    return errors


def semantic_errors(obj: dict) -> list[str]:
    """Checks the schemas cannot express."""
    errors = []
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if obj.get("apiVersion", "").startswith(GROUP + "/"):
        if kind == "AzureIdentity":
            identity_type = spec.get("type", 0)
            if identity_type not in (0, 1, 2):
                errors.append(f"spec.type: {identity_type} is not 0, 1 or 2")
            if identity_type == 0:
                if not MSI_RESOURCE_ID.match(spec.get("resourceID", "")):
                    errors.append("spec.resourceID: a type-0 identity needs /subscriptions/<guid>/resourcegroups/<rg>/"
                                  "providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>")
                if not GUID.match(spec.get("clientID", "")):
                    errors.append("spec.clientID: not a GUID")
            elif not spec.get("clientPassword") or not GUID.match(spec.get("tenantID", "")):
                errors.append("service-principal identity needs clientPassword and a GUID tenantID")
        elif kind == "AzureIdentityBinding":
            for field in ("azureIdentity", "selector"):
                if not spec.get(field):
                    errors.append(f"spec.{field}: empty")
        elif kind == "AzurePodIdentityException":
            if not spec.get("podLabels"):
                errors.append("spec.podLabels: empty (matches nothing)")
    if obj.get("apiVersion") == "projectcalico.org/v3" and kind in ("GlobalNetworkPolicy", "NetworkPolicy"):
        tier = spec.get("tier", "default")
        name = (obj.get("metadata") or {}).get("name", "")
        if tier != "default" and not name.startswith(tier + "."):
            errors.append(f"metadata.name: a policy in tier {tier!r} should be named {tier}.<name>")
        for direction in ("ingress", "egress"):
            for i, rule in enumerate(spec.get(direction) or []):
                for side in ("source", "destination"):
                    for field in ("selector", "notSelector", "namespaceSelector"):
                        sel = (rule.get(side) or {}).get(field)
                        if sel is not None and not schemas.calico_selector_ok(sel):
                            errors.append(f"spec.{direction}.{i}.{side}.{field}: unbalanced selector {sel!r}")
        for field in ("selector", "namespaceSelector"):
            if field in spec and not schemas.calico_selector_ok(spec[field]):
                errors.append(f"spec.{field}: unbalanced selector {spec[field]!r}")
    return errors


class Validator:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.crds = load_crd_schemas(report)
        self.cache: dict[str, list[str] | None] = {}

    def errors(self, obj: dict) -> list[str] | None:
        """Validation errors, or None when no schema knows the kind."""
        key = json.dumps(obj, sort_keys=True, default=str)
        if key not in self.cache:
            self.cache[key] = self._errors(obj)
        return self.cache[key]

    def _errors(self, obj: dict) -> list[str] | None:
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        schema = self.crds.get((api_version, kind)) or schemas.EXTRA.get((api_version, kind))
        if schema is None and api_version.startswith(GROUP + "/"):
            return [f"{api_version} {kind} is not in {CRD_FILE.relative_to(REPO)}"]
        if schema is not None:
            return jsonschema_errors(schema, obj) + semantic_errors(obj)
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return None
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path) or "(root)"
            return [f"{path}: {error.message}"]
        return []

    def validate(self, obj: dict, where: str, unknown_is_error: bool) -> None:
        errors = self.errors(obj)
        if errors is None:
            message = f"{where}: {name_of(obj)} ({obj.get('apiVersion')}) has no schema here"
            if unknown_is_error:
                self.report.fail(message)
            else:
                self.report.note(message + "; not validated")
            return
        if errors:
            for error in errors:
                self.report.fail(f"{where}: {name_of(obj)}: {error}")
        else:
            self.report.ok(f"{where}: {name_of(obj)} validates")


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------
class Rendered:
    """One render of the chart: objects plus the text of each document."""

    def __init__(self, values: dict, manifests: dict[str, str]) -> None:
        self.values = values
        self.docs: list[tuple[str, int, str, dict]] = []  # (template, index, text, object)
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt"):
                self.notes = text
                continue
            for index, part in enumerate(re.split(r"(?m)^---\s*$", text)):
                obj = yaml.safe_load(part)
                if isinstance(obj, dict) and obj:
                    self.docs.append((template, index, part.strip("\n"), obj))

    @property
    def objects(self) -> list[dict]:
        return [d[3] for d in self.docs]

    def find(self, kind: str, name: str | None = None) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]

    def one(self, kind: str, name: str) -> dict | None:
        found = self.find(kind, name)
        return found[0] if len(found) == 1 else None


def render(chart: helm.Chart, override: dict) -> Rendered:
    values = chart.merge_values(override)
    return Rendered(values, chart.render(values=override, name=RELEASE, namespace=NAMESPACE, is_install=True))


# ---------------------------------------------------------------------------
# Policy checks on a render
# ---------------------------------------------------------------------------
def expected_permissions(table: list[tuple], values: dict) -> set[tuple]:
    out = set()
    for cond, group, resource, verbs, names, namespace in table:
        if not cond(values):
            continue
        ns = namespace(values) if namespace else "*"
        name = names(values) if names else None
        for verb in verbs:
            out.add((ns, group, resource, verb, name))
    return out


def granted_permissions(r: Rendered, report: Report, where: str) -> dict[str, set[tuple]]:
    """ServiceAccount 'ns/name' -> {(namespace|*, group, resource, verb, resourceName|None)}."""
    roles: dict[tuple[str, str], list[dict]] = {}
    for obj in r.objects:
        if obj["kind"] == "ClusterRole":
            roles[("ClusterRole", obj["metadata"]["name"])] = obj.get("rules") or []
        elif obj["kind"] == "Role":
            roles[("Role", obj["metadata"]["namespace"] + "/" + obj["metadata"]["name"])] = obj.get("rules") or []
    grants: dict[str, set[tuple]] = {}
    for obj in r.objects:
        if obj["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = obj["roleRef"]
        if ref["kind"] == "ClusterRole":
            key = ("ClusterRole", ref["name"])
        else:
            key = ("Role", obj["metadata"]["namespace"] + "/" + ref["name"])
        rules = roles.get(key)
        if rules is None:
            report.fail(f"{where}: {name_of(obj)} refers to {ref['kind']} {ref['name']}, which the chart does not render")
            continue
        scope = "*" if obj["kind"] == "ClusterRoleBinding" else obj["metadata"]["namespace"]
        for subject in obj.get("subjects") or []:
            if subject.get("kind") != "ServiceAccount":
                report.fail(f"{where}: {name_of(obj)} binds {subject.get('kind')} {subject.get('name')}, not a ServiceAccount")
                continue
            sa = f"{subject.get('namespace')}/{subject['name']}"
            for rule in rules:
                if rule.get("nonResourceURLs"):
                    report.fail(f"{where}: {name_of(obj)} grants nonResourceURLs")
                for field in ("apiGroups", "resources", "verbs"):
                    if "*" in (rule.get(field) or []):
                        report.fail(f"{where}: {key[1]} uses a wildcard in {field}")
                for group in rule.get("apiGroups") or []:
                    for resource in rule.get("resources") or []:
                        for verb in rule.get("verbs") or []:
                            for name in rule.get("resourceNames") or [None]:
                                grants.setdefault(sa, set()).add((scope, group, resource, verb, name))
    return grants


def fmt_perm(p: tuple) -> str:
    ns, group, resource, verb, name = p
    where = "cluster-wide" if ns == "*" else f"in {ns}"
    return f"{verb} {resource}.{group or 'core'}{f'[{name}]' if name else ''} {where}"


def check_rbac(r: Rendered, report: Report, where: str) -> None:
    v = r.values
    grants = granted_permissions(r, report, where)
    expected = {f"{NAMESPACE}/{RELEASE}-agent": expected_permissions(AGENT_PERMISSIONS, v)}
    # In detach mode the ServiceAccount keeps its role (so switching back is
    # instant), but no pod mounts its token (check_agent checks that).
    if _controller_enabled(v):
        expected[f"{NAMESPACE}/{RELEASE}-controller"] = expected_permissions(CONTROLLER_PERMISSIONS, v)
    for sa in sorted(set(grants) | set(expected)):
        got, want = grants.get(sa, set()), expected.get(sa)
        if want is None:
            report.fail(f"{where}: RBAC grants permissions to unexpected ServiceAccount {sa}")
            continue
        extra, missing = got - want, want - got
        for p in sorted(extra, key=str):
            report.fail(f"{where}: {sa} may {fmt_perm(p)}, which it does not use (not in the permission table)")
        for p in sorted(missing, key=str):
            report.fail(f"{where}: {sa} cannot {fmt_perm(p)}, which it needs")
        if not extra and not missing:
            report.ok(f"{where}: {sa} RBAC is exactly its {len(want)} needed permissions")


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def check_no_privileged(r: Rendered, report: Report, where: str) -> None:
    for obj in r.objects:
        if obj["kind"] not in ("DaemonSet", "Deployment", "StatefulSet", "Job", "Pod"):
            continue
        spec = obj["spec"] if obj["kind"] == "Pod" else pod_spec(obj)
        for c in all_containers(spec):
            sc = c.get("securityContext") or {}
            key = (obj["metadata"]["name"], c["name"])
            if sc.get("privileged"):
                report.check(key in PRIVILEGED_JUSTIFIED,
                             f"{where}: {name_of(obj)} container {c['name']} is privileged"
                             + (f" (justified: {PRIVILEGED_JUSTIFIED[key]})" if key in PRIVILEGED_JUSTIFIED else " without justification"))
            report.check(sc.get("allowPrivilegeEscalation") is False,
                         f"{where}: {name_of(obj)} container {c['name']} sets allowPrivilegeEscalation: false")
            report.check((sc.get("capabilities") or {}).get("drop") == ["ALL"],
                         f"{where}: {name_of(obj)} container {c['name']} drops ALL capabilities")
            report.check(sc.get("readOnlyRootFilesystem") is True,
                         f"{where}: {name_of(obj)} container {c['name']} has a read-only root filesystem")


def arg_map(args: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for a in args:
        if a.startswith("--"):
            k, _, val = a[2:].partition("=")
            out[k] = val if _ else True
    return out


def check_agent(r: Rendered, report: Report, where: str) -> None:
    v = r.values
    ds = r.one("DaemonSet", f"{RELEASE}-agent")
    if not report.check(ds is not None, f"{where}: one agent DaemonSet"):
        return
    spec = pod_spec(ds)
    detach = v["agent"]["detachRedirect"]["enabled"]
    report.check(spec.get("priorityClassName") == "system-node-critical", f"{where}: agent priority class system-node-critical")
    report.check({"operator": "Exists"} in (spec.get("tolerations") or []), f"{where}: agent tolerates all taints")
    report.check(ds["spec"]["updateStrategy"]["type"] == "RollingUpdate", f"{where}: agent rolling update")
    report.check(not spec.get("hostPID") and not spec.get("hostIPC"), f"{where}: agent has no hostPID/hostIPC")
    volumes = {vol["name"]: vol for vol in spec.get("volumes") or []}
    bpffs_dir = f"/host/sys/fs/bpf/{v['agent']['bpffsSubdir']}"

    def caps_ok(c: dict) -> None:
        add = set((c.get("securityContext") or {}).get("capabilities", {}).get("add") or [])
        zero_policy = {"SYS_ADMIN"} if v["agent"]["listenMode"] == "pod-netns" else set()
        report.check(add == set(v["agent"]["capabilities"]) | zero_policy,
                     f"{where}: {c['name']} adds exactly agent.capabilities (and SYS_ADMIN in pod-netns mode)")
        report.check(REQUIRED_AGENT_CAPABILITIES <= add <= ALLOWED_AGENT_CAPABILITIES | zero_policy,
                     f"{where}: {c['name']} capabilities {sorted(add)} within {sorted(ALLOWED_AGENT_CAPABILITIES)}")
        report.check(c["securityContext"].get("runAsUser") == 0, f"{where}: {c['name']} runs as uid 0 (capabilities need it)")

    def bpffs_mount_ok(c: dict) -> None:
        mounts = {m["name"]: m for m in c.get("volumeMounts") or []}
        m = mounts.get("bpffs") or {}
        report.check(volumes.get("bpffs", {}).get("hostPath", {}).get("path") == v["agent"]["hostPaths"]["bpffs"]
                     and m.get("mountPath") == "/host/sys/fs/bpf" and m.get("mountPropagation") == "HostToContainer"
                     and not m.get("readOnly"),
                     f"{where}: {c['name']} mounts the host bpffs read-write with HostToContainer propagation")

    if detach:
        init = {c["name"]: c for c in spec.get("initContainers") or []}.get("detach-redirect")
        if report.check(init is not None, f"{where}: detach mode runs the detach-redirect init container"):
            report.check(init["args"][:2] == ["redirect", "uninstall"] and arg_map(init["args"]).get("bpffs-dir") == bpffs_dir,
                         f"{where}: detacher runs `redirect uninstall --bpffs-dir={bpffs_dir}`")
            report.check(init["securityContext"]["capabilities"].get("add") == ["NET_ADMIN"],
                         f"{where}: detacher adds NET_ADMIN only (pins are unlinked; the netlink guard filter needs it)")
            bpffs_mount_ok(init)
        unit = {c["name"]: c for c in spec.get("initContainers") or []}.get("uninstall-boot-guard")
        report.check(unit is not None and unit["args"][:2] == ["guard", "uninstall-unit"]
                     and not unit["securityContext"]["capabilities"].get("add"),
                     f"{where}: detach mode removes the boot unit, with no capability")
        report.check(spec.get("hostNetwork") is True and spec.get("automountServiceAccountToken") is False,
                     f"{where}: detacher on the host network (the guard's netlink filter), no API token")
        return
    enabled = v["agent"]["bootGuard"]["enabled"]
    name = "install-boot-guard" if enabled else "uninstall-boot-guard"
    unit = {c["name"]: c for c in spec.get("initContainers") or []}.get(name)
    if enabled:
        ok = (unit is not None and unit["args"][:2] == ["guard", "install-unit"]
              and arg_map(unit["args"]).get("allow-cgroup") == v["agent"]["bootGuard"]["allowCgroup"]
              and arg_map(unit["args"]).get("imds-guard-interface") == ",".join(v["agent"]["imdsGuardInterfaces"])
              and not unit["securityContext"]["capabilities"].get("add")
              and {m["name"] for m in unit["volumeMounts"]} == {"host-systemd", "host-podid"}
              and not any(m["name"] in ("host-systemd", "host-podid") for c in spec.get("containers") or [] for m in c.get("volumeMounts") or []))
        report.check(ok, f"{where}: the boot unit is installed by an init container, the only one to mount /etc/systemd/system and /opt/podid")
    else:
        report.check(unit is not None and unit["args"][:2] == ["guard", "uninstall-unit"],
                     f"{where}: with the boot guard off, an init container removes an earlier unit")

    report.check(spec.get("hostNetwork") is True, f"{where}: agent uses the host network")
    agent = {c["name"]: c for c in spec.get("containers") or []}.get("agent")
    if not report.check(agent is not None, f"{where}: agent container present"):
        return
    caps_ok(agent)
    bpffs_mount_ok(agent)
    env = {e["name"]: e for e in agent.get("env") or []}
    report.check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName"
                 and env.get("NODE_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.hostIP",
                 f"{where}: agent gets NODE_NAME and NODE_IP from the downward API")
    mounts = {m["name"]: m for m in agent.get("volumeMounts") or []}
    report.check(volumes.get("cgroup2", {}).get("hostPath", {}).get("path") == v["agent"]["hostPaths"]["cgroup2"]
                 and mounts.get("cgroup2", {}).get("readOnly") is True
                 and mounts["cgroup2"].get("mountPath") == "/host/sys/fs/cgroup",
                 f"{where}: agent mounts the host cgroup2 root read-only at /host/sys/fs/cgroup")
    report.check(all(not m["mountPath"].startswith("/sys/") for m in mounts.values()),
                 f"{where}: agent mounts nothing under /sys (the runtime's cgroup view stays for self-exemption)")
    port = v["agent"]["metrics"]["port"]
    ports = {p["name"]: p["containerPort"] for p in agent.get("ports") or []}
    report.check(ports.get("metrics") == port and ports.get("imds") == v["agent"]["listenPort"], f"{where}: agent ports")
    report.check(agent.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz"
                 and agent.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
                 f"{where}: agent readiness /readyz, liveness /healthz")
    args = agent["args"]
    a = arg_map(args)
    namespaced = v["namespaced"] or v["mode"] == "managed"
    want: dict[str, Any] = {
        "listen": f"$(NODE_IP):{v['agent']['listenPort']}",
        "node-name": "$(NODE_NAME)",
        "mode": v["mode"],
        "imds-endpoint": v["azure"]["imdsEndpoint"],
        "aad-authority": v["azure"]["aadAuthority"],
        "intercept": v["agent"]["intercept"],
        "cgroup-mount": "/host/sys/fs/cgroup",
        "bpffs-dir": bpffs_dir,
        "metrics-listen": f"{v['agent']['metrics']['bindAddress']}:{port}",
        "force-namespaced": True if namespaced else None,
        "block-instance-metadata": True if v["agent"]["blockInstanceMetadata"] else None,
        "startup-taint": v["agent"]["startupTaint"]["key"] if v["agent"]["startupTaint"]["enabled"] else None,
        "emit-denial-events": True if v["agent"]["emitDenialEvents"] else None,
        "log-level": v["logging"]["level"],
        "log-format": v["logging"]["format"],
        "audit-log": f"/var/log/podid/{v['agent']['audit']['fileName']}" if v["agent"]["audit"]["enabled"] else None,
        "assignment-wait": v["agent"]["assignmentWait"] if v["mode"] == "standard" else None,
        "audit-log-max-bytes": str(v["agent"]["audit"]["maxBytes"]) if v["agent"]["audit"]["enabled"] else None,
        "audit-log-max-files": str(v["agent"]["audit"]["maxFiles"]) if v["agent"]["audit"]["enabled"] else None,
        "cgroup-root": f"/host/sys/fs/cgroup/{v['agent']['cgroupRoot'].lstrip('/')}" if v["agent"]["cgroupRoot"] else None,
        "forward": ",".join(v["agent"]["forward"]) or None,
        "record-max-age": v["agent"]["recordMaxAge"],
        "egress-guard": True if v["agent"]["egressGuard"] else None,
        "imds-guard-interface": ",".join(v["agent"]["imdsGuardInterfaces"]),
        "listen-mode": "pod-netns" if v["agent"]["listenMode"] == "pod-netns" else None,
        "pod-netns-dir": "/host/var/run/netns" if v["agent"]["listenMode"] == "pod-netns" else None,
        "max-pod-listeners": str(v["agent"]["maxPodListeners"]) if v["agent"]["listenMode"] == "pod-netns" else None,
        "pod-listener-port": str(v["agent"]["listenPort"]) if v["agent"]["listenMode"] == "pod-netns" else None,
        "cloud-config": "/etc/kubernetes/azure.json" if v["agent"]["cloudConfigHostPath"] else None,
        **identity_rule_flags(v),
    }
    if v["agent"]["listenMode"] == "pod-netns":
        m = mounts.get("pod-netns") or {}
        report.check(volumes.get("pod-netns", {}).get("hostPath", {}).get("path") == v["agent"]["podNetnsHostPath"]
                     and m.get("mountPath") == "/host/var/run/netns" and m.get("readOnly") is True
                     and m.get("mountPropagation") == "HostToContainer",
                     f"{where}: pod-netns mode mounts the runtime's netns files read-only with HostToContainer propagation")
    else:
        report.check("pod-netns" not in volumes, f"{where}: no pod netns mount in node mode")
    if v["agent"]["cloudConfigHostPath"]:
        report.check(volumes.get("cloud-config", {}).get("hostPath") == {"path": v["agent"]["cloudConfigHostPath"], "type": "File"}
                     and mounts.get("cloud-config", {}).get("readOnly") is True,
                     f"{where}: agent mounts the cloud config file read-only")
    else:
        report.check("cloud-config" not in volumes, f"{where}: no cloud config mounted unless asked")
    bad = [f"--{k}: want {w!r}, got {a.get(k)!r}" for k, w in want.items() if a.get(k) != w]
    report.check(args[0] == "run" and not bad, f"{where}: agent flags match the values" + (f" ({'; '.join(bad)})" if bad else ""))


def identity_rule_flags(v: dict) -> dict[str, Any]:
    """The identity-rule flags both components get from identityRules.*."""
    rules = v["identityRules"]
    return {
        "node-identity": ",".join(rules["nodeIdentities"]) or None,
        "allow-node-identities": True if rules["allowNodeIdentities"] else None,
        "allowed-authority": ",".join(rules["allowedAuthorities"]) or None,
        "same-namespace-secrets": True if rules["sameNamespaceSecrets"] else None,
    }


def check_controller(r: Rendered, report: Report, where: str) -> None:
    v = r.values
    deploys = r.find("Deployment")
    if not _controller_enabled(v):
        report.check(not deploys and not r.find("PodDisruptionBudget"), f"{where}: no controller in this mode")
        return
    dep = r.one("Deployment", f"{RELEASE}-controller")
    if not report.check(dep is not None, f"{where}: one controller Deployment"):
        return
    report.check(dep["spec"]["replicas"] == v["controller"]["replicas"], f"{where}: controller replicas follow the values")
    if where == "default":
        report.check(dep["spec"]["replicas"] == 2, f"{where}: two controller replicas by default")
    spec = pod_spec(dep)
    psc = spec.get("securityContext") or {}
    report.check(not spec.get("hostNetwork") and not spec.get("hostPID"), f"{where}: controller not on the host network")
    report.check(all("hostPath" not in vol for vol in spec.get("volumes") or []), f"{where}: controller has no hostPath volume")
    for c in all_containers(spec):
        sc = c.get("securityContext") or {}
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        report.check(non_root and isinstance(uid, int) and uid != 0, f"{where}: controller {c['name']} runs as non-root (uid {uid})")
        report.check(sc.get("readOnlyRootFilesystem") is True, f"{where}: controller {c['name']} read-only root filesystem")
        report.check(not (sc.get("capabilities") or {}).get("add"), f"{where}: controller {c['name']} adds no capabilities")
    container = spec["containers"][0]
    a = arg_map(container["args"])
    report.check(a.get("leader-election-name") == _lease_name(v) and a.get("leader-election-namespace") == _lease_namespace(v),
                 f"{where}: controller leader election flags name the Lease its Role allows")
    report.check(a.get("metrics-listen") == f"0.0.0.0:{v['controller']['metrics']['port']}", f"{where}: controller metrics flag")
    report.check(a.get("log-filter") == v["logging"]["level"] and a.get("log-format") == v["logging"]["format"],
                 f"{where}: controller log flags follow logging.*")
    report.check((a.get("force-namespaced") is True) == bool(v["namespaced"]), f"{where}: controller --force-namespaced follows namespaced")
    rule_flags = {k: a.get(k) for k in identity_rule_flags(v)}
    report.check(rule_flags == identity_rule_flags(v), f"{where}: controller identity-rule flags follow identityRules.* ({rule_flags})")
    secret_name = v["controller"]["cloudConfig"]["secretName"] or f"{RELEASE}-cloud-config"
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    report.check(vols.get("cloud-config", {}).get("secret", {}).get("secretName") == secret_name
                 and a.get("cloud-config") == f"/etc/podid/cloud-config/{v['controller']['cloudConfig']['key']}",
                 f"{where}: controller reads --cloud-config from Secret {secret_name}")
    if v["controller"]["cloudConfig"]["create"]:
        secret = r.one("Secret", secret_name)
        ok = secret is not None and json.loads(secret["stringData"][v["controller"]["cloudConfig"]["key"]]) == v["controller"]["cloudConfig"]["azureJson"]
        report.check(ok, f"{where}: the chart creates the cloud config Secret from azureJson")
    probes = [container.get(p, {}).get("httpGet", {}).get("path") for p in ("livenessProbe", "readinessProbe")]
    report.check(probes == ["/healthz", "/healthz"], f"{where}: controller probes use /healthz (not the leader-only /readyz)")
    pdb = r.one("PodDisruptionBudget", f"{RELEASE}-controller")
    if v["controller"]["podDisruptionBudget"]["enabled"]:
        report.check(pdb is not None and pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"],
                     f"{where}: PodDisruptionBudget selects the controller")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    exc = r.one("AzurePodIdentityException", f"{RELEASE}-controller")
    if v["exceptions"]["controller"]:
        report.check(exc is not None and exc["metadata"]["namespace"] == NAMESPACE
                     and any(labels.get(k) == val for k, val in exc["spec"]["podLabels"].items()),
                     f"{where}: the controller's exception matches the controller pods")


def check_exceptions_and_monitors(r: Rendered, report: Report, where: str) -> None:
    v = r.values
    aks = r.one("AzurePodIdentityException", f"{RELEASE}-aks-addon-exception")
    report.check((aks is not None) == bool(v["exceptions"]["aksAddon"]) and (aks is None or aks["metadata"]["namespace"] == "kube-system"),
                 f"{where}: AKS add-on exception in kube-system iff exceptions.aksAddon")
    monitors = r.find("ServiceMonitor")
    if not v["serviceMonitor"]["enabled"]:
        report.check(not monitors, f"{where}: no ServiceMonitor unless enabled")
        return
    services = r.find("Service")
    for sm in monitors:
        sel = sm["spec"]["selector"]["matchLabels"]
        targets = [s for s in services if all(s["metadata"]["labels"].get(k) == val for k, val in sel.items())]
        port_names = {p["name"] for s in targets for p in s["spec"]["ports"]}
        ok = len(targets) == 1 and all(e["port"] in port_names for e in sm["spec"]["endpoints"])
        report.check(ok, f"{where}: {name_of(sm)} selects one Service with its endpoint port")
        for key, val in v["serviceMonitor"]["labels"].items():
            report.check(sm["metadata"]["labels"].get(key) == val, f"{where}: {name_of(sm)} carries label {key}")
    # Prometheus names the job after the Service unless relabelled: the
    # alerts in docs/metrics.md filter on job="<release>-agent" and must match.
    jobs = {
        relabel.get("replacement")
        for sm in monitors
        for endpoint in sm["spec"]["endpoints"]
        for relabel in endpoint.get("relabelings", [])
        if relabel.get("targetLabel") == "job"
    }
    metrics_doc = (REPO / "docs" / "metrics.md").read_text()
    for job in sorted(set(re.findall(r'job="([^"]+)"', metrics_doc))):
        report.check(job in jobs, f"{where}: docs/metrics.md's job=\"{job}\" is a job the ServiceMonitors set ({sorted(j for j in jobs if j)})")


# ---------------------------------------------------------------------------
# Plain manifests
# ---------------------------------------------------------------------------
KIND_ORDER = [
    "Namespace", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "ConfigMap",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    "Service", "DaemonSet", "Deployment", "Ingress",
]

NAMESPACE_DOC = f"""\
# The agent needs the host network, host paths and added capabilities, which
# Pod Security Admission allows only at the `privileged` level.
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    pod-security.kubernetes.io/enforce: privileged
    pod-security.kubernetes.io/warn: privileged"""


def plain_manifest(r: Rendered, title: str, kinds: Iterable[str] | None = None, with_namespace: bool = True) -> str:
    def order(doc: tuple) -> tuple:
        kind = doc[3]["kind"]
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), doc[0], doc[1])

    docs = [d for d in r.docs if kinds is None or d[3]["kind"] in kinds]
    parts = [NAMESPACE_DOC] if with_namespace else []
    parts += [d[2] for d in sorted(docs, key=order)]
    header = (
        f"# {title}\n"
        "# Generated from manifests/helm/podid by\n"
        "#   target/venv/bin/python manifests/tests/check_manifests.py --update\n"
        f"# (release {RELEASE!r}, namespace {NAMESPACE!r}). Do not edit; change the chart.\n"
    )
    return header + "---\n" + "\n---\n".join(parts) + "\n"


def check_drift(path: Path, want: str, update: bool, report: Report) -> None:
    rel = path.relative_to(REPO)
    have = path.read_text() if path.exists() else None
    if have == want:
        report.ok(f"{rel} is up to date")
        return
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(want)
        print(f"  wrote {rel}")
        return
    diff = "".join(list(difflib.unified_diff((have or "").splitlines(True), want.splitlines(True),
                                             f"{rel} (committed)", f"{rel} (generated)"))[:40])
    report.fail(f"{rel} is out of date; run with --update\n{diff}")


# ---------------------------------------------------------------------------
# Repository scan: manifests/ and docs/
# ---------------------------------------------------------------------------
# Fenced ```yaml blocks, also indented ones (inside list items).
YAML_BLOCK = re.compile(r"^([ \t]*)```ya?ml[^\n]*\n(.*?)^\1```", re.MULTILINE | re.DOTALL)


def repo_documents(report: Report) -> list[tuple[str, list[dict], bool]]:
    """(where, objects, unknown_is_error) for each YAML file and Markdown block."""
    out = []
    templates = CHART / "templates"
    for path in sorted((REPO / "manifests").rglob("*.y*ml")):
        if templates in path.parents or path.name in ("values.yaml", "Chart.yaml"):
            continue
        rel = str(path.relative_to(REPO))
        out.append((rel, k8s_objects(path.read_text(), rel, report), True))
    for path in sorted((REPO / "docs").rglob("*.md")) + [REPO / "manifests/README.md"]:
        if not path.exists():
            continue
        text = path.read_text()
        for match in YAML_BLOCK.finditer(text):
            block = textwrap.dedent(match.group(2))
            if block.lstrip().startswith("# fragment"):
                continue
            line = text.count("\n", 0, match.start()) + 1
            where = f"{path.relative_to(REPO)}:{line}"
            out.append((where, k8s_objects(block, where, report), False))
    return out


def check_examples_coherent(report: Report) -> None:
    """The examples work together: binding -> identity, pod label -> binding."""
    objs: list[dict] = []
    for path in sorted((REPO / "manifests/examples").glob("*.y*ml")):
        objs += [o for o in yaml.safe_load_all(path.read_text()) if isinstance(o, dict)]
    ns_of = lambda o: (o.get("metadata") or {}).get("namespace", "default")  # noqa: E731
    identities = {(ns_of(o), o["metadata"]["name"]) for o in objs if o.get("kind") == "AzureIdentity"}
    bindings = [o for o in objs if o.get("kind") == "AzureIdentityBinding"]
    for b in bindings:
        report.check((ns_of(b), b["spec"]["azureIdentity"]) in identities,
                     f"examples: binding {b['metadata']['name']} names an AzureIdentity in its namespace")
    selectors = {(ns_of(b), b["spec"]["selector"]) for b in bindings}
    workloads = [o for o in objs if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet")]
    for w in workloads:
        label = w["spec"]["template"]["metadata"].get("labels", {}).get("aadpodidbinding")
        report.check(label is not None and (ns_of(w), label) in selectors,
                     f"examples: {name_of(w)} pods carry an aadpodidbinding label a binding selects")
    ingresses = [o for o in objs if o.get("kind") == "Ingress"]
    services = {(ns_of(o), o["metadata"]["name"]) for o in objs if o.get("kind") == "Service"}
    for ing in ingresses:
        report.check(ing["apiVersion"] == "networking.k8s.io/v1", f"examples: {name_of(ing)} uses networking.k8s.io/v1")
        for rule in ing["spec"].get("rules", []):
            for p in rule["http"]["paths"]:
                report.check((ns_of(ing), p["backend"]["service"]["name"]) in services,
                             f"examples: {name_of(ing)} routes to an existing Service")


# ---------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite generated files instead of failing on drift")
    parser.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    args = parser.parse_args()
    report = Report(args.verbose)
    helm.disable_logging()

    print(f"Helm engine {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}); "
          f"Kubernetes schemas {kv_utils.major_minor(K8S_VERSION)} (kubernetes-validate {kubernetes_validate.__version__}, strict)")
    validator = Validator(report)

    section("CRDs")
    check_drift(CHART_CRD_COPY, CRD_FILE.read_text(), args.update, report)
    for crd in k8s_objects(CRD_FILE.read_text(), str(CRD_FILE), report):
        validator.validate(crd, str(CRD_FILE.relative_to(REPO)), unknown_is_error=True)

    with helm.Chart.load(CHART) as chart:
        defaults = chart.values
        renders: dict[str, Rendered] = {}
        for scenario, override in SCENARIOS:
            section(f"chart: {scenario}")
            lint = helm.lint(str(CHART), override or None, strict=True, namespace=NAMESPACE,
                             kube_version=f"v{K8S_VERSION}")
            problems = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + lint.get("errors", [])
            for m in problems:
                report.fail(f"{scenario}: helm lint: {m}")
            if not problems:
                report.ok(f"{scenario}: helm lint")
            try:
                r = render(chart, override)
            except helm.HelmError as error:
                report.fail(f"{scenario}: render failed: {error}")
                continue
            renders[scenario] = r
            for obj in r.objects:
                validator.validate(obj, f"{scenario}", unknown_is_error=True)
            check_rbac(r, report, scenario)
            check_no_privileged(r, report, scenario)
            check_agent(r, report, scenario)
            check_controller(r, report, scenario)
            check_exceptions_and_monitors(r, report, scenario)
            report.check(deep_merge(defaults, override) == r.values, f"{scenario}: values merge as expected")

        section("chart: invalid values are refused")
        for why, override, expect in INVALID_VALUES:
            try:
                chart.validate_schema(chart.merge_values(override))
                chart.render(values=override, name=RELEASE, namespace=NAMESPACE, is_install=True)
            except helm.HelmError as error:
                text = " ".join(str(error).split())
                report.check(expect in text, f"refused: {why} ({text[:120]})")
            else:
                report.fail(f"values accepted but should be refused: {why}: {override}")

        section("plain manifests (drift)")
        if "default" in renders:
            check_drift(DEPLOY, plain_manifest(renders["default"], "podid: plain manifests, default values."), args.update, report)
        if "detach-redirect" in renders:
            check_drift(DEPLOY_DETACH, plain_manifest(
                renders["detach-redirect"],
                "podid: replaces the agent DaemonSet with one that detaches the kernel redirect on every node.\n"
                "# kubectl apply -f this, wait for `kubectl -n podid rollout status ds/podid-agent`, then delete podid.yaml.",
                kinds=["DaemonSet"], with_namespace=False), args.update, report)

    section("manifests/ and docs/")
    for where, objects, unknown_is_error in repo_documents(report):
        for obj in objects:
            validator.validate(obj, where, unknown_is_error)
    check_examples_coherent(report)

    print()
    if report.failures:
        print(f"FAILED: {len(report.failures)} problem(s), {report.passed} checks passed.")
        return 1
    print(f"OK: {report.passed} checks passed" + (f", {len(report.notes)} note(s)." if report.notes else "."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
