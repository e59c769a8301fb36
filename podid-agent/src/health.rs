//! The operations endpoint: Prometheus `/metrics`, `/healthz` (the process is
//! serving) and `/readyz` (redirect attached, workloads loaded, token endpoint
//! listening).

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tracing::debug;

use crate::metrics::Metrics;

/// Readiness, set by the agent as it comes up.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    reason: std::sync::Mutex<String>,
}

impl Readiness {
    /// Marks ready.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Marks not ready, with why.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        self.ready.store(false, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.into();
    }

    /// Whether ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

fn answer(
    metrics: &Metrics,
    readiness: &Readiness,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8"),
        "/readyz" if readiness.is_ready() => text(
            StatusCode::OK,
            "ready\n".into(),
            "text/plain; charset=utf-8",
        ),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", readiness.reason()),
            "text/plain; charset=utf-8",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found\n".into(),
            "text/plain; charset=utf-8",
        ),
    }
}

/// Connections the operations endpoint keeps at once. Beyond it, the
/// oldest connection that has not sent a request yet is closed to make room,
/// so a flood of idle connections cannot keep kubelet's probe or Prometheus
/// out.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a connection may take to send its request and get the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle connection keeps its place against a new connection
/// that has not sent anything either.
const IDLE_GRACE: Duration = Duration::from_millis(100);

/// A connection being served: when it came, whether it sent a request yet,
/// and how to close it.
struct Slot {
    accepted: Instant,
    requested: Arc<AtomicBool>,
    close: oneshot::Sender<()>,
}

/// Makes room for one more connection: forgets finished ones, then, if the
/// endpoint is full, closes the oldest idle one. A new connection whose
/// request is already waiting (kubelet's probe, a scrape) always gets a
/// place that way; one that has sent nothing only takes the place of a
/// connection idle for longer than [`IDLE_GRACE`]. `false`: no room, the new
/// connection is closed.
fn make_room(slots: &mut VecDeque<Slot>, new_has_request: bool, now: Instant) -> bool {
    slots.retain(|slot| !slot.close.is_closed());
    if slots.len() < MAX_CONNECTIONS {
        return true;
    }
    let evictable = slots.iter().position(|slot| {
        !slot.requested.load(Ordering::Relaxed)
            && (new_has_request || now.duration_since(slot.accepted) >= IDLE_GRACE)
    });
    match evictable {
        Some(index) => {
            if let Some(slot) = slots.remove(index) {
                let _ = slot.close.send(());
            }
            true
        }
        None => false,
    }
}

/// Whether bytes are waiting on the socket (a request sent with the
/// handshake), without reading them.
fn has_pending_bytes(stream: &tokio::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer; MSG_PEEK leaves the data in place.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::from_mut(&mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

/// Binds the operations endpoint with a listen backlog of 4,096: a flood of
/// connections then waits in the kernel's queue for the accept loop (which
/// makes room for each) instead of having its SYNs dropped and retried.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves the operations endpoint until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut slots: VecDeque<Slot> = VecDeque::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                debug!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let now = Instant::now();
        if !make_room(&mut slots, has_pending_bytes(&stream), now) {
            metrics.rejected_connection("metrics_connection_limit");
            continue;
        }
        let (close, closed) = oneshot::channel();
        let requested = Arc::new(AtomicBool::new(false));
        slots.push_back(Slot {
            accepted: now,
            requested: requested.clone(),
            close,
        });
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                requested.store(true, Ordering::Relaxed);
                let response = answer(&metrics, &readiness, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let serving = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(CONNECTION_TIMEOUT, serving) => {}
                _ = closed => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(requested: bool) -> (Slot, oneshot::Receiver<()>) {
        let (close, closed) = oneshot::channel();
        (
            Slot {
                accepted: Instant::now(),
                requested: Arc::new(AtomicBool::new(requested)),
                close,
            },
            closed,
        )
    }

    #[test]
    fn a_full_endpoint_makes_room_for_a_request_before_an_idle_connection() {
        let mut slots = VecDeque::new();
        let mut receivers = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            // The first is busy with a request; the rest are idle.
            let (s, r) = slot(i == 0);
            slots.push_back(s);
            receivers.push(r);
        }
        // A new idle connection does not displace connections that just
        // came; later it takes the oldest idle one's place.
        assert!(!make_room(&mut slots, false, Instant::now()));
        assert!(make_room(&mut slots, false, Instant::now() + IDLE_GRACE));
        assert!(receivers[1].try_recv().is_ok(), "the oldest idle one");
        // A connection with its request waiting takes a place at once.
        let (s, r) = slot(false);
        slots.push_back(s);
        receivers.push(r);
        assert!(make_room(&mut slots, true, Instant::now()));
        assert!(receivers[2].try_recv().is_ok(), "the next oldest idle one");
        assert!(receivers[0].try_recv().is_err(), "the busy one stays");
        // Finished connections free their place without closing anyone:
        // only the busy one (its receiver still alive) is left.
        receivers.truncate(1);
        assert!(make_room(&mut slots, false, Instant::now()));
        assert_eq!(slots.len(), 1);
        // All busy: no room.
        let mut busy = VecDeque::new();
        let mut keep = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (s, r) = slot(true);
            busy.push_back(s);
            keep.push(r);
        }
        assert!(!make_room(&mut busy, true, Instant::now()));
    }
}
