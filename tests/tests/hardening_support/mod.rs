//! Shared pieces of the hardening suites (`hardening_*.rs`): a node with
//! three workloads bound to different identities, helpers that read a
//! probe's report, and the one invariant every hardening test checks: a
//! workload only ever receives tokens of the identity bound to the cgroup
//! that made the connection.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use podid_tests::{
    emulator::{EmulatorConfig, ManagedIdentity, RegisteredClient, is_node_token, token_claims},
    harness::{AgentHarness, HarnessOptions, HarnessSpec},
    probe::ProbeSpec,
};
use serde_json::Value;

/// The api-version every hardening probe sends. The agent always asks IMDS
/// with 2018-02-01, so an IMDS request with this version came straight from
/// a workload: it reached "the real IMDS" without the agent.
pub const MARKER_API_VERSION: &str = "2021-12-13";
/// The resource hardening probes ask for.
pub const RESOURCE: &str = "https://vault.azure.net";
/// Tenant of the service principal.
pub const SP_TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// The service principal's client secret (must never appear in any output).
pub const SP_SECRET: &str = "sp-client-secret-d6f1c0a4b5e3";

/// The identities of the box: `alpha` and `beta` user-assigned, `sp` a
/// service principal with a client secret.
pub struct Ids {
    pub alpha: ManagedIdentity,
    pub beta: ManagedIdentity,
    pub sp_client_id: String,
}

impl Ids {
    pub fn new() -> Self {
        Self {
            alpha: ManagedIdentity::user_assigned("alpha-identity"),
            beta: ManagedIdentity::user_assigned("beta-identity"),
            sp_client_id: podid_tests::emulator::random_guid(),
        }
    }
}

/// Workloads: `apps/alpha` → alpha, `apps/beta` → beta, `apps/sp` → the
/// service principal, `apps/gamma` → a selector nothing binds; `apps/stranger`
/// is a cgroup that is no workload.
pub fn workloads_yaml(ids: &Ids) -> String {
    let mut yaml = String::new();
    for (name, identity) in [("alpha", &ids.alpha), ("beta", &ids.beta)] {
        yaml.push_str(&format!(
            r#"---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: {name}-identity}}
spec: {{type: 0, resourceID: "{res}", clientID: "{cid}"}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: {name}-binding}}
spec: {{azureIdentity: {name}-identity, selector: {name}}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: {name}, namespace: default, labels: {{aadpodidbinding: {name}}}}}
spec: {{cgroup: apps/{name}}}
"#,
            res = identity.resource_id,
            cid = identity.client_id,
        ));
    }
    yaml.push_str(&format!(
        r#"---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentity
metadata: {{name: sp-identity}}
spec:
  type: 1
  tenantID: "{SP_TENANT}"
  clientID: "{sp}"
  clientPassword: {{name: sp-secret, namespace: default}}
---
apiVersion: "aadpodidentity.k8s.io/v1"
kind: AzureIdentityBinding
metadata: {{name: sp-binding}}
spec: {{azureIdentity: sp-identity, selector: sp}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: sp, namespace: default, labels: {{aadpodidbinding: sp}}}}
spec: {{cgroup: apps/sp}}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {{name: gamma, namespace: default, labels: {{aadpodidbinding: nothing-binds-this}}}}
spec: {{cgroup: apps/gamma}}
"#,
        sp = ids.sp_client_id,
    ));
    yaml
}

/// The harness spec for [`Ids`], with extra agent arguments.
pub fn spec(ids: &Ids, agent_args: &[&str]) -> HarnessSpec {
    let mut args: Vec<String> = vec!["--aad-authority".into(), "http://169.254.169.254".into()];
    args.extend(agent_args.iter().map(|s| s.to_string()));
    HarnessSpec {
        workloads_yaml: workloads_yaml(ids),
        cgroups: [
            "apps/alpha",
            "apps/beta",
            "apps/sp",
            "apps/gamma",
            "apps/stranger",
        ]
        .map(String::from)
        .to_vec(),
        emulator: EmulatorConfig::default()
            .with_user_assigned(ids.alpha.clone())
            .with_user_assigned(ids.beta.clone())
            .with_client(RegisteredClient::with_secret(
                SP_TENANT,
                &ids.sp_client_id,
                SP_SECRET,
            )),
        secrets: vec![(
            "default/sp-secret/clientsecret".into(),
            SP_SECRET.as_bytes().to_vec(),
        )],
        agent_args: args,
    }
}

/// Starts the box.
pub fn start(agent_args: &[&str]) -> (AgentHarness, Ids) {
    start_with(agent_args, HarnessOptions::default())
}

/// Set to `pod-netns` (as `cargo xtask test` does for its second run of the
/// hardening suites): every case runs again with the agent in zero-policy
/// mode and each workload in a pod's own network namespace on the pod
/// network, reaching the listener the agent opened there.
pub const LISTEN_MODE_ENV: &str = "PODID_HARDENING_LISTEN_MODE";

/// Whether this run is the zero-policy run ([`LISTEN_MODE_ENV`]).
pub fn zero_policy() -> bool {
    match std::env::var(LISTEN_MODE_ENV).as_deref() {
        Ok("pod-netns") => true,
        Ok("node") | Err(_) => false,
        Ok(other) => panic!("{LISTEN_MODE_ENV}={other}: expected node or pod-netns"),
    }
}

/// Starts the box with options (in zero-policy mode when
/// [`zero_policy`]).
pub fn start_with(agent_args: &[&str], options: HarnessOptions) -> (AgentHarness, Ids) {
    let options = if zero_policy() {
        HarnessOptions {
            pods: Some(options.pods.unwrap_or(1)),
            pod_netns_mode: true,
            workloads_in_pod: true,
            ..options
        }
    } else {
        options
    };
    let ids = Ids::new();
    let harness = AgentHarness::start_with(spec(&ids, agent_args), options);
    (harness, ids)
}

/// Whether `peer` (a probe's `peer`, perhaps `[::ffff:a.b.c.d]:p`) is where
/// the redirect must deliver a workload's connection: the agent's node
/// listener, or in zero-policy mode the listener the agent opened in the
/// pod's own namespace (an address of 127.64.0.0/10 on the pod listener
/// port).
pub fn is_agent_peer(harness: &AgentHarness, peer: &str) -> bool {
    let plain = peer.trim_start_matches("[::ffff:").replace(']', "");
    if !zero_policy() {
        return plain == harness.agent_addr();
    }
    plain.parse::<std::net::SocketAddrV4>().is_ok_and(|addr| {
        podid_agent::pod_listeners::is_pod_listener_address(*addr.ip()) && addr.port() == 2579
    })
}

/// Where a token request from `cgroup` was delivered (its `peer`): the
/// address a workload would have to take to pose as the agent.
pub fn redirected_peer(cgroup: &std::path::Path) -> std::net::SocketAddrV4 {
    let report = token_probe(None).run_in(cgroup);
    report["peer"]
        .as_str()
        .map(|p| p.trim_start_matches("[::ffff:").replace(']', ""))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no peer in {report}"))
}

/// A token query with the marker api-version, optionally naming a client id.
pub fn query(resource: &str, client_id: Option<&str>) -> String {
    let mut q = format!("api-version={MARKER_API_VERSION}&resource={resource}");
    if let Some(id) = client_id {
        q.push_str("&client_id=");
        q.push_str(id);
    }
    q
}

/// A well-formed token request (marker api-version) for `RESOURCE`.
pub fn token_probe(client_id: Option<&str>) -> ProbeSpec {
    ProbeSpec::token_request(&query(RESOURCE, client_id))
}

/// (status, parsed body) of a probe report (`0`, `Null` when there is none).
pub fn status_body(report: &Value) -> (u16, Value) {
    let status = report["status"].as_u64().unwrap_or(0) as u16;
    let body = report["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, body)
}

/// The client id a token was issued to (its `appid` claim).
pub fn appid(token: &str) -> String {
    token_claims(token)
        .and_then(|c| c["appid"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("<not an emulator token: {token:.20}>"))
}

/// Every access token anywhere in a probe report (single report, `results`
/// of a concurrent probe, `tokens` of a repeat summary, `handoff`).
pub fn tokens_in(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_tokens(report, &mut out);
    out
}

fn collect_tokens(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("access_token", Value::String(t)) => out.push(t.clone()),
                    ("body", Value::String(b)) => {
                        if let Ok(parsed) = serde_json::from_str::<Value>(b) {
                            collect_tokens(&parsed, out);
                        }
                    }
                    ("tokens", Value::Array(list)) => {
                        out.extend(list.iter().filter_map(|t| t.as_str().map(str::to_string)));
                    }
                    _ => collect_tokens(v, out),
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_tokens(v, out)),
        _ => {}
    }
}

/// Tallies across a test: how many inputs were tried, how many tokens were
/// seen, how many belonged to another identity, and how many of those to the
/// node's own identity (both must stay 0).
#[derive(Default)]
pub struct Tally {
    pub inputs: AtomicU64,
    pub tokens: AtomicU64,
    pub wrong: AtomicU64,
    pub node: AtomicU64,
}

impl Tally {
    /// Checks every token in `report` against `expected` (the client id bound
    /// to the cgroup that connected), counting and panicking on a mismatch.
    pub fn check(&self, what: &str, report: &Value, expected: &str) {
        self.inputs.fetch_add(1, Ordering::Relaxed);
        for token in tokens_in(report) {
            self.tokens.fetch_add(1, Ordering::Relaxed);
            let got = appid(&token);
            if is_node_token(&token) {
                self.node.fetch_add(1, Ordering::Relaxed);
                self.wrong.fetch_add(1, Ordering::Relaxed);
                panic!(
                    "{what}: NODE IDENTITY: got a token for the node's own identity {got}: {report}"
                );
            }
            if !got.eq_ignore_ascii_case(expected) {
                self.wrong.fetch_add(1, Ordering::Relaxed);
                panic!(
                    "{what}: WRONG IDENTITY: got a token for {got}, expected {expected}: {report}"
                );
            }
        }
    }

    /// Prints the figures (collected into docs/security.md).
    pub fn report(&self, test: &str) {
        eprintln!(
            "FIGURES {test}: inputs={} tokens={} wrong_identity_tokens={} node_identity_tokens={}",
            self.inputs.load(Ordering::Relaxed),
            self.tokens.load(Ordering::Relaxed),
            self.wrong.load(Ordering::Relaxed),
            self.node.load(Ordering::Relaxed)
        );
    }
}

/// Asserts that no request reached the emulated IMDS straight from a
/// workload (see [`MARKER_API_VERSION`]).
pub fn assert_no_direct_imds(harness: &AgentHarness) {
    let direct: Vec<_> = harness
        .emulator
        .requests()
        .into_iter()
        .filter(|r| r.api_version.as_deref() == Some(MARKER_API_VERSION))
        .collect();
    assert!(
        direct.is_empty(),
        "workloads reached the real IMDS without the agent: {direct:?}"
    );
}

/// The value of a metric line `name{labels} value` (exact name+labels), or 0.
pub fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Outcome counts of a `--repeat-ms` summary.
pub fn outcomes(report: &Value) -> BTreeMap<String, u64> {
    report["outcomes"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// A stand-in for an IMDS that canonicalises request paths before routing,
/// as a front end like HTTP.sys does: percent-decoding (repeatedly),
/// `\` → `/`, collapsing `//`, resolving `.` and `..`. It forwards every
/// request, with the canonical path, to `upstream` (the emulator), and counts
/// the requests whose path it had to change.
pub struct LenientImds {
    pub addr: SocketAddr,
    pub rewritten: Arc<AtomicU64>,
}

/// The canonical form of a request path, as a lenient server computes it.
pub fn canonical_path(raw: &str) -> String {
    let mut path = raw.to_string();
    for _ in 0..4 {
        let decoded = percent_encoding::percent_decode_str(&path)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == path {
            break;
        }
        path = decoded;
    }
    let path = path.replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

impl LenientImds {
    /// Serves on `listen` (inside the harness's namespace), forwarding to
    /// `upstream`.
    pub fn start(harness: &AgentHarness, listen: SocketAddr, upstream: SocketAddr) -> Self {
        let rewritten = Arc::new(AtomicU64::new(0));
        let counter = rewritten.clone();
        let listener = harness
            .block_on(tokio::net::TcpListener::bind(listen))
            .expect("bind the lenient IMDS front");
        let addr = listener.local_addr().expect("front address");
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        harness.block_on(async move {
            // Runs on the harness's runtime for as long as the harness lives.
            let _serving =
                podid_tests::http_server::serve(listener, move |request: http::Request<Bytes>| {
                    let client = client.clone();
                    let counter = counter.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let raw = parts.uri.path();
                        let canonical = canonical_path(raw);
                        if canonical != raw {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        let query = parts
                            .uri
                            .query()
                            .map(|q| format!("?{q}"))
                            .unwrap_or_default();
                        let uri: http::Uri = format!("http://{upstream}{canonical}{query}")
                            .parse()
                            .unwrap_or_else(|_| {
                                format!("http://{upstream}/").parse().expect("uri")
                            });
                        let mut forwarded = http::Request::new(Full::new(body));
                        *forwarded.method_mut() = parts.method;
                        *forwarded.uri_mut() = uri;
                        *forwarded.headers_mut() = parts.headers;
                        forwarded.headers_mut().remove(http::header::HOST);
                        match client.request(forwarded).await {
                            Ok(response) => {
                                let (parts, body) = response.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                http::Response::from_parts(parts, Full::new(body))
                            }
                            Err(_) => {
                                let mut r = http::Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                                r
                            }
                        }
                    }
                });
        });
        Self { addr, rewritten }
    }
}

/// Waits (bounded) until `probe` returns something.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
