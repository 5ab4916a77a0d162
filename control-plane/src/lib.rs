//! ironroot-plane: the reference control plane. The plane side of the wire API in
//! `ironroot_contract::wire` — CA and bootstrap tokens, enrollment, node lifecycle, heartbeats,
//! desired state, a task queue, the audit journal — plus the operator CLI.

pub mod admission;
pub mod api;
pub mod audit;
pub mod ca;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod connection;
pub mod db;
pub mod enroll;
pub mod exit;
pub mod lifecycle;
pub mod operator_api;
pub mod server;
pub mod store;
pub mod work;
