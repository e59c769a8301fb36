//! cgroup path → pod UID and container ID (`workloads::kubernetes::cgroup_path`),
//! on arbitrary paths (any bytes, as the kernel allows in cgroup names).
//!
//! Invariants: nothing panics; the answer is deterministic; a pod UID is a
//! canonical lower-case UUID that the path spells (with `-` or `_`); a
//! container ID is 64 lower-case hex digits that the path spells; the path is
//! read the same relative or absolute and below an unrelated parent; and
//! once a container is found, nothing below it (a container's delegated
//! subtree, which it names as it likes) changes the answer.

#![no_main]

use std::{
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use libfuzzer_sys::fuzz_target;
use podid_agent::workloads::kubernetes::cgroup_path::{CgroupPathError, PodCgroup, Runtime, parse};

/// What a container could create below its own cgroup to pose as another pod.
const FORGED: &str = "kubepods/burstable/podaaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee/\
                      0000000000000000000000000000000000000000000000000000000000000000";

fn is_canonical_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

fn check_ok(path: &Path, pod: &PodCgroup) {
    let text = path.to_string_lossy();
    assert!(is_canonical_uid(&pod.pod_uid), "{text:?}: uid {pod:?}");
    assert!(
        text.contains(&pod.pod_uid) || text.contains(&pod.pod_uid.replace('-', "_")),
        "{text:?}: {pod:?} is not spelled in the path"
    );
    if let Some(container) = &pod.container {
        assert_eq!(container.id.len(), 64, "{text:?}: {container:?}");
        assert!(
            container
                .id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{text:?}: {container:?}"
        );
        assert!(text.contains(&container.id), "{text:?}: {container:?}");
        assert!(
            !container.conmon || container.runtime == Runtime::CriO,
            "{text:?}: {container:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new(OsStr::from_bytes(data));
    let first = parse(path);
    assert_eq!(first, parse(path), "not deterministic");
    match &first {
        Ok(pod) => check_ok(path, pod),
        Err(
            CgroupPathError::NotAPod { path: shown }
            | CgroupPathError::Malformed { path: shown, .. },
        ) => {
            assert_eq!(*shown, path.display().to_string());
        }
    }
    let Ok(pod) = &first else {
        return;
    };

    // Relative or absolute, and below an unrelated parent (a node container,
    // a test's own cgroup): the same pod.
    let relative = data.strip_prefix(b"/").unwrap_or(data);
    let mut absolute = b"/".to_vec();
    absolute.extend_from_slice(relative);
    assert_eq!(
        parse(Path::new(OsStr::from_bytes(&absolute))).as_ref(),
        Ok(pod)
    );
    let nested = Path::new("system.slice/node.scope").join(OsStr::from_bytes(relative));
    assert_eq!(parse(&nested).as_ref(), Ok(pod), "{nested:?}");

    // The outermost pod decides: a forged pod below a container is still
    // that container.
    if pod.container.is_some() {
        let forged: PathBuf = path.join(FORGED);
        assert_eq!(parse(&forged).as_ref(), Ok(pod), "{forged:?}");
    }
});
