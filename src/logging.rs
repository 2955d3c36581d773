//! The error log (tracing, in Gunicorn's line format) and the log files
//! behind both logs, which SIGUSR1 reopens for log rotation.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::Settings;

mod event;
pub use event::LogEvent;

/// Where a log goes: a standard stream or a file that can be reopened.
pub struct LogFile {
    path: Option<PathBuf>,
    stdout: bool,
    file: Mutex<Option<File>>,
}

impl LogFile {
    /// Opens `spec`: `-` is the given standard stream, anything else a file
    /// path opened for appending.
    pub fn open(spec: &str, stdout: bool) -> io::Result<LogFile> {
        if spec == "-" {
            return Ok(LogFile {
                path: None,
                stdout,
                file: Mutex::new(None),
            });
        }
        let path = PathBuf::from(spec);
        let file = open_append(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open log file {spec}: {e}")))?;
        Ok(LogFile {
            path: Some(path),
            stdout,
            file: Mutex::new(Some(file)),
        })
    }

    /// Reopens the file (after it was moved by log rotation).
    pub fn reopen(&self) -> io::Result<()> {
        if let Some(path) = &self.path {
            let file = open_append(path)?;
            if let Ok(mut slot) = self.file.lock() {
                *slot = Some(file);
            }
        }
        Ok(())
    }

    /// Writes one whole record.
    pub fn write_record(&self, bytes: &[u8]) {
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        let _ = match file.as_mut() {
            Some(f) => f.write_all(bytes),
            None if self.stdout => io::stdout().lock().write_all(bytes),
            None => io::stderr().lock().write_all(bytes),
        };
    }
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A writer for one tracing event; writes the event in one record.
pub struct RecordWriter<'a> {
    target: &'a LogFile,
    buf: Vec<u8>,
}

impl Write for RecordWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RecordWriter<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.target.write_record(&self.buf);
        }
    }
}

struct ErrorLog(Arc<LogFile>);

impl<'a> MakeWriter<'a> for ErrorLog {
    type Writer = RecordWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        RecordWriter {
            target: &self.0,
            buf: Vec::with_capacity(256),
        }
    }
}

/// The error log's line, in one of the two formats: Gunicorn's
/// `[2026-11-22 10:00:00 +0000] [1234] [INFO] message`, or a JSON object
/// `{"time":"2026-11-22T10:00:00Z","pid":1234,"level":"INFO","message":"..."}`.
struct LineFormat {
    json: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = level_name(*event.metadata().level());
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        if !self.json {
            // The message alone: an event's other fields are for the JSON
            // form (the message says them in words).
            return writeln!(
                writer,
                "[{}] [{}] [{level}] {}",
                timestamp(),
                std::process::id(),
                fields.message
            );
        }
        let mut line = serde_json::Map::new();
        line.insert("time".into(), rfc3339_now().into());
        line.insert("pid".into(), std::process::id().into());
        line.insert("level".into(), level.into());
        match crate::worker_info::WorkerInfo::current() {
            Some(w) => {
                line.insert("role".into(), "worker".into());
                line.insert("worker_pid".into(), w.pid.into());
                line.insert("generation".into(), w.generation.into());
            }
            None => {
                line.insert("role".into(), "master".into());
            }
        }
        line.insert("source".into(), event.metadata().target().into());
        line.insert("message".into(), fields.message.into());
        // An event's own fields (`event = "..."`, `command_pid = ...`).
        for (k, v) in fields.rest {
            line.entry(k).or_insert(v);
        }
        writeln!(writer, "{}", serde_json::Value::Object(line))
    }
}

/// An event's fields as JSON: its message, and every other field by name.
#[derive(Default)]
struct JsonFields {
    message: String,
    rest: serde_json::Map<String, serde_json::Value>,
}

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.rest.insert(field.name().to_owned(), text.into());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.rest.insert(field.name().to_owned(), value.into());
        }
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.rest.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.rest.insert(field.name().to_owned(), value.into());
    }
}

fn level_name(level: tracing::Level) -> &'static str {
    match level {
        tracing::Level::ERROR => "ERROR",
        tracing::Level::WARN => "WARNING",
        tracing::Level::INFO => "INFO",
        tracing::Level::DEBUG => "DEBUG",
        tracing::Level::TRACE => "TRACE",
    }
}

/// `n` things as a person writes them: `1 worker`, `2 workers`.
pub(crate) fn count(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

/// Now, as RFC 3339 in UTC.
pub(crate) fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn timestamp() -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] +0000");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

static ERROR_LOG: OnceLock<Arc<LogFile>> = OnceLock::new();

/// Installs the error log for this process. A second call (a preloaded
/// worker inherits its master's) is a no-op.
pub fn init(settings: &Settings) -> io::Result<()> {
    if ERROR_LOG.get().is_some() {
        return Ok(());
    }
    let target = Arc::new(LogFile::open(&settings.errorlog, false)?);
    let _ = ERROR_LOG.set(Arc::clone(&target));
    let filter =
        tracing_subscriber::filter::LevelFilter::from_level(settings.loglevel.as_tracing());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(ErrorLog(target))
        .event_format(LineFormat {
            json: settings.log_format == crate::config::LogFormat::Json,
        })
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(())
}

/// Reopens the error log file, if it is a file.
pub fn reopen() {
    if let Some(log) = ERROR_LOG.get() {
        if let Err(e) = log.reopen() {
            tracing::error!(
                event = crate::logging::LogEvent::LogReopen.name(),
                "cannot reopen the error log: {e}"
            );
        }
    }
}

/// Writes bytes as they are to the error log (a worker's forwarded stderr).
pub fn write_raw(bytes: &[u8]) {
    match ERROR_LOG.get() {
        Some(log) => log.write_record(bytes),
        None => {
            let _ = io::stderr().lock().write_all(bytes);
        }
    }
}

/// A once-a-second gate for a warning that may fire on every request or
/// connection: true for the first call in each second, per `last` (a
/// `static` beside the warning, holding when it was last said, in
/// `crate::scoreboard::monotonic_ms`).
pub(crate) fn once_a_second(last: &std::sync::atomic::AtomicU64) -> bool {
    use std::sync::atomic::Ordering;
    let now = crate::scoreboard::monotonic_ms();
    let then = last.load(Ordering::Relaxed);
    now.saturating_sub(then) >= 1000
        && last
            .compare_exchange(then, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn once_a_second_lets_the_first_call_through_then_none_within_the_second() {
        let last = AtomicU64::new(0);
        assert!(once_a_second(&last));
        assert!(!once_a_second(&last));
        // As if said over a second ago.
        last.store(1, std::sync::atomic::Ordering::Relaxed);
        assert!(once_a_second(&last));
        assert!(!once_a_second(&last));
    }
}
