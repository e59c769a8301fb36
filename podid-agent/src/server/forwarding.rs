//! Which non-token IMDS requests the agent forwards to the real IMDS on a
//! pod's behalf: an explicit allowlist of path prefixes and methods
//! (`--forward`). Anything not on it is answered 404 and never leaves the
//! node. The identity namespace (`/metadata/identity/…`) is never forwarded
//! whatever the list says: its other endpoints (the "managed identity v2"
//! credential endpoints among them) would hand a pod the VM's own
//! credential.

use std::{fmt, str::FromStr};

use http::Method;

/// The default list: what applications and Azure agents use IMDS for
/// besides tokens, with the methods IMDS documents for each.
pub const DEFAULT_FORWARD_RULES: [&str; 5] = [
    // Instance metadata: compute, network, tags (SDKs read the region).
    "GET /metadata/instance",
    // Attested data: a signed document proving which VM this is.
    "GET /metadata/attested",
    // Supported api-versions.
    "GET /metadata/versions",
    // Load balancer metadata: frontend IPs and probe rules.
    "GET /metadata/loadbalancer",
    // Scheduled events: GET to list, POST to approve (StartRequests).
    "GET|POST /metadata/scheduledevents",
];

/// The prefix no rule may open: only its token endpoint is served, by the
/// agent itself.
const IDENTITY_PREFIX: &str = "/metadata/identity";

/// One allowlist entry: `METHOD[|METHOD…] /path/prefix`, or `none`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRule {
    methods: Vec<Method>,
    /// Lower-case, no trailing `/`; empty for `none`.
    prefix: String,
}

impl ForwardRule {
    /// Whether `path` (lower-case) is under this rule's prefix.
    fn covers(&self, path: &str) -> bool {
        !self.prefix.is_empty()
            && path
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix.is_empty() {
            return f.write_str("none");
        }
        let methods: Vec<&str> = self.methods.iter().map(Method::as_str).collect();
        write!(f, "{} {}", methods.join("|"), self.prefix)
    }
}

impl FromStr for ForwardRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("none") {
            return Ok(Self {
                methods: Vec::new(),
                prefix: String::new(),
            });
        }
        let (methods, prefix) = text.split_once(' ').ok_or_else(|| {
            format!("{text:?}: expected `METHOD[|METHOD…] /path` (for example `GET /metadata/instance`) or `none`")
        })?;
        let methods = methods
            .split('|')
            .map(|m| match m.trim().to_ascii_uppercase().as_str() {
                "GET" => Ok(Method::GET),
                "POST" => Ok(Method::POST),
                "PUT" => Ok(Method::PUT),
                "PATCH" => Ok(Method::PATCH),
                "DELETE" => Ok(Method::DELETE),
                "HEAD" => Ok(Method::HEAD),
                other => Err(format!("{text:?}: unknown method {other:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prefix = prefix.trim().to_ascii_lowercase();
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with("/metadata/") || !super::imds::is_canonical(&prefix) {
            return Err(format!(
                "{text:?}: the path must be a plain path under /metadata/ (letters, digits, - _ . ~)"
            ));
        }
        if prefix == IDENTITY_PREFIX || prefix.starts_with("/metadata/identity/") {
            return Err(format!(
                "{text:?}: /metadata/identity is never forwarded (the token endpoint is served by the agent; the rest would give pods the node's credentials)"
            ));
        }
        Ok(Self { methods, prefix })
    }
}

/// What the allowlist says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarding {
    /// Forward it.
    Allowed,
    /// The path is listed, but not for this method; the listed methods.
    MethodNotAllowed(Vec<Method>),
    /// The path is not listed.
    NotListed,
}

/// The allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardPolicy {
    rules: Vec<ForwardRule>,
}

impl Default for ForwardPolicy {
    fn default() -> Self {
        Self::new(
            DEFAULT_FORWARD_RULES
                .iter()
                .map(|r| r.parse().expect("the default rules parse"))
                .collect(),
        )
    }
}

impl ForwardPolicy {
    /// A policy of `rules` (a `none` rule adds nothing).
    pub fn new(rules: Vec<ForwardRule>) -> Self {
        Self {
            rules: rules.into_iter().filter(|r| !r.prefix.is_empty()).collect(),
        }
    }

    /// Decides for `method` on `path`.
    pub fn decide(&self, method: &Method, path: &str) -> Forwarding {
        let path = path.to_ascii_lowercase();
        let path = path.trim_end_matches('/');
        if path == IDENTITY_PREFIX || path.starts_with("/metadata/identity/") {
            return Forwarding::NotListed;
        }
        let mut listed: Vec<Method> = Vec::new();
        for rule in self.rules.iter().filter(|r| r.covers(path)) {
            if rule.methods.contains(method) {
                return Forwarding::Allowed;
            }
            listed.extend(rule.methods.iter().cloned());
        }
        if listed.is_empty() {
            Forwarding::NotListed
        } else {
            listed.dedup();
            Forwarding::MethodNotAllowed(listed)
        }
    }

    /// The rules, for the start-up log.
    pub fn rules(&self) -> &[ForwardRule] {
        &self.rules
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_forwards_what_applications_use() {
        let policy = ForwardPolicy::default();
        for (method, path) in [
            (Method::GET, "/metadata/instance"),
            (Method::GET, "/metadata/instance/compute/location"),
            (Method::GET, "/Metadata/Instance/compute"),
            (Method::GET, "/metadata/attested/document"),
            (Method::GET, "/metadata/versions"),
            (Method::GET, "/metadata/loadbalancer"),
            (Method::GET, "/metadata/scheduledevents"),
            (Method::POST, "/metadata/scheduledevents"),
        ] {
            assert_eq!(
                policy.decide(&method, path),
                Forwarding::Allowed,
                "{method} {path}"
            );
        }
        assert_eq!(
            policy.decide(&Method::POST, "/metadata/instance"),
            Forwarding::MethodNotAllowed(vec![Method::GET])
        );
        for path in [
            "/metadata/identity/getplatformmetadata",
            "/metadata/identity/issuecredential",
            "/METADATA/IDENTITY/credential",
            "/metadata/identity",
            "/metadata/instancex",
            "/doesnotexist",
            "/",
        ] {
            assert_eq!(
                policy.decide(&Method::GET, path),
                Forwarding::NotListed,
                "{path}"
            );
            assert_eq!(
                policy.decide(&Method::POST, path),
                Forwarding::NotListed,
                "{path}"
            );
        }
    }

    #[test]
    fn rules_parse_and_refuse_the_identity_namespace() {
        let rule: ForwardRule = "get|post /metadata/scheduledevents/".parse().unwrap();
        assert_eq!(rule.to_string(), "GET|POST /metadata/scheduledevents");
        for bad in [
            "GET /metadata/identity",
            "GET /metadata/identity/issuecredential",
            "GET /METADATA/Identity/x",
            "GET /other",
            "GET /metadata/%69nstance",
            "FETCH /metadata/instance",
            "/metadata/instance",
            "GET",
        ] {
            assert!(bad.parse::<ForwardRule>().is_err(), "{bad}");
        }
        let none = ForwardPolicy::new(vec!["none".parse().unwrap()]);
        assert_eq!(
            none.decide(&Method::GET, "/metadata/instance"),
            Forwarding::NotListed
        );
        let narrow = ForwardPolicy::new(vec!["GET /metadata/instance/compute".parse().unwrap()]);
        assert_eq!(
            narrow.decide(&Method::GET, "/metadata/instance/compute/location"),
            Forwarding::Allowed
        );
        assert_eq!(
            narrow.decide(&Method::GET, "/metadata/instance/network"),
            Forwarding::NotListed
        );
    }
}
