//! Layout of podid's objects on bpffs, and removing them.
//!
//! ```text
//! <pin root>/                      default /sys/fs/bpf/podid
//!   v<ABI_VERSION>/
//!     map_<MAP NAME>               every map of the object
//!     prog_<program>               the program currently attached
//!     link_<program>_<cgroup id>   its bpf_link to that cgroup
//! ```
//!
//! Pinned links keep the programs attached after the agent exits, so there is
//! no moment when pods reach the real IMDS. Only [`remove_all`] (the explicit
//! uninstall) detaches them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use podid_ebpf::ABI_VERSION;

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Default pin root on a node.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/podid";

/// Paths of everything podid pins under one root.
#[derive(Debug, Clone)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// Layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The pin root given by the operator.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory for this ABI version's pins.
    pub fn dir(&self) -> PathBuf {
        self.root.join(format!("v{ABI_VERSION}"))
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir().join(format!("map_{name}"))
    }

    /// Pin path of a program.
    pub fn program(&self, program: &str) -> PathBuf {
        self.dir().join(format!("prog_{program}"))
    }

    /// Pin path of a program's link to a cgroup.
    pub fn link(&self, program: &str, cgroup_id: u64) -> PathBuf {
        self.dir().join(format!("link_{program}_{cgroup_id}"))
    }

    /// Staging path used while replacing a link, so the old one stays attached
    /// until the new one is in place.
    pub fn staged_link(&self, program: &str, cgroup_id: u64) -> PathBuf {
        self.dir().join(format!("staged_{program}_{cgroup_id}"))
    }

    /// Link pins of `program` to cgroups other than `cgroup_id` (the operator
    /// moved the attach point).
    pub fn stale_links(&self, program: &str, cgroup_id: u64) -> io::Result<Vec<PathBuf>> {
        let prefix = format!("link_{program}_");
        let keep = format!("{prefix}{cgroup_id}");
        let mut stale = Vec::new();
        for entry in fs::read_dir(self.dir())? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name != keep {
                stale.push(self.dir().join(name));
            }
        }
        Ok(stale)
    }

    /// Pin directories of other ABI versions, removed once ours is attached.
    pub fn other_versions(&self) -> io::Result<Vec<PathBuf>> {
        let ours = self.dir();
        let mut others = Vec::new();
        for entry in fs::read_dir(&self.root)? {
            let path = entry?.path();
            let is_version_dir = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_version_dir_name);
            if path != ours && is_version_dir && path.is_dir() {
                others.push(path);
            }
        }
        Ok(others)
    }

    /// Makes sure the root is on bpffs and the version directory exists.
    pub fn prepare(&self) -> io::Result<()> {
        let parent = self.root.parent().unwrap_or(Path::new("/"));
        let probe = if self.root.exists() {
            self.root.as_path()
        } else {
            parent
        };
        let magic = super::cgroup::statfs_magic(probe)?;
        if magic != BPF_FS_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not on a BPF filesystem; mount one (mount -t bpf bpf {}) or pass another --bpffs-dir",
                    probe.display(),
                    parent.display()
                ),
            ));
        }
        fs::create_dir_all(self.dir())
    }
}

/// Whether anything of ours is pinned under `root`.
pub fn anything_pinned(root: &Path) -> bool {
    fs::read_dir(root)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
}

/// Whether `name` is one of podid's version directories (`v` + digits).
fn is_version_dir_name(name: &str) -> bool {
    name.strip_prefix('v')
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is one of the pins podid makes in a version directory.
fn is_our_pin_name(name: &str) -> bool {
    ["map_", "prog_", "link_", "staged_"].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty())
    })
}

/// Fails unless `path` is on a BPF filesystem.
fn require_bpffs(path: &Path) -> io::Result<()> {
    let magic = super::cgroup::statfs_magic(path)?;
    if magic == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not on a BPF filesystem (magic {magic:#x}); refusing to remove anything",
                path.display()
            ),
        ))
    }
}

/// Removes podid's pins under `root`, which must be on a BPF filesystem:
/// in each version directory (`v<N>`), the pins named as podid names them
/// (links first, so programs detach before the maps they use disappear);
/// then each version directory and `root` itself if nothing else is left in
/// them. Anything else (another tool's pins or directories) stays. Returns
/// what was removed.
pub fn remove_all(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    require_bpffs(root)?;
    let mut version_dirs = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() && name.to_str().is_some_and(is_version_dir_name) {
            version_dirs.push(entry.path());
        }
    }
    removed.extend(remove_versions(&version_dirs)?);
    if fs::read_dir(root)?.next().is_none() {
        fs::remove_dir(root)?;
    }
    Ok(removed)
}

/// Removes podid's pins in one version directory (another ABI version's,
/// once ours is attached), and the directory if nothing else is left in it.
pub fn remove_version(dir: &Path) -> io::Result<Vec<PathBuf>> {
    require_bpffs(dir)?;
    remove_versions(&[dir.to_path_buf()])
}

fn remove_versions(version_dirs: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in version_dirs {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let ours = !entry.file_type()?.is_dir()
                && entry.file_name().to_str().is_some_and(is_our_pin_name);
            if ours {
                files.push(entry.path());
            }
        }
    }
    let rank = |p: &PathBuf| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("link_") || name.starts_with("staged_") {
            0
        } else if name.starts_with("prog_") {
            1
        } else {
            2
        }
    };
    files.sort_by_key(rank);
    let mut removed = Vec::new();
    for file in files {
        fs::remove_file(&file)?;
        removed.push(file);
    }
    for dir in version_dirs {
        if fs::read_dir(dir)?.next().is_none() {
            fs::remove_dir(dir)?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_podid_names_count_as_ours() {
        for name in ["v3", "v12"] {
            assert!(is_version_dir_name(name), "{name}");
        }
        for name in ["v", "vendor", "v3x", "x3", ""] {
            assert!(!is_version_dir_name(name), "{name}");
        }
        for name in [
            "map_PEER_RECORDS",
            "prog_podid_connect4",
            "link_podid_connect4_1234",
            "staged_podid_sock_ops_1",
        ] {
            assert!(is_our_pin_name(name), "{name}");
        }
        for name in ["map_", "cilium_calls", "tc", "globals", "mapX"] {
            assert!(!is_our_pin_name(name), "{name}");
        }
    }

    #[test]
    fn a_directory_not_on_bpffs_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("podid-pins-test-{}", std::process::id()));
        let version = dir.join(format!("v{ABI_VERSION}"));
        fs::create_dir_all(&version).expect("mkdir");
        fs::write(version.join("map_PEER_RECORDS"), b"x").expect("write");
        fs::write(dir.join("someone-elses-file"), b"y").expect("write");
        let error = remove_all(&dir).expect_err("not bpffs");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(
            error.to_string().contains("not on a BPF filesystem"),
            "{error}"
        );
        assert!(version.join("map_PEER_RECORDS").exists());
        assert!(dir.join("someone-elses-file").exists());
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
