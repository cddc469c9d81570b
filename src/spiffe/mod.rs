//! SPIFFE identifiers and the encodings the Workload API expects.

mod id;

pub use id::{IdError, SpiffeId, TrustDomain};
