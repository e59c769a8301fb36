//! Every command in the docs that can run on this machine runs here:
//! `podid-agent` and `podid-controller` invocations (the audit queries run
//! against an audit log shaped like the docs' examples, `redirect status`
//! against a redirect this test pins), and every documented `cargo xtask`
//! subcommand is checked to exist. Commands that need a cluster or Azure
//! (`kubectl`, `helm install`, `az`) cannot run here; the Helm chart itself
//! is rendered and validated by `manifests/tests/check_manifests.py`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use podid_agent::audit::{AuditRecord, CacheUse, Outcome};
use podid_agent::redirect::{Redirect, RedirectOptions};
use podid_tests::{
    IMDS,
    privileged::{BpffsGuard, CgroupGuard, NetNsGuard, preconditions_met, workspace_binary},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where a command was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A fenced code block: a command to run as written.
    Block,
    /// An inline code span: a reference to a command (may omit arguments).
    Inline,
}

/// Every shell command line in README.md and docs/*.md: fenced code blocks
/// (with `\` continuations joined) and inline code spans.
fn documented_commands() -> Vec<(String, String, Source)> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).expect("read doc");
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let mut in_block = false;
        let mut pending = String::new();
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_block = !in_block;
                continue;
            }
            if in_block {
                let line = line.trim().trim_start_matches("$ ");
                if let Some(head) = line.strip_suffix('\\') {
                    pending.push_str(head);
                    continue;
                }
                let full = format!("{pending}{line}");
                pending.clear();
                out.push((name.clone(), full.trim().to_string(), Source::Block));
            } else {
                for (i, span) in line.split('`').enumerate() {
                    if i % 2 == 1 {
                        out.push((name.clone(), span.trim().to_string(), Source::Inline));
                    }
                }
            }
        }
    }
    out
}

fn commands_of(program: &str, only: Option<Source>) -> Vec<(String, Vec<String>)> {
    let mut seen = std::collections::BTreeSet::new();
    documented_commands()
        .into_iter()
        .filter(|(_, _, source)| only.is_none_or(|o| o == *source))
        .filter_map(|(file, line, _)| {
            let words = shell_words(&line);
            (words.first().map(String::as_str) == Some(program) && seen.insert(line.clone()))
                .then_some((file, words))
        })
        .collect()
}

/// Splits a command line on spaces, honouring simple quotes; stops at `|`,
/// `;`, `#` and a table's escaped `\|`.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, '|' | ';' | '#' | '\\') => break,
            (None, c) if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            (None, c) => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// An audit log with records like the docs' examples: the identity
/// `shop/sqlpodidentity` issued to pod `web-7d9c8b7f6-x2x9q` recently, a
/// refusal in the documented time window, and Key Vault tokens.
fn write_fixture(path: &Path) {
    let now = SystemTime::now();
    let ts = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
    let record = |ts: String, outcome: Outcome, status: u16, resource: &str| AuditRecord {
        ts,
        node: "aks-nodepool1-12345678-vmss000003".into(),
        namespace: "shop".into(),
        pod: "web-7d9c8b7f6-x2x9q".into(),
        pod_uid: "3f1c2b4a-8e9d-4c7b-a6f5-1e2d3c4b5a69".into(),
        container: "web".into(),
        cgroup_id: 8043,
        identity: if outcome == Outcome::Issued {
            "shop/sqlpodidentity".into()
        } else {
            String::new()
        },
        client_id: if outcome == Outcome::Issued {
            "9d8c58bf-c8a7-437f-8cc8-85e6b20e4c63".into()
        } else {
            String::new()
        },
        resource: resource.into(),
        status,
        outcome,
        cache: if outcome == Outcome::Issued {
            CacheUse::Hit
        } else {
            CacheUse::None
        },
        ..AuditRecord::default()
    };
    let window = humantime::parse_rfc3339("2026-11-28T09:30:00Z").expect("timestamp");
    let records = [
        record(
            ts(now - Duration::from_secs(600)),
            Outcome::Issued,
            200,
            "https://database.windows.net",
        ),
        record(
            ts(now - Duration::from_secs(300)),
            Outcome::Issued,
            200,
            "https://vault.azure.net",
        ),
        record(
            ts(window),
            Outcome::IdentityNotFound,
            400,
            "https://vault.azure.net",
        ),
    ];
    let text: String = records
        .iter()
        .map(|r| format!("{}\n", serde_json::to_string(r).unwrap()))
        .collect();
    fs::write(path, text).expect("write fixture");
}

fn run(program: &Path, args: &[String]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .env("PODID_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn documented_audit_queries_run_and_find_records() {
    let queries: Vec<_> = commands_of("podid-agent", Some(Source::Block))
        .into_iter()
        .filter(|(_, words)| words.get(1).map(String::as_str) == Some("audit"))
        .collect();
    assert!(
        queries.len() >= 4,
        "the docs show audit queries: {queries:?}"
    );
    let dir = std::env::temp_dir().join(format!("podid-docs-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let fixture = dir.join("audit.log");
    write_fixture(&fixture);
    for (file, words) in queries {
        let args: Vec<String> = words[1..]
            .iter()
            .map(|w| {
                if w.ends_with("audit.log") {
                    fixture.display().to_string()
                } else {
                    w.clone()
                }
            })
            .collect();
        let (ok, stdout, stderr) = run(&workspace_binary("podid-agent"), &args);
        assert!(
            ok,
            "{file}: podid-agent {} failed: {stderr}",
            words[1..].join(" ")
        );
        let rows = if args.iter().any(|a| a == "--summary") {
            stdout.lines().skip(1).count()
        } else {
            stdout.lines().count()
        };
        assert!(
            rows > 0,
            "{file}: podid-agent {} found nothing:\n{stdout}",
            words[1..].join(" ")
        );
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_of_every_binary_and_documented_subcommand_runs() {
    for program in ["podid-agent", "podid-controller"] {
        let (ok, stdout, stderr) = run(&workspace_binary(program), &["--help".into()]);
        assert!(ok && stdout.contains("Usage"), "{program} --help: {stderr}");
    }
    for sub in ["run", "audit", "redirect"] {
        let (ok, stdout, _) = run(
            &workspace_binary("podid-agent"),
            &[sub.into(), "--help".into()],
        );
        assert!(ok && stdout.contains("Usage"), "podid-agent {sub} --help");
    }
    // Every documented `podid-agent`/`podid-controller` invocation names a
    // real subcommand: `<subcommand …> --help` must succeed.
    for program in ["podid-agent", "podid-controller"] {
        for (file, words) in commands_of(program, None) {
            let subcommands: Vec<String> = words[1..]
                .iter()
                .take_while(|w| !w.starts_with('-'))
                .cloned()
                .collect();
            let mut args = subcommands.clone();
            args.push("--help".into());
            let (ok, _, stderr) = run(&workspace_binary(program), &args);
            assert!(
                ok,
                "{file}: `{program} {}` is not a command: {stderr}",
                subcommands.join(" ")
            );
        }
    }
}

#[test]
fn documented_xtask_commands_exist() {
    let xtasks = commands_of("cargo", None);
    let xtasks: Vec<_> = xtasks
        .into_iter()
        .filter(|(_, w)| w.get(1).map(String::as_str) == Some("xtask"))
        .collect();
    assert!(
        xtasks
            .iter()
            .any(|(_, w)| w.get(2).map(String::as_str) == Some("test"))
            && xtasks
                .iter()
                .any(|(_, w)| w.get(2).map(String::as_str) == Some("demo")),
        "the README documents `cargo xtask test` and `cargo xtask demo`"
    );
    for (file, words) in xtasks {
        let subcommands: Vec<String> = words[2..]
            .iter()
            .take_while(|w| !w.starts_with('-') && !w.contains('/'))
            .cloned()
            .collect();
        let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(repo())
            .arg("xtask")
            .args(&subcommands)
            .arg("--help")
            .output()
            .expect("cargo xtask");
        assert!(
            out.status.success(),
            "{file}: `cargo xtask {}` is not a command: {}",
            subcommands.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn documented_redirect_status_reads_a_pinned_redirect() {
    if !preconditions_met("documented_redirect_status_reads_a_pinned_redirect") {
        return;
    }
    let commands: Vec<_> = commands_of("podid-agent", Some(Source::Block))
        .into_iter()
        .filter(|(_, w)| w.get(1..3) == Some(&["redirect".to_string(), "status".to_string()]))
        .collect();
    assert!(
        !commands.is_empty(),
        "troubleshooting.md shows redirect status"
    );
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let cgroups = CgroupGuard::new("docs-status");
    let redirect = Redirect::install(&RedirectOptions {
        cgroup_root: cgroups.path().to_path_buf(),
        pin_root: bpffs.pin_root(),
        imds: IMDS,
        agent: "127.0.0.1:2579".parse().unwrap(),
        exempt_self: true,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    })
    .expect("install");
    drop(redirect);
    for (file, words) in commands {
        let args: Vec<String> = words[1..]
            .iter()
            .map(|w| {
                if w.starts_with("/sys/fs/bpf") {
                    bpffs.pin_root().display().to_string()
                } else {
                    w.clone()
                }
            })
            .collect();
        let (ok, stdout, stderr) = run(&workspace_binary("podid-agent"), &args);
        assert!(ok, "{file}: {stderr}");
        let counters: serde_json::Value =
            serde_json::from_str(stdout.trim()).expect("JSON counters");
        for counter in [
            "redirected",
            "exempt",
            "recorded",
            "record_missing",
            "record_failed",
        ] {
            assert!(
                counters[counter].is_u64(),
                "{file}: {counter} missing from {stdout}"
            );
        }
    }
}

#[test]
fn the_demo_runs() {
    if !preconditions_met("the_demo_runs") {
        return;
    }
    let out = Command::new(workspace_binary("podid-demo"))
        .output()
        .expect("run podid-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podid-demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("got a token for client id"), "{stdout}");
    assert!(stdout.contains("Identity not found"), "{stdout}");
    assert!(stdout.contains("\"outcome\":\"issued\""), "{stdout}");
}
