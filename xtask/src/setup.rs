//! `cargo xtask setup`: installs what is missing, and says nothing when
//! nothing is.
//!
//! - the eBPF toolchain: Debian's rustc-web + prebuilt BPF `core` + bpf-linker
//!   against the same LLVM where Debian has them, otherwise rustup nightly with
//!   rust-src + bpf-linker;
//! - system tools the tests use: bpftool, iproute2, iptables/nftables (the
//!   DNAT comparison benchmark);
//! - Python tools (`tests/python-requirements.txt`) in `target/venv`, and the
//!   npm `@azure/identity` client in `target/node`;
//! - fuzzing: cargo-fuzz, and a C++ compiler for libFuzzer.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::ebpf_build;

/// Debian packages of the eBPF toolchain route.
const DEBIAN_TOOLCHAIN: [&str; 3] = ["rustc-web", "cargo-web", "libstd-rust-web-dev-bpf"];
/// bpf-linker release that builds against Debian's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// System tools the tests and benchmarks use.
const SYSTEM_TOOLS: [(&str, &str); 4] = [
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
];
/// The npm client the end-to-end tests use, pinned.
pub const NPM_AZURE_IDENTITY: &str = "@azure/identity@4.14.1";

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Python virtualenv the tests use.
pub fn venv() -> PathBuf {
    workspace().join("target").join("venv")
}

/// The npm prefix the tests use.
pub fn node_prefix() -> PathBuf {
    workspace().join("target").join("node")
}

pub fn run() -> anyhow::Result<()> {
    ensure_system_tools()?;
    ensure_ebpf_toolchain()?;
    ensure_python_tools()?;
    ensure_node_tools()?;
    ensure_fuzz_tools()?;
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_candidate(package: &str) -> bool {
    Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .is_ok_and(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.lines()
                .any(|l| l.trim().starts_with("Candidate:") && !l.contains("(none)"))
        })
}

fn run_quiet(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Installs Debian packages, refreshing the package index once if needed.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "installing {} needs root (apt-get); run as root or install them yourself",
            packages.join(" ")
        );
    }
    let mut refreshed = false;
    if !packages.iter().all(|p| apt_candidate(p)) {
        run_quiet(apt_get().args(["update", "-qq"]), "apt-get update")?;
        refreshed = true;
    }
    eprintln!("setup: installing {}", packages.join(" "));
    let install = || {
        run_quiet(
            apt_get()
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages),
            "apt-get install",
        )
    };
    match install() {
        Ok(()) => Ok(()),
        // A stale index names package versions the mirror no longer holds (404):
        // refresh it once and try again.
        Err(_) if !refreshed => {
            run_quiet(apt_get().args(["update", "-qq"]), "apt-get update")?;
            install()
        }
        Err(error) => Err(error),
    }
}

fn has_apt() -> bool {
    on_path("apt-get")
}

fn ensure_system_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = SYSTEM_TOOLS
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if has_apt() {
        apt_install(&missing)
    } else {
        bail!(
            "missing tools: {} (install them with your package manager)",
            missing.join(", ")
        )
    }
}

/// The LLVM major version Debian's rustc was built with.
fn debian_llvm_major() -> Option<String> {
    let out = Command::new("/usr/bin/rustc").arg("-vV").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
}

fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    if ebpf_build::detect_route().is_ok() {
        return Ok(());
    }
    let debian_available = has_apt()
        && (DEBIAN_TOOLCHAIN.iter().all(|p| dpkg_installed(p))
            || DEBIAN_TOOLCHAIN.iter().all(|p| apt_candidate(p))
            || {
                // The candidates may only appear after an index refresh.
                is_root()
                    && run_quiet(apt_get().args(["update", "-qq"]), "apt-get update").is_ok()
                    && DEBIAN_TOOLCHAIN.iter().all(|p| apt_candidate(p))
            });
    if debian_available {
        let missing: Vec<&str> = DEBIAN_TOOLCHAIN
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect();
        if !missing.is_empty() {
            apt_install(&missing)?;
        }
        let llvm = debian_llvm_major().context("reading Debian rustc's LLVM version")?;
        let llvm_dev = format!("llvm-{llvm}-dev");
        if !dpkg_installed(&llvm_dev) {
            apt_install(&[llvm_dev.as_str()])?;
        }
        if ebpf_build::find_bpf_linker().is_none() {
            let prefix = format!("/usr/lib/llvm-{llvm}");
            eprintln!(
                "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} (about a minute)"
            );
            run_quiet(
                Command::new("/usr/bin/cargo")
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env("RUSTC", "/usr/bin/rustc")
                    .env("LLVM_PREFIX", &prefix)
                    .env(format!("LLVM_SYS_{llvm}1_PREFIX"), &prefix)
                    .args([
                        "install",
                        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                        "--locked",
                        "--no-default-features",
                        "--features",
                        &format!("llvm-{llvm}"),
                    ]),
                "cargo install bpf-linker",
            )?;
        }
    } else {
        // An ordinary internet-connected machine: the usual aya route.
        if ebpf_build::nightly_route().is_err() {
            eprintln!("setup: installing rustup nightly with rust-src");
            run_quiet(
                Command::new("rustup").args([
                    "toolchain",
                    "install",
                    "nightly",
                    "--profile",
                    "minimal",
                    "--component",
                    "rust-src",
                ]),
                "rustup toolchain install nightly",
            )?;
        }
        if ebpf_build::find_bpf_linker().is_none() {
            eprintln!("setup: installing bpf-linker");
            run_quiet(
                Command::new("cargo").args(["install", "bpf-linker"]),
                "cargo install bpf-linker",
            )?;
        }
    }
    ebpf_build::detect_route()
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn requirements_stamp(requirements: &str) -> String {
    // A cheap, stable fingerprint: the file's length and a simple checksum.
    let sum = requirements.bytes().fold(0u64, |acc, b| {
        acc.wrapping_mul(131).wrapping_add(u64::from(b))
    });
    format!("{}-{sum:x}", requirements.len())
}

fn ensure_python_tools() -> anyhow::Result<()> {
    let requirements_path = workspace().join("tests/python-requirements.txt");
    let requirements = fs::read_to_string(&requirements_path)
        .with_context(|| format!("reading {}", requirements_path.display()))?;
    let venv = venv();
    let stamp_path = venv.join(".podid-requirements");
    let stamp = requirements_stamp(&requirements);
    if venv.join("bin/python").is_file()
        && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
    {
        return Ok(());
    }
    eprintln!(
        "setup: installing Python test tools into {}",
        venv.display()
    );
    if !venv.join("bin/python").is_file() {
        run_quiet(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        )?;
    }
    run_quiet(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check", "-r"])
            .arg(&requirements_path),
        "pip install",
    )?;
    fs::write(&stamp_path, stamp).context("writing the venv stamp")?;
    Ok(())
}

fn ensure_node_tools() -> anyhow::Result<()> {
    let prefix = node_prefix();
    let installed = prefix.join("node_modules/@azure/identity/package.json");
    if installed.is_file() {
        return Ok(());
    }
    if !on_path("npm") {
        bail!("npm is missing: install Node.js 20+ and npm");
    }
    eprintln!(
        "setup: installing {NPM_AZURE_IDENTITY} into {}",
        prefix.display()
    );
    fs::create_dir_all(&prefix)?;
    run_quiet(
        Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(NPM_AZURE_IDENTITY),
        "npm install",
    )
}

/// cargo-fuzz (from crates.io) and the C++ compiler libfuzzer-sys builds
/// libFuzzer with. Any toolchain does: `cargo xtask fuzz` uses rustup's
/// nightly when there is one, else this one with `RUSTC_BOOTSTRAP=1`.
fn ensure_fuzz_tools() -> anyhow::Result<()> {
    if !on_path("c++") && !on_path("g++") {
        if has_apt() {
            apt_install(&["g++"])?;
        } else {
            bail!("a C++ compiler (g++) is missing: libFuzzer needs one");
        }
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin/cargo-fuzz"));
    if on_path("cargo-fuzz") || cargo_bin.is_some_and(|p| p.is_file()) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz");
    run_quiet(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "install",
            "cargo-fuzz",
            "--locked",
        ]),
        "cargo install cargo-fuzz",
    )
}
