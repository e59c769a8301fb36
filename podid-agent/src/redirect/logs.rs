//! Forwarding the kernel programs' aya-log records to tracing.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tracing::{Level, warn};

/// The tracing target kernel records are emitted under.
pub const KERNEL_LOG_TARGET: &str = "podid::kernel";

/// A `log::Log` that re-emits records as tracing events.
#[derive(Debug, Clone, Copy)]
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        match record.level() {
            log::Level::Error => emit(Level::ERROR, &message),
            log::Level::Warn => emit(Level::WARN, &message),
            log::Level::Info => emit(Level::INFO, &message),
            log::Level::Debug => emit(Level::DEBUG, &message),
            log::Level::Trace => emit(Level::TRACE, &message),
        }
    }

    fn flush(&self) {}
}

fn emit(level: Level, message: &str) {
    match level {
        Level::ERROR => tracing::error!(target: KERNEL_LOG_TARGET, "{message}"),
        Level::WARN => tracing::warn!(target: KERNEL_LOG_TARGET, "{message}"),
        Level::INFO => tracing::info!(target: KERNEL_LOG_TARGET, "{message}"),
        Level::DEBUG => tracing::debug!(target: KERNEL_LOG_TARGET, "{message}"),
        Level::TRACE => tracing::trace!(target: KERNEL_LOG_TARGET, "{message}"),
    }
}

/// Reads aya-log records from the kernel programs and emits them as tracing
/// events, until the task is dropped. Returns at once (with a warning) if the
/// object has no log buffer.
pub async fn forward_kernel_logs(mut ebpf: Ebpf) {
    let logger = match EbpfLogger::init_with_logger(&mut ebpf, TracingLog) {
        Ok(logger) => logger,
        Err(error) => {
            warn!(%error, "kernel program logs are not available");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer fd, which stays open and
    // unchanged for as long as the AsyncFd owns the logger.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(error) => {
            warn!(error = %error, "cannot poll the kernel log buffer");
            return;
        }
    };
    loop {
        let mut guard = match logger.readable_mut().await {
            Ok(guard) => guard,
            Err(error) => {
                warn!(%error, "kernel log buffer failed");
                return;
            }
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
