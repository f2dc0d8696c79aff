//! Admission: the global connection limit and the per-address limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The global and per-address connection limits.
pub struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// A session's place under the per-address limit; given back when dropped.
pub struct IpPlace {
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    /// `max_per_ip = 0` means no per-address limit.
    pub fn new(max: usize, max_per_ip: usize) -> Admission {
        Admission {
            global: Arc::new(Semaphore::new(max)),
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    /// A place under `limits.max_connections`.
    pub fn global(&self) -> Option<OwnedSemaphorePermit> {
        self.global.clone().try_acquire_owned().ok()
    }

    /// A place under `limits.max_connections_per_ip` for the device's (real) address.
    pub fn per_ip(&self, ip: IpAddr) -> Option<IpPlace> {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
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
        let admission = Admission::new(2, 2);
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
}
