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

    pub fn allows(&self, ip: IpAddr) -> bool {
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
        // Behind a load balancer the socket's peer is the balancer: it must be a trusted one.
        let (trusted, why) = match route.route.proxy_protocol {
            true => (&route.route.proxy_from, "proxy_untrusted"),
            false => (&route.route.allow, "acl_denied"),
        };
        if !trusted.iter().any(|net| net.contains(&peer.ip())) {
            shared.sinks.refused(
                &route.route,
                peer,
                why,
                "peer address is not in the route's allow (or proxy_from) list",
            );
            continue;
        }
        let Some(permit) = shared.admission.global() else {
            refuse_busy(&route, &shared, tcp, peer);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!(
            "conn",
            route = %route.route.name,
            peer = field::Empty,
            device_tls = field::Empty,
            cipher = field::Empty,
            upstream_tls = field::Empty,
        );
        let task = session::run(route.clone(), shared.clone(), tcp, peer, permit);
        shared.tracker.spawn(task.instrument(span));
    }
}

/// Over a limit: plaintext protocols get their "try later" reply without waiting (a fresh
/// socket's send buffer is empty, so `try_write` does not block), then the socket closes.
pub fn refuse_busy(route: &RouteCtx, shared: &Shared, tcp: TcpStream, peer: SocketAddr) {
    if route.route.device_tls != DeviceMode::Tls {
        let reply: &[u8] = match route.route.protocol {
            Protocol::Smtp => b"421 4.7.0 too many connections, try again later\r\n",
            Protocol::Imap => b"* BYE [UNAVAILABLE] too many connections, try again later\r\n",
            Protocol::Pop3 => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
            Protocol::Tcp => b"",
        };
        let _ = tcp.try_write(reply);
    }
    let why = "limits.max_connections or limits.max_connections_per_ip reached";
    shared
        .sinks
        .refused(&route.route, peer, "too_many_connections", why);
}

/// The global and per-IP connection limits.
pub struct Admission {
    global: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
}

/// A session's place under the per-IP limit; given back when dropped.
pub struct IpPlace {
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
