//! The optional cloud metadata endpoint: an HTTP(S) URL (named by an earlier source's `metadata`
//! key) answering with an identity document. Size-capped while streaming and deadline-bound;
//! a redirect is not followed (a metadata service that redirects is misconfigured).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;

use super::doc::{self, DocError, MAX_DOC};

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("is not an http:// or https:// URL")]
    Url,
    #[error("did not answer within {0:?}")]
    Deadline(Duration),
    #[error("request failed: {0}")]
    Http(String),
    #[error("answered HTTP {0}")]
    Status(u16),
    #[error("answer")]
    Doc(#[from] DocError),
}

/// Fetches and parses the identity document at `url`.
pub async fn fetch(url: &str, deadline: Duration) -> Result<BTreeMap<String, String>, MetadataError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(MetadataError::Url);
    }
    let body =
        tokio::time::timeout(deadline, get_capped(url)).await.map_err(|_| MetadataError::Deadline(deadline))??;
    Ok(doc::parse_identity_doc(&body)?)
}

async fn get_capped(url: &str) -> Result<Vec<u8>, MetadataError> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| MetadataError::Http(e.to_string()))?;
    let resp = http.get(url).send().await.map_err(|e| MetadataError::Http(e.without_url().to_string()))?;
    if !resp.status().is_success() {
        return Err(MetadataError::Status(resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > MAX_DOC) {
        return Err(DocError::TooLarge.into());
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.map_err(|e| MetadataError::Http(e.without_url().to_string()))?);
        if body.len() as u64 > MAX_DOC {
            return Err(DocError::TooLarge.into());
        }
    }
    Ok(body)
}
