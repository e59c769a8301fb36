//! Standalone mode: workloads and identities from a YAML file
//! (`--workloads FILE`), no Kubernetes.
//!
//! The file holds `AzureIdentity` and `AzureIdentityBinding` objects exactly as
//! for aad-pod-identity, plus `LocalWorkload` objects naming a cgroup (relative
//! to `--cgroup-root`). A process in that cgroup, or any cgroup below it, is
//! that workload; the deepest matching `LocalWorkload` wins. Identities are
//! taken as already assigned to the machine (there is no controller), as in
//! aad-pod-identity's managed mode.
//!
//! The file is re-read when it changes. A file that does not parse is
//! reported and ignored: the previous contents stay in force.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use podid_api::{
    AzureIdentity, AzureIdentityBinding, AzurePodIdentityException, Document, LocalWorkload,
    parse_documents,
};
use tracing::{info, warn};

use super::{Assignment, Unattributed, Workload, WorkloadSource};
use crate::{
    identity::{BoundIdentity, IdentityCatalog, NamespaceRule, RefusedIdentity, object_key},
    tokens::SecretSource,
};

/// Why the workloads file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsFileError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: podid_api::DocumentError,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Everything one version of the file says.
#[derive(Debug, Default)]
pub struct WorkloadsSnapshot {
    identities: HashMap<String, Arc<AzureIdentity>>,
    bindings: Vec<Arc<AzureIdentityBinding>>,
    exceptions: Vec<Arc<AzurePodIdentityException>>,
    /// (cgroup path relative to the cgroup2 mount, workload), deepest first.
    workloads: Vec<(PathBuf, Workload)>,
}

impl IdentityCatalog for WorkloadsSnapshot {
    fn bindings_with_selector(&self, selector: &str) -> Vec<Arc<AzureIdentityBinding>> {
        self.bindings
            .iter()
            .filter(|b| b.spec.selector == selector)
            .cloned()
            .collect()
    }

    fn identity(&self, namespace: &str, name: &str) -> Option<Arc<AzureIdentity>> {
        self.identities
            .get(&object_key(Some(namespace), Some(name)))
            .cloned()
    }
}

impl WorkloadsSnapshot {
    /// Builds a snapshot from the file's text. `root` is `--cgroup-root`
    /// relative to the cgroup2 mount.
    pub fn parse(text: &str, root: &Path, path: &Path) -> Result<Self, WorkloadsFileError> {
        let documents = parse_documents(text).map_err(|source| WorkloadsFileError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let mut snapshot = WorkloadsSnapshot::default();
        let mut seen_cgroups = HashMap::new();
        for document in documents {
            match document {
                Document::Identity(identity) => {
                    let key = object_key(
                        identity.metadata.namespace.as_deref(),
                        identity.metadata.name.as_deref(),
                    );
                    if snapshot
                        .identities
                        .insert(key.clone(), Arc::from(identity))
                        .is_some()
                    {
                        return Err(WorkloadsFileError::Invalid {
                            path: path.to_path_buf(),
                            message: format!("AzureIdentity {key} is defined twice"),
                        });
                    }
                }
                Document::Binding(binding) => snapshot.bindings.push(Arc::from(binding)),
                Document::Exception(exception) => snapshot.exceptions.push(Arc::from(exception)),
                Document::Assigned(_) => {
                    return Err(WorkloadsFileError::Invalid {
                        path: path.to_path_buf(),
                        message: "AzureAssignedIdentity objects are written by the controller and have no meaning in standalone mode".into(),
                    });
                }
                Document::LocalWorkload(local) => {
                    let cgroup = root.join(local.spec.cgroup.trim_matches('/'));
                    if let Some(other) =
                        seen_cgroups.insert(cgroup.clone(), local.metadata.name.clone())
                    {
                        return Err(WorkloadsFileError::Invalid {
                            path: path.to_path_buf(),
                            message: format!(
                                "LocalWorkloads {other} and {} name the same cgroup {}",
                                local.metadata.name,
                                cgroup.display()
                            ),
                        });
                    }
                    snapshot.workloads.push((cgroup, workload_of(*local)));
                }
            }
        }
        // Deepest cgroup first, so the most specific workload wins.
        snapshot
            .workloads
            .sort_by_key(|(cgroup, _)| std::cmp::Reverse(cgroup.components().count()));
        Ok(snapshot)
    }

    fn workload_for(&self, cgroup_path: &Path) -> Option<&Workload> {
        self.workloads
            .iter()
            .find(|(cgroup, _)| cgroup_path.starts_with(cgroup))
            .map(|(_, workload)| workload)
    }

    /// Number of LocalWorkloads.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }
}

fn workload_of(local: LocalWorkload) -> Workload {
    Workload {
        namespace: local.metadata.namespace,
        name: local.metadata.name,
        uid: String::new(),
        container: String::new(),
        labels: local.metadata.labels,
    }
}

/// The standalone workload source.
pub struct StandaloneSource {
    path: PathBuf,
    root: PathBuf,
    rule: NamespaceRule,
    /// (identity, refusal kind) already logged: one warning each.
    refused_logged: std::sync::Mutex<std::collections::HashSet<(String, &'static str)>>,
    snapshot: RwLock<(Arc<WorkloadsSnapshot>, Option<SystemTime>)>,
    secrets: Arc<dyn SecretSource>,
}

impl std::fmt::Debug for StandaloneSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneSource")
            .field("path", &self.path)
            .field("root", &self.root)
            .finish()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl StandaloneSource {
    /// Loads `path`. `root` is `--cgroup-root` relative to the cgroup2 mount.
    /// A file that does not load is an error here: the agent must not start
    /// with a half-understood configuration.
    pub fn load(
        path: &Path,
        root: &Path,
        rule: NamespaceRule,
        secrets: Arc<dyn SecretSource>,
    ) -> Result<Self, WorkloadsFileError> {
        let stamp = modified(path);
        let snapshot = Self::read(path, root)?;
        info!(
            file = %path.display(),
            workloads = snapshot.workload_count(),
            identities = snapshot.identities.len(),
            bindings = snapshot.bindings.len(),
            "loaded workloads"
        );
        Ok(Self {
            path: path.to_path_buf(),
            root: root.to_path_buf(),
            rule,
            refused_logged: std::sync::Mutex::default(),
            snapshot: RwLock::new((Arc::new(snapshot), stamp)),
            secrets,
        })
    }

    fn read(path: &Path, root: &Path) -> Result<WorkloadsSnapshot, WorkloadsFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadsFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        WorkloadsSnapshot::parse(&text, root, path)
    }

    /// Re-reads the file if it changed. On error the previous snapshot stays.
    pub fn reload_if_changed(&self) -> Result<bool, WorkloadsFileError> {
        let stamp = modified(&self.path);
        let current = self.snapshot.read().unwrap_or_else(|e| e.into_inner()).1;
        if stamp == current {
            return Ok(false);
        }
        match Self::read(&self.path, &self.root) {
            Ok(snapshot) => {
                info!(
                    file = %self.path.display(),
                    workloads = snapshot.workload_count(),
                    "workloads file changed; reloaded"
                );
                *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) =
                    (Arc::new(snapshot), stamp);
                Ok(true)
            }
            Err(error) => {
                // Remember the stamp so a bad file is reported once, not every poll.
                self.snapshot.write().unwrap_or_else(|e| e.into_inner()).1 = stamp;
                Err(error)
            }
        }
    }

    /// Polls the file for changes until the task is dropped.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut interval = tokio::time::interval(every);
        loop {
            interval.tick().await;
            if let Err(error) = self.reload_if_changed() {
                warn!(%error, "ignoring the changed workloads file; the previous contents stay in force");
            }
        }
    }

    fn current(&self) -> Arc<WorkloadsSnapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }
}

impl WorkloadSource for StandaloneSource {
    async fn workload(
        &self,
        _cgroup_id: u64,
        cgroup_path: &Path,
    ) -> Result<Workload, Unattributed> {
        self.current()
            .workload_for(cgroup_path)
            .cloned()
            .ok_or_else(|| Unattributed::UnknownCgroup {
                path: cgroup_path.display().to_string(),
            })
    }

    fn catalog(&self) -> Arc<dyn IdentityCatalog + Send + Sync> {
        self.current()
    }

    fn namespace_rule(&self) -> NamespaceRule {
        self.rule
    }

    fn is_exception(&self, workload: &Workload) -> bool {
        self.current()
            .exceptions
            .iter()
            .filter(|e| e.metadata.namespace.as_deref().unwrap_or("default") == workload.namespace)
            .any(|e| e.matches(&workload.labels))
    }

    async fn assignment(&self, _: &Workload, _: &BoundIdentity, _: Duration) -> Assignment {
        Assignment::Ready
    }

    fn secrets(&self) -> Arc<dyn SecretSource> {
        self.secrets.clone()
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn on_identity_refused(&self, refused: &RefusedIdentity) {
        let key = (
            format!("{}/{}", refused.namespace, refused.name),
            refused.refusal.kind(),
        );
        let first = self
            .refused_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        if first {
            warn!(
                identity = %format!("{}/{}", refused.namespace, refused.name),
                reason = %refused.refusal,
                "an AzureIdentity in the workloads file is refused; its workloads get no token"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{RequestedIdentity, bound_identities, choose};

    const FILE: &str = r#"
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentity
metadata: {name: sqlpodidentity}
spec: {type: 0, clientID: c-sql, resourceID: /subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/sql}
---
apiVersion: aadpodidentity.k8s.io/v1
kind: AzureIdentityBinding
metadata: {name: sqlpodidentity-binding}
spec: {azureIdentity: sqlpodidentity, selector: sqlpodid}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {name: reporting, labels: {aadpodidbinding: sqlpodid}}
spec: {cgroup: services/reporting}
---
apiVersion: podid.dev/v1alpha1
kind: LocalWorkload
metadata: {name: reporting-batch, labels: {aadpodidbinding: nothing}}
spec: {cgroup: services/reporting/batch}
"#;

    #[test]
    fn deepest_workload_wins_and_bindings_resolve() {
        let root = Path::new("podid-demo");
        let snapshot = WorkloadsSnapshot::parse(FILE, root, Path::new("w.yaml")).unwrap();
        let reporting = snapshot
            .workload_for(Path::new("podid-demo/services/reporting/worker"))
            .unwrap();
        assert_eq!(reporting.name, "reporting");
        let batch = snapshot
            .workload_for(Path::new("podid-demo/services/reporting/batch/x"))
            .unwrap();
        assert_eq!(batch.name, "reporting-batch");
        assert!(
            snapshot
                .workload_for(Path::new("podid-demo/services/reportingx"))
                .is_none()
        );
        assert!(
            snapshot
                .workload_for(Path::new("elsewhere/services/reporting"))
                .is_none()
        );

        let bound = bound_identities(
            &snapshot,
            NamespaceRule::Cluster,
            &podid_api::validation::IdentityRules::default(),
            &reporting.namespace,
            &reporting.labels,
        )
        .unwrap();
        let chosen = choose(&bound, &RequestedIdentity::Any).unwrap();
        assert_eq!(chosen.identity.spec.client_id, "c-sql");
    }

    #[test]
    fn conflicting_files_are_rejected() {
        let twice = format!(
            "{FILE}\n---\napiVersion: podid.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {{name: again}}\nspec: {{cgroup: services/reporting}}\n"
        );
        let err = WorkloadsSnapshot::parse(&twice, Path::new(""), Path::new("w.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("name the same cgroup"), "{err}");
    }
}
