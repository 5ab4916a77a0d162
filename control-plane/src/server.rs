//! The plane's HTTPS server: rustls with optional client certificates (enrollment is
//! server-authenticated only; every other endpoint checks the certificate the connection
//! presented), the accept loop within the anonymous-connection caps, and the background loops
//! (silence sweep, journal checkpoints). One connection's life is in `connection`; routes are
//! in `api` and `operator_api`. At shutdown the machines the provider started are powered off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admission::{ConnectionCaps, ConnectionLimits, RateLimiter};
use crate::ca::{Authority, Peer, write_secret};
use crate::checkpoint::Journal;
use crate::connection::Deadlines;
use crate::store::{Settings, Store};

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
    /// The journal key and the newest checkpoint beside the database.
    pub journal: Journal,
    /// Enrollment attempts per address.
    pub limiter: RateLimiter,
    /// Journal records of refusals before authentication (refused TLS handshakes, capped
    /// connections, rate-limited enrollments, requests without a certificate), per address.
    pub noise_journal_limiter: RateLimiter,
    /// Journal records of refusals of authenticated callers, per certificate holder.
    pub peer_journal_limiter: RateLimiter<String>,
    pub caps: ConnectionCaps,
    pub deadlines: Deadlines,
    pub waiters: crate::api::Waiters,
    /// Trust keys and registry access for publishing modules (channels, template pins).
    pub publisher: crate::publish::Publisher,
    /// Machines on demand (`serve --provider`).
    pub provider: crate::provider::Provider,
}

/// How the server treats connections and the journal (`serve` flags).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub names: Vec<String>,
    pub limits: ConnectionLimits,
    pub deadlines: Deadlines,
    pub checkpoint_interval: Duration,
    pub publisher: crate::publish::Publisher,
    pub provider: crate::provider::ProviderConfig,
}

/// Opens the state directory: the CA (created on first start), a server certificate for
/// `names` (issued again when one is missing from it), an operator certificate `admin`, the
/// journal key, the database, and the machine provider for a plane listening on `listen`.
pub fn open_state(
    dir: &Path,
    settings: Settings,
    options: &ServerOptions,
    listen: SocketAddr,
) -> anyhow::Result<(Plane, rustls::ServerConfig)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let state = StateDir(dir.to_owned());
    let ca = Authority::open_or_create(dir)?;
    let (server_cert, server_key) = (dir.join("server.pem"), dir.join("server.key"));
    if !server_cert.exists() || !names_all(&server_cert, &options.names)? {
        let (cert, key) = ca.issue_server(&options.names)?;
        write_secret(&server_key, &key, 0o600)?;
        write_secret(&server_cert, &format!("{cert}{}", ca.cert_pem()), 0o644)?;
    }
    if !state.operator_cert().exists() {
        let (cert, key) = ca.issue_operator("admin")?;
        write_secret(&state.operator_key(), &key, 0o600)?;
        write_secret(&state.operator_cert(), &cert, 0o644)?;
    }
    let journal = Journal::open_or_create(dir)?;
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
    let provider = crate::provider::Provider::open(&options.provider, dir, listen, ca.cert_pem())?;
    let store = Store::open(&dir.join("plane.db"), ca, settings).context("opening the database")?;
    let limiter = RateLimiter::new(store.settings.enroll_burst, store.settings.enroll_per_second);
    let plane = Plane {
        store,
        journal,
        limiter,
        noise_journal_limiter: RateLimiter::new(NOISE_BURST, NOISE_PER_SECOND),
        peer_journal_limiter: RateLimiter::new(PEER_NOISE_BURST, PEER_NOISE_PER_SECOND),
        caps: ConnectionCaps::new(options.limits),
        deadlines: options.deadlines,
        waiters: crate::api::Waiters::default(),
        publisher: options.publisher.clone(),
        provider,
    };
    Ok((plane, tls))
}

/// Whether the certificate at `path` names every one of `names` (DNS names or IP addresses).
fn names_all(path: &Path, names: &[String]) -> anyhow::Result<bool> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let der = CertificateDer::from_pem_file(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).with_context(|| format!("parsing {}", path.display()))?;
    let mut named: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => named.push((*d).to_owned()),
                GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                    Ok(v4) => named.push(std::net::Ipv4Addr::from(v4).to_string()),
                    Err(_) => {
                        if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            named.push(std::net::Ipv6Addr::from(v6).to_string());
                        }
                    }
                },
                _ => {}
            }
        }
    }
    Ok(names.iter().all(|n| named.iter().any(|m| m.eq_ignore_ascii_case(n))))
}

/// Journal records of unauthenticated refusals per address: a burst, then one a second.
const NOISE_BURST: u32 = 10;
const NOISE_PER_SECOND: f64 = 1.0;
/// Journal records of refusals per certificate holder: more, since each is attributable.
const PEER_NOISE_BURST: u32 = 60;
const PEER_NOISE_PER_SECOND: f64 = 5.0;

/// Serves until `shutdown` resolves: accepts TLS connections on `listener` (within the
/// anonymous caps), sweeps for silent nodes and signs journal checkpoints in the background;
/// on shutdown signs a last checkpoint.
pub async fn serve(
    plane: Arc<Plane>,
    tls: rustls::ServerConfig,
    listener: TcpListener,
    checkpoint_interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let router = crate::api::router(Arc::clone(&plane));
    let sweeper = tokio::spawn(sweep_loop(Arc::clone(&plane)));
    let checkpointer = tokio::spawn(checkpoint_loop(Arc::clone(&plane), checkpoint_interval));
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match plane.caps.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(cap) => {
                drop(tcp);
                crate::api::journal_noise(&plane, remote, "refused.connection", "connection_cap", &cap.to_string());
                continue;
            }
        };
        tokio::spawn(crate::connection::serve(Arc::clone(&plane), acceptor.clone(), router.clone(), tcp, remote, slot));
    }
    sweeper.abort();
    checkpointer.abort();
    for (name, ended) in plane.provider.machines.stop_all().await {
        tracing::info!(node.name = %name, ?ended, "machine powered off at shutdown");
        let p = Arc::clone(&plane);
        let data = serde_json::json!({"node": name, "ended": ended, "why": "the plane is shutting down"});
        let journaled = tokio::task::spawn_blocking(move || {
            let id = p.store.node(&name).map(|n| n.id).unwrap_or(name);
            p.store.journal_provider("plane:provider", "provider.stop", &id, &data)
        })
        .await;
        if !matches!(journaled, Ok(Ok(()))) {
            tracing::error!("journaling a machine powered off at shutdown");
        }
    }
    let p = Arc::clone(&plane);
    match tokio::task::spawn_blocking(move || p.store.checkpoint(&p.journal, crate::store::now())).await {
        Ok(Ok(Some(c))) => tracing::info!(seq = c.seq, "journal checkpoint at shutdown"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "journal checkpoint at shutdown"),
        Err(e) => tracing::error!(error = %e, "journal checkpoint at shutdown"),
    }
    Ok(())
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

async fn checkpoint_loop(plane: Arc<Plane>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await; // the first tick is immediate; the journal was just opened
    loop {
        tick.tick().await;
        let p = Arc::clone(&plane);
        if let Ok(Err(e)) =
            tokio::task::spawn_blocking(move || p.store.checkpoint(&p.journal, crate::store::now())).await
        {
            tracing::warn!(error = %e, "journal checkpoint");
        }
    }
}

/// Raises the soft limit on open descriptors to the hard limit: every node holds a connection.
pub fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum
        && let Err(e) = setrlimit(Resource::Nofile, rustix::process::Rlimit { current: limit.maximum, ..limit })
    {
        tracing::warn!(error = %e, "raising the open-file limit");
    }
}
