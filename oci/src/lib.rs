//! Moving ironroot modules between places and verifying them on the way.
//!
//! - [`reference`]: where a module is (a registry reference or an OCI layout directory);
//! - [`registry`]: a distribution registry over HTTP(S) — bounded reads of our own, pushes
//!   through `oci-client`;
//! - [`layout`]: an OCI image layout directory, for offline use;
//! - [`source`]: the small trait both implement for reading;
//! - [`download`]: size caps, deadlines and `.partial` files for every byte fetched;
//! - [`evidence`]: the store's record of what it verified, so warm boots verify offline;
//! - [`store`]: the flat, content-addressed object store packs unpack into;
//! - [`unpack`]: a pack streamed from its source straight into the store;
//! - [`verify`]: the trust chain, start to end; only it constructs a [`VerifiedModule`] (and,
//!   for a control plane that publishes modules, a [`SignedModule`]: signature and config only).
//!
//! Shared by `ironroot-build` (verify, push, sign), the agent (fetch into its store) and the
//! plane (signature and config of what it publishes).

pub mod download;
pub mod evidence;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod unpack;
pub mod verify;

pub use download::Limits;
pub use reference::Target;
pub use registry::{Credentials, RegistryAccess};
pub use verify::{SignedModule, VerifiedModule, VerifyError, VerifyOptions};
