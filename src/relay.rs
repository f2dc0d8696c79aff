//! The relay: both directions at once, half-closes carried across, an idle timeout, byte counts.
//!
//! An end is carried faithfully: when one side ends cleanly its reader sees EOF and the other
//! side gets a clean close (TLS close_notify, then FIN) in that direction only, while the other
//! direction goes on. When a side ends abnormally (reset, or EOF without close_notify on a TLS
//! leg), the session stops and the caller must not dress that up as a clean close.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read at once per direction. Each open session holds two of these for its whole life,
/// so this is most of a relayed connection's idle cost; 8 KiB keeps throughput (measured with
/// scripts/bench.sh) while halving that cost against a full TLS record.
const CHUNK: usize = 8 * 1024;

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions ended cleanly.
    Clean,
    /// No byte either way for the idle timeout.
    Idle,
    /// The device leg failed (reset, or a write to it failed).
    Device(io::Error),
    /// The upstream leg failed: reset, truncation without close_notify, or a failed write.
    Upstream(io::Error),
    /// The proxy is shutting down and the drain time is over.
    Cancelled,
}

/// Bytes kept from the end of each direction: enough for a protocol's goodbye.
const KEEP: usize = 64;

/// Bytes kept from the start of each direction: enough for a protocol's first command (the SMTP
/// EHLO that names a device) and the first replies (a Basic-auth refusal after EHLO and AUTH).
const HEAD: usize = 1024;

/// What passed one way: the byte count (payload only, TLS overhead not included), the first
/// bytes and the last bytes.
#[derive(Debug, Default)]
pub struct Seen {
    pub bytes: u64,
    pub head: Vec<u8>,
    pub tail: Vec<u8>,
}

impl Seen {
    fn passed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        let room = HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
        self.tail
            .extend_from_slice(&chunk[chunk.len().saturating_sub(KEEP)..]);
        let excess = self.tail.len().saturating_sub(KEEP);
        self.tail.drain(..excess);
    }
}

/// How the relay ended and what passed each way.
#[derive(Debug)]
pub struct Relayed {
    pub end: End,
    /// Device to upstream.
    pub up: Seen,
    /// Upstream to device.
    pub down: Seen,
}

/// Copies device -> upstream and upstream -> device until both ends finish or one fails.
pub async fn run<D, U>(
    device: &mut D,
    upstream: &mut U,
    idle: Duration,
    cancel: &CancellationToken,
) -> Relayed
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (up_seen, down_seen) = (Mutex::default(), Mutex::default());
    let (mut device_rx, mut device_tx) = tokio::io::split(device);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let up = copy(
        &mut device_rx,
        &mut upstream_tx,
        Meter {
            seen: &up_seen,
            last_activity: &last_activity,
            start,
        },
        Side::Device,
    );
    let down = copy(
        &mut upstream_rx,
        &mut device_tx,
        Meter {
            seen: &down_seen,
            last_activity: &last_activity,
            start,
        },
        Side::Upstream,
    );
    let end = tokio::select! {
        result = futures_try_join(up, down) => match result {
            Ok(()) => End::Clean,
            Err((Side::Device, err)) => End::Device(err),
            Err((Side::Upstream, err)) => End::Upstream(err),
        },
        () = idle_watch(&last_activity, start, idle) => End::Idle,
        () = cancel.cancelled() => End::Cancelled,
    };
    let seen = |s: Mutex<Seen>| s.into_inner().unwrap_or_else(|p| p.into_inner());
    Relayed {
        end,
        up: seen(up_seen),
        down: seen(down_seen),
    }
}

#[derive(Debug, Clone, Copy)]
enum Side {
    Device,
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Device => Side::Upstream,
            Side::Upstream => Side::Device,
        }
    }
}

/// What one direction records as bytes pass.
struct Meter<'a> {
    seen: &'a Mutex<Seen>,
    last_activity: &'a AtomicU64,
    start: Instant,
}

impl Meter<'_> {
    fn passed(&self, chunk: &[u8]) {
        let elapsed = self.start.elapsed().as_millis() as u64;
        self.last_activity.store(elapsed, Ordering::Relaxed);
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .passed(chunk);
    }
}

/// One direction: read from `from`, write to the other side; on clean EOF, close the other side
/// in this direction only.
async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    meter: Meter<'_>,
    from: Side,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(|err| (from, err))?;
        if n == 0 {
            return writer.shutdown().await.map_err(|err| (from.other(), err));
        }
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|err| (from.other(), err))?;
        writer.flush().await.map_err(|err| (from.other(), err))?;
        meter.passed(&buf[..n]);
    }
}

/// Both directions; the first failure ends both.
async fn futures_try_join<A, B>(a: A, b: B) -> Result<(), (Side, io::Error)>
where
    A: std::future::Future<Output = Result<(), (Side, io::Error)>>,
    B: std::future::Future<Output = Result<(), (Side, io::Error)>>,
{
    tokio::try_join!(a, b).map(|_| ())
}

/// Resolves once no byte has moved either way for `idle`.
async fn idle_watch(last_activity: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
        if last.elapsed() >= idle {
            return;
        }
        tokio::time::sleep_until(last + idle).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn half_close_is_carried_and_counts_add_up() {
        let (mut device, mut device_peer) = duplex(1024);
        let (mut upstream, mut upstream_peer) = duplex(1024);
        let cancel = CancellationToken::new();
        let relay = tokio::spawn(async move {
            run(&mut device, &mut upstream, Duration::from_secs(60), &cancel).await
        });
        device_peer.write_all(b"request").await.unwrap();
        device_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "upstream sees the request and then EOF");
        upstream_peer.write_all(b"the whole reply").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut reply = Vec::new();
        device_peer.read_to_end(&mut reply).await.unwrap();
        assert_eq!(
            reply, b"the whole reply",
            "the device still gets all of the reply"
        );
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Clean), "{:?}", relayed.end);
        assert_eq!((relayed.up.bytes, relayed.down.bytes), (7, 15));
        assert_eq!(relayed.up.head, b"request");
        assert_eq!(relayed.down.tail, b"the whole reply");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires_and_activity_postpones_it() {
        let (mut device, mut device_peer) = duplex(1024);
        let (mut upstream, _upstream_peer) = duplex(1024);
        let cancel = CancellationToken::new();
        let relay = tokio::spawn(async move {
            run(&mut device, &mut upstream, Duration::from_secs(10), &cancel).await
        });
        tokio::time::sleep(Duration::from_secs(8)).await;
        device_peer.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(
            !relay.is_finished(),
            "activity at 8s moves the deadline to 18s"
        );
        let relayed = relay.await.unwrap();
        assert!(matches!(relayed.end, End::Idle), "{:?}", relayed.end);
    }
}
