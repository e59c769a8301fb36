//! Logging setup: text or JSON on stdout for the agent, stderr for one-shot
//! commands (whose stdout carries their result).

use tracing_subscriber::{EnvFilter, fmt};

use crate::{audit::AUDIT_TARGET, config::LogFormat};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The agent: logs (and audit events) on stdout, as containers expect.
    Stdout,
    /// One-shot commands: logs on stderr.
    Stderr,
}

/// Installs the global subscriber. `level` is a level or a full filter;
/// `PODID_LOG` overrides it. Audit events (target `podid::audit`) stay on at
/// info whatever the level, unless the filter names that target itself.
pub fn init(level: &str, format: LogFormat, target: LogTarget) {
    let wanted = std::env::var("PODID_LOG").unwrap_or_else(|_| level.to_string());
    let directives = if wanted.contains(AUDIT_TARGET) {
        wanted
    } else {
        format!("{wanted},{AUDIT_TARGET}=info")
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter);
    let result = match (format, target) {
        (LogFormat::Text, LogTarget::Stdout) => builder.try_init(),
        (LogFormat::Text, LogTarget::Stderr) => builder.with_writer(std::io::stderr).try_init(),
        (LogFormat::Json, LogTarget::Stdout) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Json, LogTarget::Stderr) => builder
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .try_init(),
    };
    // A subscriber may already be installed (tests): keep it.
    let _ = result;
}
