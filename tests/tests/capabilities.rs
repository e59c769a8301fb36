//! The agent runs with exactly the capabilities the Helm chart grants it
//! (`agent.capabilities`: BPF and NET_ADMIN, everything else dropped, no
//! `privileged`), and each of them is needed.
//!
//! `setpriv --bounding-set` gives a root process only the listed
//! capabilities, which is what a container with `capabilities.drop: [ALL]`
//! and `add: [BPF, NET_ADMIN]` gets.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use podid_agent::redirect::{Redirect, RedirectOptions};
use podid_tests::{
    IMDS,
    harness::http_get,
    privileged::{
        BpffsGuard, CgroupGuard, ChildGuard, NetNsGuard, cgroup_id_of, in_cgroup,
        preconditions_met, workspace_binary,
    },
    probe::{ProbeSpec, finish},
};

/// The chart's `agent.capabilities` (manifests/helm/podid/values.yaml).
const CHART_CAPABILITIES: &[&str] = &["bpf", "net_admin"];
const AGENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2579);

fn values_capabilities() -> Vec<String> {
    let values = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/helm/podid/values.yaml"),
    )
    .expect("read values.yaml");
    let mut lines = values.lines().skip_while(|l| l.trim() != "capabilities:");
    lines.next();
    lines
        .map_while(|l| {
            l.trim()
                .strip_prefix("- ")
                .map(|c| c.trim().to_ascii_lowercase())
        })
        .collect()
}

/// `setpriv` wrapping `podid-agent args…` with only `caps` (as root).
fn with_only(caps: &[&str], args: &[&str]) -> Command {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set={bounding}"))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(workspace_binary("podid-agent"))
        .args(args)
        .env("PODID_LOG", "warn");
    cmd
}

fn install_args<'a>(cgroup: &'a str, pins: &'a str) -> Vec<&'a str> {
    vec![
        "redirect",
        "install",
        "--cgroup-root",
        cgroup,
        "--bpffs-dir",
        pins,
        "--listen",
        "127.0.0.1:2579",
    ]
}

fn output(mut cmd: Command) -> Output {
    cmd.output().expect("run setpriv")
}

#[test]
fn the_chart_capability_set_is_bpf_and_net_admin() {
    // No privileges needed: this pins the list the other tests use to the chart.
    assert_eq!(values_capabilities(), CHART_CAPABILITIES);
}

#[test]
fn the_redirect_installs_and_works_with_only_the_chart_capabilities() {
    if !preconditions_met("the_redirect_installs_and_works_with_only_the_chart_capabilities") {
        return;
    }
    let _netns = NetNsGuard::new();
    let bpffs = BpffsGuard::new();
    let mut cgroups = CgroupGuard::new("caps");
    let pod = cgroups.child("pod");
    let pins = bpffs.pin_root();
    let root = cgroups.path().to_str().unwrap().to_string();
    let out = output(with_only(
        CHART_CAPABILITIES,
        &install_args(&root, pins.to_str().unwrap()),
    ));
    assert!(
        out.status.success(),
        "install with only BPF and NET_ADMIN failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The programs it attached redirect and record for real.
    let listener = TcpListener::bind(AGENT).unwrap();
    let probe = ProbeSpec {
        hold: Duration::from_millis(200),
        ..ProbeSpec::connect(IMDS)
    }
    .spawn_in(&pod);
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (stream, peer) = loop {
        match listener.accept() {
            Ok(pair) => break pair,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("no redirected connection: {e}"),
        }
    };
    finish(probe);
    let reader = Redirect::install(&RedirectOptions {
        cgroup_root: cgroups.path().to_path_buf(),
        pin_root: pins.clone(),
        imds: IMDS,
        agent: AGENT,
        exempt_self: false,
        exempt: vec![],
        record_capacity: None,
        record_max_age: podid_agent::redirect::DEFAULT_RECORD_MAX_AGE,
        guard: podid_agent::redirect::GuardInterfaces::Auto,
        agent_started_ns: 0,
        egress_guard: true,
        pod_listeners: None,
    })
    .unwrap();
    let record = reader
        .take_peer_record(peer, stream.local_addr().unwrap())
        .unwrap()
        .expect("recorded by the programs the restricted loader attached");
    assert_eq!(record.cgroup_id, cgroup_id_of(&pod));
    drop(reader);

    // Status and uninstall need no more than that either.
    let out = output(with_only(
        CHART_CAPABILITIES,
        &["redirect", "status", "--bpffs-dir", pins.to_str().unwrap()],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = output(with_only(
        CHART_CAPABILITIES,
        &[
            "redirect",
            "uninstall",
            "--bpffs-dir",
            pins.to_str().unwrap(),
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn each_capability_is_needed() {
    if !preconditions_met("each_capability_is_needed") {
        return;
    }
    let _netns = NetNsGuard::new();
    for (caps, missing) in [(&["net_admin"][..], "BPF"), (&["bpf"][..], "NET_ADMIN")] {
        let bpffs = BpffsGuard::new();
        let cgroups = CgroupGuard::new("caps-missing");
        let root = cgroups.path().to_str().unwrap().to_string();
        let out = output(with_only(
            caps,
            &install_args(&root, bpffs.pin_root().to_str().unwrap()),
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "install without {missing} must fail, but succeeded"
        );
        assert!(
            stderr.contains("Operation not permitted") || stderr.contains("Permission denied"),
            "without {missing}: {stderr}"
        );
        // Nothing is left attached by a failed install.
        let attached = Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(cgroups.path())
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&attached.stdout).contains("podid_"),
            "a failed install left programs attached"
        );
    }
}

#[test]
fn the_whole_agent_serves_tokens_with_only_the_chart_capabilities() {
    if !preconditions_met("the_whole_agent_serves_tokens_with_only_the_chart_capabilities") {
        return;
    }
    use podid_tests::emulator::{Emulator, EmulatorConfig, ManagedIdentity};
    let netns = NetNsGuard::new();
    netns.add_loopback_address("169.254.169.254/32");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let identity = ManagedIdentity::user_assigned("caps");
    let mut config = EmulatorConfig::default().with_user_assigned(identity.clone());
    config.listen = std::net::SocketAddr::V4(IMDS);
    let _emulator = runtime.block_on(Emulator::start(config)).unwrap();
    let bpffs = BpffsGuard::new();
    let mut cgroups = CgroupGuard::new("caps-agent");
    let agent_cgroup = cgroups.child("agent");
    let app = cgroups.child("app");
    let dir = std::env::temp_dir().join(format!("podid-caps-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let workloads = dir.join("workloads.yaml");
    fs::write(
        &workloads,
        format!(
            "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata: {{name: caps}}\nspec: {{type: 0, clientID: {}, resourceID: {}}}\n---\napiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata: {{name: caps}}\nspec: {{azureIdentity: caps, selector: caps}}\n---\napiVersion: podid.dev/v1alpha1\nkind: LocalWorkload\nmetadata: {{name: app, labels: {{aadpodidbinding: caps}}}}\nspec: {{cgroup: app}}\n",
            identity.client_id, identity.resource_id
        ),
    )
    .unwrap();
    let root = cgroups.path().to_str().unwrap().to_string();
    let pins = bpffs.pin_root().to_str().unwrap().to_string();
    let mut cmd = with_only(
        CHART_CAPABILITIES,
        &[
            "run",
            "--listen",
            "127.0.0.1:2579",
            "--metrics-listen",
            "127.0.0.1:9090",
            "--cgroup-root",
            &root,
            "--bpffs-dir",
            &pins,
            "--workloads",
            workloads.to_str().unwrap(),
            "--audit-log",
            dir.join("audit.log").to_str().unwrap(),
        ],
    );
    in_cgroup(&mut cmd, &agent_cgroup)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut agent = ChildGuard::new(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get("127.0.0.1:9090", "/readyz").is_none_or(|(s, _)| s != 200) {
        if let Ok(Some(status)) = agent.inner().try_wait() {
            let mut err = String::new();
            if let Some(mut e) = agent.inner().stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("agent with only BPF and NET_ADMIN exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "agent not ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let report =
        ProbeSpec::token_request("api-version=2018-02-01&resource=https://vault.azure.net")
            .run_in(&app);
    assert_eq!(report["status"], 200, "{report}");
    agent.kill();
    let _ = fs::remove_dir_all(&dir);
}
