"""Schemas for objects that are neither Kubernetes built-ins (kubernetes-validate
has those) nor our CRDs (generated from the Rust types).

These are hand-written subsets, from the projects' API references, of the
fields our manifests and docs use: Calico (projectcalico.org/v3), the
Prometheus Operator's ServiceMonitor, and podid's own standalone-mode
LocalWorkload (podid-api/src/local.rs, which rejects unknown fields). They are
closed (`additionalProperties: false`) where a typo would otherwise be
ignored silently; add a field here when a manifest needs it.
"""

from __future__ import annotations

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _meta(namespaced: bool | None) -> dict:
    props = {
        "name": {"type": "string", "pattern": DNS_SUBDOMAIN, "maxLength": 253},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        "generateName": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer"},
        "creationTimestamp": {"type": ["string", "null"]},
        "managedFields": {"type": "array"},
    }
    if namespaced is not False:
        props["namespace"] = {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}
    return {"type": "object", "required": ["name"], "additionalProperties": False, "properties": props}


OBJECT_META_NAMESPACED = _meta(True)
OBJECT_META_CLUSTER = _meta(False)


def _object(api_version: str, kind: str, spec: dict, namespaced: bool, spec_required: bool = True) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata"] + (["spec"] if spec_required else []),
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": OBJECT_META_NAMESPACED if namespaced else OBJECT_META_CLUSTER,
            "spec": spec,
        },
    }


def _closed(props: dict, required: list[str] | None = None) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


# --- Calico (projectcalico.org/v3) -----------------------------------------
CIDR = {"type": "string", "pattern": r"^[0-9a-fA-F:.]+(/[0-9]{1,3})?$"}
SELECTOR = {"type": "string"}
PORT = {"anyOf": [
    {"type": "integer", "minimum": 1, "maximum": 65535},
    {"type": "string", "pattern": r"^[0-9]{1,5}:[0-9]{1,5}$"},  # range
    {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},  # named port
]}
PROTOCOL = {"anyOf": [
    {"enum": ["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite"]},
    {"type": "integer", "minimum": 1, "maximum": 255},
]}
ENTITY_RULE = _closed({
    "nets": {"type": "array", "items": CIDR},
    "notNets": {"type": "array", "items": CIDR},
    "selector": SELECTOR,
    "notSelector": SELECTOR,
    "namespaceSelector": SELECTOR,
    "ports": {"type": "array", "items": PORT},
    "notPorts": {"type": "array", "items": PORT},
    "serviceAccounts": _closed({"names": {"type": "array", "items": {"type": "string"}}, "selector": SELECTOR}),
    "services": _closed({"name": {"type": "string"}, "namespace": {"type": "string"}}),
})
ICMP = _closed({"type": {"type": "integer"}, "code": {"type": "integer"}})
RULE = _closed({
    "action": {"enum": ["Allow", "Deny", "Log", "Pass"]},
    "protocol": PROTOCOL,
    "notProtocol": PROTOCOL,
    "ipVersion": {"enum": [4, 6]},
    "icmp": ICMP,
    "notICMP": ICMP,
    "source": ENTITY_RULE,
    "destination": ENTITY_RULE,
    "http": _closed({"methods": {"type": "array"}, "paths": {"type": "array"}}),
    "metadata": _closed({"annotations": STRING_MAP}),
}, ["action"])
_POLICY_COMMON = {
    "tier": {"type": "string"},
    "order": {"type": "number"},
    "selector": SELECTOR,
    "serviceAccountSelector": SELECTOR,
    "types": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}, "uniqueItems": True},
    "ingress": {"type": "array", "items": RULE},
    "egress": {"type": "array", "items": RULE},
    "performanceHints": {"type": "array", "items": {"enum": ["AssumeNeededOnEveryNode"]}},
}
NETWORK_POLICY_SPEC = _closed(dict(_POLICY_COMMON))
GLOBAL_NETWORK_POLICY_SPEC = _closed(dict(
    _POLICY_COMMON,
    namespaceSelector=SELECTOR,
    doNotTrack={"type": "boolean"},
    preDNAT={"type": "boolean"},
    applyOnForward={"type": "boolean"},
))
TIER_SPEC = _closed({"order": {"type": "number"}, "defaultAction": {"enum": ["Deny", "Pass"]}})
NETWORK_SET_SPEC = _closed({"nets": {"type": "array", "items": CIDR}})
HOST_ENDPOINT_SPEC = _closed({
    "node": {"type": "string"},
    "interfaceName": {"type": "string"},
    "expectedIPs": {"type": "array", "items": {"type": "string"}},
    "profiles": {"type": "array", "items": {"type": "string"}},
    "ports": {"type": "array"},
})
# FelixConfiguration has dozens of fields; only those the docs use are typed.
FELIX_CONFIGURATION_SPEC = {
    "type": "object",
    "properties": {
        "defaultEndpointToHostAction": {"enum": ["Drop", "Accept", "Return"]},
        "bpfEnabled": {"type": "boolean"},
        "bpfConnectTimeLoadBalancing": {"enum": ["TCP", "Enabled", "Disabled"]},
    },
}

# --- Prometheus Operator ----------------------------------------------------
LABEL_SELECTOR = _closed({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}})
RELABEL = _closed({
    "sourceLabels": {"type": "array", "items": {"type": "string"}},
    "separator": {"type": "string"},
    "targetLabel": {"type": "string"},
    "regex": {"type": "string"},
    "modulus": {"type": "integer"},
    "replacement": {"type": "string"},
    "action": {"type": "string"},
})
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR_SPEC = _closed({
    "selector": LABEL_SELECTOR,
    "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}),
    "jobLabel": {"type": "string"},
    "targetLabels": {"type": "array"},
    "podTargetLabels": {"type": "array"},
    "sampleLimit": {"type": "integer"},
    "endpoints": {"type": "array", "minItems": 1, "items": _closed({
        "port": {"type": "string"},
        "targetPort": {"type": ["string", "integer"]},
        "path": {"type": "string"},
        "scheme": {"enum": ["http", "https"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "tlsConfig": {"type": "object"},
        "bearerTokenSecret": {"type": "object"},
        "authorization": {"type": "object"},
        "relabelings": {"type": "array", "items": RELABEL},
        "metricRelabelings": {"type": "array", "items": RELABEL},
    })},
}, ["selector", "endpoints"])

# --- podid standalone mode (podid-api/src/local.rs) ----------------------------
LOCAL_WORKLOAD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "podid.dev/v1alpha1"},
        "kind": {"const": "LocalWorkload"},
        "metadata": _closed({"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                             "labels": STRING_MAP}, ["name"]),
        "spec": _closed({"cgroup": {"type": "string", "minLength": 1, "pattern": r"^[^/]"}}, ["cgroup"]),
    },
}

EXTRA: dict[tuple[str, str], dict] = {
    ("projectcalico.org/v3", "NetworkPolicy"): _object("projectcalico.org/v3", "NetworkPolicy", NETWORK_POLICY_SPEC, True),
    ("projectcalico.org/v3", "GlobalNetworkPolicy"): _object("projectcalico.org/v3", "GlobalNetworkPolicy", GLOBAL_NETWORK_POLICY_SPEC, False),
    ("projectcalico.org/v3", "Tier"): _object("projectcalico.org/v3", "Tier", TIER_SPEC, False),
    ("projectcalico.org/v3", "GlobalNetworkSet"): _object("projectcalico.org/v3", "GlobalNetworkSet", NETWORK_SET_SPEC, False),
    ("projectcalico.org/v3", "NetworkSet"): _object("projectcalico.org/v3", "NetworkSet", NETWORK_SET_SPEC, True),
    ("projectcalico.org/v3", "HostEndpoint"): _object("projectcalico.org/v3", "HostEndpoint", HOST_ENDPOINT_SPEC, False),
    ("projectcalico.org/v3", "FelixConfiguration"): _object("projectcalico.org/v3", "FelixConfiguration", FELIX_CONFIGURATION_SPEC, False),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _object("monitoring.coreos.com/v1", "ServiceMonitor", SERVICE_MONITOR_SPEC, True),
    ("podid.dev/v1alpha1", "LocalWorkload"): LOCAL_WORKLOAD,
}


def calico_selector_ok(selector: str) -> bool:
    """A light check of a Calico selector: quotes and parentheses balance and
    the expression is not empty. (Calico's grammar is richer; this catches the
    usual editing slips.)"""
    if not selector.strip():
        return False
    depth, quote = 0, None
    for ch in selector:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and quote is None
