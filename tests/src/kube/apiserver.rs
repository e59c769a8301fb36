//! An in-memory Kubernetes API server for the agent's tests.
//!
//! It answers what kube-rs sends the way the API server does, for the
//! resources the agent uses: list (with label and field selectors) and watch
//! (history after a `resourceVersion`, then live events, `410 Gone` for a
//! compacted version), get, create, merge patch (with a `resourceVersion`
//! precondition), replace and delete. Objects are kept as JSON.
//!
//! Tests drive it from the outside: they write objects, drop or refuse
//! watches, compact the history (forcing a relist) and read back every call
//! the client made, as (verb, group, resource), to check the RBAC it needs.
//!
//! The same server is reachable in-process ([`FakeApiServer::client`], a
//! tower-test mock pair behind a real `kube::Client`) and over plain HTTP
//! ([`FakeApiServer::serve_http`]), for the agent binary.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use super::merge_patch::merge;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

type ResponseBody = BoxBody<Bytes, Infallible>;

/// A resource the server knows: (group, version, plural, kind, namespaced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
    },
    Kind {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Kind {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    Kind {
        group: "aadpodidentity.k8s.io",
        version: "v1",
        plural: "azureidentities",
        kind: "AzureIdentity",
        namespaced: true,
    },
    Kind {
        group: "aadpodidentity.k8s.io",
        version: "v1",
        plural: "azureidentitybindings",
        kind: "AzureIdentityBinding",
        namespaced: true,
    },
    Kind {
        group: "aadpodidentity.k8s.io",
        version: "v1",
        plural: "azureassignedidentities",
        kind: "AzureAssignedIdentity",
        namespaced: true,
    },
    Kind {
        group: "aadpodidentity.k8s.io",
        version: "v1",
        plural: "azurepodidentityexceptions",
        kind: "AzurePodIdentityException",
        namespaced: true,
    },
];

impl Kind {
    fn find(group: &str, plural: &str) -> Option<Kind> {
        KINDS
            .iter()
            .copied()
            .find(|k| k.group == group && k.plural == plural)
    }

    fn of<K: kube::Resource<DynamicType = ()>>() -> Kind {
        let group = K::group(&());
        let plural = K::plural(&());
        Kind::find(&group, &plural)
            .unwrap_or_else(|| panic!("the fake API server does not serve {plural}.{group}"))
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One request the client made.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiCall {
    /// RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// API group, empty for core.
    pub group: String,
    /// Plural resource name.
    pub resource: String,
    /// Namespace in the URL, if any.
    pub namespace: Option<String>,
    /// Object name in the URL, if any.
    pub name: Option<String>,
    /// HTTP status answered.
    pub status: u16,
}

#[derive(Clone, Debug)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change to the store, kept for watches.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    namespace: String,
    change: ChangeType,
    old: Option<Value>,
    new: Value,
}

type Key = (Kind, String, String);

#[derive(Default)]
struct State {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this answer 410 Gone.
    compacted: u64,
    calls: Vec<ApiCall>,
    unavailable: bool,
}

struct Shared {
    state: Mutex<State>,
    live: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    epoch: watch::Sender<u64>,
}

/// The in-memory API server. Cheap to clone (shared state).
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
}

impl Default for FakeApiServer {
    fn default() -> Self {
        Self::new()
    }
}

/// A parsed request path.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(code: u16, value: &Value) -> Response<ResponseBody> {
    let body = Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error(code: u16, reason: &str, message: &str) -> Response<ResponseBody> {
    respond(code, &status_body(code, reason, message))
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        rest => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some(name.to_string())),
        _ => return None,
    };
    let kind = Kind::find(group, plural)?;
    Some(Target {
        kind,
        namespace,
        name,
    })
}

fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `key=value`, `key==value`, `key!=value`, `key` (exists), `!key`.
fn requirements(selector: &str) -> Vec<(String, Option<String>, bool)> {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                (k.trim().to_string(), Some(v.trim().to_string()), false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.trim().to_string(), Some(v.trim().to_string()), true)
            } else if let Some(k) = term.strip_prefix('!') {
                (k.trim().to_string(), None, false)
            } else {
                (term.to_string(), None, true)
            }
        })
        .collect()
}

fn field_value(object: &Value, path: &str) -> Option<String> {
    let mut value = object;
    for part in path.split('.') {
        value = value.get(part)?;
    }
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Label and field selectors of a list or watch.
#[derive(Clone, Default)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, Option<String>, bool)>,
}

impl Filter {
    fn new(namespace: Option<String>, params: &BTreeMap<String, String>) -> Self {
        Filter {
            namespace,
            labels: requirements(params.get("labelSelector").map_or("", String::as_str)),
            fields: requirements(params.get("fieldSelector").map_or("", String::as_str)),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && field_value(object, "metadata.namespace").as_deref() != Some(ns.as_str())
        {
            return false;
        }
        let labels = object.pointer("/metadata/labels");
        let label_ok = self.labels.iter().all(|(key, value, equal)| {
            let actual = labels.and_then(|l| l.get(key)).and_then(Value::as_str);
            match (value, equal) {
                (Some(v), true) => actual == Some(v.as_str()),
                (Some(v), false) => actual != Some(v.as_str()),
                (None, true) => actual.is_some(),
                (None, false) => actual.is_none(),
            }
        });
        let field_ok = self.fields.iter().all(|(path, value, equal)| {
            let actual = field_value(object, path).unwrap_or_default();
            let wanted = value.clone().unwrap_or_default();
            (actual == wanted) == *equal
        });
        label_ok && field_ok
    }
}

fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// RFC 3339 (seconds, UTC) of a Unix time, without a date crate.
fn rfc3339(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

impl FakeApiServer {
    /// An empty server.
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(4096);
        let (epoch, _) = watch::channel(0);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                live,
                epoch,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A `kube::Client` talking to this server in-process, through a
    /// tower-test mock pair. Needs a Tokio runtime.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<ResponseBody>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let (parts, body) = request.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    send.send_response(server.handle(Request::from_parts(parts, body)));
                });
            }
        });
        kube::Client::new(service, "default")
    }

    /// Serves plain HTTP on `addr` (port 0 picks one) until the runtime
    /// stops; returns the bound address.
    pub async fn serve_http(&self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let server = self.clone();
        crate::http_server::serve(listener, move |request| {
            let response = server.handle(request);
            async move { response }
        });
        Ok(bound)
    }

    /// A kubeconfig pointing at `addr` over plain HTTP, default namespace
    /// `namespace`.
    pub fn kubeconfig(addr: SocketAddr, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: agent\n  user: {{}}\n"
        )
    }

    /// Creates or replaces `object` (as a client would, without
    /// preconditions), filling in uid, resourceVersion and timestamps.
    pub fn apply<K>(&self, object: &K)
    where
        K: kube::Resource<DynamicType = ()> + Serialize,
    {
        let kind = Kind::of::<K>();
        let mut value = serde_json::to_value(object).expect("objects serialise");
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind);
        let mut state = self.state();
        self.put(&mut state, kind, value);
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete<K>(&self, namespace: Option<&str>, name: &str) -> bool
    where
        K: kube::Resource<DynamicType = ()>,
    {
        let kind = Kind::of::<K>();
        let mut state = self.state();
        self.remove(&mut state, kind, namespace.unwrap_or(""), name)
    }

    /// The stored object, if any.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let kind = Kind::of::<K>();
        let key = (kind, namespace.unwrap_or("").to_string(), name.to_string());
        let value = self.state().objects.get(&key).cloned()?;
        Some(serde_json::from_value(value).expect("stored objects deserialise"))
    }

    /// Every stored object of type `K`.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        let kind = Kind::of::<K>();
        self.state()
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| serde_json::from_value(v.clone()).expect("stored objects deserialise"))
            .collect()
    }

    /// Ends every open watch, as an API server restart or a load balancer
    /// timeout does. Clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the history up to now: a watch resuming from an older
    /// resourceVersion gets `410 Gone`, so the client must list again.
    pub fn compact(&self) {
        let mut state = self.state();
        state.compacted = state.rv + 1;
        state.history.clear();
    }

    /// While unavailable, every request is answered 503 and open watches end.
    pub fn set_available(&self, available: bool) {
        self.state().unavailable = !available;
        if !available {
            self.drop_watches();
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.state().calls.clone()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.state().calls.clear();
    }

    /// (verb, group, resource) of every call so far: the RBAC the client used.
    pub fn permissions_used(&self) -> BTreeSet<(String, String, String)> {
        self.state()
            .calls
            .iter()
            .map(|c| (c.verb.clone(), c.group.clone(), c.resource.clone()))
            .collect()
    }

    /// How many calls of `verb` on `resource` were made.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        self.state()
            .calls
            .iter()
            .filter(|c| c.verb == verb && c.resource == resource)
            .count()
    }

    fn next_rv(state: &mut State) -> u64 {
        state.rv += 1;
        state.rv
    }

    fn record(&self, state: &mut State, change: Change) {
        state.history.push(change.clone());
        // Sent under the lock, so a watch subscribing under the lock misses nothing.
        let _ = self.shared.live.send(change);
    }

    fn put(&self, state: &mut State, kind: Kind, mut value: Value) -> Value {
        let namespace = if kind.namespaced {
            value
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let key = (kind, namespace.clone(), name);
        let old = state.objects.get(&key).cloned();
        let rv = Self::next_rv(state);
        if !value["metadata"].is_object() {
            value["metadata"] = json!({});
        }
        let meta = &mut value["metadata"];
        if kind.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match &old {
            Some(old) => {
                meta["uid"] = old["metadata"]["uid"].clone();
                meta["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            }
            None => {
                if meta
                    .get("uid")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    state.uid += 1;
                    meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", state.uid));
                }
                meta["creationTimestamp"] = json!(now_rfc3339());
            }
        }
        state.objects.insert(key, value.clone());
        let change = Change {
            rv,
            kind,
            namespace,
            change: if old.is_some() {
                ChangeType::Modified
            } else {
                ChangeType::Added
            },
            old,
            new: value.clone(),
        };
        self.record(state, change);
        value
    }

    fn remove(&self, state: &mut State, kind: Kind, namespace: &str, name: &str) -> bool {
        let namespace = if kind.namespaced {
            if namespace.is_empty() {
                "default"
            } else {
                namespace
            }
        } else {
            ""
        };
        let key = (kind, namespace.to_string(), name.to_string());
        let Some(mut old) = state.objects.remove(&key) else {
            return false;
        };
        let rv = Self::next_rv(state);
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            kind,
            namespace: namespace.to_string(),
            change: ChangeType::Deleted,
            old: None,
            new: old,
        };
        self.record(state, change);
        true
    }

    /// Answers one request.
    pub fn handle(&self, request: Request<Bytes>) -> Response<ResponseBody> {
        let path = request.uri().path().to_string();
        let params = query_params(request.uri().query());
        let Some(target) = parse_path(&path) else {
            return error(
                404,
                "NotFound",
                &format!("the fake API server does not serve {path}"),
            );
        };
        let watching = params.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (request.method(), &target.name, watching) {
            (&Method::GET, None, true) => "watch",
            (&Method::GET, None, false) => "list",
            (&Method::GET, Some(_), _) => "get",
            (&Method::POST, None, _) => "create",
            (&Method::PUT, Some(_), _) => "update",
            (&Method::PATCH, Some(_), _) => "patch",
            (&Method::DELETE, Some(_), _) => "delete",
            _ => return error(405, "MethodNotAllowed", "method not allowed"),
        };
        let mut state = self.state();
        let response = if state.unavailable {
            error(503, "ServiceUnavailable", "the API server is unavailable")
        } else {
            match verb {
                "watch" => self.watch(&mut state, &target, &params),
                "list" => Self::list_response(&state, &target, &params),
                "get" => Self::get_response(&state, &target),
                "create" => self.create(&mut state, &target, request.body()),
                "update" => self.update(&mut state, &target, request.body()),
                "patch" => self.patch(&mut state, &target, request.body()),
                _ => self.delete_response(&mut state, &target),
            }
        };
        state.calls.push(ApiCall {
            verb: verb.to_string(),
            group: target.kind.group.to_string(),
            resource: target.kind.plural.to_string(),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            status: response.status().as_u16(),
        });
        response
    }

    fn key_of(target: &Target) -> Key {
        (
            target.kind,
            if target.kind.namespaced {
                target.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            target.name.clone().unwrap_or_default(),
        )
    }

    fn list_response(
        state: &State,
        target: &Target,
        params: &BTreeMap<String, String>,
    ) -> Response<ResponseBody> {
        let filter = Filter::new(target.namespace.clone(), params);
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), v)| *k == target.kind && filter.matches(v))
            .map(|(_, v)| v.clone())
            .collect();
        respond(
            200,
            &json!({
                "apiVersion": target.kind.api_version(),
                "kind": format!("{}List", target.kind.kind),
                "metadata": {"resourceVersion": state.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn get_response(state: &State, target: &Target) -> Response<ResponseBody> {
        match state.objects.get(&Self::key_of(target)) {
            Some(object) => respond(200, object),
            None => error(
                404,
                "NotFound",
                &format!(
                    "{} \"{}\" not found",
                    target.kind.plural,
                    target.name.as_deref().unwrap_or_default()
                ),
            ),
        }
    }

    fn create(&self, state: &mut State, target: &Target, body: &Bytes) -> Response<ResponseBody> {
        let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
            return error(400, "BadRequest", "the body is not JSON");
        };
        if value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            let prefix = value
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .unwrap_or("object-")
                .to_string();
            value["metadata"]["name"] = json!(format!("{prefix}{}", state.rv + 1));
        }
        if let Some(ns) = &target.namespace {
            value["metadata"]["namespace"] = json!(ns);
        }
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (
            target.kind,
            target.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        if state.objects.contains_key(&key) {
            return error(409, "AlreadyExists", &format!("{name} already exists"));
        }
        value["apiVersion"] = json!(target.kind.api_version());
        value["kind"] = json!(target.kind.kind);
        let stored = self.put(state, target.kind, value);
        respond(201, &stored)
    }

    fn update(&self, state: &mut State, target: &Target, body: &Bytes) -> Response<ResponseBody> {
        let Ok(value) = serde_json::from_slice::<Value>(body) else {
            return error(400, "BadRequest", "the body is not JSON");
        };
        let Some(current) = state.objects.get(&Self::key_of(target)) else {
            return error(404, "NotFound", "not found");
        };
        if let Some(rv) = value
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return error(409, "Conflict", "the object has been modified");
        }
        let stored = self.put(state, target.kind, value);
        respond(200, &stored)
    }

    fn patch(&self, state: &mut State, target: &Target, body: &Bytes) -> Response<ResponseBody> {
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return error(400, "BadRequest", "the body is not JSON");
        };
        let Some(current) = state.objects.get(&Self::key_of(target)).cloned() else {
            return error(404, "NotFound", "not found");
        };
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return error(409, "Conflict", "the object has been modified");
        }
        let mut merged = current;
        merge(&mut merged, &patch);
        let stored = self.put(state, target.kind, merged);
        respond(200, &stored)
    }

    fn delete_response(&self, state: &mut State, target: &Target) -> Response<ResponseBody> {
        let (kind, namespace, name) = Self::key_of(target);
        if self.remove(state, kind, &namespace, &name) {
            respond(
                200,
                &json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
            )
        } else {
            error(404, "NotFound", "not found")
        }
    }

    /// The watch event a change is for this watch, if any (selector
    /// transitions become ADDED/DELETED, as the API server sends them).
    fn event_for(change: &Change, kind: Kind, filter: &Filter) -> Option<Value> {
        if change.kind != kind {
            return None;
        }
        if let Some(ns) = &filter.namespace
            && *ns != change.namespace
        {
            return None;
        }
        let now = filter.matches(&change.new);
        let before = change.old.as_ref().is_some_and(|o| filter.matches(o));
        let kind = match change.change {
            ChangeType::Added if now => "ADDED",
            ChangeType::Modified if now && before => "MODIFIED",
            ChangeType::Modified if now => "ADDED",
            ChangeType::Modified if before => "DELETED",
            ChangeType::Deleted if now => "DELETED",
            _ => return None,
        };
        Some(json!({"type": kind, "object": change.new}))
    }

    fn watch(
        &self,
        state: &mut State,
        target: &Target,
        params: &BTreeMap<String, String>,
    ) -> Response<ResponseBody> {
        let from: u64 = params
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(state.rv);
        let filter = Filter::new(target.namespace.clone(), params);
        let kind = target.kind;
        let mut pending: VecDeque<Value> = VecDeque::new();
        if from != 0 && from + 1 < state.compacted {
            pending.push_back(json!({
                "type": "ERROR",
                "object": status_body(410, "Expired", "too old resource version"),
            }));
        } else {
            pending.extend(
                state
                    .history
                    .iter()
                    .filter(|c| c.rv > from)
                    .filter_map(|c| Self::event_for(c, kind, &filter)),
            );
        }
        let expired = from != 0 && from + 1 < state.compacted;
        let mut live = self.shared.live.subscribe();
        let mut epoch = self.shared.epoch.subscribe();
        epoch.borrow_and_update();
        let (tx, mut rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            for event in pending {
                if tx.send(Bytes::from(format!("{event}\n"))).await.is_err() {
                    return;
                }
            }
            if expired {
                return;
            }
            loop {
                tokio::select! {
                    // A dropped watch forwards nothing more, even events
                    // already queued for it.
                    biased;
                    _ = epoch.changed() => return,
                    received = live.recv() => match received {
                        Ok(change) => {
                            if let Some(event) = Self::event_for(&change, kind, &filter)
                                && tx.send(Bytes::from(format!("{event}\n"))).await.is_err()
                            {
                                return;
                            }
                        }
                        // Lagging behind ends the watch; the client resumes.
                        Err(_) => return,
                    },
                }
            }
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_merge_behave_like_the_api_server() {
        let pod = json!({"metadata": {"namespace": "a", "labels": {"x": "1"}}, "spec": {"nodeName": "n1"}});
        let params: BTreeMap<String, String> = [
            ("labelSelector".to_string(), "x=1".to_string()),
            ("fieldSelector".to_string(), "spec.nodeName=n1".to_string()),
        ]
        .into();
        assert!(Filter::new(None, &params).matches(&pod));
        assert!(!Filter::new(Some("b".into()), &params).matches(&pod));
        let other: BTreeMap<String, String> =
            [("fieldSelector".to_string(), "spec.nodeName=n2".to_string())].into();
        assert!(!Filter::new(None, &other).matches(&pod));

        let mut node = json!({"spec": {"taints": [{"key": "a"}], "podCIDR": "x"}});
        merge(&mut node, &json!({"spec": {"taints": null}}));
        assert_eq!(node, json!({"spec": {"podCIDR": "x"}}));
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
