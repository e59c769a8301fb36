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
                .is_some_and(|n| n.starts_with('v'));
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

/// Removes every pin under `root` (links first, so programs detach before the
/// maps they use disappear), then the directories. Returns what was removed.
pub fn remove_all(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    let mut dirs = vec![root.to_path_buf()];
    let mut files = Vec::new();
    let mut i = 0;
    while i < dirs.len() {
        for entry in fs::read_dir(&dirs[i])? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
        i += 1;
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
    for file in files {
        fs::remove_file(&file)?;
        removed.push(file);
    }
    for dir in dirs.into_iter().rev() {
        fs::remove_dir(&dir)?;
    }
    Ok(removed)
}
