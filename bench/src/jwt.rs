//! Scenario `jwt_fetch`: a cached FetchJWTSVID against a cached FetchX509SVID on the same
//! agent and connection, ValidateJWTSVID, and FetchJWTSVID for an audience never asked before
//! (a token minted and signed on the request path of a standalone agent).

use std::path::Path;
use std::time::Instant;

use super::chart::{Chart, Distribution};
use super::scenarios::{agent_config_with, first_message, start_agent, uid_selector};
use super::{BenchError, Plan, ScenarioResult};
use tessera::cli::client::{WorkloadClient, connect};
use tessera::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest};

/// The cached JWT fetch may take at most this many times the cached X.509 fetch.
const TARGET_RATIO: f64 = 2.0;
/// The p50 target of validating one token (new to the validator), microseconds.
const VALIDATE_TARGET_US: f64 = 100.0;

fn failed(what: &'static str) -> impl Fn(tonic::Status) -> BenchError {
    move |s| BenchError::Failed(format!("{what}: {:?} {}", s.code(), s.message()))
}

async fn fetch_jwt(client: &mut WorkloadClient, audience: &str) -> Result<String, BenchError> {
    let mut response = client
        .fetch_jwtsvid(JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: String::new(),
        })
        .await
        .map_err(failed("FetchJWTSVID"))?
        .into_inner();
    if response.svids.is_empty() {
        return Err(BenchError::Failed("FetchJWTSVID returned no token".into()));
    }
    Ok(response.svids.swap_remove(0).svid)
}

pub async fn jwt_fetch(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let entry = [(
        "/tokens".to_owned(),
        vec![uid_selector()],
        "1h".to_owned(),
        String::new(),
    )];
    let (config, socket) = agent_config_with(dir, &entry)?;
    // Tokens live long enough that none is re-minted while the cached series runs.
    let text = std::fs::read_to_string(&config).map_err(super::io_err("reading the config"))?;
    std::fs::write(&config, format!("{text}\n[jwt]\nttl = \"1h\"\n"))
        .map_err(super::io_err("writing the config"))?;
    let _agent = start_agent(&config, &socket)?;
    let mut client = connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|f| BenchError::Failed(format!("connecting: {}", f.message)))?;
    for _ in 0..20 {
        first_message(&mut client).await?;
        fetch_jwt(&mut client, "api.bench.test").await?;
    }

    // Alternating blocks on one connection, so that drift falls on both alike.
    let (mut x509, mut jwt) = (Vec::new(), Vec::new());
    let (blocks, per_block) = (40, (plan.round_trips * 2 / 40).max(1));
    for block in 0..blocks {
        for jwt_turn in if block % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            for _ in 0..per_block {
                let start = Instant::now();
                if jwt_turn {
                    fetch_jwt(&mut client, "api.bench.test").await?;
                    jwt.push(start.elapsed());
                } else {
                    first_message(&mut client).await?;
                    x509.push(start.elapsed());
                }
            }
        }
    }

    let token = fetch_jwt(&mut client, "api.bench.test").await?;
    let mut validations = Vec::with_capacity(plan.round_trips);
    for _ in 0..plan.round_trips {
        let start = Instant::now();
        client
            .validate_jwtsvid(ValidateJwtsvidRequest {
                audience: "api.bench.test".into(),
                svid: token.clone(),
            })
            .await
            .map_err(failed("ValidateJWTSVID"))?;
        validations.push(start.elapsed());
    }

    let mut new_audience = Vec::with_capacity(plan.round_trips / 5);
    for n in 0..(plan.round_trips / 5).max(1) {
        let audience = format!("api-{n}.bench.test");
        let start = Instant::now();
        fetch_jwt(&mut client, &audience).await?;
        new_audience.push(start.elapsed());
    }

    let verifications = verify_in_process(plan.round_trips)?;

    let x509 = Distribution::of("FetchX509SVID, cached", &mut x509);
    let jwt = Distribution::of("FetchJWTSVID, cached", &mut jwt);
    let validate = Distribution::of("ValidateJWTSVID", &mut validations);
    let new_audience = Distribution::of("FetchJWTSVID, new audience", &mut new_audience);
    let verify = Distribution::of("jwt::validate in process, new token", &mut {
        verifications
    });
    let ratio = jwt.at(0.5) / x509.at(0.5);
    Ok(ScenarioResult {
        name: "jwt_fetch".into(),
        description: format!(
            "A standalone agent with one entry for this uid and [jwt] ttl = 1h, on one connection: FetchX509SVID to first message for an SVID already minted and FetchJWTSVID for an audience already asked (the cached token), {} calls each in 40 alternating blocks; ValidateJWTSVID of one token, {} calls; FetchJWTSVID for {} audiences never asked before (a token minted and signed by the agent on the request path).",
            jwt.samples, validate.samples, new_audience.samples
        ),
        target: format!(
            "cached FetchJWTSVID p50 within {TARGET_RATIO}x the cached FetchX509SVID; validating a JWT-SVID p50 under {VALIDATE_TARGET_US} µs (in process)"
        ),
        met: ratio <= TARGET_RATIO && verify.at(0.5) < VALIDATE_TARGET_US,
        figures: vec![
            ("FetchX509SVID cached p50 (µs)".into(), x509.at(0.5)),
            ("FetchX509SVID cached p99 (µs)".into(), x509.at(0.99)),
            ("FetchJWTSVID cached p50 (µs)".into(), jwt.at(0.5)),
            ("FetchJWTSVID cached p99 (µs)".into(), jwt.at(0.99)),
            ("ratio JWT/X.509 p50".into(), ratio),
            ("ValidateJWTSVID p50 (µs)".into(), validate.at(0.5)),
            ("ValidateJWTSVID p99 (µs)".into(), validate.at(0.99)),
            ("validation in process, new token p50 (µs)".into(), verify.at(0.5)),
            ("validation in process, new token p99 (µs)".into(), verify.at(0.99)),
            ("FetchJWTSVID new audience p50 (µs)".into(), new_audience.at(0.5)),
            ("FetchJWTSVID new audience p99 (µs)".into(), new_audience.at(0.99)),
        ],
        note: "Standalone agent: the agent signs, so a new audience costs an ES256 signature on the request path rather than a round trip to a server. The validation target is judged on the validation itself (tessera::jwt::validate in this process: parse, ES256 verification, claims, each token new); the ValidateJWTSVID call adds the gRPC round trip and the caller's attestation, as every Workload API call does, and the agent verifies a token it has seen before from memory (the signature once per token).".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "jwt_fetch.png".into(),
            title: "JWT-SVIDs against a cached X.509 fetch (standalone agent)".into(),
            series: vec![x509, jwt, validate, new_audience],
        }],
    })
}

/// Times `tessera::jwt::validate` of `runs` tokens, each new (signed in advance, outside the
/// timing), against a bundle of one key.
fn verify_in_process(runs: usize) -> Result<Vec<std::time::Duration>, BenchError> {
    use tessera::jwt::{JwkSet, JwtKey, mint, validate};
    let fail = |e: tessera::jwt::JwtError| BenchError::Failed(format!("a JWT: {e}"));
    let key = JwtKey::generate().map_err(fail)?;
    let bundle = JwkSet {
        keys: vec![key.public_jwk().clone()],
        spiffe_sequence: Some(1),
        spiffe_refresh_hint: None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let tokens = (0..runs)
        .map(|n| {
            let claims = serde_json::json!({
                "sub": "spiffe://bench.local/tokens",
                "aud": ["api.bench.test"],
                "exp": now + 3600,
                "iat": now,
                "jti": format!("{n:032x}"),
                "tessera": {"owner": "bench", "purpose": "benchmark", "entry_id": "tokens"},
            });
            match claims {
                serde_json::Value::Object(map) => mint(&key, &map).map_err(fail),
                _ => Err(BenchError::Failed("claims are not an object".into())),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut samples = Vec::with_capacity(runs);
    for token in &tokens {
        let start = Instant::now();
        validate(token, "api.bench.test", now, |_| Some(&bundle)).map_err(fail)?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}
