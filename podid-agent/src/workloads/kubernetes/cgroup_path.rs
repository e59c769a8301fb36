//! From a cgroup path to a pod UID and a container ID.
//!
//! kubelet names a pod's cgroup after the pod UID, and the container runtime
//! names each container's cgroup after the container ID. The layouts (cgroup
//! v2 paths relative to the cgroup2 mount; `<uid>` with dashes, `<uid_>` with
//! underscores, `<id>` 64 lower-case hex digits):
//!
//! | driver | pod cgroup | container cgroup |
//! |---|---|---|
//! | systemd | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` (Guaranteed: `kubepods.slice/kubepods-pod<uid_>.slice`) | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `crio-conmon-<id>.scope`, `docker-<id>.scope` |
//! | cgroupfs | `kubepods/<qos>/pod<uid>` (Guaranteed: `kubepods/pod<uid>`) | `<id>`, `crio-<id>`, `crio-conmon-<id>`, `cri-containerd-<id>`, `docker-<id>` |
//! | containerd, systemd cgroup v1 style | `…/containerd.service/kubepods-<qos>-pod<uid_>.slice:cri-containerd:<id>` | (same component) |
//!
//! `<qos>` is `burstable` or `besteffort`. Anything may come before the
//! kubelet part (a test's or a nested node's cgroup: kind's
//! `kubelet.slice/kubelet-kubepods.slice/…`, or a node container's
//! `system.slice/docker-<node>.scope/kubepods/…`); a systemd pod slice must
//! sit in the slice its name says is its parent (`kubepods-burstable-pod….slice`
//! in `kubepods-burstable.slice`), and a cgroupfs pod directory in `kubepods`
//! or its QoS directory.
//!
//! The **first** (outermost) pod cgroup in the path decides: cgroups below a
//! container's are the container's own (a container with a delegated cgroup
//! subtree can name them as it likes, so they are never trusted to name
//! another pod). A process directly in the pod's cgroup, or in one the
//! runtime did not name after a container, is rejected unless it is a known
//! form; the pause container (the sandbox) and CRI-O's `conmon` monitor have
//! container cgroups of their own and count as the pod.

use std::path::{Component, Path};

/// Which runtime named the container cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>`.
    Containerd,
    /// `crio-<id>` (and `crio-conmon-<id>`).
    CriO,
    /// `docker-<id>` (dockershim, cri-dockerd).
    Docker,
    /// A bare `<id>` (cgroupfs driver: containerd or Docker).
    Unnamed,
}

/// A container cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// The runtime that named it.
    pub runtime: Runtime,
    /// The container ID (64 lower-case hex digits), as in
    /// `status.containerStatuses[].containerID` after `<runtime>://`.
    pub id: String,
    /// CRI-O's `conmon` monitor of that container, not the container itself.
    pub conmon: bool,
}

/// What a cgroup path says about the pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID, with dashes (`metadata.uid`).
    pub pod_uid: String,
    /// The container, when the path goes below the pod's cgroup.
    pub container: Option<ContainerCgroup>,
}

/// Why a path is not a pod's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupPathError {
    /// No component is a kubelet pod cgroup.
    #[error("{path} is not below a kubelet pod cgroup")]
    NotAPod {
        /// The path.
        path: String,
    },
    /// A component names a pod but breaks kubelet's layout.
    #[error("{path}: {reason}")]
    Malformed {
        /// The path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Length of a pod UID with separators.
const UID_LEN: usize = 36;
/// Positions of the separators in a UID.
const UID_SEPARATORS: [usize; 4] = [8, 13, 18, 23];
/// Length of a container ID.
const CONTAINER_ID_LEN: usize = 64;

/// A pod UID written with `separator`, returned with dashes.
fn pod_uid(text: &str, separator: u8) -> Option<String> {
    let bytes = text.as_bytes();
    if bytes.len() != UID_LEN {
        return None;
    }
    let valid = bytes.iter().enumerate().all(|(i, b)| {
        if UID_SEPARATORS.contains(&i) {
            *b == separator
        } else {
            b.is_ascii_digit() || (b'a'..=b'f').contains(b)
        }
    });
    valid.then(|| text.replace(separator as char, "-"))
}

fn container_id(text: &str) -> Option<String> {
    (text.len() == CONTAINER_ID_LEN
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| text.to_string())
}

/// How kubelet's driver named the pod cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Driver {
    Systemd,
    Cgroupfs,
}

/// The parts of a systemd pod slice name before `-pod<uid>`: an optional
/// prefix (`kubelet`), `kubepods`, an optional QoS class. Returns the
/// parent slice's name, which the pod slice must sit in.
fn systemd_parent(prefix: &str) -> Result<String, String> {
    let parts: Vec<&str> = prefix.split('-').collect();
    let Some(at) = parts.iter().position(|p| *p == "kubepods") else {
        return Err(format!("slice {prefix}-pod… is not below kubepods"));
    };
    match &parts[at + 1..] {
        [] | ["burstable"] | ["besteffort"] => {}
        other => return Err(format!("unknown QoS class {:?}", other.join("-"))),
    }
    if parts[..at].iter().any(|p| p.is_empty()) {
        return Err(format!("malformed slice prefix {prefix:?}"));
    }
    Ok(format!("{prefix}.slice"))
}

/// Whether `component` (under `parent`) is a pod cgroup: `Ok(None)` if it
/// does not look like one, an error if it looks like one but is broken.
fn pod_component(
    component: &str,
    parent: Option<&str>,
    grandparent: Option<&str>,
) -> Result<Option<(String, Driver)>, String> {
    if let Some(stem) = component.strip_suffix(".slice") {
        let Some((prefix, uid)) = stem.rsplit_once("-pod") else {
            return Ok(None);
        };
        if !prefix.split('-').any(|p| p == "kubepods") {
            return Ok(None);
        }
        let uid = pod_uid(uid, b'_')
            .ok_or_else(|| format!("{component}: not a pod UID with underscores"))?;
        let expected = systemd_parent(prefix)?;
        if parent != Some(expected.as_str()) {
            return Err(format!(
                "pod slice {component} must be in {expected}, not {}",
                parent.unwrap_or("the root")
            ));
        }
        return Ok(Some((uid, Driver::Systemd)));
    }
    let Some(uid) = component.strip_prefix("pod") else {
        return Ok(None);
    };
    let in_kubepods = match parent {
        Some("kubepods") => true,
        Some("burstable" | "besteffort") => grandparent == Some("kubepods"),
        _ => false,
    };
    if !in_kubepods {
        return Ok(None);
    }
    let uid = pod_uid(uid, b'-').ok_or_else(|| format!("{component}: not a pod UID"))?;
    Ok(Some((uid, Driver::Cgroupfs)))
}

/// The container a cgroup below a pod's names.
fn container_component(component: &str, driver: Driver) -> Result<ContainerCgroup, String> {
    let stem = match driver {
        Driver::Systemd => component
            .strip_suffix(".scope")
            .ok_or_else(|| format!("{component}: a systemd container cgroup is a .scope"))?,
        Driver::Cgroupfs if component.ends_with(".scope") => {
            return Err(format!(
                "{component}: a .scope under a cgroupfs pod directory"
            ));
        }
        Driver::Cgroupfs => component,
    };
    let (runtime, conmon, id) = if let Some(id) = stem.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, false, id)
    } else if let Some(id) = stem.strip_prefix("crio-conmon-") {
        (Runtime::CriO, true, id)
    } else if let Some(id) = stem.strip_prefix("crio-") {
        (Runtime::CriO, false, id)
    } else if let Some(id) = stem.strip_prefix("docker-") {
        (Runtime::Docker, false, id)
    } else if driver == Driver::Cgroupfs {
        (Runtime::Unnamed, false, stem)
    } else {
        return Err(format!(
            "{component}: not a container cgroup of a known runtime"
        ));
    };
    let id = container_id(id).ok_or_else(|| format!("{component}: not a 64-hex container ID"))?;
    Ok(ContainerCgroup {
        runtime,
        id,
        conmon,
    })
}

/// `kubepods-<qos>-pod<uid_>.slice:cri-containerd:<id>` (containerd with the
/// systemd driver on cgroup v1 hosts).
fn colon_component(component: &str) -> Result<Option<PodCgroup>, String> {
    let parts: Vec<&str> = component.split(':').collect();
    let [slice, runtime, id] = parts.as_slice() else {
        return Ok(None);
    };
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Ok(None);
    };
    let Some((prefix, uid)) = stem.rsplit_once("-pod") else {
        return Ok(None);
    };
    systemd_parent(prefix)?;
    let uid = pod_uid(uid, b'_').ok_or_else(|| format!("{component}: not a pod UID"))?;
    let runtime = match *runtime {
        "cri-containerd" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        other => return Err(format!("{component}: unknown runtime {other:?}")),
    };
    let id = container_id(id).ok_or_else(|| format!("{component}: not a 64-hex container ID"))?;
    Ok(Some(PodCgroup {
        pod_uid: uid,
        container: Some(ContainerCgroup {
            runtime,
            id,
            conmon: false,
        }),
    }))
}

/// Parses a cgroup path (relative to the cgroup2 mount, or absolute as in
/// `/proc/<pid>/cgroup`).
pub fn parse(path: &Path) -> Result<PodCgroup, CgroupPathError> {
    let shown = path.display().to_string();
    let malformed = |reason: String| CgroupPathError::Malformed {
        path: shown.clone(),
        reason,
    };
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => components.push(
                name.to_str()
                    .ok_or_else(|| malformed("a component is not UTF-8".into()))?,
            ),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(malformed("a component is not a plain name".into()));
            }
        }
    }
    for (i, component) in components.iter().enumerate() {
        if let Some(pod) = colon_component(component).map_err(&malformed)? {
            return Ok(pod);
        }
        let parent = i.checked_sub(1).map(|p| components[p]);
        let grandparent = i.checked_sub(2).map(|p| components[p]);
        let Some((pod_uid, driver)) =
            pod_component(component, parent, grandparent).map_err(&malformed)?
        else {
            continue;
        };
        let container = match components.get(i + 1) {
            None => None,
            Some(next) => Some(container_component(next, driver).map_err(&malformed)?),
        };
        return Ok(PodCgroup { pod_uid, container });
    }
    Err(CgroupPathError::NotAPod { path: shown })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1e7b6a3c-9f7c-4c8a-8e2a-0d4c2b1f9a77";
    const UID_: &str = "1e7b6a3c_9f7c_4c8a_8e2a_0d4c2b1f9a77";
    const ID: &str = "3f1c9a0e5b7d2c4a6e8f0b1d3c5a7e9f1b3d5c7a9e0f2b4d6c8a0e1f3b5d7c9a";
    const OTHER_UID: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";

    fn container(runtime: Runtime, conmon: bool) -> Option<ContainerCgroup> {
        Some(ContainerCgroup {
            runtime,
            id: ID.into(),
            conmon,
        })
    }

    #[test]
    fn real_world_paths_for_each_driver_runtime_and_qos() {
        use Runtime::*;
        let cases: Vec<(String, Option<ContainerCgroup>)> = vec![
            // systemd driver, containerd, each QoS class.
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Containerd, false),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Containerd, false),
            ),
            (
                format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                container(Containerd, false),
            ),
            // systemd driver, CRI-O: the container, its conmon, and crun's
            // nested `container` cgroup below the scope.
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
                ),
                container(CriO, false),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
                ),
                container(CriO, true),
            ),
            (
                format!("kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope/container"),
                container(CriO, false),
            ),
            // systemd driver, Docker (dockershim / cri-dockerd).
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{ID}.scope"
                ),
                container(Docker, false),
            ),
            // cgroupfs driver, each QoS class and runtime.
            (
                format!("kubepods/burstable/pod{UID}/{ID}"),
                container(Unnamed, false),
            ),
            (
                format!("kubepods/besteffort/pod{UID}/crio-{ID}"),
                container(CriO, false),
            ),
            (format!("kubepods/pod{UID}/{ID}"), container(Unnamed, false)),
            (
                format!("kubepods/pod{UID}/crio-conmon-{ID}"),
                container(CriO, true),
            ),
            (
                format!("kubepods/burstable/pod{UID}/docker-{ID}"),
                container(Docker, false),
            ),
            (
                format!("kubepods/burstable/pod{UID}/cri-containerd-{ID}"),
                container(Containerd, false),
            ),
            // kind (systemd and cgroupfs), a node container seen from the
            // host, and a test's own root.
            (
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Containerd, false),
            ),
            (
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Containerd, false),
            ),
            (
                format!("kubelet/kubepods/burstable/pod{UID}/{ID}"),
                container(Unnamed, false),
            ),
            (
                format!("system.slice/docker-{ID}.scope/kubepods/besteffort/pod{UID}/{ID}"),
                container(Unnamed, false),
            ),
            (
                format!(
                    "podid-test-1-0-kube/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                container(Containerd, false),
            ),
            // containerd with the systemd driver, cgroup v1 naming.
            (
                format!(
                    "system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"
                ),
                container(Containerd, false),
            ),
            // The pod's own cgroup, no container.
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                None,
            ),
            (format!("kubepods/pod{UID}"), None),
            // Cgroups a container created below its own are still its own,
            // whatever they are called: the outermost pod decides.
            (
                format!("kubepods/burstable/pod{UID}/{ID}/kubepods/pod{OTHER_UID}/{ID}"),
                container(Unnamed, false),
            ),
            (
                format!(
                    "kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope/kubepods.slice/kubepods-pod{}.slice",
                    OTHER_UID.replace('-', "_")
                ),
                container(Containerd, false),
            ),
        ];
        for (path, expected) in cases {
            let parsed = parse(Path::new(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(parsed.pod_uid, UID, "{path}");
            assert_eq!(parsed.container, expected, "{path}");
        }
    }

    #[test]
    fn malformed_and_foreign_paths_are_rejected() {
        let short_uid = "1e7b6a3c_9f7c_4c8a_8e2a_0d4c2b1f9a7";
        let mixed_uid = "1e7b6a3c-9f7c_4c8a_8e2a_0d4c2b1f9a77";
        let upper_uid = "1E7B6A3C_9F7C_4C8A_8E2A_0D4C2B1F9A77";
        let short_id = &ID[..63];
        let upper_id = ID.to_uppercase();
        let not_a_pod = [
            String::new(),
            "system.slice/sshd.service".into(),
            "kubepods.slice".into(),
            "kubepods.slice/kubepods-burstable.slice".into(),
            "kubepods/burstable".into(),
            // `pod<uid>` outside kubepods is not kubelet's.
            format!("elsewhere/pod{UID}/{ID}"),
            format!("user.slice/user-pod{UID_}.slice"),
        ];
        for path in not_a_pod {
            assert!(
                matches!(
                    parse(Path::new(&path)),
                    Err(CgroupPathError::NotAPod { .. })
                ),
                "{path:?} must not be a pod"
            );
        }
        let malformed = [
            // Broken UIDs.
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{short_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{mixed_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{upper_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!("kubepods/burstable/pod{UID_}/{ID}"),
            // The pod slice in the wrong parent, or a QoS class that does not exist.
            format!("kubepods.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "kubepods.slice/kubepods-guaranteed.slice/kubepods-guaranteed-pod{UID_}.slice/cri-containerd-{ID}.scope"
            ),
            format!("kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
            // Broken or unknown container cgroups.
            format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{short_id}.scope"),
            format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{upper_id}.scope"),
            format!("kubepods.slice/kubepods-pod{UID_}.slice/rkt-{ID}.scope"),
            format!("kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}"),
            format!("kubepods.slice/kubepods-pod{UID_}.slice/{ID}.scope"),
            format!("kubepods/pod{UID}/cri-containerd-{ID}.scope"),
            format!("kubepods/pod{UID}/not-a-container"),
            format!("system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:rkt:{ID}"),
            format!(
                "system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{short_id}"
            ),
            // Not plain names.
            format!("kubepods/pod{UID}/../pod{OTHER_UID}/{ID}"),
        ];
        for path in malformed {
            assert!(
                matches!(
                    parse(Path::new(&path)),
                    Err(CgroupPathError::Malformed { .. })
                ),
                "{path:?} must be rejected as malformed, got {:?}",
                parse(Path::new(&path))
            );
        }
    }
}
