//! image-rewriter: a Kubernetes mutating admission webhook that moves
//! container images to a private registry.
//!
//! The policy (`image`, `policy`, `pod`, `patch`, `admission`, `deadline`) is pure and tested
//! without a server; `server`, `connection`, `coalesce`, `readahead`, `tls`, `volume`, `reload`, `unwind` and `metrics` are the shell
//! the cluster runs.
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod connection;
pub mod counted;
pub mod deadline;
pub mod image;
pub mod kubectl_yaml;
pub mod manifest_yaml;
pub mod metrics;
pub mod offline;
pub mod patch;
pub mod pod;
pub mod policy;
pub mod pullsecrets;
pub mod readahead;
pub mod reload;
pub mod server;
pub mod tls;
pub mod unwind;
pub mod volume;
