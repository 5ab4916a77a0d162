//! ironroot-plane: the reference control plane. The plane side of the wire API in
//! `ironroot_contract::wire` — CA and bootstrap tokens, enrollment, node lifecycle, heartbeats,
//! desired state, a task queue, the audit journal — the release channels and role catalogs
//! (templates) it publishes verified modules through, rollouts and receipts, machines on demand
//! (the QEMU provider), and the operator CLI.

pub mod admission;
pub mod api;
pub mod audit;
pub mod ca;
pub mod catalog;
pub mod catalog_api;
pub mod checkpoint;
pub mod cli;
pub mod client;
pub mod connection;
pub mod db;
pub mod enroll;
pub mod exit;
pub mod lifecycle;
pub mod operator_api;
pub mod provider;
pub mod publish;
pub mod receipts;
pub mod render;
pub mod rollout;
pub mod server;
pub mod store;
pub mod work;
