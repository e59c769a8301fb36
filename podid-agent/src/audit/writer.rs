//! Writing audit records: a tracing event for each, and a JSON line in the
//! audit file, appended by a dedicated thread so a slow or full disk never
//! holds up a token response.
//!
//! Failure stance: the agent keeps serving when the audit file cannot be
//! written (disk full, read-only, deleted directory). Each lost record is
//! counted (`podid_audit_records_lost_total`), and stderr says so, once per
//! failure streak. The tracing copy on stdout is unaffected. We chose this
//! over failing closed because pods' access to their own identity should not
//! depend on the node's log disk; the metric lets operators alert on it.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread::JoinHandle,
};

use tracing::info;

use super::record::{AUDIT_TARGET, AuditRecord};

/// Records queued for the writer thread before new ones are dropped (and counted).
const QUEUE_CAPACITY: usize = 8192;

/// Where and how to keep the audit file.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The JSON-lines file; `None` for the tracing copy only.
    pub path: Option<PathBuf>,
    /// Rotate when the file would grow past this many bytes.
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` … `FILE.N`, `.1` newest).
    pub max_files: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            max_bytes: 100 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// Errors from the audit file (reported, never returned to a request).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("opening audit log {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing audit log {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rotating audit log {path}")]
    Rotate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the writer thread receives.
#[derive(Debug)]
enum Message {
    Record(Box<AuditRecord>),
    Flush(SyncSender<()>),
}

fn encode(record: &AuditRecord) -> String {
    // Serialising plain strings and numbers cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

/// The stdout copy: one event on the audit target carrying the JSON record.
fn emit(record: &AuditRecord, line: &str) {
    info!(
        target: AUDIT_TARGET,
        namespace = %record.namespace,
        pod = %record.pod,
        identity = %record.identity,
        outcome = record.outcome.as_str(),
        status = record.status,
        record = %line,
        "audit"
    );
}

#[derive(Debug, Default)]
struct Counts {
    written: AtomicU64,
    lost: AtomicU64,
}

/// The audit sink.
#[derive(Debug)]
pub struct AuditLog {
    sender: Option<SyncSender<Message>>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<()>>,
}

impl AuditLog {
    /// Starts the writer. Never fails: an unusable file is reported and
    /// retried on every record.
    pub fn start(config: AuditConfig) -> Self {
        let counts = Arc::new(Counts::default());
        let (sender, receiver) = mpsc::sync_channel(QUEUE_CAPACITY);
        let thread_counts = counts.clone();
        let thread = std::thread::Builder::new()
            .name("podid-audit".into())
            .spawn(move || FileWriter::new(config).run(receiver, &thread_counts))
            .ok();
        Self {
            sender: thread.as_ref().map(|_| sender),
            counts,
            thread,
        }
    }

    /// Records one request. The JSON encoding, the stdout event and the file
    /// write happen on the writer thread, off the request's path.
    pub fn record(&self, record: AuditRecord) {
        let Some(sender) = &self.sender else {
            emit(&record, &encode(&record));
            return;
        };
        match sender.try_send(Message::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) | Err(TrySendError::Disconnected(message)) => {
                // The stdout copy is kept even when the file cannot keep up.
                if let Message::Record(record) = message {
                    emit(&record, &encode(&record));
                }
                self.counts.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records written to the file so far.
    pub fn written(&self) -> u64 {
        self.counts.written.load(Ordering::Relaxed)
    }

    /// Records that could not be written to the file.
    pub fn lost(&self) -> u64 {
        self.counts.lost.load(Ordering::Relaxed)
    }

    /// Waits until everything queued so far is written (or lost).
    pub fn flush(&self) {
        let Some(sender) = &self.sender else { return };
        let (done, wait) = mpsc::sync_channel(1);
        if sender.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct FileWriter {
    /// `None`: stdout only.
    path: Option<PathBuf>,
    config: AuditConfig,
    file: Option<BufWriter<File>>,
    /// Bytes in the file, counting what is still buffered.
    size: u64,
    /// Length of the file after the last successful flush: everything up to
    /// here is on disk, as whole lines.
    durable: u64,
    /// Records buffered since the last successful flush. They count as
    /// written only once a flush succeeds: with a full disk it is the flush
    /// that fails, and those records are lost.
    pending: u64,
    failing: bool,
}

impl FileWriter {
    fn new(config: AuditConfig) -> Self {
        Self {
            path: config.path.clone(),
            config,
            file: None,
            size: 0,
            durable: 0,
            pending: 0,
            failing: false,
        }
    }

    fn run(mut self, receiver: Receiver<Message>, counts: &Counts) {
        while let Ok(message) = receiver.recv() {
            self.handle(message, counts);
            // Drain what is queued, then flush once: bursts are batched.
            while let Ok(message) = receiver.try_recv() {
                self.handle(message, counts);
            }
            self.flush(counts);
        }
        self.flush(counts);
    }

    fn handle(&mut self, message: Message, counts: &Counts) {
        let record = match message {
            Message::Record(record) => record,
            Message::Flush(done) => {
                self.flush(counts);
                let _ = done.send(());
                return;
            }
        };
        let line = encode(&record);
        emit(&record, &line);
        let Some(path) = self.path.clone() else {
            return;
        };
        match self.write_line(&path, &line, counts) {
            Ok(()) => self.pending += 1,
            Err(error) => {
                // This record, and whatever was buffered with it.
                counts.lost.fetch_add(1, Ordering::Relaxed);
                self.fail(&error, counts);
            }
        }
    }

    /// Flushes the buffer; the records in it are written, or lost.
    fn flush(&mut self, counts: &Counts) {
        let Some(file) = &mut self.file else { return };
        let Some(path) = self.path.clone() else {
            return;
        };
        match file.flush() {
            Ok(()) => {
                counts.written.fetch_add(self.pending, Ordering::Relaxed);
                self.pending = 0;
                self.durable = self.size;
                if self.failing {
                    eprintln!(
                        "podid-agent: audit log {} is writable again",
                        path.display()
                    );
                    self.failing = false;
                }
            }
            Err(source) => self.fail(&AuditError::Write { path, source }, counts),
        }
    }

    /// Counts the buffered records as lost, says so on stderr (once per
    /// failure streak), drops the buffer without writing it and cuts the
    /// file back to its last whole line, so that a later record never
    /// continues a partly written one. The file is reopened on the next
    /// record: it may have been removed, or space may come back.
    fn fail(&mut self, error: &AuditError, counts: &Counts) {
        counts.lost.fetch_add(self.pending, Ordering::Relaxed);
        self.pending = 0;
        if let Some(file) = self.file.take() {
            let (file, _discarded) = file.into_parts();
            // Only ever shorten: the file may have been truncated meanwhile.
            if file.metadata().is_ok_and(|m| m.len() > self.durable) {
                let _ = file.set_len(self.durable);
            }
        }
        self.size = self.durable;
        if !self.failing {
            eprintln!(
                "podid-agent: {}: {}; audit records are being lost (see podid_audit_records_lost_total)",
                error,
                std::error::Error::source(error)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            self.failing = true;
        }
    }

    fn open(&mut self, path: &Path) -> Result<(), AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.durable = self.size;
        self.file = Some(BufWriter::new(file));
        Ok(())
    }

    fn write_line(&mut self, path: &Path, line: &str, counts: &Counts) -> Result<(), AuditError> {
        let needed = line.len() as u64 + 1;
        if self.file.is_some() && self.size > 0 && self.size + needed > self.config.max_bytes {
            self.rotate(path, counts)?;
        }
        if self.file.is_none() {
            self.open(path)?;
        }
        let file = self.file.as_mut().ok_or_else(|| AuditError::Write {
            path: path.to_path_buf(),
            source: std::io::Error::other("audit file not open"),
        })?;
        let result = file
            .write_all(line.as_bytes())
            .and_then(|()| file.write_all(b"\n"));
        result.map_err(|source| AuditError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        self.size += needed;
        Ok(())
    }

    fn rotate(&mut self, path: &Path, counts: &Counts) -> Result<(), AuditError> {
        self.flush(counts);
        self.file = None;
        let rotate_err = |source| AuditError::Rotate {
            path: path.to_path_buf(),
            source,
        };
        if self.config.max_files == 0 {
            return fs::remove_file(path).map_err(rotate_err);
        }
        for i in (1..self.config.max_files).rev() {
            let from = rotated(path, i);
            if from.exists() {
                fs::rename(&from, rotated(path, i + 1)).map_err(rotate_err)?;
            }
        }
        fs::rename(path, rotated(path, 1)).map_err(rotate_err)
    }
}

/// Path of the `n`th rotated file (`FILE.n`).
pub(crate) fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "podid-audit-{label}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn record(pod: &str) -> AuditRecord {
        AuditRecord {
            pod: pod.into(),
            ..AuditRecord::default()
        }
    }

    #[test]
    fn writes_json_lines_and_rotates_by_size() {
        let dir = temp_dir("rotate");
        let path = dir.join("audit.log");
        let log = AuditLog::start(AuditConfig {
            path: Some(path.clone()),
            max_bytes: 2000,
            max_files: 2,
        });
        for i in 0..40 {
            log.record(record(&format!("pod-{i}")));
        }
        log.flush();
        assert_eq!(log.written(), 40);
        assert_eq!(log.lost(), 0);
        let current = fs::read_to_string(&path).unwrap();
        let last: AuditRecord = serde_json::from_str(current.lines().last().unwrap()).unwrap();
        assert_eq!(last.pod, "pod-39");
        assert!(rotated(&path, 1).exists());
        assert!(rotated(&path, 2).exists());
        assert!(
            !rotated(&path, 3).exists(),
            "only max_files rotated files are kept"
        );
        for file in [path.clone(), rotated(&path, 1), rotated(&path, 2)] {
            assert!(fs::metadata(&file).unwrap().len() <= 2000);
        }
        drop(log);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_disk_counts_buffered_records_as_lost_not_written() {
        // /dev/full accepts the open and fails every write with ENOSPC: the
        // records fit in the buffer, and the flush is what fails.
        let log = AuditLog::start(AuditConfig {
            path: Some(PathBuf::from("/dev/full")),
            ..AuditConfig::default()
        });
        for i in 0..3 {
            log.record(record(&format!("pod-{i}")));
        }
        log.flush();
        assert_eq!(log.written(), 0);
        assert_eq!(log.lost(), 3);
    }

    #[test]
    fn an_unwritable_file_counts_lost_records_and_recovers() {
        let dir = temp_dir("unwritable");
        // A directory where the file should be: every open fails.
        let path = dir.join("audit.log");
        fs::create_dir(&path).unwrap();
        let log = AuditLog::start(AuditConfig {
            path: Some(path.clone()),
            ..AuditConfig::default()
        });
        log.record(record("a"));
        log.record(record("b"));
        log.flush();
        assert_eq!(log.lost(), 2);
        assert_eq!(log.written(), 0);
        fs::remove_dir(&path).unwrap();
        log.record(record("c"));
        log.flush();
        assert_eq!(log.written(), 1);
        assert!(fs::read_to_string(&path).unwrap().contains("\"pod\":\"c\""));
        drop(log);
        fs::remove_dir_all(dir).unwrap();
    }
}
