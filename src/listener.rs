//! The accept loop of one route: accept, check the ACL and the limits, spawn one task per
//! connection. Nothing here waits on a peer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, warn, Instrument};

use crate::audit::SessionRecord;
use crate::config::{DeviceMode, Protocol, Route};
use crate::server::Shared;
use crate::session;

/// A route with what its sessions share.
pub struct RouteCtx {
    pub route: Route,
    /// The route's SNI allow list, handed to the acceptor for each handshake.
    pub sni_allow: Option<Arc<[String]>>,
}

impl RouteCtx {
    pub fn new(route: Route) -> RouteCtx {
        let sni_allow = match route.upstream {
            crate::config::Upstream::Sni { .. } => Some(route.sni_allow.clone().into()),
            crate::config::Upstream::Fixed { .. } => None,
        };
        RouteCtx { route, sni_allow }
    }

    fn allows(&self, ip: IpAddr) -> bool {
        self.route.allow.iter().any(|net| net.contains(&ip))
    }
}

/// Accepts until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    route: Arc<RouteCtx>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning on the same error.
                warn!(route = %route.route.name, error = %err, "accept failed; backing off {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        if !route.allows(peer.ip()) {
            refuse(
                &route,
                peer,
                "acl_denied",
                "peer address is outside the route's allow list",
            );
            continue;
        }
        let Some(admission) = shared.admission.admit(peer.ip()) else {
            refuse_busy(&route, tcp, peer);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!(
            "conn",
            route = %route.route.name,
            peer = %peer,
            device_tls = field::Empty,
            cipher = field::Empty,
            upstream_tls = field::Empty,
        );
        let (route, shared_for_task) = (route.clone(), shared.clone());
        shared.tracker.spawn(
            async move {
                session::run(route, shared_for_task, tcp, peer).await;
                drop(admission);
            }
            .instrument(span),
        );
    }
}

fn refuse(route: &RouteCtx, peer: SocketAddr, outcome: &str, why: &str) {
    let r = &route.route;
    SessionRecord::new(&r.name, peer, r.protocol, r.upstream.to_string()).closed(
        0,
        0,
        outcome,
        Some(why),
    );
}

/// Over a limit: plaintext protocols get their "try later" reply without waiting (a fresh
/// socket's send buffer is empty, so `try_write` does not block), then the socket closes.
fn refuse_busy(route: &RouteCtx, tcp: TcpStream, peer: SocketAddr) {
    if route.route.device_tls != DeviceMode::Tls {
        let reply: &[u8] = match route.route.protocol {
            Protocol::Smtp => b"421 4.7.0 too many connections, try again later\r\n",
            Protocol::Imap => b"* BYE [UNAVAILABLE] too many connections, try again later\r\n",
            Protocol::Pop3 => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
            Protocol::Tcp => b"",
        };
        let _ = tcp.try_write(reply);
    }
    refuse(
        route,
        peer,
        "too_many_connections",
        "limits.max_connections or limits.max_connections_per_ip reached",
    );
}

/// The global and per-IP connection limits.
pub struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// Held by a session; gives its places back when dropped.
pub struct Admitted {
    _permit: OwnedSemaphorePermit,
    ip: IpAddr,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Admission {
    /// `max_per_ip = 0` means no per-IP limit.
    pub fn new(max: usize, max_per_ip: usize) -> Admission {
        Admission {
            global: Arc::new(Semaphore::new(max)),
            per_ip: Arc::default(),
            max_per_ip,
        }
    }

    pub fn admit(&self, ip: IpAddr) -> Option<Admitted> {
        let permit = self.global.clone().try_acquire_owned().ok()?;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *count >= self.max_per_ip {
            return None;
        }
        *count += 1;
        Some(Admitted {
            _permit: permit,
            ip,
            per_ip: self.per_ip.clone(),
        })
    }

    /// Sessions open right now.
    pub fn active(&self, max: usize) -> usize {
        max - self.global.available_permits()
    }
}

impl Drop for Admitted {
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
        let admission = Admission::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert!(admission.admit(a).is_none(), "per-IP limit");
        let _third = admission.admit(b).unwrap();
        assert!(admission.admit(b).is_none(), "global limit");
        drop(first);
        let _again = admission
            .admit(a)
            .expect("places come back when a session ends");
        assert_eq!(admission.per_ip.lock().unwrap().get(&a), Some(&2));
    }
}
