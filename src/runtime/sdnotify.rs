//! systemd's readiness protocol (sd_notify): a datagram to `$NOTIFY_SOCKET`. A no-op when the
//! process does not run under a `Type=notify` unit.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening. Failures are logged, never
/// fatal: the process works the same without a supervisor.
pub fn notify(state: &str) {
    if let Some(target) = std::env::var_os("NOTIFY_SOCKET") {
        notify_to(&target.to_string_lossy(), state);
    }
}

fn notify_to(target: &str, state: &str) {
    let result = (|| -> std::io::Result<()> {
        let addr = match target.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes())?,
            None => SocketAddr::from_pathname(target)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(socket = %target, state, error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }
}
