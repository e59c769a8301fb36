//! An in-memory Kubernetes API server behind a real `kube::Client`
//! (`tower_test::mock::pair()`), for the controller tests and benchmark.
//!
//! It answers the calls kube-rs makes the way the API server does: list
//! (with label selectors) and watch (history from a resourceVersion, then
//! live events), get, create, replace (with resourceVersion preconditions),
//! merge patch (same), delete (finalizers keep an object until they are
//! removed). Objects are kept as JSON. Every call is recorded as
//! (verb, resource), so tests can check the RBAC the controller needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use crate::kube::merge_patch::merge;
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use kube::Resource;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::sync::broadcast;

type ResponseBody = BoxBody<Bytes, Infallible>;

/// A resource type: its plural and API group (`""` for core).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// Plural name.
    pub plural: String,
}

impl ResourceType {
    /// The type of `K`.
    pub fn of<K: Resource<DynamicType = ()>>() -> Self {
        ResourceType {
            group: K::group(&()).to_string(),
            plural: K::plural(&()).to_string(),
        }
    }

    /// `plural` or `plural.group`, as RBAC names it.
    pub fn rbac_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    kind: ResourceType,
    namespace: Option<String>,
    event: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<(ResourceType, String, String), Value>,
    history: Vec<WatchEvent>,
    calls: Vec<(String, ResourceType)>,
    uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<WatchEvent>,
}

/// The in-memory API server. Clones share state.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn labels_match(object: &Value, selector: &str) -> bool {
    let labels = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object);
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            get(k.trim().trim_end_matches('=')) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else {
            get(term.trim()).is_some()
        }
    })
}

/// A parsed request path.
struct Target {
    kind: ResourceType,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, version, rest) = match *parts.first()? {
        "api" => ("", *parts.get(1)?, &parts[2..]),
        "apis" => (*parts.get(1)?, *parts.get(2)?, &parts[3..]),
        _ => return None,
    };
    let (namespace, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (Some(rest[1].to_string()), &rest[2..])
    } else {
        (None, rest)
    };
    let plural = rest.first()?;
    Some(Target {
        kind: ResourceType {
            group: group.to_string(),
            plural: plural.to_string(),
        },
        version: version.to_string(),
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

impl ApiServer {
    /// An empty API server.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(65_536);
        ApiServer {
            shared: Arc::new(Shared {
                store: Mutex::new(Store::default()),
                events,
            }),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A `kube::Client` talking to this server through a tower-test mock
    /// pair. Each client gets its own serving task.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<ResponseBody>>();
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let response = server.serve(request).await;
                    send.send_response(response);
                });
            }
        });
        kube::Client::new(service, "default")
    }

    /// Every call so far as (verb, resource), e.g. ("patch",
    /// "azureassignedidentities.aadpodidentity.k8s.io").
    pub fn calls(&self) -> BTreeSet<(String, String)> {
        self.store()
            .calls
            .iter()
            .map(|(verb, kind)| (verb.clone(), kind.rbac_name()))
            .collect()
    }

    /// Number of calls with this verb on this resource.
    pub fn call_count(&self, verb: &str, kind: &ResourceType) -> usize {
        self.store()
            .calls
            .iter()
            .filter(|(v, k)| v == verb && k == kind)
            .count()
    }

    /// Creates (or replaces) an object directly, as another client would.
    pub fn put<K>(&self, object: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let kind = ResourceType::of::<K>();
        let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let namespace = object.meta().namespace.clone();
        let name = object.meta().name.clone().unwrap_or_default();
        let written = {
            let mut store = self.store();
            let key = (kind.clone(), namespace.clone().unwrap_or_default(), name);
            let existing = store.objects.get(&key).cloned();
            match existing {
                Some(old) => {
                    value["metadata"]["uid"] = old["metadata"]["uid"].clone();
                    value["metadata"]["creationTimestamp"] =
                        old["metadata"]["creationTimestamp"].clone();
                    self.write(&mut store, key, value, "MODIFIED")
                }
                None => self.insert_new(&mut store, key, value),
            }
        };
        serde_json::from_value(written)
            .unwrap_or_else(|e| panic!("stored object does not parse back: {e}"))
    }

    /// Deletes an object directly (honouring finalizers), as another client would.
    pub fn remove<K: Resource<DynamicType = ()>>(&self, namespace: Option<&str>, name: &str) {
        let kind = ResourceType::of::<K>();
        let mut store = self.store();
        let key = (
            kind,
            namespace.unwrap_or_default().to_string(),
            name.to_string(),
        );
        self.delete_key(&mut store, key);
    }

    /// All objects of a type.
    pub fn list<K>(&self) -> Vec<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let kind = ResourceType::of::<K>();
        self.store()
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// One object.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let key = (
            ResourceType::of::<K>(),
            namespace.unwrap_or_default().to_string(),
            name.to_string(),
        );
        self.store()
            .objects
            .get(&key)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    fn insert_new(
        &self,
        store: &mut Store,
        key: (ResourceType, String, String),
        mut value: Value,
    ) -> Value {
        store.uid += 1;
        value["metadata"]["uid"] = json!(format!("uid-{}", store.uid));
        value["metadata"]["creationTimestamp"] = json!(now());
        if !key.1.is_empty() {
            value["metadata"]["namespace"] = json!(key.1);
        }
        self.write(store, key, value, "ADDED")
    }

    fn write(
        &self,
        store: &mut Store,
        key: (ResourceType, String, String),
        mut value: Value,
        event: &'static str,
    ) -> Value {
        store.rv += 1;
        value["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
        // A terminating object whose finalizers are gone is removed.
        let terminating = value
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|v| !v.is_null());
        let finalizers_left = value
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if terminating && !finalizers_left {
            store.objects.remove(&key);
            self.emit(store, &key, "DELETED", value.clone());
            return value;
        }
        store.objects.insert(key.clone(), value.clone());
        self.emit(store, &key, event, value.clone());
        value
    }

    fn delete_key(
        &self,
        store: &mut Store,
        key: (ResourceType, String, String),
    ) -> Option<(Value, bool)> {
        let mut value = store.objects.get(&key)?.clone();
        let has_finalizers = value
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if value
                .pointer("/metadata/deletionTimestamp")
                .is_none_or(Value::is_null)
            {
                value["metadata"]["deletionTimestamp"] = json!(now());
                let written = self.write(store, key, value, "MODIFIED");
                return Some((written, false));
            }
            return Some((value, false));
        }
        store.objects.remove(&key);
        store.rv += 1;
        value["metadata"]["resourceVersion"] = json!(store.rv.to_string());
        self.emit(store, &key, "DELETED", value.clone());
        Some((value, true))
    }

    fn emit(
        &self,
        store: &mut Store,
        key: &(ResourceType, String, String),
        event: &'static str,
        object: Value,
    ) {
        let watch_event = WatchEvent {
            rv: store.rv,
            kind: key.0.clone(),
            namespace: (!key.1.is_empty()).then(|| key.1.clone()),
            event,
            object,
        };
        store.history.push(watch_event.clone());
        let _ = self.shared.events.send(watch_event);
    }

    async fn serve(&self, request: Request<kube::client::Body>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let Some(target) = parse_path(&path) else {
            return respond(status(404, "NotFound", &format!("no route {path}")));
        };
        let method = parts.method.as_str();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let watching = query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (method, target.name.is_some(), watching) {
            ("GET", _, true) => "watch",
            ("GET", false, false) => "list",
            ("GET", true, false) => "get",
            ("POST", _, _) => "create",
            ("PUT", _, _) => "update",
            ("PATCH", _, _) => "patch",
            ("DELETE", _, _) => "delete",
            _ => "unknown",
        };
        self.store()
            .calls
            .push((verb.to_string(), target.kind.clone()));
        match verb {
            "watch" => self.watch(&target, &query),
            "list" => respond(self.do_list(&target, &query)),
            "get" => respond(self.do_get(&target)),
            "create" => respond(self.do_create(&target, &body)),
            "update" => respond(self.do_update(&target, &body)),
            "patch" => respond(self.do_patch(&target, &body, &content_type)),
            "delete" => respond(self.do_delete(&target)),
            _ => respond(status(405, "MethodNotAllowed", method)),
        }
    }

    fn key_of(target: &Target) -> (ResourceType, String, String) {
        (
            target.kind.clone(),
            target.namespace.clone().unwrap_or_default(),
            target.name.clone().unwrap_or_default(),
        )
    }

    fn do_list(&self, target: &Target, query: &str) -> (u16, Value) {
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let store = self.store();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|((k, ns, _), _)| {
                *k == target.kind && target.namespace.as_ref().is_none_or(|want| want == ns)
            })
            .filter(|(_, v)| labels_match(v, &selector))
            .map(|(_, v)| v.clone())
            .collect();
        let api_version = if target.kind.group.is_empty() {
            target.version.clone()
        } else {
            format!("{}/{}", target.kind.group, target.version)
        };
        (
            200,
            json!({"apiVersion": api_version, "kind": "List", "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
        )
    }

    fn do_get(&self, target: &Target) -> (u16, Value) {
        match self.store().objects.get(&Self::key_of(target)) {
            Some(v) => (200, v.clone()),
            None => status(
                404,
                "NotFound",
                &format!("{} {:?} not found", target.kind.plural, target.name),
            ),
        }
    }

    fn do_create(&self, target: &Target, body: &Bytes) -> (u16, Value) {
        let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let Some(name) = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(String::from)
        else {
            return status(422, "Invalid", "metadata.name is required");
        };
        let key = (
            target.kind.clone(),
            target.namespace.clone().unwrap_or_default(),
            name,
        );
        let mut store = self.store();
        if store.objects.contains_key(&key) {
            return status(409, "AlreadyExists", "already exists");
        }
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
            meta.remove("deletionTimestamp");
        }
        (201, self.insert_new(&mut store, key, value))
    }

    fn do_update(&self, target: &Target, body: &Bytes) -> (u16, Value) {
        let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let key = Self::key_of(target);
        let mut store = self.store();
        let Some(current) = store.objects.get(&key).cloned() else {
            return status(404, "NotFound", "not found");
        };
        let sent_rv = value
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .map(String::from);
        if sent_rv.is_some()
            && sent_rv.as_deref()
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        for field in ["uid", "creationTimestamp", "deletionTimestamp"] {
            value["metadata"][field] = current["metadata"][field].clone();
        }
        if value["metadata"]["deletionTimestamp"].is_null()
            && let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.remove("deletionTimestamp");
        }
        (200, self.write(&mut store, key, value, "MODIFIED"))
    }

    fn do_patch(&self, target: &Target, body: &Bytes, content_type: &str) -> (u16, Value) {
        if content_type.contains("json-patch+json") {
            return status(
                415,
                "UnsupportedMediaType",
                "JSON patch is not supported by this test server",
            );
        }
        let Ok(patch) = serde_json::from_slice::<Value>(body) else {
            return status(400, "BadRequest", "invalid JSON");
        };
        let key = Self::key_of(target);
        let mut store = self.store();
        let Some(mut current) = store.objects.get(&key).cloned() else {
            return status(404, "NotFound", "not found");
        };
        if let Some(rv) = patch
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv)
                != current
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return status(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version and try again",
            );
        }
        merge(&mut current, &patch);
        (200, self.write(&mut store, key, current, "MODIFIED"))
    }

    fn do_delete(&self, target: &Target) -> (u16, Value) {
        let mut store = self.store();
        match self.delete_key(&mut store, Self::key_of(target)) {
            None => status(404, "NotFound", "not found"),
            Some((value, false)) => (200, value),
            Some((_, true)) => (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ),
        }
    }

    fn watch(&self, target: &Target, query: &str) -> Response<ResponseBody> {
        let from: u64 = query_param(query, "resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let timeout = query_param(query, "timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290u64);
        let selector = query_param(query, "labelSelector").unwrap_or_default();
        let kind = target.kind.clone();
        let namespace = target.namespace.clone();
        // Subscribe before reading history so no event falls in between.
        let mut live = self.shared.events.subscribe();
        let past: Vec<WatchEvent> = self
            .store()
            .history
            .iter()
            .filter(|e| e.rv > from)
            .cloned()
            .collect();
        let last_past = past.last().map(|e| e.rv).unwrap_or(from);
        let matches = move |e: &WatchEvent| {
            e.kind == kind
                && namespace
                    .as_ref()
                    .is_none_or(|ns| e.namespace.as_ref() == Some(ns))
                && labels_match(&e.object, &selector)
        };
        let matches_live = matches.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        tokio::spawn(async move {
            let line = |e: &WatchEvent| {
                Bytes::from(format!(
                    "{}\n",
                    json!({"type": e.event, "object": e.object})
                ))
            };
            for event in past.iter().filter(|e| matches(e)) {
                if tx.send(line(event)).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    received = live.recv() => match received {
                        Ok(event) => {
                            if event.rv > last_past && matches_live(&event) && tx.send(line(&event)).await.is_err() {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // The client re-lists, as after a real watch expiry.
                            let _ = tx.send(Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}})))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        let stream = tokio_stream_from(rx).map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
        let body = BodyExt::boxed(StreamBody::new(stream));
        let mut response = Response::new(body);
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Bytes> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn respond((code, value): (u16, Value)) -> Response<ResponseBody> {
    let body = http_body_util::Full::new(Bytes::from(value.to_string()))
        .map_err(|never| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
