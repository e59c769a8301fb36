//! cgroup v2 facts the redirect needs: where the hierarchy is mounted, which
//! cgroup this process is in, and a cgroup's id (the inode of its directory,
//! which is what `bpf_get_current_cgroup_id()` returns).

use std::{
    fs,
    io::{self, BufRead},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Filesystem magic of cgroup2 (`CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A cgroup v2 mount as seen from this process's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted, for example `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`.
    pub mount_point: PathBuf,
    /// Which cgroup of the hierarchy appears at the mount point (usually `/`).
    pub root: String,
}

/// Finds the cgroup v2 mount in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> io::Result<Cgroup2Mount> {
    let file = fs::File::open("/proc/self/mountinfo")?;
    parse_mountinfo(io::BufReader::new(file))?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 filesystem is mounted (cgroup v2 is required)",
        )
    })
}

fn parse_mountinfo(reader: impl BufRead) -> io::Result<Option<Cgroup2Mount>> {
    for line in reader.lines() {
        let line = line?;
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> <source> <super options>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        return Ok(Some(Cgroup2Mount {
            root: unescape_mountinfo(fields[3]),
            mount_point: PathBuf::from(unescape_mountinfo(fields[4])),
        }));
    }
    Ok(None)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup v2 path relative to its cgroup namespace root, from
/// the `0::` line of `/proc/self/cgroup`.
pub fn own_cgroup_path() -> io::Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "/proc/self/cgroup has no cgroup v2 (0::) entry",
            )
        })
}

/// Directory of this process's own cgroup, under the cgroup2 mount.
pub fn own_cgroup_dir() -> io::Result<PathBuf> {
    let mount = cgroup2_mount()?;
    let path = own_cgroup_path()?;
    Ok(resolve_under_mount(&mount, &path))
}

/// Joins a cgroup path (relative to the cgroup namespace root) onto the mount
/// point, accounting for a mount whose root is not `/`.
fn resolve_under_mount(mount: &Cgroup2Mount, cgroup_path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let relative = cgroup_path
        .strip_prefix(root)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .unwrap_or(cgroup_path);
    mount.mount_point.join(relative.trim_start_matches('/'))
}

/// The depth of the cgroup at `dir` in the cgroup2 hierarchy (the root is 0),
/// as `bpf_skb_ancestor_cgroup_id` counts levels: the directories below the
/// mount point, plus the depth of the cgroup mounted there.
pub fn cgroup_level(dir: &Path) -> io::Result<u32> {
    let mount = cgroup2_mount()?;
    let dir = fs::canonicalize(dir)?;
    let mount_point = fs::canonicalize(&mount.mount_point).unwrap_or(mount.mount_point.clone());
    let below = dir.strip_prefix(&mount_point).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not below the cgroup2 mount {}",
                dir.display(),
                mount_point.display()
            ),
        )
    })?;
    let normal = |p: &Path| {
        p.components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count() as u32
    };
    Ok(normal(Path::new(&mount.root)) + normal(below))
}

/// The cgroup id of a cgroup v2 directory.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a cgroup directory", dir.display()),
        ));
    }
    Ok(meta.ino())
}

/// Checks that `dir` is on a cgroup2 filesystem.
pub fn ensure_cgroup2(dir: &Path) -> io::Result<()> {
    let magic = statfs_magic(dir)?;
    if magic == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not on a cgroup v2 filesystem (magic {magic:#x})",
                dir.display()
            ),
        ))
    }
}

/// `statfs(2)`'s `f_type` for `path`.
pub(crate) fn statfs_magic(path: &Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: c_path is NUL-terminated and buf is a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs succeeded, so buf is initialised.
    let buf = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Ok(buf.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let text = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        let mount = parse_mountinfo(text.as_bytes()).unwrap().unwrap();
        assert_eq!(mount.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(mount.root, "/");
    }

    #[test]
    fn no_cgroup2_is_none() {
        let text = "25 30 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n";
        assert_eq!(parse_mountinfo(text.as_bytes()).unwrap(), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn resolves_paths_under_a_mount_with_a_non_root_root() {
        let mount = Cgroup2Mount {
            mount_point: PathBuf::from("/host/cgroup"),
            root: "/kubepods.slice".into(),
        };
        assert_eq!(
            resolve_under_mount(&mount, "/kubepods.slice/pod1"),
            PathBuf::from("/host/cgroup/pod1")
        );
        let root_mount = Cgroup2Mount {
            mount_point: PathBuf::from("/sys/fs/cgroup"),
            root: "/".into(),
        };
        assert_eq!(
            resolve_under_mount(&root_mount, "/system.slice/podid.service"),
            PathBuf::from("/sys/fs/cgroup/system.slice/podid.service")
        );
        assert_eq!(
            resolve_under_mount(&root_mount, "/"),
            PathBuf::from("/sys/fs/cgroup")
        );
    }
}
