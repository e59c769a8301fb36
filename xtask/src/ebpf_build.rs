//! Finding a toolchain that can build the kernel crate, and building it.
//!
//! This file uses only `std`: podid-agent's build script includes it with
//! `#[path]`, so `cargo build` builds the kernel object the same way
//! `cargo xtask build-ebpf` does.
//!
//! Two routes are supported (see `TOOLCHAIN.md`):
//! - Debian: `/usr/bin/rustc` from `rustc-web` with a prebuilt `core` for
//!   `bpfel-unknown-none` (`libstd-rust-web-dev-bpf`), plus `bpf-linker` built
//!   against the matching LLVM. `RUSTC_BOOTSTRAP=1` because aya-ebpf uses an
//!   unstable feature.
//! - rustup: a nightly toolchain with `rust-src`, building `core` with
//!   `-Z build-std`, plus `bpf-linker`.

use std::{
    env, fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF target triple the object is built for.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Kernel crate package name.
pub const EBPF_PACKAGE: &str = "podid-ebpf";
/// Binary (object) name inside the kernel crate.
pub const EBPF_BIN: &str = "podid";

/// How the kernel crate will be compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Debian's rustc with a prebuilt BPF `core`.
    Debian { cargo: PathBuf, rustc: PathBuf },
    /// rustup nightly with rust-src and `-Z build-std`.
    Nightly,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Debian { rustc, .. } => {
                write!(
                    f,
                    "Debian rustc ({}) with prebuilt BPF core",
                    rustc.display()
                )
            }
            Route::Nightly => write!(f, "rustup nightly with rust-src (-Z build-std)"),
        }
    }
}

/// Why no route is usable, phrased for the person who has to fix it.
#[derive(Debug)]
pub struct NoRoute {
    pub missing: Vec<String>,
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no toolchain can build the eBPF programs ({}); run `cargo xtask setup`",
            self.missing.join("; ")
        )
    }
}

impl std::error::Error for NoRoute {}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Looks for `bpf-linker` on `PATH` and in `$CARGO_HOME/bin`.
pub fn find_bpf_linker() -> Option<PathBuf> {
    let in_cargo_home = cargo_home().join("bin").join("bpf-linker");
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("bpf-linker"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| in_cargo_home.is_file().then_some(in_cargo_home))
}

fn rustc_sysroot(rustc: &Path, toolchain: Option<&str>) -> Option<PathBuf> {
    let mut cmd = Command::new(rustc);
    if let Some(tc) = toolchain {
        cmd.env("RUSTUP_TOOLCHAIN", tc);
    }
    let out = cmd.arg("--print").arg("sysroot").output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_prebuilt_bpf_core(sysroot: &Path) -> bool {
    let dir = sysroot.join("lib/rustlib").join(BPF_TARGET).join("lib");
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
        })
        .unwrap_or(false)
}

/// The Debian route, if its parts are installed.
pub fn debian_route() -> Result<Route, String> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if !rustc.is_file() || !cargo.is_file() {
        return Err("Debian rustc-web/cargo-web not installed".into());
    }
    let sysroot = rustc_sysroot(&rustc, None).ok_or("/usr/bin/rustc does not run")?;
    if !has_prebuilt_bpf_core(&sysroot) {
        return Err(format!(
            "no prebuilt core for {BPF_TARGET} under {} (libstd-rust-web-dev-bpf)",
            sysroot.display()
        ));
    }
    Ok(Route::Debian { cargo, rustc })
}

/// The rustup nightly route, if nightly with rust-src is installed.
pub fn nightly_route() -> Result<Route, String> {
    let sysroot =
        rustc_sysroot(Path::new("rustc"), Some("nightly")).ok_or("no rustup nightly toolchain")?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        Ok(Route::Nightly)
    } else {
        Err("rustup nightly has no rust-src component".into())
    }
}

/// Picks the first usable route: Debian's, then rustup nightly.
pub fn detect_route() -> Result<Route, NoRoute> {
    let mut missing = Vec::new();
    if find_bpf_linker().is_none() {
        missing.push("bpf-linker not found".to_string());
    }
    let route = match debian_route() {
        Ok(route) => Some(route),
        Err(why) => {
            missing.push(why);
            match nightly_route() {
                Ok(route) => Some(route),
                Err(why) => {
                    missing.push(why);
                    None
                }
            }
        }
    };
    match route {
        Some(route) if find_bpf_linker().is_some() => Ok(route),
        _ => Err(NoRoute { missing }),
    }
}

/// Environment variables set by an outer cargo (for example while running a
/// build script, or under clippy) that must not leak into the nested build.
const LEAKY_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTDOC",
    "RUSTUP_TOOLCHAIN",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PKG_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// The command that builds the kernel object for `route`.
pub fn build_command(route: &Route, workspace: &Path, target_dir: &Path) -> Command {
    let linker = find_bpf_linker().unwrap_or_else(|| PathBuf::from("bpf-linker"));
    let mut cmd = match route {
        Route::Debian { cargo, .. } => Command::new(cargo),
        Route::Nightly => Command::new("cargo"),
    };
    for var in LEAKY_ENV {
        cmd.env_remove(var);
    }
    // Variables of the form CARGO_CFG_* / CARGO_FEATURE_* come from build scripts.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("CARGO_CFG_") || key.starts_with("CARGO_FEATURE_") {
            cmd.env_remove(key);
        }
    }
    let target_env = BPF_TARGET.to_uppercase().replace('-', "_");
    cmd.current_dir(workspace)
        .env(format!("CARGO_TARGET_{target_env}_LINKER"), &linker)
        .env(
            format!("CARGO_TARGET_{target_env}_RUSTFLAGS"),
            "-C link-arg=--btf",
        )
        .env("CARGO_TARGET_DIR", target_dir);
    match route {
        Route::Debian { rustc, .. } => {
            cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
        }
        Route::Nightly => {
            cmd.env("RUSTUP_TOOLCHAIN", "nightly")
                .args(["-Z", "build-std=core"]);
        }
    }
    cmd.args(["build", "--locked", "--release", "--package", EBPF_PACKAGE])
        .args(["--bin", EBPF_BIN, "--target", BPF_TARGET]);
    cmd
}

/// Where the object lands for a given target directory.
pub fn object_path(target_dir: &Path) -> PathBuf {
    target_dir.join(BPF_TARGET).join("release").join(EBPF_BIN)
}

/// The directory the kernel build uses, kept apart from the host build's so
/// the two toolchains never contend for the same lock or artifacts.
pub fn default_target_dir(workspace: &Path) -> PathBuf {
    workspace.join("target").join("ebpf")
}

/// Builds the kernel object and returns its path.
pub fn build(workspace: &Path, target_dir: &Path, quiet: bool) -> Result<PathBuf, String> {
    let route = detect_route().map_err(|e| e.to_string())?;
    let mut cmd = build_command(&route, workspace, target_dir);
    if quiet {
        cmd.arg("--quiet");
    }
    // Nothing the nested cargo prints may reach a build script's stdout,
    // where cargo would read it as instructions.
    cmd.stdout(std::process::Stdio::from(std::io::stderr()));
    let status = cmd.status().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the eBPF programs with {route} failed ({status})"
        ));
    }
    let object = object_path(target_dir);
    if !object.is_file() {
        return Err(format!("{} was not produced", object.display()));
    }
    Ok(object)
}

/// Files whose change means the object must be rebuilt.
pub fn inputs(workspace: &Path) -> Vec<PathBuf> {
    vec![
        workspace.join(EBPF_PACKAGE).join("src"),
        workspace.join(EBPF_PACKAGE).join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ]
}
