//! Incremental SDS (`DeltaSecrets`): a response holds only the secrets the client lacks or
//! holds in an older version, and names those it must forget.
//!
//! The first request subscribes to names, or to everything when it names none (or `*`); later
//! ones add and remove names. The stream knows what the client holds (what it said it held when
//! it connected, then what it was sent), so a reconnecting client is sent only what changed
//! meanwhile. Subscription changes are applied whatever nonce a request answers; ACKs and
//! NACKs are told apart as in state-of-the-world, and a rejected version is not sent again.

use std::collections::BTreeSet;

use super::secrets::{Versions, response_version, versions};
use super::{Caller, Protocol, SdsError, Session};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};

/// The name by which a delta client subscribes to (or leaves) everything.
const WILDCARD: &str = "*";

/// One `DeltaSecrets` stream's protocol state.
#[derive(Default)]
pub(super) struct Incremental {
    /// The client and the nonces.
    session: Session,
    /// Subscribed to everything the caller may have.
    wildcard: bool,
    /// Names subscribed to explicitly.
    names: BTreeSet<String>,
    /// What the client holds: name to version.
    held: Versions,
}

impl Protocol for Incremental {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn on_request(
        &mut self,
        caller: &mut Caller,
        request: DeltaDiscoveryRequest,
    ) -> Result<bool, SdsError> {
        let first = self
            .session
            .begin(caller, &request.type_url, request.node)?;
        if first {
            self.wildcard = request.resource_names_subscribe.is_empty();
            self.held = request.initial_resource_versions.into_iter().collect();
        }
        for name in &request.resource_names_subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
            }
        }
        for name in &request.resource_names_unsubscribe {
            if name == WILDCARD {
                self.wildcard = false;
            } else {
                self.names.remove(name);
                self.held.remove(name);
            }
        }
        if self.session.answers_last(&request.response_nonce)
            && let Some(error) = &request.error_detail
        {
            self.session.rejected(&request.response_nonce, error);
        }
        Ok(first || !request.resource_names_subscribe.is_empty())
    }

    fn on_change(
        &mut self,
        caller: &mut Caller,
    ) -> Result<Option<DeltaDiscoveryResponse>, SdsError> {
        let items = caller.with_available(|available| {
            available.items(self.names.iter().map(String::as_str), self.wildcard)
        })?;
        let changed: Vec<_> = items
            .iter()
            .filter(|(name, item)| self.held.get(*name) != Some(&item.version))
            .collect();
        // Held names in the subscription that the caller may no longer have.
        let removed: Vec<String> = self
            .held
            .keys()
            .filter(|name| !items.contains_key(*name))
            .filter(|name| self.wildcard || self.names.contains(*name))
            .cloned()
            .collect();
        if changed.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        let resources = caller
            .encode(changed)
            .into_iter()
            .map(|(name, version, secret)| Resource {
                version,
                resource: Some(secret),
                name,
            })
            .collect();
        for name in &removed {
            self.held.remove(name);
        }
        self.held.extend(versions(&items));
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: response_version(&versions(&items)),
            resources,
            type_url: super::SECRET_TYPE_URL.to_owned(),
            nonce: self.session.next_nonce(),
            removed_resources: removed,
        }))
    }
}
