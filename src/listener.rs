//! The accept loop of one route: accept, check the ACL and the limits, spawn one task per
//! connection. Nothing here waits on a peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, warn, Instrument};

use crate::context::{RouteCtx, Shared};
use crate::outcome::Refusal;
use crate::session;

/// The first wait after a failed accept (EMFILE and friends), doubled up to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    route: Arc<RouteCtx>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
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
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        // Behind a load balancer the socket's peer is the balancer: it must be a trusted one.
        let (trusted, refusal) = match route.route.proxy_protocol {
            true => (&route.route.proxy_from, Refusal::ProxyUntrusted),
            false => (&route.route.allow, Refusal::AclDenied),
        };
        if !trusted.iter().any(|net| net.contains(&peer.ip())) {
            shared.sinks.refused(
                &route.route,
                &route.metrics,
                peer,
                refusal,
                "peer address is not in the route's allow (or proxy_from) list",
            );
            continue;
        }
        // Behind a balancer the socket's peer is the balancer, shared by every device: there
        // the rate applies to the address in the PROXY header (`session::run`).
        if !route.route.proxy_protocol && !shared.admission.rate_allows(peer.ip()) {
            shared.sinks.refused(
                &route.route,
                &route.metrics,
                peer,
                Refusal::RateLimited,
                "limits.connect_rate_per_ip reached",
            );
            continue;
        }
        let Some(permit) = shared.admission.global() else {
            session::refuse_busy(&route, &shared, tcp, peer);
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
