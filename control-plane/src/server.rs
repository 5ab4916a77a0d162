//! The plane's HTTPS server: rustls with optional client certificates (enrollment is
//! server-authenticated only; every other endpoint checks the certificate the connection
//! presented), a per-connection [`Conn`] carrying who is calling, size-capped bodies, and a
//! journal record for every refusal. Routes are in `api`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ca::{Authority, Peer, write_secret};
use crate::store::{Settings, Store};

/// A TLS handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub peer: Option<Peer>,
    pub remote: SocketAddr,
}

/// The files a plane keeps in its state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn ca(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    pub fn operator_cert(&self) -> PathBuf {
        self.0.join("operator.pem")
    }
    pub fn operator_key(&self) -> PathBuf {
        self.0.join("operator.key")
    }
    /// The address the running server listens on (written once it is bound).
    pub fn address(&self) -> PathBuf {
        self.0.join("address")
    }
}

/// Everything a running plane holds.
#[derive(Debug)]
pub struct Plane {
    pub store: Store,
    /// Enrollment attempts per address.
    pub limiter: crate::api::RateLimiter,
    /// Journal records of unauthenticated noise (refused TLS handshakes, rate-limited
    /// enrollment attempts) per address.
    pub noise_journal_limiter: crate::api::RateLimiter,
    pub waiters: crate::api::Waiters,
}

/// Opens the state directory: the CA (created on first start), a server certificate for
/// `names`, an operator certificate `admin`, and the database.
pub fn open_state(dir: &Path, names: &[String], settings: Settings) -> anyhow::Result<(Plane, rustls::ServerConfig)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = StateDir(dir.to_owned());
    let ca = Authority::open_or_create(dir)?;
    let (server_cert, server_key) = (dir.join("server.pem"), dir.join("server.key"));
    if !server_cert.exists() {
        let (cert, key) = ca.issue_server(names)?;
        write_secret(&server_key, &key, 0o600)?;
        write_secret(&server_cert, &format!("{cert}{}", ca.cert_pem()), 0o644)?;
    }
    if !state.operator_cert().exists() {
        let (cert, key) = ca.issue_operator("admin")?;
        write_secret(&state.operator_key(), &key, 0o600)?;
        write_secret(&state.operator_cert(), &cert, 0o644)?;
    }
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(cert.context("CA certificate")?).context("trusting the CA")?;
    }
    let verifier =
        WebPkiClientVerifier::builder(Arc::new(roots)).allow_unauthenticated().build().context("client verifier")?;
    let chain = CertificateDer::pem_file_iter(&server_cert)
        .with_context(|| format!("reading {}", server_cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .context("server certificate")?;
    let key = PrivateKeyDer::from_pem_file(&server_key).with_context(|| format!("reading {}", server_key.display()))?;
    let mut tls = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("server TLS")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let store = Store::open(&dir.join("plane.db"), ca, settings).context("opening the database")?;
    let limiter = crate::api::RateLimiter::new(store.settings.enroll_burst, store.settings.enroll_per_second);
    let noise_journal_limiter = crate::api::RateLimiter::new(10, 1.0);
    Ok((Plane { store, limiter, noise_journal_limiter, waiters: Default::default() }, tls))
}

/// Serves until the process ends: accepts TLS connections on `listener`, and sweeps for
/// silent nodes in the background.
pub async fn serve(plane: Arc<Plane>, tls: rustls::ServerConfig, listener: TcpListener) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let router = crate::api::router(Arc::clone(&plane));
    tokio::spawn(sweep_loop(Arc::clone(&plane)));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, router, plane) = (acceptor.clone(), router.clone(), Arc::clone(&plane));
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    crate::api::journal_tls_refusal(&plane, remote, &e.to_string());
                    return;
                }
                Err(_) => return,
            };
            let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| crate::ca::peer_of(c));
            let service = router.layer(axum::Extension(Conn { peer, remote }));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service)).await {
                tracing::debug!(error = %e, %remote, "connection ended");
            }
        });
    }
}

async fn sweep_loop(plane: Arc<Plane>) {
    let every = (plane.store.settings.heartbeat_interval / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let p = Arc::clone(&plane);
        match tokio::task::spawn_blocking(move || p.store.sweep(crate::store::now())).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(moved = n, "sweep"),
            Ok(Err(e)) => tracing::warn!(error = %e, "sweep"),
            _ => {}
        }
    }
}
