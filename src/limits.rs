//! Admission: the global connection limit, the per-address limit and the per-address
//! new-connection rate. "Per address" means per IPv4 address (IPv4-mapped IPv6 counts as IPv4)
//! and per IPv6 /64: one host can hold a whole /64, so counting its addresses one by one would
//! let it escape both limits.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The key an address is counted under: an IPv4 address as is, an IPv6 address as its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The global and per-address connection limits.
pub struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
    rate: Option<Mutex<RateLimiter>>,
}

/// A session's place under the per-address limit; given back when dropped.
pub struct IpPlace {
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    /// `max_per_ip = 0` means no per-address limit, `rate_per_ip = 0` no rate limit. `max` must
    /// be within `config::MAX_COUNT` (validation sees to it).
    pub fn new(max: usize, max_per_ip: usize, rate_per_ip: u32) -> Admission {
        Admission {
            global: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            per_ip: Arc::default(),
            max_per_ip,
            rate: (rate_per_ip > 0).then(|| Mutex::new(RateLimiter::new(rate_per_ip))),
        }
    }

    /// Takes a token from the address's new-connection bucket (`limits.connect_rate_per_ip`);
    /// false when it is empty.
    pub fn rate_allows(&self, ip: IpAddr) -> bool {
        let Some(rate) = &self.rate else {
            return true;
        };
        let now = Instant::now();
        let (allowed, retired) = {
            let mut rate = rate.lock().unwrap_or_else(|p| p.into_inner());
            rate.take(address_key(ip), now)
        };
        // The retired generation is freed outside the lock.
        drop(retired);
        allowed
    }

    /// A place under `limits.max_connections`.
    pub fn global(&self) -> Option<OwnedSemaphorePermit> {
        self.global.clone().try_acquire_owned().ok()
    }

    /// A place under `limits.max_connections_per_ip` for the device's (real) address.
    pub fn per_ip(&self, ip: IpAddr) -> Option<IpPlace> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let ip = address_key(ip);
        let count = per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        Some(IpPlace {
            ip,
            per_ip: self.per_ip.clone(),
        })
    }
}

/// The most addresses with a bucket in one generation of [`RateLimiter`]; past it the
/// generation is retired early. Bounds the limiter's memory whatever the addresses.
const MAX_RATE_BUCKETS: usize = 65_536;

/// Per-address token buckets (`rate` tokens a second, `2 * rate` at most), kept in two
/// generations: a bucket untouched for a whole generation, which is at least as long as a
/// bucket takes to refill, is full anyway and is forgotten when its generation is retired. So
/// idle buckets cost nothing, and no step scans the map.
struct RateLimiter {
    rate: f64,
    burst: f64,
    generation: Duration,
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
    started: Instant,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> RateLimiter {
        let rate = f64::from(rate);
        let burst = 2.0 * rate;
        RateLimiter {
            rate,
            burst,
            // Time to refill an empty bucket, and at least a second.
            generation: Duration::from_secs_f64((burst / rate).max(1.0)),
            current: HashMap::new(),
            previous: HashMap::new(),
            started: Instant::now(),
        }
    }

    /// Takes a token for `key` at `now`; also returns a retired generation for the caller to
    /// drop outside the lock.
    fn take(&mut self, key: IpAddr, now: Instant) -> (bool, Option<HashMap<IpAddr, Bucket>>) {
        let mut retired = None;
        if now.saturating_duration_since(self.started) >= self.generation
            || self.current.len() >= MAX_RATE_BUCKETS
        {
            let current = std::mem::take(&mut self.current);
            retired = Some(std::mem::replace(&mut self.previous, current));
            self.started = now;
        }
        let bucket = match self.current.get(&key) {
            Some(bucket) => *bucket,
            None => self.previous.remove(&key).unwrap_or(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let mut tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        let allowed = tokens >= 1.0;
        if allowed {
            tokens -= 1.0;
        }
        self.current.insert(key, Bucket { tokens, at: now });
        (allowed, retired)
    }
}

impl Drop for IpPlace {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_global_and_per_ip_places() {
        let admission = Admission::new(2, 2, 0);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = admission.per_ip(a).unwrap();
        let _second = admission.per_ip(a).unwrap();
        assert!(admission.per_ip(a).is_none(), "per-IP limit");
        let _other = admission
            .per_ip(b)
            .expect("other addresses are not affected");
        drop(first);
        let _again = admission
            .per_ip(a)
            .expect("places come back when a session ends");
        assert_eq!(admission.per_ip.lock().unwrap().get(&a), Some(&2));
        let (_g1, _g2) = (admission.global().unwrap(), admission.global().unwrap());
        assert!(admission.global().is_none(), "global limit");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("fd00::1"), "fd00::");
        assert_eq!(key("fd00::ffff:1:2:3"), "fd00::");
        assert_eq!(key("fd00:0:0:1::1"), "fd00:0:0:1::");
        assert_eq!(key("::ffff:10.0.0.1"), "10.0.0.1");
        assert_eq!(key("10.0.0.1"), "10.0.0.1");

        let admission = Admission::new(100, 2, 0);
        let _a = admission.per_ip("fd00::1".parse().unwrap()).unwrap();
        let _b = admission.per_ip("fd00::2".parse().unwrap()).unwrap();
        assert!(
            admission.per_ip("fd00::3".parse().unwrap()).is_none(),
            "a third address of the same /64"
        );
        assert!(admission.per_ip("fd00:0:0:1::3".parse().unwrap()).is_some());
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let mut limiter = RateLimiter::new(5);
        let start = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let allowed = (0..20).filter(|_| limiter.take(ip, start).0).count();
        assert_eq!(allowed, 10, "burst is twice the rate");
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(
            limiter.take(other, start).0,
            "other addresses have their own bucket"
        );
        // A /64 sibling shares the bucket of its /64 (through `address_key`).
        let later = start + Duration::from_millis(500);
        assert!(limiter.take(ip, later).0, "2.5 tokens back after 0.5 s");
        assert!(limiter.take(ip, later).0);
        assert!(!limiter.take(ip, later).0);
        // Generations retire idle buckets; a forgotten bucket starts full again.
        let much_later = start + Duration::from_secs(10);
        limiter.take(other, much_later);
        limiter.take(other, much_later + Duration::from_secs(3));
        assert!(!limiter.current.contains_key(&ip) && !limiter.previous.contains_key(&ip));
        assert!(limiter.take(ip, much_later + Duration::from_secs(3)).0);
        let admission = Admission::new(10, 0, 1);
        let sibling = |n: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n));
        assert!(admission.rate_allows(sibling(1)));
        assert!(admission.rate_allows(sibling(2)));
        assert!(!admission.rate_allows(sibling(3)), "one /64, one bucket");
    }
}
