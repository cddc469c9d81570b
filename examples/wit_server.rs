//! An HTTP server that accepts a request only with a WIT-SVID and a Workload Proof Token (IETF
//! WIMSE WPT draft) signed by the key the WIT names: a stolen WIT alone gets nowhere.
//!
//! The WIT is checked against the WIT bundle streamed from the Workload API (FetchWITBundles);
//! the proof against the WIT's `cnf.jwk`, this request's URI, a short lifetime, the WIT's hash
//! and a replay cache of proof ids.
//!
//! ```sh
//! cargo run --example wit_server -- --socket unix:///path/agent.sock --listen 127.0.0.1:0 \
//!     [--origin https://api.example.com]
//! ```
//!
//! `--origin` is what clients address proofs to (default `http://` and the bound address):
//! behind a proxy, or listening on 0.0.0.0, give the name clients use.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, RwLock};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tessera::jwt::JwkSet;
use tessera::jwt::wit::{validate_wit, validate_wpt};
use tessera::proto::workload::WitBundlesRequest;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

/// What every request is checked against.
struct Checker {
    /// This server's origin (`http://ADDR`): a proof must be made out to it, whatever `Host`
    /// the request claims, so that a proof sent here cannot be replayed to another server.
    origin: String,
    /// The trust domain (`spiffe://...`) whose WITs are accepted.
    trust_domain: String,
    /// The trust domain's WIT bundle, the latest the agent sent.
    bundle: RwLock<JwkSet>,
    /// Proof ids seen, with their expiry: a proof is good for one request.
    seen: Mutex<HashMap<String, i64>>,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, listen, origin) = match args.as_slice() {
        [s, socket, l, listen] if s == "--socket" && l == "--listen" => (socket, listen, None),
        [s, socket, l, listen, o, origin]
            if s == "--socket" && l == "--listen" && o == "--origin" =>
        {
            (
                socket,
                listen,
                Some(origin.trim_end_matches('/').to_owned()),
            )
        }
        _ => {
            eprintln!(
                "usage: wit_server --socket unix:///path/agent.sock --listen ADDR [--origin URL]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(socket, listen, origin).await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run(socket: &str, listen: &str, origin: Option<String>) -> Result<(), String> {
    let mut client = tessera::cli::client::connect(socket)
        .await
        .map_err(|f| f.message)?;
    let mut bundles = client
        .fetch_wit_bundles(WitBundlesRequest {})
        .await
        .map_err(|s| format!("FetchWITBundles: {}", s.message()))?
        .into_inner();
    let (trust_domain, first) = next_bundle(&mut bundles, None).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let checker = Arc::new(Checker {
        origin: origin.unwrap_or_else(|| format!("http://{local}")),
        trust_domain: trust_domain.clone(),
        bundle: RwLock::new(first),
        seen: Mutex::new(HashMap::new()),
    });
    let follower = checker.clone();
    tokio::spawn(async move {
        while let Ok((_, bundle)) = next_bundle(&mut bundles, Some(&trust_domain)).await {
            *follower.bundle.write().unwrap_or_else(|e| e.into_inner()) = bundle;
        }
        eprintln!("the WIT bundle stream ended; keeping the last bundle");
    });
    println!("listening on {local}");
    loop {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let checker = checker.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let checker = checker.clone();
                async move { Ok::<_, Infallible>(answer(&checker, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The trust domain (`want`, or the first one) and its WIT bundle in the next message of the
/// stream.
async fn next_bundle(
    stream: &mut tonic::Streaming<tessera::proto::workload::WitBundlesResponse>,
    want: Option<&str>,
) -> Result<(String, JwkSet), String> {
    let message = stream
        .next()
        .await
        .ok_or("the WIT bundle stream ended")?
        .map_err(|s| format!("FetchWITBundles: {}", s.message()))?;
    let (trust_domain, json) = match want {
        Some(want) => message.bundles.get_key_value(want),
        None => message.bundles.iter().next(),
    }
    .ok_or("no WIT bundle for the trust domain")?;
    let bundle =
        serde_json::from_str(json).map_err(|e| format!("the WIT bundle is not a JWK Set: {e}"))?;
    Ok((trust_domain.clone(), bundle))
}

fn answer(checker: &Checker, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match check(checker, request) {
        Ok(who) => reply(StatusCode::OK, format!("hello {who}\n")),
        Err(why) => {
            eprintln!("refused: {why}");
            reply(StatusCode::UNAUTHORIZED, format!("{why}\n"))
        }
    }
}

/// The SPIFFE ID of the caller, if its WIT and proof hold for this request.
fn check(checker: &Checker, request: &Request<Incoming>) -> Result<String, String> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(format!("the {name} header is required"))
    };
    let wit = header("workload-identity-token")?;
    let proof = header("workload-proof-token")?;
    let audience = format!("{}{}", checker.origin, request.uri().path());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let valid = {
        let bundle = checker.bundle.read().unwrap_or_else(|e| e.into_inner());
        validate_wit(wit, now, |td| {
            (td.id_string() == checker.trust_domain).then_some(&*bundle)
        })
        .map_err(|e| format!("WIT: {e}"))?
    };
    let (jti, expires_at) =
        validate_wpt(proof, wit, &valid, &audience, now).map_err(|e| format!("proof: {e}"))?;
    let mut seen = checker.seen.lock().unwrap_or_else(|e| e.into_inner());
    seen.retain(|_, exp| *exp > now);
    if seen.insert(jti.clone(), expires_at).is_some() {
        return Err(format!("proof {jti} was already used"));
    }
    Ok(valid.spiffe_id.to_string())
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
