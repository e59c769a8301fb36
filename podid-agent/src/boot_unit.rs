//! The node-start window: after a reboot bpffs is empty, and the pods
//! already bound to the node start again before the agent's DaemonSet pod
//! attaches anything. A systemd unit on the host closes it: ordered before
//! the container runtime and kubelet, it runs `podid-agent guard boot`, which
//! installs the tc guard in boot mode (only the host's services reach IMDS)
//! until the agent takes over.
//!
//! `podid-agent guard install-unit` writes the unit and a copy of the agent
//! binary under a host root (the chart's init container mounts the host's
//! `/etc/systemd/system` and `/opt/podid` there); `uninstall-unit` removes
//! them. Nothing else on the host is touched, and no daemon reload is needed:
//! the unit matters from the next boot on.

use std::{
    fs, io,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
};

/// The unit's file name.
pub const UNIT_NAME: &str = "podid-imds-guard.service";
/// Where the binary is copied, on the host.
pub const HOST_BINARY: &str = "/opt/podid/bin/podid-agent";

/// What the unit runs.
#[derive(Debug, Clone)]
pub struct UnitSettings {
    /// The host's bpffs pin root (`--bpffs-dir`).
    pub bpffs_dir: PathBuf,
    /// The host cgroup whose processes keep IMDS during boot.
    pub allow_cgroup: PathBuf,
    /// `--imds-guard-interface`.
    pub guard_interfaces: String,
}

/// The unit file's text.
pub fn unit_text(settings: &UnitSettings) -> String {
    format!(
        "# Installed by podid-agent (`podid-agent guard install-unit`); removed by\n\
# `podid-agent guard uninstall-unit`. Keeps pods from the Instance Metadata\n\
# Service from boot until the podid agent attaches its programs.\n\
[Unit]\n\
Description=podid IMDS guard: pods reach IMDS only through the podid agent\n\
Wants=network-online.target\n\
After=network-online.target sys-fs-bpf.mount\n\
Before=containerd.service crio.service docker.service kubelet.service\n\
\n\
[Service]\n\
Type=oneshot\n\
RemainAfterExit=yes\n\
ExecStart={HOST_BINARY} guard boot --bpffs-dir {} --allow-cgroup {} --imds-guard-interface {}\n\
\n\
[Install]\n\
WantedBy=kubelet.service\n",
        settings.bpffs_dir.display(),
        settings.allow_cgroup.display(),
        settings.guard_interfaces,
    )
}

fn under(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

/// The files `install` writes under `root`: the unit, its `wants` link and
/// the binary.
pub fn paths(root: &Path) -> [PathBuf; 3] {
    [
        under(root, &format!("/etc/systemd/system/{UNIT_NAME}")),
        under(
            root,
            &format!("/etc/systemd/system/kubelet.service.wants/{UNIT_NAME}"),
        ),
        under(root, HOST_BINARY),
    ]
}

/// Writes the unit, enables it for kubelet, and copies `binary` to the host
/// path. Idempotent: an unchanged file is left as it is. Returns what it
/// wrote.
pub fn install(root: &Path, settings: &UnitSettings, binary: &Path) -> io::Result<Vec<PathBuf>> {
    let [unit, wants, host_binary] = paths(root);
    let mut written = Vec::new();
    let text = unit_text(settings);
    if fs::read_to_string(&unit).ok().as_deref() != Some(text.as_str()) {
        write_atomically(&unit, text.as_bytes(), 0o644)?;
        written.push(unit.clone());
    }
    if fs::read_link(&wants).ok().as_deref() != Some(Path::new(&format!("../{UNIT_NAME}"))) {
        if let Some(dir) = wants.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&wants);
        symlink(format!("../{UNIT_NAME}"), &wants)?;
        written.push(wants);
    }
    let new = fs::read(binary)?;
    if fs::read(&host_binary).ok().as_deref() != Some(new.as_slice()) {
        write_atomically(&host_binary, &new, 0o755)?;
        written.push(host_binary);
    }
    Ok(written)
}

/// Removes what [`install`] wrote. Returns what it removed.
pub fn uninstall(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for path in paths(root) {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

fn write_atomically(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let staged = dir.join(format!(
        ".{}.podid-new",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    fs::write(&staged, content)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
    fs::rename(&staged, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> UnitSettings {
        UnitSettings {
            bpffs_dir: "/sys/fs/bpf/podid".into(),
            allow_cgroup: "/sys/fs/cgroup/system.slice".into(),
            guard_interfaces: "auto".into(),
        }
    }

    #[test]
    fn install_is_idempotent_and_uninstall_removes_only_its_files() {
        let root = std::env::temp_dir().join(format!("podid-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let binary = std::env::current_exe().expect("a binary to copy");
        let other = root.join("etc/systemd/system/other.service");
        fs::create_dir_all(other.parent().unwrap()).unwrap();
        fs::write(&other, "[Unit]\n").unwrap();

        let first = install(&root, &settings(), &binary).expect("install");
        assert_eq!(first.len(), 3, "{first:?}");
        let [unit, wants, copy] = paths(&root);
        let text = fs::read_to_string(&unit).unwrap();
        assert!(text.contains("Before=containerd.service"), "{text}");
        assert!(
            text.contains(&format!("ExecStart={HOST_BINARY} guard boot")),
            "{text}"
        );
        assert_eq!(
            fs::read_link(&wants).unwrap(),
            Path::new(&format!("../{UNIT_NAME}"))
        );
        assert_eq!(
            fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            install(&root, &settings(), &binary).unwrap().is_empty(),
            "nothing changes the second time"
        );

        let removed = uninstall(&root).unwrap();
        assert_eq!(removed.len(), 3);
        assert!(other.exists(), "other units stay");
        assert!(uninstall(&root).unwrap().is_empty());
        let _ = fs::remove_dir_all(&root);
    }
}
