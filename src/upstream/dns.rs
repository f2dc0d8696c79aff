//! Upstream name resolution with a small cache and a bound on concurrent lookups. Sessions to
//! the same upstream share one answer for [`ANSWER_TTL`] (a failure for [`FAILURE_TTL`]), so a
//! burst of connections costs one lookup, and a DNS outage cannot pile up blocked lookups on
//! the blocking pool: at most [`MAX_CONCURRENT_LOOKUPS`] run at once, the rest wait (within the
//! session's `upstream_tls.connect_timeout`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// How long an answer is reused. The system resolver does not tell the record's TTL; this is
/// short enough to follow a Microsoft 365 address change quickly.
pub const ANSWER_TTL: Duration = Duration::from_secs(30);

/// How long a failed lookup is remembered, so an outage costs one lookup per name and period.
pub const FAILURE_TTL: Duration = Duration::from_secs(5);

/// Lookups running at once (each holds a blocking-pool thread).
pub const MAX_CONCURRENT_LOOKUPS: usize = 8;

/// Names cached at most (SNI routes may name many); past it the cache starts over.
const MAX_CACHED_NAMES: usize = 1024;

type Answer = Result<Vec<SocketAddr>, (io::ErrorKind, String)>;

struct Entry {
    answer: Answer,
    expires: Instant,
}

struct Resolver {
    cache: Mutex<HashMap<(String, u16), Entry>>,
    lookups: Semaphore,
}

fn resolver() -> &'static Resolver {
    static RESOLVER: OnceLock<Resolver> = OnceLock::new();
    RESOLVER.get_or_init(|| Resolver {
        cache: Mutex::new(HashMap::new()),
        lookups: Semaphore::new(MAX_CONCURRENT_LOOKUPS),
    })
}

impl Resolver {
    fn cached(&self, key: &(String, u16), now: Instant) -> Option<Answer> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|entry| entry.expires > now)
            .map(|entry| entry.answer.clone())
    }

    fn store(&self, key: (String, u16), answer: Answer, now: Instant) {
        let ttl = match answer {
            Ok(_) => ANSWER_TTL,
            Err(_) => FAILURE_TTL,
        };
        let retired = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let retired = (cache.len() >= MAX_CACHED_NAMES && !cache.contains_key(&key))
                .then(|| std::mem::take(&mut *cache));
            cache.insert(
                key,
                Entry {
                    answer,
                    expires: now + ttl,
                },
            );
            retired
        };
        // Freed outside the lock.
        drop(retired);
    }
}

/// The addresses of `host:port`, from the cache or a bounded lookup.
pub async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let resolver = resolver();
    let key = (host.to_ascii_lowercase(), port);
    let to_io = |answer: Answer| answer.map_err(|(kind, text)| io::Error::new(kind, text));
    if let Some(answer) = resolver.cached(&key, Instant::now()) {
        return to_io(answer);
    }
    let _slot = resolver
        .lookups
        .acquire()
        .await
        .map_err(|_| io::Error::other("resolver closed"))?;
    // Another session may have resolved it while this one waited.
    if let Some(answer) = resolver.cached(&key, Instant::now()) {
        return to_io(answer);
    }
    let answer: Answer = match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(err) => Err((err.kind(), err.to_string())),
    };
    resolver.store(key, answer.clone(), Instant::now());
    to_io(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_and_failures_are_cached() {
        let addrs = resolve("127.0.0.1", 25).await.unwrap();
        assert_eq!(addrs, ["127.0.0.1:25".parse().unwrap()]);
        let key = ("127.0.0.1".to_string(), 25);
        assert!(resolver().cached(&key, Instant::now()).is_some());
        assert!(resolver()
            .cached(&key, Instant::now() + ANSWER_TTL + Duration::from_secs(1))
            .is_none());
        let bad = "no-such-host.invalid";
        assert!(resolve(bad, 25).await.is_err());
        let key = (bad.to_string(), 25);
        assert!(matches!(
            resolver().cached(&key, Instant::now()),
            Some(Err(_))
        ));
        assert!(resolver()
            .cached(&key, Instant::now() + FAILURE_TTL + Duration::from_secs(1))
            .is_none());
    }
}
