//! Guards for privileged tests: a private network namespace, private cgroups,
//! a private bpffs, and child processes placed in a cgroup. Everything is
//! undone in `Drop`, also when the test panics.
//!
//! Safety rules these guards exist for: tests never send traffic outside a
//! network namespace they created, attach programs only to cgroups they
//! created, and kill only processes they started.

use std::{
    ffi::CString,
    fs,
    io::{self, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Set by `cargo xtask test` (and so in CI): a missing precondition is then a
/// failure, not a skip.
pub const REQUIRE_ENV: &str = "PODID_REQUIRE_PRIVILEGED";

/// Why privileged tests cannot run here, if they cannot.
pub fn missing_preconditions() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if cgroup2_mount_point().is_none() {
        return Some("no cgroup v2 filesystem is mounted".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    None
}

/// Returns true if the test should go on. Prints a skip reason otherwise, or
/// panics when [`REQUIRE_ENV`] is set.
pub fn preconditions_met(test: &str) -> bool {
    match missing_preconditions() {
        None => true,
        Some(reason) if std::env::var_os(REQUIRE_ENV).is_some() => {
            panic!("{test}: privileged preconditions not met: {reason}")
        }
        Some(reason) => {
            eprintln!("skipping test {test}: {reason}");
            false
        }
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount_point() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// A private network namespace for the current thread (and the threads and
/// processes it starts), with `lo` up. Dropping it returns the thread to the
/// namespace it came from.
pub struct NetNsGuard {
    original: OwnedFd,
}

impl NetNsGuard {
    /// Enters a new network namespace.
    pub fn new() -> Self {
        let original: OwnedFd = fs::File::open("/proc/thread-self/ns/net")
            .expect("open /proc/thread-self/ns/net")
            .into();
        // SAFETY: unshare with a valid flag; affects only this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
        let guard = Self { original };
        run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
        guard
    }

    /// Adds an address to `lo` (for example 169.254.169.254/32 for an IMDS
    /// stand-in, or a node address for the agent) inside this namespace.
    pub fn add_loopback_address(&self, cidr: &str) {
        run_ok(Command::new("ip").args(["addr", "add", cidr, "dev", "lo"]));
    }

    /// The namespace's inode, to check that work happens inside it.
    pub fn current_inode() -> u64 {
        fs::metadata("/proc/thread-self/ns/net")
            .expect("stat netns")
            .ino()
    }
}

impl Default for NetNsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        // SAFETY: original is an open netns fd.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            eprintln!(
                "NetNsGuard: cannot return to the original netns: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// A cgroup v2 directory created by the test, removed (with its children) on drop.
pub struct CgroupGuard {
    path: PathBuf,
    children: Vec<PathBuf>,
}

impl CgroupGuard {
    /// Creates `podid-test-<pid>-<n>` directly under the cgroup2 mount.
    pub fn new(label: &str) -> Self {
        let mount = cgroup2_mount_point().expect("cgroup2 mounted");
        let path = mount.join(format!(
            "podid-test-{}-{}-{label}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path,
            children: Vec::new(),
        }
    }

    /// This cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its cgroup id (directory inode).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("stat cgroup").ino()
    }

    /// Creates a child cgroup at `relative` (may be nested, for example a
    /// kubelet-style `kubepods.slice/kubepods-pod<uid>.slice/cri-containerd-<id>.scope`).
    pub fn child(&mut self, relative: &str) -> PathBuf {
        let mut path = self.path.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path.push(part);
            if !path.exists() {
                fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
                self.children.push(path.clone());
            }
        }
        path
    }
}

impl CgroupGuard {
    /// Removes the child cgroup at `relative` now (it must be empty of
    /// processes; ours are moved out first).
    pub fn remove_child(&mut self, relative: &str) {
        let path = self.path.join(relative);
        remove_cgroup(&path);
        self.children.retain(|c| c != &path);
    }
}

/// The cgroup id of a directory.
pub fn cgroup_id_of(path: &Path) -> u64 {
    fs::metadata(path).expect("stat cgroup").ino()
}

fn remove_cgroup(path: &Path) {
    // Move any leftover process of ours out, so the directory can go.
    if let (Ok(procs), Some(mount)) = (
        fs::read_to_string(path.join("cgroup.procs")),
        cgroup2_mount_point(),
    ) {
        for pid in procs.lines() {
            let _ = fs::write(mount.join("cgroup.procs"), pid);
        }
    }
    for _ in 0..50 {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("CgroupGuard: could not remove {}", path.display());
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for child in self.children.iter().rev() {
            remove_cgroup(child);
        }
        remove_cgroup(&self.path);
    }
}

/// A private bpffs instance mounted on a temporary directory. Pins in it
/// disappear, and their links detach, when it is unmounted on drop.
pub struct BpffsGuard {
    path: PathBuf,
}

impl BpffsGuard {
    /// Mounts a new bpffs instance.
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!(
            "podid-bpffs-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path).expect("mkdir bpffs dir");
        let target = cstring(&path);
        let fstype = CString::new("bpf").expect("static");
        // SAFETY: valid NUL-terminated strings; no mount data.
        let rc = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount bpffs: {}", io::Error::last_os_error());
        Self { path }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin root to give the agent (a directory below the mount point).
    pub fn pin_root(&self) -> PathBuf {
        self.path.join("podid")
    }

    /// Every file pinned below the mount point, except the kernel's own
    /// preloaded `maps.debug`/`progs.debug` iterators.
    pub fn pinned_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let p = entry.path();
                    let preloaded = p.parent() == Some(self.path.as_path())
                        && p.extension().is_some_and(|e| e == "debug");
                    if p.is_dir() {
                        stack.push(p);
                    } else if !preloaded {
                        out.push(p);
                    }
                }
            }
        }
        out
    }
}

impl Default for BpffsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpffsGuard {
    fn drop(&mut self) {
        let target = cstring(&self.path);
        // SAFETY: valid path; MNT_DETACH never blocks.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir(&self.path);
    }
}

/// A filesystem mounted by the test (a small tmpfs, or a bind mount of one
/// of the test's own directories), unmounted on drop.
pub struct MountGuard {
    path: PathBuf,
    created: bool,
}

fn mount_raw(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = CString::new(source).expect("no NUL");
    let target = cstring(target);
    let fstype = fstype.map(|f| CString::new(f).expect("no NUL"));
    let data = data.map(|d| CString::new(d).expect("no NUL"));
    // SAFETY: valid NUL-terminated strings (or null where allowed).
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl MountGuard {
    /// Mounts a tmpfs of `size_bytes` on a new temporary directory.
    pub fn tmpfs(label: &str, size_bytes: u64) -> Self {
        let path = std::env::temp_dir().join(format!(
            "podid-tmpfs-{}-{}-{label}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&path).expect("mkdir tmpfs dir");
        let guard = Self {
            path,
            created: true,
        };
        mount_raw(
            "tmpfs",
            &guard.path,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&format!("size={size_bytes},mode=0755")),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", guard.path.display()));
        guard
    }

    /// Bind-mounts `source` on `target` (both directories the test owns),
    /// read-only if asked.
    pub fn bind(source: &Path, target: &Path, read_only: bool) -> Self {
        mount_raw(&source.to_string_lossy(), target, None, libc::MS_BIND, None)
            .unwrap_or_else(|e| panic!("bind {} on {}: {e}", source.display(), target.display()));
        let guard = Self {
            path: target.to_path_buf(),
            created: false,
        };
        if read_only {
            guard.set_read_only(true);
        }
        guard
    }

    /// Remounts a bind mount read-only or read-write.
    pub fn set_read_only(&self, read_only: bool) {
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        mount_raw("none", &self.path, None, flags, None)
            .unwrap_or_else(|e| panic!("remount {} (ro={read_only}): {e}", self.path.display()));
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        let target = cstring(&self.path);
        // SAFETY: valid path; MNT_DETACH never blocks.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if self.created {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// A child process this test started; killed (by its own PID) and reaped on drop.
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Wraps a started child.
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    /// The child's PID.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Mutable access, for stdout/stdin.
    pub fn inner(&mut self) -> &mut Child {
        self.child.as_mut().expect("child present")
    }

    /// Waits for the child to exit, with a bound.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGKILL to the child (ours, by PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Takes the child out of the guard (the caller becomes responsible).
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("child present")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes `cmd` move itself into `cgroup` between fork and exec, so the program
/// runs entirely inside it.
pub fn in_cgroup<'a>(cmd: &'a mut Command, cgroup: &Path) -> &'a mut Command {
    let procs = cstring(&cgroup.join("cgroup.procs"));
    // SAFETY: the closure only calls async-signal-safe functions (open, write, close).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" means the writing process itself.
            let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if rc != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

thread_local! {
    static WORKLOAD_NETNS: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// While alive, workloads this thread starts with [`in_workload`] (probes,
/// SDK clients) run in the network namespace at a pod's path instead of the
/// thread's own: the same test then exercises a pod on the pod network.
pub struct WorkloadNetnsGuard {
    previous: Option<PathBuf>,
}

impl WorkloadNetnsGuard {
    /// Runs this thread's workloads in `netns` until the guard drops.
    pub fn enter(netns: PathBuf) -> Self {
        let previous = WORKLOAD_NETNS.with(|slot| slot.replace(Some(netns)));
        Self { previous }
    }
}

impl Drop for WorkloadNetnsGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        WORKLOAD_NETNS.with(|slot| *slot.borrow_mut() = previous);
    }
}

/// Places `cmd` as a workload: in `cgroup`, and in the pod network
/// namespace a [`WorkloadNetnsGuard`] names, if one is alive on this thread.
pub fn in_workload<'a>(cmd: &'a mut Command, cgroup: &Path) -> &'a mut Command {
    if let Some(netns) = WORKLOAD_NETNS.with(|slot| slot.borrow().clone()) {
        in_netns(cmd, &netns);
    }
    in_cgroup(cmd, cgroup)
}

/// Makes `cmd` enter the network namespace at `netns` (a `/run/netns/…`
/// path) between fork and exec, as a pod's container runs in its pod's.
pub fn in_netns<'a>(cmd: &'a mut Command, netns: &Path) -> &'a mut Command {
    let file = fs::File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    let fd: OwnedFd = file.into();
    // SAFETY: setns is async-signal-safe; the fd stays open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

/// Moves this whole test process into `cgroup` until the guard drops.
pub struct ProcessCgroupGuard {
    original: PathBuf,
}

impl ProcessCgroupGuard {
    /// Moves the current process into `cgroup`.
    pub fn enter(cgroup: &Path) -> Self {
        let mount = cgroup2_mount_point().expect("cgroup2 mounted");
        let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup v2 entry")
            .trim_start_matches('/')
            .to_owned();
        let original = mount.join(relative);
        write_pid(cgroup, std::process::id());
        Self { original }
    }
}

impl Drop for ProcessCgroupGuard {
    fn drop(&mut self) {
        write_pid(&self.original, std::process::id());
    }
}

fn write_pid(cgroup: &Path, pid: u32) {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    f.write_all(pid.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", cgroup.display()));
}

/// Runs a command to completion and panics with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of a binary built from this workspace (`target/<profile>/<name>`),
/// found next to the running executable: a test binary lives in
/// `target/<profile>/deps`, a normal binary in `target/<profile>`.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("the executable has a directory");
    let candidates = [Some(dir), dir.parent()];
    candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {}: build the workspace binaries first (`cargo xtask test` does)",
                exe.display()
            )
        })
}

/// A second network namespace (a "pod"), joined to the current one by a veth
/// pair: `host_addr` on this side, `pod_addr` inside, default route via the
/// host side. Removed on drop. Threads enter it with [`PodNetns::enter`].
pub struct PodNetns {
    name: String,
    host_if: String,
}

impl PodNetns {
    /// Creates the namespace and the link. Addresses are `a.b.c.d` in a /24.
    pub fn new(host_addr: &str, pod_addr: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::SeqCst);
        let name = format!("podid-{}-{id}", std::process::id());
        let host_if = format!("pdh{}x{id}", std::process::id() % 100_000);
        let pod_if = format!("pdp{}x{id}", std::process::id() % 100_000);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let guard = Self {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        run_ok(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &pod_if, "netns", &name]));
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host_addr}/24"),
            "dev",
            &host_if,
        ]));
        run_ok(Command::new("ip").args(["link", "set", &host_if, "up"]));
        let in_pod = |args: &[&str]| {
            run_ok(
                Command::new("ip")
                    .args(["netns", "exec", &name, "ip"])
                    .args(args),
            );
        };
        in_pod(&["link", "set", "lo", "up"]);
        in_pod(&["addr", "add", &format!("{pod_addr}/24"), "dev", &pod_if]);
        in_pod(&["link", "set", &pod_if, "up"]);
        in_pod(&["route", "add", "default", "via", host_addr]);
        guard
    }

    /// Moves the calling thread into the pod namespace (for good: use a
    /// dedicated thread).
    pub fn enter(&self) {
        let file = fs::File::open(format!("/run/netns/{}", self.name)).expect("open pod netns");
        // SAFETY: valid netns fd; affects only the calling thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host side of the veth pair.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
