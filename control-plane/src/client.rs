//! The operator's client: mTLS to the plane with the operator certificate from the state
//! directory (or given paths), trusting only the plane CA.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use ironroot_contract::wire::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::exit::CommandError;
use crate::server::StateDir;

#[derive(Debug)]
pub struct OperatorClient {
    http: reqwest::Client,
    base: String,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub state: Option<PathBuf>,
    pub plane: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn read(p: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

impl OperatorClient {
    pub fn connect(cfg: &ClientConfig) -> anyhow::Result<Self> {
        let state = cfg.state.clone().map(StateDir);
        let pick =
            |given: &Option<PathBuf>, from_state: fn(&StateDir) -> PathBuf, what: &str| -> anyhow::Result<PathBuf> {
                given
                    .clone()
                    .or_else(|| state.as_ref().map(from_state))
                    .with_context(|| format!("no {what}: give --state DIR or --{what}"))
            };
        let cert = pick(&cfg.cert, StateDir::operator_cert, "cert")?;
        let key = pick(&cfg.key, StateDir::operator_key, "key")?;
        let ca = pick(&cfg.ca, StateDir::ca, "ca")?;
        let address = match (&cfg.plane, &state) {
            (Some(a), _) => a.clone(),
            (None, Some(s)) => std::fs::read_to_string(s.address())
                .with_context(|| format!("reading {} (is the plane running?)", s.address().display()))?
                .trim()
                .to_owned(),
            (None, None) => bail!("no plane address: give --state DIR or --plane HOST:PORT"),
        };
        let mut identity = read(&cert)?;
        identity.extend_from_slice(&read(&key)?);
        let http = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&read(&ca)?).context("plane CA")?)
            .identity(reqwest::Identity::from_pem(&identity).context("operator certificate and key")?)
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("building the client")?;
        Ok(Self { http, base: format!("https://{address}") })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let bytes = self.send_raw(req).await?;
        serde_json::from_slice(&bytes).context("the plane's answer is not the expected JSON")
    }

    /// The answer's bytes as the plane sent them (a refusal is an error, as for [`Self::get`]).
    async fn send_raw(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Vec<u8>> {
        let unreachable = |source: reqwest::Error| CommandError::Unreachable { base: self.base.clone(), source };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => (e.error, e.message),
                Err(_) => ("unknown".to_owned(), String::from_utf8_lossy(&bytes).chars().take(200).collect()),
            };
            let status = status.as_u16();
            return Err(if status >= 500 {
                CommandError::PlaneFailed { status, message }
            } else {
                CommandError::Refused { status, code, message }
            }
            .into());
        }
        Ok(bytes.to_vec())
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn get_raw(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        self.send_raw(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.delete(format!("{}{path}", self.base))).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> anyhow::Result<T> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }
}
