//! The ARM emulator: state, request handling and the HTTP server.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

/// VM or scale set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `virtualMachines`.
    VirtualMachine,
    /// `virtualMachineScaleSets`.
    ScaleSet,
}

impl ResourceKind {
    fn segment(self) -> &'static str {
        match self {
            ResourceKind::VirtualMachine => "virtualMachines",
            ResourceKind::ScaleSet => "virtualMachineScaleSets",
        }
    }
}

/// How long-running operations are announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LroStyle {
    /// `Azure-AsyncOperation` header; the status URL answers
    /// `{"status":"InProgress|Succeeded|Failed"}`.
    AsyncOperation,
    /// `Location` header; the URL answers 202 until done, then 200.
    Location,
}

/// Emulator settings.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Added before every ARM answer (not token answers).
    pub latency: Duration,
    /// How long an identity update takes to complete.
    pub lro_duration: Duration,
    /// How updates are announced.
    pub lro_style: LroStyle,
    /// `Retry-After` (seconds) on operation answers, if any.
    pub lro_retry_after: Option<u64>,
    /// Identities allowed in one request (ARM: 150).
    pub max_identities_per_request: usize,
    /// Reject ARM calls without a bearer token this emulator issued.
    pub require_auth: bool,
    /// Location used in operation URLs.
    pub location: String,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            latency: Duration::ZERO,
            lro_duration: Duration::from_millis(20),
            lro_style: LroStyle::AsyncOperation,
            lro_retry_after: None,
            max_identities_per_request: 150,
            require_auth: true,
            location: "westeurope".into(),
        }
    }
}

/// An injected failure for the next matching ARM requests.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Only requests with this method (`GET`, `PATCH`), if set.
    pub method: Option<String>,
    /// Only requests whose path contains this (case-insensitive), if set.
    pub path_contains: Option<String>,
    /// How many requests it applies to.
    pub count: usize,
    /// HTTP status to answer (429, 500, …).
    pub status: u16,
    /// `Retry-After` seconds to send with it.
    pub retry_after: Option<u64>,
}

/// One request the emulator received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Method.
    pub method: String,
    /// Path (as sent).
    pub path: String,
    /// Query string.
    pub query: String,
    /// Raw body bytes, exactly as received.
    pub body: Bytes,
    /// Status answered.
    pub status: u16,
    /// When it arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// Whether this is a GET or PATCH of a VM or scale set (not an
    /// operation poll or token request).
    pub fn is_resource(&self) -> bool {
        let p = self.path.to_ascii_lowercase();
        (p.contains("/virtualmachines/") || p.contains("/virtualmachinescalesets/"))
            && !p.contains("/operations/")
    }

    /// Whether this is a PATCH of the named VM or scale set.
    pub fn is_patch_of(&self, name: &str) -> bool {
        self.method == "PATCH"
            && self.is_resource()
            && self
                .path
                .to_ascii_lowercase()
                .ends_with(&format!("/{}", name.to_ascii_lowercase()))
    }
}

/// `/subscriptions/{sub}/resourcegroups/{rg}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}`.
pub fn uami_id(subscription: &str, resource_group: &str, name: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

#[derive(Debug)]
struct Resource {
    kind: ResourceKind,
    id: String,
    name: String,
    subscription: String,
    system_assigned: bool,
    user_assigned: BTreeMap<String, String>,
    operation: Option<String>,
}

#[derive(Debug)]
struct Operation {
    resource: String,
    started: Instant,
    result: Result<(bool, BTreeMap<String, String>), (String, String)>,
    done: bool,
}

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
    operations: HashMap<String, Operation>,
    invalid: BTreeSet<String>,
    faults: Vec<Fault>,
    fail_operations: BTreeMap<String, usize>,
    log: Vec<RecordedRequest>,
    tokens: BTreeSet<String>,
    token_requests: usize,
    next_id: u64,
}

struct Inner {
    config: Mutex<EmulatorConfig>,
    state: Mutex<State>,
    base: String,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn config(&self) -> EmulatorConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A running ARM emulator on 127.0.0.1. Stops when dropped.
pub struct ArmEmulator {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ArmEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn resource_key(
    kind: ResourceKind,
    subscription: &str,
    resource_group: &str,
    name: &str,
) -> String {
    format!(
        "/subscriptions/{subscription}/resourcegroups/{resource_group}/providers/microsoft.compute/{}/{name}",
        kind.segment()
    )
    .to_ascii_lowercase()
}

fn arm_error(status: u16, code: &str, message: &str) -> (u16, Vec<(String, String)>, Value) {
    (
        status,
        Vec::new(),
        json!({"error": {"code": code, "message": message}}),
    )
}

impl ArmEmulator {
    /// Starts on `127.0.0.1:port` (0 for any free port).
    pub async fn start_on(port: u16, config: EmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            config: Mutex::new(config),
            state: Mutex::new(State::default()),
            base: format!("http://{addr}"),
        });
        let served = inner.clone();
        let task = crate::http_server::serve(listener, move |request| {
            let inner = served.clone();
            async move { handle(&inner, request).await }
        });
        Ok(ArmEmulator { inner, addr, task })
    }

    /// Starts on a free port of 127.0.0.1.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Self> {
        Self::start_on(0, config).await
    }

    /// `http://127.0.0.1:PORT` (ARM, IMDS and Entra ID endpoints alike).
    pub fn url(&self) -> String {
        self.inner.base.clone()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the latency added to every ARM answer.
    pub fn set_latency(&self, latency: Duration) {
        self.inner
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latency = latency;
    }

    /// Adds (or resets) a VM or scale set with these identities.
    pub fn add_resource(
        &self,
        kind: ResourceKind,
        subscription: &str,
        resource_group: &str,
        name: &str,
        system_assigned: bool,
        user_assigned: &[String],
    ) {
        let key = resource_key(kind, subscription, resource_group, name);
        let id = format!(
            "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/{}/{name}",
            kind.segment()
        );
        self.inner.state().resources.insert(
            key,
            Resource {
                kind,
                id,
                name: name.to_string(),
                subscription: subscription.to_string(),
                system_assigned,
                user_assigned: user_assigned
                    .iter()
                    .map(|i| (i.to_ascii_lowercase(), i.clone()))
                    .collect(),
                operation: None,
            },
        );
    }

    /// The lower-cased user-assigned identities of a resource (after any
    /// finished operation), or None if it does not exist.
    pub fn identities(
        &self,
        kind: ResourceKind,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Option<BTreeSet<String>> {
        let key = resource_key(kind, subscription, resource_group, name);
        let mut state = self.inner.state();
        settle(&mut state, &self.inner.config(), &key);
        state
            .resources
            .get(&key)
            .map(|r| r.user_assigned.keys().cloned().collect())
    }

    /// Whether the system-assigned identity is on.
    pub fn system_assigned(
        &self,
        kind: ResourceKind,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Option<bool> {
        let key = resource_key(kind, subscription, resource_group, name);
        let mut state = self.inner.state();
        settle(&mut state, &self.inner.config(), &key);
        state.resources.get(&key).map(|r| r.system_assigned)
    }

    /// Removes an identity behind the controller's back (`az vmss identity remove`).
    pub fn remove_out_of_band(
        &self,
        kind: ResourceKind,
        subscription: &str,
        resource_group: &str,
        name: &str,
        identity: &str,
    ) -> bool {
        let key = resource_key(kind, subscription, resource_group, name);
        let mut state = self.inner.state();
        settle(&mut state, &self.inner.config(), &key);
        state.resources.get_mut(&key).is_some_and(|r| {
            r.user_assigned
                .remove(&identity.to_ascii_lowercase())
                .is_some()
        })
    }

    /// Makes PATCHes that add this identity fail with `FailedIdentityOperation`
    /// (it "does not exist").
    pub fn mark_invalid(&self, identity: &str) {
        self.inner
            .state()
            .invalid
            .insert(identity.to_ascii_lowercase());
    }

    /// Injects a fault for the next matching ARM requests.
    pub fn inject(&self, fault: Fault) {
        self.inner.state().faults.push(fault);
    }

    /// Makes the next `count` identity updates of the named resource end in
    /// a failed long-running operation (nothing changes).
    pub fn fail_next_operations(&self, name: &str, count: usize) {
        self.inner
            .state()
            .fail_operations
            .insert(name.to_ascii_lowercase(), count);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.state().log.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.inner.state().log.clear();
    }

    /// Number of requests with `method` on VMs / scale sets (not polls).
    pub fn resource_calls(&self, method: &str) -> usize {
        self.inner
            .state()
            .log
            .iter()
            .filter(|r| r.method == method && r.is_resource())
            .count()
    }

    /// PATCH requests of the named VM / scale set.
    pub fn patches_of(&self, name: &str) -> usize {
        self.inner
            .state()
            .log
            .iter()
            .filter(|r| r.is_patch_of(name))
            .count()
    }

    /// Token requests served.
    pub fn token_requests(&self) -> usize {
        self.inner.state().token_requests
    }
}

/// Applies a finished operation of `key`, if its time has come.
fn settle(state: &mut State, config: &EmulatorConfig, key: &str) {
    let Some(op_id) = state.resources.get(key).and_then(|r| r.operation.clone()) else {
        return;
    };
    let ready = state
        .operations
        .get(&op_id)
        .is_some_and(|op| op.started.elapsed() >= config.lro_duration);
    if !ready {
        return;
    }
    let Some(op) = state.operations.get_mut(&op_id) else {
        return;
    };
    op.done = true;
    let result = op.result.clone();
    if let Some(resource) = state.resources.get_mut(key) {
        resource.operation = None;
        if let Ok((system, user)) = result {
            resource.system_assigned = system;
            resource.user_assigned = user;
        }
    }
}

fn resource_body(
    resource: &Resource,
    location: &str,
    provisioning: &str,
    system: bool,
    user: &BTreeMap<String, String>,
) -> Value {
    let kind = match (system, !user.is_empty()) {
        (true, true) => "SystemAssigned, UserAssigned",
        (false, true) => "UserAssigned",
        (true, false) => "SystemAssigned",
        (false, false) => "None",
    };
    let mut identity = Map::new();
    identity.insert("type".into(), json!(kind));
    if system {
        identity.insert(
            "principalId".into(),
            json!(format!("principal-{}", resource.name)),
        );
        identity.insert("tenantId".into(), json!("tenant"));
    }
    if !user.is_empty() {
        let map: Map<String, Value> = user
            .values()
            .map(|id| {
                let name = id.rsplit('/').next().unwrap_or_default();
                (
                    id.clone(),
                    json!({"principalId": format!("p-{name}"), "clientId": format!("c-{name}")}),
                )
            })
            .collect();
        identity.insert("userAssignedIdentities".into(), Value::Object(map));
    }
    let mut body = json!({
        "id": resource.id,
        "name": resource.name,
        "type": format!("Microsoft.Compute/{}", resource.kind.segment()),
        "location": location,
        "properties": {"provisioningState": provisioning},
    });
    if kind != "None" {
        body["identity"] = Value::Object(identity);
    }
    body
}

fn reply(status: u16, headers: Vec<(String, String)>, body: Value) -> Response<Full<Bytes>> {
    let bytes = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(name.as_bytes()),
            hyper::header::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

async fn handle(inner: &Inner, request: Request<Bytes>) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let headers = request.headers().clone();
    let arrived = Instant::now();
    let body = request.into_body();
    let config = inner.config();
    let lower = path.to_ascii_lowercase();

    // Token endpoints (not counted as ARM calls, no latency).
    if lower == "/metadata/identity/oauth2/token" {
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            return reply(
                400,
                vec![],
                json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}),
            );
        }
        return issue_token(inner, true);
    }
    if lower.ends_with("/oauth2/v2.0/token") && method == "POST" {
        let form: HashMap<String, String> =
            url::form_urlencoded::parse(&body).into_owned().collect();
        if form.get("grant_type").map(String::as_str) != Some("client_credentials")
            || !form.contains_key("client_id")
        {
            return reply(400, vec![], json!({"error": "invalid_request"}));
        }
        return issue_token(inner, false);
    }

    if !config.latency.is_zero() {
        tokio::time::sleep(config.latency).await;
    }
    let (status, extra_headers, value) =
        arm(inner, &config, &method, &path, &query, &headers, &body);
    inner.state().log.push(RecordedRequest {
        method,
        path,
        query,
        body,
        status,
        at: arrived,
    });
    reply(status, extra_headers, value)
}

fn issue_token(inner: &Inner, imds: bool) -> Response<Full<Bytes>> {
    let mut state = inner.state();
    state.next_id += 1;
    state.token_requests += 1;
    let token = format!("emulated-token-{}", state.next_id);
    state.tokens.insert(token.clone());
    let expires_on = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    if imds {
        reply(
            200,
            vec![],
            json!({"access_token": token, "expires_on": expires_on.to_string(), "expires_in": "3600", "token_type": "Bearer", "resource": "https://management.azure.com/"}),
        )
    } else {
        reply(
            200,
            vec![],
            json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}),
        )
    }
}

fn arm(
    inner: &Inner,
    config: &EmulatorConfig,
    method: &str,
    path: &str,
    query: &str,
    headers: &hyper::HeaderMap,
    body: &Bytes,
) -> (u16, Vec<(String, String)>, Value) {
    let mut state = inner.state();
    if config.require_auth {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !token.is_some_and(|t| state.tokens.contains(t)) {
            return arm_error(
                401,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing or invalid.",
            );
        }
    }
    let lower = path.to_ascii_lowercase();
    // Injected faults.
    if let Some(index) = state.faults.iter().position(|f| {
        f.count > 0
            && f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && f.path_contains
                .as_deref()
                .is_none_or(|p| lower.contains(&p.to_ascii_lowercase()))
    }) {
        let fault = state.faults[index].clone();
        state.faults[index].count -= 1;
        let mut headers = Vec::new();
        if let Some(seconds) = fault.retry_after {
            headers.push(("retry-after".to_string(), seconds.to_string()));
        }
        let code = if fault.status == 429 {
            "TooManyRequests"
        } else {
            "InternalServerError"
        };
        let message = if fault.status == 429 {
            format!(
                "The request is being throttled. Retry after {} seconds.",
                fault.retry_after.unwrap_or(0)
            )
        } else {
            "An internal execution error occurred.".to_string()
        };
        return (
            fault.status,
            headers,
            json!({"error": {"code": code, "message": message}}),
        );
    }
    if !query.contains("api-version=") {
        return arm_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        );
    }

    // Operation status.
    if let Some(op_id) = lower
        .split("/operations/")
        .nth(1)
        .filter(|_| lower.contains("/providers/microsoft.compute/locations/"))
    {
        let op_id = op_id.to_string();
        let Some(resource_key) = state.operations.get(&op_id).map(|op| op.resource.clone()) else {
            return arm_error(404, "NotFound", "operation not found");
        };
        settle(&mut state, config, &resource_key);
        let Some(op) = state.operations.get(&op_id) else {
            return arm_error(404, "NotFound", "operation not found");
        };
        let mut extra = Vec::new();
        if let Some(seconds) = config.lro_retry_after {
            extra.push(("retry-after".to_string(), seconds.to_string()));
        }
        let monitor = query.contains("monitor=true");
        if !op.done {
            if monitor {
                extra.push((
                    "location".to_string(),
                    format!("{}{}?{}", inner.base, path, query),
                ));
                return (202, extra, Value::Null);
            }
            return (200, extra, json!({"name": op_id, "status": "InProgress"}));
        }
        return match &op.result {
            Ok(_) => {
                if monitor {
                    (200, extra, Value::Null)
                } else {
                    (200, extra, json!({"name": op_id, "status": "Succeeded"}))
                }
            }
            Err((code, message)) => {
                if monitor {
                    (
                        400,
                        extra,
                        json!({"error": {"code": code, "message": message}}),
                    )
                } else {
                    (
                        200,
                        extra,
                        json!({"name": op_id, "status": "Failed", "error": {"code": code, "message": message}}),
                    )
                }
            }
        };
    }

    // VM / scale set.
    let parts: Vec<&str> = lower.split('/').filter(|p| !p.is_empty()).collect();
    let kind = match parts.get(6) {
        Some(&"virtualmachines") => ResourceKind::VirtualMachine,
        Some(&"virtualmachinescalesets") => ResourceKind::ScaleSet,
        _ => return arm_error(404, "InvalidResourceType", "unknown resource type"),
    };
    if parts.len() != 8
        || parts[0] != "subscriptions"
        || parts[2] != "resourcegroups"
        || parts[5] != "microsoft.compute"
    {
        return arm_error(404, "InvalidResourceType", "unknown resource path");
    }
    let key = resource_key(kind, parts[1], parts[3], parts[7]);
    settle(&mut state, config, &key);
    let Some(resource) = state.resources.get(&key) else {
        return arm_error(
            404,
            "ResourceNotFound",
            &format!("The Resource '{path}' was not found."),
        );
    };
    match method {
        "GET" => {
            let provisioning = if resource.operation.is_some() {
                "Updating"
            } else {
                "Succeeded"
            };
            (
                200,
                vec![],
                resource_body(
                    resource,
                    &config.location,
                    provisioning,
                    resource.system_assigned,
                    &resource.user_assigned,
                ),
            )
        }
        "PATCH" => patch(inner, &mut state, config, &key, body),
        _ => arm_error(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn patch(
    inner: &Inner,
    state: &mut State,
    config: &EmulatorConfig,
    key: &str,
    body: &Bytes,
) -> (u16, Vec<(String, String)>, Value) {
    let Some(resource) = state.resources.get(key) else {
        return arm_error(404, "ResourceNotFound", "not found");
    };
    if resource.operation.is_some() {
        return arm_error(
            409,
            "OperationNotAllowed",
            "Operation 'Update' is not allowed since another operation is in progress on this resource.",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return arm_error(
            400,
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        );
    };
    let mut system = resource.system_assigned;
    let mut user = resource.user_assigned.clone();
    if let Some(identity) = request.get("identity").filter(|v| !v.is_null()) {
        let Some(kind) = identity.get("type").and_then(Value::as_str) else {
            return arm_error(400, "InvalidParameter", "identity.type is required");
        };
        let parts: Vec<String> = kind
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .collect();
        let (want_system, want_user) = match parts
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["none"] => (false, false),
            ["systemassigned"] => (true, false),
            ["userassigned"] => (false, true),
            ["systemassigned", "userassigned"] | ["userassigned", "systemassigned"] => (true, true),
            _ => {
                return arm_error(
                    400,
                    "InvalidParameter",
                    &format!("Unsupported identity type '{kind}'."),
                );
            }
        };
        system = want_system;
        let map = match identity.get("userAssignedIdentities") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => {
                return arm_error(
                    400,
                    "InvalidParameter",
                    "userAssignedIdentities must be an object",
                );
            }
        };
        if map.len() > config.max_identities_per_request {
            return arm_error(
                400,
                "BadRequest",
                &format!(
                    "User Assigned Identities Number '{}' Assign exceed limit '{}' in one request.",
                    map.len(),
                    config.max_identities_per_request
                ),
            );
        }
        if !want_user {
            if map.values().any(|v| !v.is_null()) {
                return arm_error(
                    400,
                    "InvalidParameter",
                    &format!("userAssignedIdentities cannot be set with identity type '{kind}'."),
                );
            }
            user.clear();
        } else {
            let mut invalid = Vec::new();
            for (id, value) in &map {
                if value.is_null() {
                    user.remove(&id.to_ascii_lowercase());
                } else {
                    if state.invalid.contains(&id.to_ascii_lowercase()) {
                        invalid.push(id.clone());
                    }
                    user.insert(id.to_ascii_lowercase(), id.clone());
                }
            }
            if !invalid.is_empty() {
                let named = invalid
                    .iter()
                    .map(|id| format!("Resource '{id}' does not exist."))
                    .collect::<Vec<_>>()
                    .join(" ");
                return arm_error(
                    400,
                    "FailedIdentityOperation",
                    &format!(
                        "Identity operation for resource '{}' failed with error 'Failed to perform resource identity operation. Status: 'NotFound'. Response: '{{\"error\":{{\"code\":\"NotFound\",\"message\":\"{named}\"}}}}'.'.",
                        resource.id
                    ),
                );
            }
            if user.is_empty() {
                return arm_error(
                    400,
                    "InvalidParameter",
                    &format!(
                        "Identity type '{kind}' requires at least one user assigned identity."
                    ),
                );
            }
        }
    }
    state.next_id += 1;
    let op_id = format!("op-{}", state.next_id);
    let name = resource.name.to_ascii_lowercase();
    let subscription = resource.subscription.clone();
    let failing = state.fail_operations.get(&name).copied().unwrap_or(0);
    let result = if failing > 0 {
        state.fail_operations.insert(name, failing - 1);
        Err((
            "InternalOperationError".to_string(),
            "The identity update failed.".to_string(),
        ))
    } else {
        Ok((system, user.clone()))
    };
    state.operations.insert(
        op_id.clone(),
        Operation {
            resource: key.to_string(),
            started: Instant::now(),
            result,
            done: false,
        },
    );
    let Some(resource) = state.resources.get_mut(key) else {
        return arm_error(404, "ResourceNotFound", "not found");
    };
    resource.operation = Some(op_id.clone());
    let operation_url = format!(
        "{}/subscriptions/{subscription}/providers/Microsoft.Compute/locations/{}/operations/{op_id}",
        inner.base, config.location
    );
    let mut headers = Vec::new();
    match config.lro_style {
        LroStyle::AsyncOperation => headers.push((
            "azure-asyncoperation".to_string(),
            format!("{operation_url}?api-version=2024-07-01"),
        )),
        LroStyle::Location => headers.push((
            "location".to_string(),
            format!("{operation_url}?monitor=true&api-version=2024-07-01"),
        )),
    }
    if let Some(seconds) = config.lro_retry_after {
        headers.push(("retry-after".to_string(), seconds.to_string()));
    }
    let body = resource_body(resource, &config.location, "Updating", system, &user);
    (200, headers, body)
}
