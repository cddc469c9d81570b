//! What the operator commands (`entry`, `token`, `node`, `bundle`) share: the admin socket
//! and output options, the connection, status mapping and printing.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;

use super::Failure;
use super::client::{admin_status_failure, connect_admin};
use crate::config::parse_duration;
use crate::proto::tessera::admin_client::AdminClient;

/// Where the server listens for admin calls unless told otherwise.
pub(super) const DEFAULT_ADMIN_SOCKET: &str = crate::server::config::DEFAULT_ADMIN_SOCKET;

/// Options of every operator command; accepted before or after the verb.
#[derive(Args, Debug, Clone)]
pub(super) struct AdminArgs {
    /// The server's admin socket.
    #[arg(
        long,
        env = "TESSERA_ADMIN_SOCKET",
        value_name = "PATH",
        default_value = DEFAULT_ADMIN_SOCKET,
        global = true,
        help_heading = "Server options"
    )]
    pub(super) admin_socket: PathBuf,
}

/// A connected admin client that knows its socket, for error messages.
pub(super) struct Admin {
    /// The generated client.
    pub(super) client: AdminClient<Channel>,
    socket: PathBuf,
}

impl Admin {
    /// Connects to the admin socket named in `args`.
    pub(super) async fn connect(args: &AdminArgs) -> Result<Self, Failure> {
        Ok(Self {
            client: connect_admin(&args.admin_socket).await?,
            socket: args.admin_socket.clone(),
        })
    }

    /// Maps a failed call's status to a failure.
    pub(super) fn failure(&self, status: tonic::Status) -> Failure {
        admin_status_failure(status, &self.socket)
    }

    /// Like [`Admin::failure`], but says plainly that `kind` `id` does not exist when the
    /// server answers NotFound.
    pub(super) fn lookup_failure(&self, status: tonic::Status, kind: &str, id: &str) -> Failure {
        if status.code() == tonic::Code::NotFound {
            return Failure::failed(format!("no {kind} with id {id:?}"));
        }
        self.failure(status)
    }
}

/// Refuses an empty id argument before it reaches the server.
pub(super) fn require_id(kind: &str, id: &str) -> Result<(), Failure> {
    if id.trim().is_empty() {
        return Err(Failure::usage(format!(
            "the {kind} id is empty; give one as listed by `tessera {kind} list`"
        )));
    }
    Ok(())
}

/// A usage failure that names the flag, the value given and what is wrong with it.
pub(super) fn bad_flag(flag: &str, value: &str, reason: &str) -> Failure {
    Failure::usage(format!("{flag} {value:?}: {reason}"))
}

/// A duration flag in whole seconds, longer than zero, as the API's `int64` seconds.
pub(super) fn seconds(flag: &str, value: &str) -> Result<i64, Failure> {
    let seconds = positive_seconds(flag, value)?;
    i64::try_from(seconds).map_err(|_| bad_flag(flag, value, "is too long"))
}

/// A duration flag in whole seconds, longer than zero.
pub(super) fn positive_seconds(flag: &str, value: &str) -> Result<u64, Failure> {
    let parsed = parse_duration(value).map_err(|reason| bad_flag(flag, value, &reason))?;
    if parsed.is_zero() {
        return Err(bad_flag(flag, value, "must be longer than zero, e.g. 10m"));
    }
    if parsed.subsec_nanos() != 0 {
        return Err(bad_flag(flag, value, "must be whole seconds, e.g. 90s"));
    }
    Ok(parsed.as_secs())
}

/// Prints `value` as one line of JSON on stdout.
pub(super) fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string(value)
        .map_err(|e| Failure::failed(format!("cannot encode the answer as JSON: {e}")))?;
    print_text(&format!("{text}\n"))
}

/// Prints text on stdout as it is; a closed pipe (`| head`) is not an error worth a panic.
pub(super) fn print_text(text: &str) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::failed(format!("cannot write to stdout: {e}"))),
    }
}
