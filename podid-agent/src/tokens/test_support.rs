//! Helpers for the token service's tests: temporary secret directories,
//! an observer that records upstream calls, log capture, and a service
//! pointed at an emulator.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use podid_tests::emulator::EmulatorHandle;

use super::{
    FileSecretSource, SecretSource, TokenConfig, TokenService, Upstream, UpstreamObserver,
};

/// A directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "podid-tokens-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `rel` (creating parent directories).
    pub(crate) fn write(&self, rel: &str, contents: &[u8]) {
        let path = self.0.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records every upstream attempt.
#[derive(Debug, Default)]
pub(crate) struct Recorder(Mutex<Vec<(Upstream, Option<u16>)>>);

impl Recorder {
    pub(crate) fn calls(&self) -> Vec<(Upstream, Option<u16>)> {
        self.0.lock().expect("recorder lock").clone()
    }
}

impl UpstreamObserver for Recorder {
    fn upstream_call(&self, upstream: Upstream, status: Option<u16>, _elapsed: Duration) {
        self.0
            .lock()
            .expect("recorder lock")
            .push((upstream, status));
    }
}

/// A configuration against `emu` with quick retries.
pub(crate) fn config_for(emu: &EmulatorHandle) -> TokenConfig {
    TokenConfig {
        imds_endpoint: emu.url(),
        aad_authority: emu.url(),
        upstream_timeout: Duration::from_secs(3),
        max_total_wait: Duration::from_secs(8),
        retry_base_delay: Duration::from_millis(20),
        max_attempts: 3,
        ..TokenConfig::default()
    }
}

/// A service with `config`, secrets from `dir` (or none), and a recorder.
pub(crate) fn service_with(
    config: TokenConfig,
    dir: Option<&Path>,
) -> (TokenService, Arc<Recorder>) {
    let secrets: Arc<dyn SecretSource> = match dir {
        Some(dir) => Arc::new(FileSecretSource::new(dir)),
        None => Arc::new(FileSecretSource::unconfigured()),
    };
    let recorder = Arc::new(Recorder::default());
    let service = TokenService::new(config, secrets, recorder.clone()).expect("valid token config");
    (service, recorder)
}

/// A `tracing` writer that keeps everything written.
#[derive(Clone, Default)]
pub(crate) struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
