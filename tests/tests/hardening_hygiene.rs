//! Secrets hygiene: no token the emulator issued, and no client secret,
//! ever appears in the agent's logs (stdout, stderr), its audit records or
//! its metrics. Every harness checks this when it is dropped (see
//! `podid_tests::harness::token_leaks`); this suite drives varied traffic on
//! purpose, at debug and trace log levels, and checks explicitly, and checks
//! that the detector itself finds what it must.
//!
//! Privileged (but the first test): `cargo test -p podid-tests --test hardening_hygiene -- --test-threads=1`.

mod hardening_support;

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use hardening_support::{RESOURCE, SP_SECRET, Tally, query, start_with, status_body, token_probe};
use podid_tests::{
    IMDS,
    emulator::{Endpoint, Fault, IssuedRecord},
    harness::{AgentHarness, HarnessOptions, python_client, run_client_json, token_leaks, venv},
    privileged::preconditions_met,
    probe::ProbeSpec,
};
use sha2::Digest;

fn issued(token: &str) -> IssuedRecord {
    IssuedRecord {
        endpoint: Endpoint::Imds,
        client_id: "cid".into(),
        resource: "https://vault.azure.net".into(),
        expires_on: 0,
        access_token: token.into(),
    }
}

#[test]
fn the_leak_detector_finds_whole_and_partial_tokens() {
    let token = "eyJ0eXAiOiJKV1QifQ.eyJhcHBpZCI6ImNpZCIsInV0aSI6IlB6OUQwNlM5RGJXbGJIbGNBeE15aVEifQ.UXX1TmpiuATHgxsf7rQHoUwjphEPzII3jGKEt4Kg_C4";
    let (header, rest) = token.split_once('.').expect("jwt");
    let (payload, signature) = rest.split_once('.').expect("jwt");
    let tokens = [issued(token)];
    for (what, text) in [
        (
            "whole token",
            format!("level=info access_token={token} done"),
        ),
        (
            "in JSON",
            format!(r#"{{"body":"{{\"access_token\":\"{token}\"}}"}}"#),
        ),
        ("Bearer header", format!("authorization: Bearer {token}\n")),
        ("payload alone", format!("claims {payload} x")),
        ("signature alone", format!("sig={signature}")),
        (
            "truncated signature",
            format!("sig={}...", &signature[..20]),
        ),
    ] {
        assert_eq!(
            token_leaks(&tokens, &[("text", &text)]).len(),
            1,
            "{what} must be found in {text:?}"
        );
    }
    // Things that are not the token: its fingerprint, the shared header
    // segment, other base64.
    let fingerprint = hex(&sha2::Sha256::digest(token.as_bytes()))[..12].to_string();
    for text in [
        format!("token_sha256={fingerprint}"),
        format!("header {header}"),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJvdGhlciJ9.c2lnbmF0dXJlLW90aGVy".to_string(),
    ] {
        assert!(
            token_leaks(&tokens, &[("text", &text)]).is_empty(),
            "{text}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Drives every kind of request at the box; returns how many were sent.
fn varied_traffic(harness: &AgentHarness, ids: &hardening_support::Ids, tally: &Tally) -> u64 {
    let mut sent = 0;
    let alpha = harness.cgroup("apps/alpha");
    // Tokens: hits and misses, by client id and by resource id.
    for i in 0..6 {
        let resource = format!("https://h{i}.example.com");
        for named in [
            String::new(),
            format!("&client_id={}", ids.alpha.client_id),
            format!("&msi_res_id={}", ids.alpha.resource_id),
        ] {
            let report = ProbeSpec::token_request(&format!("{}{named}", query(&resource, None)))
                .run_in(&alpha);
            tally.check("alpha", &report, &ids.alpha.client_id);
            assert_eq!(status_body(&report).0, 200, "{report}");
            sent += 1;
        }
    }
    // A service principal (Entra ID client credentials), with one retry.
    harness
        .emulator
        .inject(Fault::status(500).times(1).on(Endpoint::EntraV1));
    for i in 0..5 {
        let report = ProbeSpec::token_request(&query(&format!("https://sp{i}.example.com"), None))
            .run_in(&harness.cgroup("apps/sp"));
        tally.check("sp", &report, &ids.sp_client_id);
        assert_eq!(status_body(&report).0, 200, "{report}");
        sent += 1;
    }
    // A load burst.
    let report = ProbeSpec {
        repeat: Duration::from_secs(2),
        interval: Duration::from_millis(5),
        ..token_probe(None)
    }
    .run_in(&harness.cgroup("apps/beta"));
    tally.check("beta load", &report, &ids.beta.client_id);
    sent += report["attempts"].as_u64().unwrap_or(0);
    // Refusals and errors.
    let raw = |text: &str| ProbeSpec {
        raw: Some(text.into()),
        ..ProbeSpec::connect(IMDS)
    };
    let path = format!("/metadata/identity/oauth2/token?{}", query(RESOURCE, None));
    for (cgroup, spec) in [
        ("apps/gamma", token_probe(None)),
        ("apps/stranger", token_probe(None)),
        ("apps/alpha", token_probe(Some(&ids.beta.client_id))),
        (
            "apps/alpha",
            raw(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")),
        ),
        (
            "apps/alpha",
            raw(&format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
            )),
        ),
        (
            "apps/alpha",
            raw(&format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n"
            )),
        ),
        (
            "apps/alpha",
            raw(&format!(
                "GET {path} HTTP/1.1\r\nMetadata: true\r\nX-Pad: {}\r\n\r\n",
                "p".repeat(20_000)
            )),
        ),
        ("apps/alpha", raw("NOT HTTP AT ALL\r\n\r\n")),
        (
            "apps/alpha",
            raw(
                "GET /metadata/identity/oauth2/%74oken?resource=x HTTP/1.1\r\nMetadata: true\r\n\r\n",
            ),
        ),
        (
            "apps/alpha",
            ProbeSpec {
                http_path: Some("/metadata/instance?api-version=2021-02-01".into()),
                headers: vec!["Metadata: true".into()],
                ..ProbeSpec::connect(IMDS)
            },
        ),
    ] {
        let report = spec.run_in(&harness.cgroup(cgroup));
        tally.check(cgroup, &report, "none");
        sent += 1;
    }
    // Upstream failures for beta (fresh resources, so not from the cache).
    harness
        .emulator
        .inject(Fault::status(503).times(100).on(Endpoint::Imds));
    let report = ProbeSpec::token_request(&query("https://down.example.com", None))
        .run_in(&harness.cgroup("apps/beta"));
    tally.check("beta, IMDS down", &report, &ids.beta.client_id);
    harness.emulator.clear_faults();
    harness
        .emulator
        .inject(Fault::throttle(1).times(1).on(Endpoint::Imds));
    let report = ProbeSpec::token_request(&query("https://throttled.example.com", None))
        .run_in(&harness.cgroup("apps/beta"));
    tally.check("beta, throttled", &report, &ids.beta.client_id);
    sent += 2;
    // A direct connection and a slow head (unattributed).
    let addr: SocketAddr = harness.agent_addr().parse().expect("agent address");
    if let Ok(mut stream) = TcpStream::connect(addr) {
        let _ = stream.write_all(format!("GET {path} HTTP/1.1\r\nMetadata: true\r\n").as_bytes());
        sent += 1;
    }
    // The official Python SDK, when it is installed.
    if venv().join("bin/python").exists() {
        let result = run_client_json(
            python_client(
                Some(&ids.alpha.client_id),
                "https://vault.azure.net/.default",
            ),
            &alpha,
            Duration::from_secs(60),
        );
        assert!(result["token"].is_string(), "{result}");
        sent += 1;
    } else {
        eprintln!("(azure-identity not installed: the Python SDK part is skipped)");
    }
    sent
}

fn check_no_secrets(harness: &AgentHarness) {
    let leaks = harness.secrets_leaks();
    assert!(leaks.is_empty(), "tokens leaked:\n{}", leaks.join("\n"));
    let audit = std::fs::read_to_string(harness.audit_path()).unwrap_or_default();
    for (name, text) in [
        ("stdout", harness.agent_stdout()),
        ("stderr", harness.agent_stderr()),
        ("audit", audit.clone()),
        ("metrics", harness.metrics()),
    ] {
        assert!(
            !text.contains(SP_SECRET),
            "the client secret appears in {name}"
        );
    }
    // The audit refers to each issued token by fingerprint only.
    let issued = harness.emulator.issued_tokens();
    let fingerprints: std::collections::HashSet<String> = issued
        .iter()
        .map(|t| hex(&sha2::Sha256::digest(t.access_token.as_bytes()))[..12].to_string())
        .collect();
    let records = harness.audit_records(1);
    let with_fingerprint = records
        .iter()
        .filter(|r| !r.token_sha256.is_empty())
        .count();
    assert!(with_fingerprint > 0);
    assert!(
        records
            .iter()
            .filter(|r| !r.token_sha256.is_empty())
            .all(|r| fingerprints.contains(&r.token_sha256)),
        "every fingerprint is of a token the emulator issued"
    );
}

fn run_at_level(level: &str, test: &str) {
    let (mut harness, ids) = start_with(
        &[],
        HarnessOptions {
            log_filter: Some(level.into()),
            ..HarnessOptions::default()
        },
    );
    harness
        .emulator
        .set_token_lifetime(Duration::from_secs(3600));
    let tally = Tally::default();
    let mut sent = varied_traffic(&harness, &ids, &tally);
    // Short-lived tokens: fetched again and again (refresh paths).
    harness.emulator.set_token_lifetime(Duration::from_secs(62));
    for _ in 0..3 {
        let report = token_probe(None).run_in(&harness.cgroup("apps/alpha"));
        tally.check("alpha, short-lived", &report, &ids.alpha.client_id);
        sent += 1;
        std::thread::sleep(Duration::from_millis(1100));
    }
    // A restart in the middle: the start-up logs too.
    harness.kill_agent();
    harness.start_agent();
    sent += varied_traffic(&harness, &ids, &tally);
    let issued = harness.emulator.issued_tokens().len();
    let bytes = harness.agent_stdout().len() + harness.agent_stderr().len();
    eprintln!(
        "FIGURES {test}: requests={sent} tokens_issued={issued} log_bytes={bytes} leaks=0 (checked below)"
    );
    assert!(
        issued >= 20,
        "enough tokens to make the check meaningful ({issued})"
    );
    check_no_secrets(&harness);
    tally.report(test);
}

#[test]
fn no_token_or_secret_reaches_logs_audit_or_metrics_at_debug_level() {
    if !preconditions_met("no_token_or_secret_reaches_logs_audit_or_metrics_at_debug_level") {
        return;
    }
    run_at_level("debug", "hygiene_debug");
}

#[test]
fn no_token_or_secret_reaches_logs_audit_or_metrics_at_trace_level() {
    if !preconditions_met("no_token_or_secret_reaches_logs_audit_or_metrics_at_trace_level") {
        return;
    }
    run_at_level("trace", "hygiene_trace");
}
