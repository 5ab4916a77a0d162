//! Exit codes of `ironroot-build`, documented in docs/interfaces/exit-codes.md. Units and
//! scripts branch on them (a bad signature is never worth a retry; a network failure may be).

use ironroot_oci::download::DownloadError;
use ironroot_oci::registry::RegistryError;
use ironroot_oci::source::SourceError;
use ironroot_oci::verify::{FailureKind, VerifyError};

use crate::kernel::fetch::ArchiveError;
use crate::module::sign::SignError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Anything not classified below (local I/O, bad input files).
    Failure = 1,
    /// Command-line misuse (clap's own code).
    Usage = 2,
    /// No trusted signature for the content: missing, untrusted key, bad or copied signature.
    Signature = 10,
    /// Content does not match what was signed (digest, pack, image or config mismatch).
    Content = 11,
    /// Refused by policy: size cap, serial floor, image index, descriptor urls, not a module.
    Policy = 12,
    /// Registry unreachable, HTTP error, authentication refused or deadline passed; retrying
    /// may help.
    Transport = 13,
    /// Stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it); nothing was left behind.
    Interrupted = 130,
}

impl From<FailureKind> for Exit {
    fn from(k: FailureKind) -> Self {
        match k {
            FailureKind::Signature => Self::Signature,
            FailureKind::Content => Self::Content,
            FailureKind::Policy => Self::Policy,
            FailureKind::Transport => Self::Transport,
            FailureKind::Local => Self::Failure,
        }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

/// The exit code for a failed command that reads or writes registries (push, sign, verify,
/// kernel fetch): the outermost cause of a type that knows its class decides; anything else
/// is a plain failure.
pub fn classify(err: &anyhow::Error) -> Exit {
    err.chain().find_map(class_of).unwrap_or(Exit::Failure)
}

fn class_of(cause: &(dyn std::error::Error + 'static)) -> Option<Exit> {
    if let Some(e) = cause.downcast_ref::<VerifyError>() {
        return Some(e.kind().into());
    }
    if let Some(e) = cause.downcast_ref::<SignError>() {
        return e.exit();
    }
    if let Some(e) = cause.downcast_ref::<DownloadError>() {
        return Some(download(e));
    }
    if let Some(e) = cause.downcast_ref::<SourceError>() {
        return Some(source(e));
    }
    if let Some(e) = cause.downcast_ref::<RegistryError>() {
        return Some(registry(e));
    }
    cause.downcast_ref::<ArchiveError>().map(ArchiveError::exit)
}

/// As `VerifyError::kind` classes a download inside a verification.
fn download(e: &DownloadError) -> Exit {
    match e {
        DownloadError::OverCap { .. } => Exit::Policy,
        DownloadError::DeclaredSize { .. }
        | DownloadError::Oversize { .. }
        | DownloadError::Digest { .. }
        | DownloadError::Pack { .. } => Exit::Content,
        DownloadError::Manifest { source, .. } | DownloadError::Source { source, .. } => self::source(source),
        DownloadError::Io { .. } => Exit::Failure,
        _ => Exit::Transport,
    }
}

fn source(e: &SourceError) -> Exit {
    match e {
        SourceError::Registry(r) => registry(r),
        SourceError::TooLarge { .. } => Exit::Policy,
        SourceError::Layout(_) | SourceError::Local { .. } => Exit::Failure,
    }
}

fn registry(e: &RegistryError) -> Exit {
    match e {
        RegistryError::Request { .. }
        | RegistryError::Status { .. }
        | RegistryError::Auth { .. }
        | RegistryError::Push { .. } => Exit::Transport,
        RegistryError::TooLarge { .. } => Exit::Policy,
        // The client could not be built (an unusable --registry-ca) or a local file not read.
        RegistryError::Client(_) | RegistryError::File { .. } => Exit::Failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outermost_classified_cause_decides() {
        let inner = RegistryError::Auth { repository: "r".into(), reason: "refused".into() };
        let err = anyhow::Error::new(SourceError::Registry(inner)).context("pushing blob");
        assert_eq!(classify(&err), Exit::Transport);
        let over = RegistryError::TooLarge { what: "manifest".into(), size: 2, cap: 1 };
        assert_eq!(classify(&anyhow::Error::new(over).context("reading")), Exit::Policy);
        assert_eq!(classify(&anyhow::anyhow!("reading key")), Exit::Failure);
        let file = RegistryError::File { path: "p".into(), source: std::io::Error::other("gone") };
        assert_eq!(classify(&anyhow::Error::new(file)), Exit::Failure);
    }
}
