//! Who this node is: its identity as discovered from every source, with provenance
//! ([`discover`]), and its identity at the plane — the key, the certificate the plane issued
//! and checked here ([`enroll`]).

pub mod discover;
pub mod enroll;
