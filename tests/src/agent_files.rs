//! What a harness's agent leaves in its scratch directory: stdout and stderr
//! (appended across restarts) and the audit log; how the harnesses read
//! them, scan them for leaked tokens, and report them when a test fails.
//! Shared by [`crate::harness::AgentHarness`] and
//! [`crate::kube::KubeNodeHarness`].

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use podid_agent::audit::AuditRecord;

use crate::{
    emulator::{EmulatorHandle, Endpoint, IssuedRecord, is_node_token},
    harness::{METRICS_ADDR, http_get, token_leaks},
};

/// Rotated audit files (`audit.log.N`) read by the leak scan.
const ROTATED_AUDIT_FILES: usize = 16;

/// A new scratch directory for a harness, named after `kind`.
pub fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "podid-{kind}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    fs::create_dir_all(&dir).expect("create harness dir");
    dir
}

/// The agent's `/metrics` text (empty if the agent does not answer).
pub fn scrape_metrics() -> String {
    http_get(METRICS_ADDR, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

/// The agent's output files: stdout and stderr in `dir`, the audit log at
/// `audit_path`.
pub struct AgentFiles<'a> {
    dir: &'a Path,
    audit_path: PathBuf,
}

impl<'a> AgentFiles<'a> {
    pub fn new(dir: &'a Path, audit_path: PathBuf) -> Self {
        Self { dir, audit_path }
    }

    /// stdout and stderr files for a (re)started agent, opened for
    /// appending so that a restarted agent's output follows the first one's.
    pub fn open_outputs(&self) -> (fs::File, fs::File) {
        let open = |name: &str| {
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(name))
                .expect("agent output file")
        };
        (open("agent.stdout"), open("agent.stderr"))
    }

    /// Everything the agent printed on stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("agent.stdout")).unwrap_or_default()
    }

    /// Everything the agent printed on stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("agent.stderr")).unwrap_or_default()
    }

    /// Audit records in the file, waiting (bounded) until at least
    /// `at_least` are there: the writer thread appends asynchronously.
    pub fn audit_records(&self, at_least: usize) -> Vec<AuditRecord> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let records = self.read_audit();
            if records.len() >= at_least || Instant::now() >= deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first audit record that `matches`, waiting up to 10 s for it to
    /// be written; panics naming `what`, with the records there are.
    pub fn audit_record_where(
        &self,
        what: &str,
        matches: impl Fn(&AuditRecord) -> bool,
    ) -> AuditRecord {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.read_audit();
            if let Some(record) = records.iter().find(|r| matches(r)) {
                return record.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no audit record for {what} among {records:#?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn read_audit(&self) -> Vec<AuditRecord> {
        fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("audit lines are records"))
            .collect()
    }

    /// Where any of `tokens` appears in the agent's stdout, stderr, audit
    /// files (rotated ones too) or `metrics` (see [`token_leaks`]).
    pub fn leaks(&self, tokens: &[IssuedRecord], metrics: &str) -> Vec<String> {
        let mut audit = fs::read_to_string(&self.audit_path).unwrap_or_default();
        for n in 1..=ROTATED_AUDIT_FILES {
            let rotated = format!("{}.{n}", self.audit_path.display());
            audit.push_str(&fs::read_to_string(rotated).unwrap_or_default());
        }
        let (stdout, stderr) = (self.stdout(), self.stderr());
        token_leaks(
            tokens,
            &[
                ("agent stdout", &stdout),
                ("agent stderr", &stderr),
                ("audit log", &audit),
                ("/metrics", metrics),
            ],
        )
    }

    /// Prints the agent's output, for a test that failed.
    pub fn dump(&self) {
        eprintln!(
            "--- agent stdout ---\n{}\n--- agent stderr ---\n{}",
            self.stdout(),
            self.stderr()
        );
    }
}

/// Fails the test if the hygiene scan found leaks.
/// What of the node's own identity the emulator handed out: tokens for its
/// system-assigned identity, and any request that reached its "managed
/// identity v2" credential endpoints. One line each.
pub fn node_identity_grants(emulator: &EmulatorHandle) -> Vec<String> {
    let tokens = emulator
        .issued_tokens()
        .into_iter()
        .filter(|t| is_node_token(&t.access_token))
        .map(|t| {
            format!(
                "a token of the node's identity {} for {}",
                t.client_id, t.resource
            )
        });
    let credentials = emulator
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::ImdsCredential)
        .map(|r| {
            format!(
                "a request to IMDS's credential endpoints (answered {})",
                r.status
            )
        });
    tokens.chain(credentials).collect()
}

/// Panics unless `grants` ([`node_identity_grants`]) is empty.
pub fn assert_no_node_identity(grants: &[String]) {
    assert!(
        grants.is_empty(),
        "the node's own identity was handed out:\n{}",
        grants.join("\n")
    );
}

pub fn assert_no_leaks(leaks: &[String]) {
    assert!(
        leaks.is_empty(),
        "secrets hygiene: tokens the emulator issued leaked:\n{}",
        leaks.join("\n")
    );
}
