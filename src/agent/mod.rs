//! The node agent: serves the SPIFFE Workload API to local workloads.

pub mod admin;
pub mod app;
pub mod authority;
pub mod cache;
pub mod config;
pub mod endpoint;
pub mod entries;
pub mod jwt;
pub mod metrics;
pub mod output;
pub mod policy;
pub mod revocation;
pub mod sds;
pub mod tasks;
pub mod uploader;
pub mod upstream;
pub mod wit;
pub mod workload;

pub use app::{AgentError, AgentHandle, BuildOptions, build};
pub use config::AgentConfig;
