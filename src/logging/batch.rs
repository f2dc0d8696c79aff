//! Standard output in batches. A write per log line woke the reading end (journald, a
//! container runtime, a pipe) twice per session: with the downgrade log on, that cost more
//! than a tenth of the CPU of a whole TLS 1.0 session (measured: 0.77 ms per session with the
//! log at `info`, 0.67 ms at `warn`). Lines are collected and written together a short moment
//! later, in order; a backlog past `LIMIT` is written at once by the logging thread, as a
//! blocked output blocked logging before.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

/// How long the first line of a batch waits for others.
pub const WINDOW: Duration = Duration::from_millis(50);
/// A backlog this large is written at once.
const LIMIT: usize = 256 * 1024;

/// Lines on their way to `sink`.
pub struct Batch<W> {
    /// Held while writing, so batches leave in the order they were taken.
    sink: Mutex<W>,
    lines: Mutex<Vec<u8>>,
    waiting: Condvar,
}

impl<W: Write + Send + 'static> Batch<W> {
    /// A batch writing to `sink` `window` after its first line, with the thread that writes it.
    pub fn start(sink: W, window: Duration) -> std::io::Result<Arc<Batch<W>>> {
        let batch = Arc::new(Batch {
            sink: Mutex::new(sink),
            lines: Mutex::new(Vec::new()),
            waiting: Condvar::new(),
        });
        let writer = batch.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || loop {
                writer.wait_for_lines();
                std::thread::sleep(window);
                writer.flush();
            })?;
        Ok(batch)
    }

    pub fn push(&self, line: &[u8]) {
        let mut lines = lock(&self.lines);
        let first = lines.is_empty();
        lines.extend_from_slice(line);
        let backlog = lines.len() >= LIMIT;
        drop(lines);
        if backlog {
            self.flush();
        } else if first {
            self.waiting.notify_one();
        }
    }

    /// Writes every line pushed so far.
    pub fn flush(&self) {
        let mut sink = lock(&self.sink);
        let batch = std::mem::take(&mut *lock(&self.lines));
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
    }

    /// `flush` for a panic: skipped if this thread was in the middle of one.
    pub fn try_flush(&self) {
        if let (Ok(mut sink), Ok(mut lines)) = (self.sink.try_lock(), self.lines.try_lock()) {
            let _ = sink.write_all(&std::mem::take(&mut *lines));
            let _ = sink.flush();
        }
    }

    fn wait_for_lines(&self) {
        let mut lines = lock(&self.lines);
        while lines.is_empty() {
            lines = self
                .waiting
                .wait(lines)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The process's standard output, batched (one for the process: `flush` at exit).
pub fn stdout() -> std::io::Result<&'static Batch<std::io::Stdout>> {
    if let Some(batch) = STDOUT.get() {
        return Ok(batch);
    }
    let batch = Batch::start(std::io::stdout(), WINDOW)?;
    Ok(STDOUT.get_or_init(|| batch))
}

static STDOUT: OnceLock<Arc<Batch<std::io::Stdout>>> = OnceLock::new();

/// Writes out what standard output still holds (nothing if it was never batched).
pub fn flush_stdout() {
    if let Some(batch) = STDOUT.get() {
        batch.flush();
    }
}

/// A `MakeWriter` for a batch: each event's line is pushed whole.
pub struct Lines(pub &'static Batch<std::io::Stdout>);

pub struct Line(&'static Batch<std::io::Stdout>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Waits (up to 10 s) until the sink has been written to.
    fn written(sink: &Sink) -> Vec<Vec<u8>> {
        for _ in 0..1000 {
            let writes = lock(&sink.0).clone();
            if !writes.is_empty() {
                return writes;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("nothing was written");
    }

    #[test]
    fn lines_leave_together_in_order() {
        let sink = Sink::default();
        let batch = Batch::start(sink.clone(), Duration::from_secs(1)).unwrap();
        for n in 0..100 {
            batch.push(format!("line {n}\n").as_bytes());
        }
        let writes = written(&sink);
        assert_eq!(writes.len(), 1, "one write for the whole batch");
        let expected: String = (0..100).map(|n| format!("line {n}\n")).collect();
        assert_eq!(String::from_utf8(writes[0].clone()).unwrap(), expected);
    }

    #[test]
    fn a_backlog_and_a_flush_write_at_once() {
        let sink = Sink::default();
        let batch = Batch::start(sink.clone(), Duration::from_secs(3600)).unwrap();
        batch.push(&vec![b'x'; LIMIT]);
        assert_eq!(lock(&sink.0).concat().len(), LIMIT, "written by the pusher");
        batch.push(b"last\n");
        batch.flush();
        assert!(lock(&sink.0).concat().ends_with(b"last\n"));
    }
}
