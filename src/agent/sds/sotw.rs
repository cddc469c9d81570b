//! State-of-the-world SDS (`StreamSecrets`): every response holds every subscribed secret the
//! caller may have.
//!
//! A request that answers the last response's nonce is an ACK, or a NACK when it carries an
//! error; one that answers an older nonce is stale and ignored. A response is sent on the first
//! request, when the subscribed names change, and when anything subscribed changes: never the
//! same versions twice in a row, so a rejected version is not sent again.

use super::secrets::{Items, Versions, response_version, versions};
use super::{Caller, Protocol, SdsError, Session, resolve};
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

/// One `StreamSecrets` stream's protocol state.
#[derive(Default)]
pub(super) struct StateOfTheWorld {
    /// The client and the nonces.
    session: Session,
    /// The subscribed names; none: everything.
    names: Vec<String>,
    /// Every name's version in the last response.
    sent: Option<Versions>,
}

impl Protocol for StateOfTheWorld {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn on_request(
        &mut self,
        caller: &mut Caller,
        request: DiscoveryRequest,
    ) -> Result<bool, SdsError> {
        let first = self
            .session
            .begin(caller, &request.type_url, request.node)?;
        let nonce = request.response_nonce.as_str();
        if !nonce.is_empty() && !self.session.answers_last(nonce) {
            tracing::debug!(
                node = self.session.node_name(),
                nonce,
                "ignoring an SDS request that answers an older response"
            );
            return Ok(false);
        }
        if let Some(error) = &request.error_detail {
            self.session.rejected(nonce, error);
        }
        let mut names = request.resource_names;
        names.sort();
        names.dedup();
        let renamed = names != self.names;
        self.names = names;
        Ok(first || renamed)
    }

    fn on_change(&mut self, caller: &mut Caller) -> Result<Option<DiscoveryResponse>, SdsError> {
        let items = resolve(caller, &self.names)?;
        if items.is_empty() {
            tracing::debug!(
                node = self.session.node_name(),
                names = ?self.names,
                "no secret the SDS client subscribed to is available to it yet"
            );
            return Ok(None);
        }
        let now = versions(&items);
        if self.sent.as_ref() == Some(&now) {
            return Ok(None);
        }
        let response = response(caller, &items, self.session.next_nonce());
        self.sent = Some(now);
        Ok(Some(response))
    }
}

/// The response carrying `items`, with a version that names their versions.
pub(super) fn response(caller: &Caller, items: &Items, nonce: String) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: response_version(&versions(items)),
        resources: caller
            .encode(items)
            .into_iter()
            .map(|(_, _, secret)| secret)
            .collect(),
        type_url: super::SECRET_TYPE_URL.to_owned(),
        nonce,
    }
}
