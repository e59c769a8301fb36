//! Reading the audit file back: `podid-agent audit` answers questions such as
//! "which pods got tokens for identity X in the last hour".

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{
    record::{AuditRecord, Outcome},
    writer::rotated,
};

/// Filters; every given field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Workload namespace.
    pub namespace: Option<String>,
    /// Pod (or LocalWorkload) name.
    pub pod: Option<String>,
    /// Identity `namespace/name` (or just `name`, or its client id).
    pub identity: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// Resource (audience).
    pub resource: Option<String>,
    /// Records at or after this time.
    pub since: Option<SystemTime>,
    /// Records before this time.
    pub until: Option<SystemTime>,
}

/// Why the audit file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: not an audit record")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("no audit file at {0}")]
    Missing(PathBuf),
}

impl AuditQuery {
    /// Whether `record` passes every filter.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if !eq(&self.namespace, &record.namespace)
            || !eq(&self.pod, &record.pod)
            || !eq(&self.resource, &record.resource)
        {
            return false;
        }
        if let Some(identity) = &self.identity {
            let name = record.identity.rsplit('/').next().unwrap_or("");
            let hit = record.identity == *identity
                || (!identity.contains('/') && name == identity)
                || record.client_id.eq_ignore_ascii_case(identity);
            if !hit {
                return false;
            }
        }
        if self.outcome.is_some_and(|o| o != record.outcome) {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(ts) = humantime::parse_rfc3339_weak(&record.ts) else {
                return false;
            };
            if self.since.is_some_and(|since| ts < since)
                || self.until.is_some_and(|until| ts >= until)
            {
                return false;
            }
        }
        true
    }
}

/// Every record in `path` and its rotated files, oldest first, that matches.
pub fn read_records(path: &Path, query: &AuditQuery) -> Result<Vec<AuditRecord>, QueryError> {
    let mut files: Vec<PathBuf> = (1..=1000)
        .map(|n| rotated(path, n))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    if files.is_empty() {
        return Err(QueryError::Missing(path.to_path_buf()));
    }
    let mut out = Vec::new();
    for file in files {
        let reader = BufReader::new(fs::File::open(&file).map_err(|source| QueryError::Read {
            path: file.clone(),
            source,
        })?);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| QueryError::Read {
                path: file.clone(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let record: AuditRecord =
                serde_json::from_str(&line).map_err(|source| QueryError::Parse {
                    path: file.clone(),
                    line: i + 1,
                    source,
                })?;
            if query.matches(&record) {
                out.push(record);
            }
        }
    }
    Ok(out)
}

/// Requests per (namespace, pod, identity, outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub namespace: String,
    pub pod: String,
    pub identity: String,
    pub outcome: Outcome,
    pub requests: usize,
    pub first: String,
    pub last: String,
}

/// Groups records by (namespace, pod, identity, outcome).
pub fn summarize(records: &[AuditRecord]) -> Vec<Summary> {
    let mut groups: BTreeMap<(String, String, String, &'static str), Summary> = BTreeMap::new();
    for record in records {
        let key = (
            record.namespace.clone(),
            record.pod.clone(),
            record.identity.clone(),
            record.outcome.as_str(),
        );
        groups
            .entry(key)
            .and_modify(|s| {
                s.requests += 1;
                s.last = record.ts.clone();
            })
            .or_insert_with(|| Summary {
                namespace: record.namespace.clone(),
                pod: record.pod.clone(),
                identity: record.identity.clone(),
                outcome: record.outcome,
                requests: 1,
                first: record.ts.clone(),
                last: record.ts.clone(),
            });
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(ts: SystemTime, pod: &str, identity: &str, outcome: Outcome) -> AuditRecord {
        AuditRecord {
            ts: humantime::format_rfc3339_millis(ts).to_string(),
            namespace: "app".into(),
            pod: pod.into(),
            identity: identity.into(),
            client_id: format!("client-{identity}"),
            outcome,
            ..AuditRecord::default()
        }
    }

    #[test]
    fn answers_which_pods_got_tokens_for_an_identity_in_the_last_hour() {
        let now = SystemTime::now();
        let records = [
            record(
                now - Duration::from_secs(7200),
                "old",
                "app/sql",
                Outcome::Issued,
            ),
            record(
                now - Duration::from_secs(600),
                "web-1",
                "app/sql",
                Outcome::Issued,
            ),
            record(
                now - Duration::from_secs(300),
                "web-1",
                "app/sql",
                Outcome::Issued,
            ),
            record(
                now - Duration::from_secs(200),
                "web-2",
                "app/sql",
                Outcome::Issued,
            ),
            record(
                now - Duration::from_secs(100),
                "web-3",
                "app/other",
                Outcome::Issued,
            ),
            record(
                now - Duration::from_secs(50),
                "web-4",
                "app/sql",
                Outcome::IdentityNotFound,
            ),
        ];
        let query = AuditQuery {
            identity: Some("app/sql".into()),
            outcome: Some(Outcome::Issued),
            since: Some(now - Duration::from_secs(3600)),
            ..AuditQuery::default()
        };
        let hits: Vec<_> = records
            .iter()
            .filter(|r| query.matches(r))
            .cloned()
            .collect();
        let summary = summarize(&hits);
        let pods: Vec<_> = summary
            .iter()
            .map(|s| (s.pod.as_str(), s.requests))
            .collect();
        assert_eq!(pods, [("web-1", 2), ("web-2", 1)]);
        // The identity can also be given by bare name or client id.
        let by_name = AuditQuery {
            identity: Some("sql".into()),
            ..AuditQuery::default()
        };
        assert_eq!(records.iter().filter(|r| by_name.matches(r)).count(), 5);
        let by_client = AuditQuery {
            identity: Some("CLIENT-app/other".into()),
            ..AuditQuery::default()
        };
        assert_eq!(records.iter().filter(|r| by_client.matches(r)).count(), 1);
    }
}
