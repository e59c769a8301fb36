//! From a kernel record to a cgroup path: the first half of attribution.
//!
//! The kernel gives a cgroup id (the inode of the caller's cgroup v2
//! directory). [`CgroupPaths`] turns it into a path relative to the cgroup2
//! mount, through `open_by_handle_at(2)` (cgroupfs exports ids as file
//! handles) and, where that is not permitted, a walk of the hierarchy. Results
//! are cached; a miss refreshes. The workload sources turn the path into a pod
//! or a local workload.

use std::{
    collections::HashMap,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use tracing::debug;

/// `FILEID_KERNFS`: the handle type cgroupfs uses; the handle is the 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;
/// Entries kept before the cache is cleared and rebuilt on demand.
const CACHE_CAPACITY: usize = 65_536;
/// Upper bound on directories visited by one fallback walk.
const WALK_LIMIT: usize = 200_000;

#[repr(C)]
struct CgroupFileHandle {
    handle_bytes: u32,
    handle_type: i32,
    cgroup_id: u64,
}

/// Resolves cgroup ids to paths under one cgroup2 mount.
#[derive(Debug)]
pub struct CgroupPaths {
    mount: PathBuf,
    mount_fd: OwnedFd,
    cache: Mutex<HashMap<u64, PathBuf>>,
}

impl CgroupPaths {
    /// Uses the cgroup2 hierarchy mounted at `mount` (on a node, the host's
    /// cgroup2 root as mounted into the agent's container).
    pub fn new(mount: &Path) -> io::Result<Self> {
        crate::redirect::cgroup::ensure_cgroup2(mount)?;
        let c_path = CString::new(mount.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: valid NUL-terminated path; the fd is owned right after.
        let fd = unsafe {
            libc::open(
                c_path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is not owned elsewhere.
        let mount_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            mount: mount.to_path_buf(),
            mount_fd,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The path of cgroup `id` relative to the mount (empty for the root), or
    /// `None` if no such cgroup exists (any more).
    pub fn path_of(&self, id: u64) -> Option<PathBuf> {
        // cgroup ids are never reused, so a cached entry can only be stale by
        // naming a removed directory: still that cgroup's path, which is what
        // attribution needs (a connection in flight from a cgroup being
        // removed belongs to it). No syscall on the hot path.
        if let Some(path) = self.cached(id) {
            return Some(path);
        }
        let found = self.by_handle(id).or_else(|| self.by_walk(id))?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(id, found.clone());
        Some(found)
    }

    fn cached(&self, id: u64) -> Option<PathBuf> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn still_has_id(&self, relative: &Path, id: u64) -> bool {
        fs::metadata(self.mount.join(relative)).is_ok_and(|m| m.ino() == id)
    }

    /// `open_by_handle_at` on the mount; needs CAP_DAC_READ_SEARCH.
    fn by_handle(&self, id: u64) -> Option<PathBuf> {
        let mut handle = CgroupFileHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            cgroup_id: id,
        };
        // SAFETY: the handle struct matches `struct file_handle` with an
        // 8-byte payload; the returned fd is owned right after.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.mount_fd.as_raw_fd(),
                &mut handle as *mut CgroupFileHandle,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_PATH,
            )
        };
        if fd < 0 {
            debug!(
                cgroup_id = id,
                error = %io::Error::last_os_error(),
                "open_by_handle_at failed; walking the hierarchy instead"
            );
            return None;
        }
        // SAFETY: fd was just returned by the kernel and is not owned elsewhere.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let relative = link.strip_prefix(&self.mount).ok()?.to_path_buf();
        // The link is our mount namespace's view; confirm it is the same
        // directory before trusting it.
        self.still_has_id(&relative, id).then_some(relative)
    }

    /// Walks the hierarchy breadth-first, caching every id it passes.
    fn by_walk(&self, id: u64) -> Option<PathBuf> {
        let mut queue = std::collections::VecDeque::from([PathBuf::new()]);
        let mut visited = 0usize;
        let mut seen = Vec::new();
        let mut found = None;
        while let Some(relative) = queue.pop_front() {
            visited += 1;
            if visited > WALK_LIMIT {
                break;
            }
            let Ok(meta) = fs::metadata(self.mount.join(&relative)) else {
                continue;
            };
            seen.push((meta.ino(), relative.clone()));
            if meta.ino() == id {
                found = Some(relative);
                break;
            }
            let Ok(entries) = fs::read_dir(self.mount.join(&relative)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    queue.push_back(relative.join(entry.file_name()));
                }
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() + seen.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.extend(seen);
        found
    }
}

/// Whether `path` lies at or below `ancestor`, comparing whole components.
pub fn is_within(path: &Path, ancestor: &Path) -> bool {
    path.starts_with(ancestor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_compares_components() {
        assert!(is_within(Path::new("a/b/c"), Path::new("a/b")));
        assert!(is_within(Path::new("a/b"), Path::new("a/b")));
        assert!(!is_within(Path::new("a/bc"), Path::new("a/b")));
        assert!(is_within(Path::new("a/b"), Path::new("")));
    }
}
