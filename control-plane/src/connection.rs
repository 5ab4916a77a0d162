//! One accepted connection's life: the TLS handshake (bounded), who is calling (the client
//! certificate), and the two deadlines hyper does not keep apart — a request's headers must
//! arrive within the header-read timeout once its first byte has, and a connection with no
//! request in flight and no bytes moving is closed after the idle timeout (which is above the
//! heartbeat interval, so a node's persistent connection survives between heartbeats). A
//! connection that presented no client certificate counts against the anonymous caps until it
//! ends, and gets the header-read timeout as its idle timeout: it is only there to enroll.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::admission::AnonymousSlot;
use crate::server::{Conn, Plane};

/// Deadlines of one connection (`serve --handshake-timeout`, `--header-timeout`, `--idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub handshake: Duration,
    pub header: Duration,
    pub idle: Duration,
}

/// What a connection is doing, shared by its IO, its service and its watchdog. Times are
/// milliseconds since the connection started; 0 means "not set".
#[derive(Debug)]
struct Activity {
    started: Instant,
    last_io_ms: AtomicU64,
    /// When the first byte of a request arrived while none was in flight (headers pending).
    header_since_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_io_ms: AtomicU64::new(1),
            header_since_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.started + Duration::from_millis(ms)
    }

    fn bytes_in(&self) {
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Acquire) == 0 {
            // Only the first byte of a request starts its header clock.
            let _already_running = self.header_since_ms.compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn bytes_out(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The headers are in (hyper called the service): the header clock stops.
    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.header_since_ms.store(0, Ordering::Release);
        InFlight(Arc::clone(self))
    }

    /// When this connection must end if nothing changes, and why.
    fn deadline(&self, d: &Deadlines, idle: Duration) -> (Instant, &'static str) {
        let header = self.header_since_ms.load(Ordering::Acquire);
        if header != 0 {
            return (self.at(header) + d.header, "header-read timeout");
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // A request is being served (a long-poll waits up to 30 s): look again later.
            return (Instant::now() + idle, "");
        }
        (self.at(self.last_io_ms.load(Ordering::Relaxed)) + idle, "idle timeout")
    }
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.bytes_out();
    }
}

/// The TLS stream, noting every byte that moves.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_in();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.bytes_out();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one accepted TCP connection to its end. `slot` is its place among anonymous
/// connections, given back as soon as the handshake shows a client certificate.
pub async fn serve(
    plane: Arc<Plane>,
    acceptor: tokio_rustls::TlsAcceptor,
    router: axum::Router,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    slot: AnonymousSlot,
) {
    let d = plane.deadlines;
    let tls = match tokio::time::timeout(d.handshake, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            crate::api::journal_tls_refusal(&plane, remote, &e.to_string());
            return;
        }
        Err(_) => return,
    };
    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::ca::peer_of(c));
    let (idle, _slot) = match peer {
        Some(_) => {
            drop(slot); // authenticated: no longer counted among anonymous connections
            (d.idle, None)
        }
        None => (d.header, Some(slot)),
    };
    let activity = Arc::new(Activity::new());
    let conn = Conn { peer, remote };
    let service = {
        let (router, activity) = (router.layer(axum::Extension(conn)), Arc::clone(&activity));
        tower::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
            let in_flight = activity.request_started();
            let call = router.clone().oneshot(req);
            async move {
                let response = call.await;
                drop(in_flight);
                response
            }
        })
    };
    let io = TokioIo::new(Watched { inner: tls, activity: Arc::clone(&activity) });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(64 * 1024);
    let connection = http.serve_connection(io, TowerToHyperService::new(service));
    tokio::pin!(connection);
    loop {
        let (deadline, why) = activity.deadline(&d, idle);
        tokio::select! {
            ended = connection.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, %remote, "connection ended");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                if !why.is_empty() && activity.deadline(&d, idle).0 <= Instant::now() {
                    tracing::debug!(%remote, why, "closing connection");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Deadlines = Deadlines {
        handshake: Duration::from_secs(10),
        header: Duration::from_secs(10),
        idle: Duration::from_secs(90),
    };

    #[tokio::test(start_paused = true)]
    async fn headers_have_their_own_clock_and_idle_counts_only_without_a_request() {
        let a = Arc::new(Activity::new());
        let (deadline, why) = a.deadline(&D, D.idle);
        assert_eq!((deadline - a.started, why), (Duration::from_millis(1) + D.idle, "idle timeout"));

        tokio::time::advance(Duration::from_secs(5)).await;
        a.bytes_in();
        let (deadline, why) = a.deadline(&D, D.idle);
        assert_eq!(why, "header-read timeout");
        assert_eq!(deadline - a.started, Duration::from_secs(15));
        tokio::time::advance(Duration::from_secs(3)).await;
        a.bytes_in();
        assert_eq!(a.deadline(&D, D.idle).0 - a.started, Duration::from_secs(15), "more header bytes do not extend it");

        let req = a.request_started();
        a.bytes_in(); // the body
        assert_eq!(a.deadline(&D, D.idle).1, "", "a request in flight is never idle");
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(req);
        let (deadline, why) = a.deadline(&D, D.idle);
        assert_eq!((deadline - a.started, why), (Duration::from_secs(38) + D.idle, "idle timeout"));
    }
}
