//! An HTTP client that presents its WIT-SVID with a Workload Proof Token (IETF WIMSE WPT draft)
//! signed by the key the agent handed it with the WIT, bound to the request's URI.
//!
//! ```sh
//! cargo run --example wit_client -- --socket unix:///path/agent.sock --connect 127.0.0.1:8080
//! ```
//!
//! With `--replay` it sends the same proof twice; with `--stolen` it signs the proof with a key
//! of its own, as a thief holding only the WIT would: the server must refuse both.

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tessera::jwt::JwtKey;
use tessera::jwt::wit::mint_wpt;
use tessera::proto::workload::WitsvidRequest;
use tokio::net::TcpStream;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, address, flags) = match args.as_slice() {
        [s, socket, c, address, flags @ ..] if s == "--socket" && c == "--connect" => {
            (socket, address, flags)
        }
        _ => {
            eprintln!(
                "usage: wit_client --socket unix:///path/agent.sock --connect ADDR [--replay] [--stolen]"
            );
            std::process::exit(2);
        }
    };
    let replay = flags.iter().any(|f| f == "--replay");
    let stolen = flags.iter().any(|f| f == "--stolen");
    match run(socket, address, replay, stolen).await {
        Ok(all_ok) => std::process::exit(if all_ok { 0 } else { 1 }),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

/// Sends the request(s); whether every answer was 200.
async fn run(socket: &str, address: &str, replay: bool, stolen: bool) -> Result<bool, String> {
    let mut client = tessera::cli::client::connect(socket)
        .await
        .map_err(|f| f.message)?;
    let message = client
        .fetch_witsvid(WitsvidRequest::default())
        .await
        .map_err(|s| format!("FetchWITSVID: {}", s.message()))?
        .into_inner()
        .next()
        .await
        .ok_or("the WIT stream ended")?
        .map_err(|s| format!("FetchWITSVID: {}", s.message()))?;
    let svid = message.svids.first().ok_or("no WIT-SVID")?;
    let key = if stolen {
        JwtKey::generate().map_err(|e| e.to_string())?
    } else {
        JwtKey::from_private_jwk(&svid.wit_svid_key).map_err(|e| e.to_string())?
    };
    let path = "/hello";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let proof = mint_wpt(
        &key,
        &svid.wit_svid,
        &format!("http://{address}{path}"),
        now,
        60,
        &tessera::jwt::new_jti(),
    )
    .map_err(|e| e.to_string())?;
    let mut all_ok = true;
    for _ in 0..if replay { 2 } else { 1 } {
        let (status, body) = get(address, path, &svid.wit_svid, &proof).await?;
        println!("{status} {}", body.trim_end());
        all_ok &= status == 200;
    }
    Ok(all_ok)
}

/// One GET with the WIT and the proof; the status and the body.
async fn get(address: &str, path: &str, wit: &str, proof: &str) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header("host", address)
        .header("workload-identity-token", wit)
        .header("workload-proof-token", proof)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
