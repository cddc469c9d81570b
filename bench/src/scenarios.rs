//! The scenarios. Each returns a [`ScenarioResult`] with its baseline measured in the same run.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tessera_harness::Process;
use tokio::sync::Barrier;

use super::cfssl::{self, Cfssl};
use super::chart::{Chart, Distribution};
use super::{BenchError, Plan, Report, Scenario, ScenarioResult, io_err, start_own, start_tessera};
use tessera::ca::{LeafRequest, LocalCaSource, SigningCa, load_or_create_local_ca, mint_x509_svid};
use tessera::cli::client::{WorkloadClient, channel, connect};
use tessera::proto::workload::X509svidRequest;
use tessera::spiffe::{SpiffeId, TrustDomain};

/// The trust domain of the standalone agents.
pub const TRUST_DOMAIN: &str = "bench.local";
/// The streams target, 200 MB (10^6 bytes), in the MiB that /proc's KiB convert to.
const RSS_LIMIT_MIB: f64 = 200e6 / (1024.0 * 1024.0);
/// Streams per connection in the scale scenario (below the agent's per-connection limit).
pub const STREAMS_PER_CONNECTION: usize = 100;

fn failed(what: &str) -> impl FnOnce(tessera::cli::Failure) -> BenchError + '_ {
    move |f| BenchError::Failed(format!("{what}: {}", f.message))
}

fn status_failed(what: &str) -> impl FnOnce(tonic::Status) -> BenchError + '_ {
    move |s| BenchError::Failed(format!("{what}: {:?} {}", s.code(), s.message()))
}

/// The selector of this process's effective uid.
pub fn uid_selector() -> String {
    format!("unix:uid:{}", nix::unistd::geteuid())
}

/// Writes an agent configuration serving `entries` (triples of path, selectors, TTL).
fn agent_config(
    dir: &Path,
    entries: &[(String, Vec<String>, String)],
) -> Result<(PathBuf, PathBuf), BenchError> {
    let entries: Vec<_> = entries
        .iter()
        .map(|(path, selectors, ttl)| (path.clone(), selectors.clone(), ttl.clone(), String::new()))
        .collect();
    agent_config_with(dir, &entries)
}

/// Writes an agent configuration serving `entries` (path, selectors, TTL, and further lines of
/// the entry's TOML table).
pub fn agent_config_with(
    dir: &Path,
    entries: &[(String, Vec<String>, String, String)],
) -> Result<(PathBuf, PathBuf), BenchError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let socket = dir.join("agent.sock");
    let mut text = format!(
        "trust_domain = \"{TRUST_DOMAIN}\"\nsocket_path = \"{}\"\nstate_dir = \"{}\"\n",
        socket.display(),
        dir.join("state").display()
    );
    for (path, selectors, ttl, extra) in entries {
        let selectors: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
        text += &format!(
            "\n[[entry]]\nspiffe_id = \"spiffe://{TRUST_DOMAIN}{path}\"\nselectors = [{}]\nx509_ttl = \"{ttl}\"\nowner = \"bench\"\npurpose = \"benchmark\"\n{extra}",
            selectors.join(", ")
        );
    }
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).map_err(io_err("writing the agent configuration"))?;
    Ok((config, socket))
}

/// Starts a standalone agent and waits for its socket.
pub fn start_agent(config: &Path, socket: &Path) -> Result<Process, BenchError> {
    let config = config.display().to_string();
    start_tessera(&["agent", "run", "--config", &config], socket)
}

/// The first message of a FetchX509SVID stream.
pub async fn first_message(
    client: &mut WorkloadClient,
) -> Result<tessera::proto::workload::X509svidResponse, BenchError> {
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status_failed("FetchX509SVID"))?
        .into_inner();
    stream
        .message()
        .await
        .map_err(status_failed("FetchX509SVID stream"))?
        .ok_or_else(|| BenchError::Failed("stream ended without a message".into()))
}

/// Runs `selected` (in the order of [`Scenario::ALL`]) with the sizes of `plan`, using
/// `work_dir` for sockets and state.
pub async fn run_all(
    plan: Plan,
    mode: &str,
    work_dir: &Path,
    selected: &[Scenario],
) -> Result<Report, BenchError> {
    let mut scenarios = Vec::new();
    for scenario in Scenario::ALL.into_iter().filter(|s| selected.contains(s)) {
        let dir = work_dir.join(scenario.name());
        let started = Instant::now();
        let mut result = match scenario {
            Scenario::FetchLatency => fetch_latency(plan, &dir).await,
            Scenario::FirstFetch => first_fetch(plan, &dir).await,
            Scenario::MintThroughput => mint_throughput(plan).await,
            Scenario::StreamsAtScale => streams_at_scale(plan, &dir).await,
            Scenario::StreamsManyIdentities => {
                super::identities::streams_many_identities(plan, &dir).await
            }
            Scenario::SdsStreams => super::sds::sds_streams(plan, &dir).await,
            Scenario::RevocationPropagation => {
                super::revocation::revocation_propagation(plan, &dir).await
            }
            Scenario::RevocationToRelyingParty => {
                super::relying_party::revocation_to_relying_party(plan, &dir).await
            }
            Scenario::EventIngest => super::ingest::event_ingest(plan, &dir).await,
            Scenario::CrlSize => super::crl_size::crl_size(plan).await,
            Scenario::TaskStart => super::tasks::task_start(plan, &dir).await,
            Scenario::TaskCascade => super::tasks::task_cascade(plan, &dir).await,
            Scenario::TaskEnds => super::task_ends::task_ends(plan, &dir).await,
            Scenario::PolicyCost => super::policy::policy_cost(plan, &dir).await,
            Scenario::JwtFetch => super::jwt::jwt_fetch(plan, &dir).await,
            Scenario::JwtServer => super::jwt::jwt_server(plan, &dir).await,
            Scenario::Fleet => super::fleet::fleet(plan, &dir).await,
        }
        .map_err(|e| BenchError::Failed(format!("{}: {e}", scenario.name())))?;
        result.seconds = started.elapsed().as_secs_f64();
        scenarios.push(result);
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Ok(Report {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        mode: mode.to_owned(),
        machine: format!(
            "{} cores, Linux {}, {} build",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel.trim(),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
        ),
        scenarios,
        plots: None,
    })
}

/// 1. FetchX509SVID for an identity already minted, against a bare tonic unary call.
async fn fetch_latency(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let (config, socket) = agent_config(
        dir,
        &[("/latency".into(), vec![uid_selector()], "1h".into())],
    )?;
    let _agent = start_agent(&config, &socket)?;
    let floor_socket = dir.join("floor.sock");
    let floor_arg = floor_socket.display().to_string();
    let _floor = start_own(&["floor", "--socket", &floor_arg], &floor_socket)?;

    let mut client = connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(failed("connecting to the agent"))?;
    let floor_channel = channel(&floor_socket)
        .await
        .map_err(failed("connecting to the floor server"))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(floor_channel);
    let check = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };

    for _ in 0..20 {
        first_message(&mut client).await?;
        health
            .check(check())
            .await
            .map_err(status_failed("health check"))?;
    }
    let (mut agent, mut floor) = (Vec::new(), Vec::new());
    let blocks = 10;
    for _ in 0..blocks {
        for _ in 0..plan.round_trips / blocks {
            let start = Instant::now();
            first_message(&mut client).await?;
            agent.push(start.elapsed());
        }
        for _ in 0..plan.round_trips / blocks {
            let start = Instant::now();
            health
                .check(check())
                .await
                .map_err(status_failed("health check"))?;
            floor.push(start.elapsed());
        }
    }
    let agent = Distribution::of("agent FetchX509SVID", &mut agent);
    let floor = Distribution::of("floor: tonic health Check", &mut floor);
    let (agent_p50, agent_p99) = (agent.at(0.5), agent.at(0.99));
    let (floor_p50, floor_p99) = (floor.at(0.5), floor.at(0.99));
    let ratio = agent_p50 / floor_p50;
    Ok(ScenarioResult {
        name: "fetch_latency".into(),
        description: format!(
            "FetchX509SVID to first message for a caller whose SVID is already minted, {} calls on one connection, against a bare tonic unary call (gRPC health Check) on another Unix socket served by a separate process.",
            agent.samples
        ),
        target: "p50 within 2x the transport floor".into(),
        met: ratio <= 2.0,
        figures: vec![
            ("agent p50 (µs)".into(), agent_p50),
            ("agent p99 (µs)".into(), agent_p99),
            ("floor p50 (µs)".into(), floor_p50),
            ("floor p99 (µs)".into(), floor_p99),
            ("p50 ratio agent/floor".into(), ratio),
        ],
        note: "Each agent call attests the caller afresh (pidfd check, /proc reads) before answering from the cache.".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "fetch_latency.png".into(),
            title: "FetchX509SVID (SVID minted) against the transport floor".into(),
            series: vec![agent, floor],
        }],
    })
}

/// Links (or copies) the running binary to `target`.
fn place_binary(exe: &Path, target: &Path, hard_link: bool) -> Result<(), BenchError> {
    if !(hard_link && std::fs::hard_link(exe, target).is_ok()) {
        std::fs::copy(exe, target).map_err(io_err(format!(
            "copying the binary to {}",
            target.display()
        )))?;
    }
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod"))
}

/// 2. A new process's first fetch (attestation + mint), executable hash cached and not.
async fn first_fetch(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let exe = std::env::current_exe().map_err(io_err("locating the binary"))?;
    let digest = {
        let bytes = std::fs::read(&exe).map_err(io_err("reading the binary"))?;
        hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &bytes,
        ))
    };
    // Hard links share an inode (hash cached after the first); copies do not.
    let links_dir = exe.with_file_name(format!("bench-links-{}", std::process::id()));
    std::fs::create_dir_all(&links_dir).map_err(io_err("creating the links directory"))?;
    let _cleanup = RemoveOnDrop(links_dir.clone());
    let n = plan.new_processes + 1;
    let mut entries = Vec::new();
    let mut programs = Vec::new();
    for (kind, hard_link) in [("cached", true), ("uncached", false)] {
        for i in 0..n {
            let path = links_dir.join(format!("{kind}-{i}"));
            place_binary(&exe, &path, hard_link)?;
            entries.push((
                format!("/{kind}/{i}"),
                vec![
                    uid_selector(),
                    format!("unix:path:{}", path.display()),
                    format!("unix:sha256:{digest}"),
                ],
                "1h".to_string(),
            ));
            programs.push((kind, path));
        }
    }
    let (config, socket) = agent_config(dir, &entries)?;
    let agent = start_agent(&config, &socket)?;
    let socket_arg = socket.display().to_string();
    let (mut cached, mut uncached) = (Vec::new(), Vec::new());
    for (i, (kind, program)) in programs.iter().enumerate() {
        let out = tessera_harness::output_within(
            tessera_harness::command(program).args(["probe", "--socket", &socket_arg]),
            Duration::from_secs(30),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let micros: f64 = text.trim().parse().map_err(|_| {
            BenchError::Failed(format!(
                "probe failed: {}{}",
                text,
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
        // The first cached probe pays for hashing: it warms the cache.
        if i == 0 {
            continue;
        }
        let sample = Duration::from_secs_f64(micros / 1e6);
        if *kind == "cached" {
            cached.push(sample)
        } else {
            uncached.push(sample)
        }
    }
    let cached = Distribution::of("exe hash cached", &mut cached);
    let uncached = Distribution::of("exe hash uncached", &mut uncached);
    let (cached_p50, cached_p99) = (cached.at(0.5), cached.at(0.99));
    let (uncached_p50, uncached_p99) = (uncached.at(0.5), uncached.at(0.99));
    let size = std::fs::metadata(&exe).map(|m| m.len()).unwrap_or(0);
    drop(agent);
    Ok(ScenarioResult {
        name: "first_fetch".into(),
        description: format!(
            "A new process (a fresh pid, its own entry selecting uid + path + sha256) connects and times FetchX509SVID to first message: attestation, entry matching and minting its SVID. {} processes per series; the executable is {} bytes.",
            cached.samples,
            size
        ),
        target: "p50 under 1 ms with the exe hash cached".into(),
        met: cached_p50 < 1000.0,
        figures: vec![
            ("hash cached p50 (µs)".into(), cached_p50),
            ("hash cached p99 (µs)".into(), cached_p99),
            ("hash uncached p50 (µs)".into(), uncached_p50),
            ("hash uncached p99 (µs)".into(), uncached_p99),
        ],
        note: "Connection setup is excluded (the probe connects, then starts the clock). The uncached series hashes the whole executable through /proc/<pid>/exe.".into(),
        seconds: 0.0,
        charts: vec![Chart::Cdf {
            file: "first_fetch.png".into(),
            title: "First FetchX509SVID by a new process: attestation and mint".into(),
            series: vec![cached, uncached],
        }],
    })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Scenario 3: the agent's minting path against a raw rcgen + aws-lc-rs keygen-and-sign loop
/// (one thread) and against cfssl's `newcert` endpoint on loopback (one core), in alternating
/// blocks.
async fn mint_throughput(plan: Plan) -> Result<ScenarioResult, BenchError> {
    let state = tempfile::tempdir().map_err(io_err("creating a temporary directory"))?;
    let trust_domain =
        TrustDomain::new(TRUST_DOMAIN).map_err(|e| BenchError::Failed(e.to_string()))?;
    let ca = Arc::new(
        load_or_create_local_ca(
            &LocalCaSource::Generated {
                state_dir: state.path().into(),
                ttl: Duration::from_secs(86400),
            },
            &trust_domain,
        )
        .map_err(|e| BenchError::Failed(e.to_string()))?,
    );
    let cfssl_program = cfssl::find();
    let cfssl = match &cfssl_program {
        Some(program) => Some(
            Cfssl::start(
                program,
                &state.path().join("ca_cert.pem"),
                &state.path().join("ca_key.pem"),
            )
            .await?,
        ),
        None => None,
    };

    let blocks = 5;
    let per_block = (plan.mints / blocks).max(1);
    let in_process = |count: usize| {
        let ca = ca.clone();
        async move {
            tokio::task::spawn_blocking(move || signing_block(&ca, count))
                .await
                .map_err(|e| BenchError::Failed(e.to_string()))?
        }
    };
    in_process(20).await?;
    if let Some(cfssl) = &cfssl {
        cfssl.block(20).await?;
    }
    let (mut agent_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    let mut cfssl_total = cfssl::Block::default();
    for _ in 0..blocks {
        let (agent, raw) = in_process(per_block).await?;
        agent_time += agent;
        raw_time += raw;
        if let Some(cfssl) = &cfssl {
            cfssl_total += cfssl.block(per_block).await?;
        }
    }
    let total = (per_block * blocks) as f64;
    let agent_rate = total / agent_time.as_secs_f64();
    let raw_rate = total / raw_time.as_secs_f64();
    let ratio = agent_rate / raw_rate;
    let mut figures = vec![
        ("agent mints/s".into(), agent_rate),
        ("raw rcgen+aws-lc-rs mints/s".into(), raw_rate),
        ("ratio agent/raw".into(), ratio),
        ("agent µs per mint".into(), 1e6 / agent_rate),
    ];
    let mut met = ratio >= 0.7;
    let note = match cfssl_program {
        Some(program) => {
            let certificates = cfssl_total.certificates as f64;
            // /proc counts CPU time in clock ticks; a block shorter than one still cost some.
            let cpu = cfssl_total.server_cpu.max(Duration::from_millis(10));
            let per_core = certificates / cpu.as_secs_f64();
            figures.extend([
                (
                    "cfssl certs/s (one core, HTTP on loopback)".into(),
                    certificates / cfssl_total.wall.as_secs_f64(),
                ),
                ("cfssl certs per CPU-second".into(), per_core),
                ("ratio agent/cfssl per core".into(), agent_rate / per_core),
            ]);
            met &= agent_rate > per_core;
            format!(
                "cfssl: {} `serve` (GOMAXPROCS=1, pinned to one CPU) asked for {}; each answer is checked to hold an X.509 certificate. The compared rate is certificates per CPU-second of the cfssl process (its /proc times), so the harness's HTTP client does not count against it. cfssl's work per certificate includes HTTP, JSON, a CSR and PEM encoding, which an agent minting in process does not do; that is the price a workload would pay for a CA service instead of a node-local mint.",
                cfssl_version(&program),
                super::cfssl::NEW_CERT_REQUEST_SUMMARY
            )
        }
        None => {
            met = false;
            "cfssl is not on PATH (Debian: apt-get install golang-cfssl): the comparison with cfssl was not measured, so the target is not met.".into()
        }
    };
    Ok(ScenarioResult {
        name: "mint_throughput".into(),
        description: format!(
            "X.509-SVIDs per second on one thread: the agent's minting path (key, serial, every X509-SVID extension, chain) against a raw loop generating a P-256 key and signing a certificate with only a URI SAN, and against cfssl generating a key and certificate over HTTP on loopback; {} each, alternating in blocks.",
            per_block * blocks
        ),
        target: "at least 70% of the raw signing rate, and faster than cfssl per core".into(),
        met,
        figures,
        note,
        seconds: 0.0,
        charts: Vec::new(),
    })
}

/// Times `count` mints through the agent's path, then `count` raw keygen-and-sign rounds.
fn signing_block(ca: &SigningCa, count: usize) -> Result<(Duration, Duration), BenchError> {
    let id = SpiffeId::parse_workload("spiffe://bench.local/mint")
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    let request = LeafRequest {
        spiffe_id: &id,
        ttl: Duration::from_secs(300),
        dns_names: &[],
        not_after_cap: None,
        task: None,
    };
    let raw_err = |e: rcgen::Error| BenchError::Failed(e.to_string());
    let start = Instant::now();
    for _ in 0..count {
        mint_x509_svid(ca, &request, SystemTime::now())
            .map_err(|e| BenchError::Failed(e.to_string()))?;
    }
    let agent = start.elapsed();
    let start = Instant::now();
    for _ in 0..count {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(raw_err)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://bench.local/mint".try_into().map_err(raw_err)?,
        )];
        params.signed_by(&key, &ca.issuer).map_err(raw_err)?;
    }
    Ok((agent, start.elapsed()))
}

/// `cfssl version`'s first line, e.g. `Version: 1.2.0`, as `cfssl 1.2.0`.
fn cfssl_version(program: &Path) -> String {
    std::process::Command::new(program)
        .arg("version")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let version = text
                .lines()
                .next()?
                .strip_prefix("Version:")?
                .trim()
                .to_owned();
            Some(format!("cfssl {version}"))
        })
        .unwrap_or_else(|| "cfssl".into())
}

/// 4. Many concurrent FetchX509SVID streams with a short TTL: RSS, CPU, late rotations.
async fn streams_at_scale(plan: Plan, dir: &Path) -> Result<ScenarioResult, BenchError> {
    let ttl = plan.stream_ttl.as_secs();
    let run = StreamsRun {
        name: "streams_at_scale",
        description: format!(
            "Concurrent FetchX509SVID streams on one agent ({STREAMS_PER_CONNECTION} per connection), SVID TTL {ttl}s: every stream must receive the next SVID before the one it holds expires. RSS and CPU are the agent process's own (/proc)."
        ),
        chart_file: "streams_rss.png",
        chart_title: format!("Agent RSS against concurrent FetchX509SVID streams (TTL {ttl}s)"),
        x_label: "concurrent streams",
    };
    streams_through_rotation(plan, dir, run, |_, channel, opened, wait| async move {
        let mut client = tessera::cli::client::workload_client(channel);
        watch_one_rotation(&mut client, &opened, wait).await
    })
    .await
}

/// Spawns one stream's watch, which waits at `opened` once its stream is open; a watch that
/// fails before it gets there takes its place at the barrier all the same.
pub fn spawn_watch<T: Send + 'static>(
    opened: Arc<Barrier>,
    watch: impl std::future::Future<Output = Result<T, BenchError>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<T, BenchError>> {
    tokio::spawn(async move {
        let outcome = watch.await;
        if outcome.is_err() {
            // Never leave the barrier short of a party.
            opened.wait().await;
        }
        outcome
    })
}

/// What the streams of one level saw of their rotation.
#[derive(Debug, Default)]
pub struct RotationTally {
    /// Streams whose next SVID came at or after the expiry of the one they held.
    pub late: usize,
    /// Streams that got no next SVID in time.
    pub missed: usize,
    /// Streams that failed to open or broke.
    pub errors: usize,
    /// Why the first of those failed.
    pub first_error: Option<String>,
}

impl RotationTally {
    /// Counts one stream: `Some(true)` on time, `Some(false)` late, `None` missed, or why it
    /// failed.
    pub fn count(&mut self, seen: Result<Option<bool>, String>) {
        match seen {
            Ok(Some(true)) => {}
            Ok(Some(false)) => self.late += 1,
            Ok(None) => self.missed += 1,
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// Whether every stream got its next SVID in time.
    pub fn all_on_time(&self) -> bool {
        self.late + self.missed + self.errors == 0
    }

    /// The note a level with failed streams gets, named `level`.
    pub fn failure_note(&self, level: &str) -> Option<String> {
        self.first_error.as_ref().map(|error| {
            format!(
                "{level}: {} streams failed to open or broke (first: {error})",
                self.errors
            )
        })
    }

    /// The level's late and missed rotations, as report figures.
    pub fn figures(&self, level: &str) -> [(String, f64); 2] {
        [
            (format!("{level}: late rotations"), self.late as f64),
            (format!("{level}: missed rotations"), self.missed as f64),
        ]
    }
}

/// What a stream saw of the rotation: `Some(true)` its next SVID before the one it held
/// expired, `Some(false)` late, `None` none within TTL + 10 s.
pub type RotationSeen = Result<Option<bool>, BenchError>;

/// How a streams-through-a-rotation scenario names and pictures itself.
pub struct StreamsRun {
    /// The scenario's name.
    pub name: &'static str,
    /// What it measures, for the report.
    pub description: String,
    /// The RSS chart's file.
    pub chart_file: &'static str,
    /// The RSS chart's title.
    pub chart_title: String,
    /// What the chart's x axis counts.
    pub x_label: &'static str,
}

/// For each of the plan's stream counts: an agent with one entry for this process (TTL the
/// plan's), that many streams opened by `open_one` (the stream's index, a connection shared by
/// [`STREAMS_PER_CONNECTION`] streams, a barrier to wait at once open, and how long to wait for
/// the rotation), then the agent's RSS and CPU and what every stream saw.
pub async fn streams_through_rotation<F, Fut>(
    plan: Plan,
    dir: &Path,
    run: StreamsRun,
    open_one: F,
) -> Result<ScenarioResult, BenchError>
where
    F: Fn(usize, tonic::transport::Channel, Arc<Barrier>, Duration) -> Fut,
    Fut: std::future::Future<Output = RotationSeen> + Send + 'static,
{
    let ttl = format!("{}s", plan.stream_ttl.as_secs());
    let mut figures = Vec::new();
    let mut met = true;
    let mut notes = Vec::new();
    let (mut rss_open_line, mut rss_peak_line) = (Vec::new(), Vec::new());
    for &level in plan.stream_levels {
        let (config, socket) = agent_config(
            &dir.join(level.to_string()),
            &[("/streams".into(), vec![uid_selector()], ttl.clone())],
        )?;
        let agent = start_agent(&config, &socket)?;
        let (rss_idle, _) = agent.rss_kib();
        let cpu_before = agent.cpu_time();
        let mut channels = Vec::new();
        for _ in 0..level.div_ceil(STREAMS_PER_CONNECTION) {
            channels.push(channel(&socket).await.map_err(failed("connecting"))?);
        }
        let opened = Arc::new(Barrier::new(level + 1));
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(level);
        for i in 0..level {
            let stream = open_one(
                i,
                channels[i % channels.len()].clone(),
                opened.clone(),
                plan.stream_ttl + Duration::from_secs(10),
            );
            tasks.push(spawn_watch(opened.clone(), stream));
        }
        opened.wait().await;
        let open_time = started.elapsed();
        let (rss_open, _) = agent.rss_kib();
        let mut tally = RotationTally::default();
        for task in tasks {
            tally.count(match task.await {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        }
        let (rss_now, rss_peak) = agent.rss_kib();
        let cpu = agent.cpu_time().saturating_sub(cpu_before);
        drop(channels);
        drop(agent);
        let rss_peak_mib = rss_peak as f64 / 1024.0;
        let level_met = tally.all_on_time() && (level < 10_000 || rss_peak_mib < RSS_LIMIT_MIB);
        rss_open_line.push((level as f64, rss_open as f64 / 1024.0));
        rss_peak_line.push((level as f64, rss_peak_mib));
        met &= level_met;
        let label = format!("{level} streams");
        notes.extend(tally.failure_note(&label));
        figures.extend([
            (
                format!("{level} streams: time to open all (ms)"),
                open_time.as_secs_f64() * 1e3,
            ),
            (
                format!("{level} streams: agent RSS idle (MiB)"),
                rss_idle as f64 / 1024.0,
            ),
            (
                format!("{level} streams: agent RSS all open (MiB)"),
                rss_open as f64 / 1024.0,
            ),
            (
                format!("{level} streams: agent RSS after rotation (MiB)"),
                rss_now as f64 / 1024.0,
            ),
            (
                format!("{level} streams: agent RSS peak (MiB)"),
                rss_peak_mib,
            ),
            (format!("{level} streams: agent CPU (s)"), cpu.as_secs_f64()),
        ]);
        figures.extend(tally.figures(&label));
    }
    Ok(ScenarioResult {
        name: run.name.into(),
        description: run.description,
        target: "10,000 streams under 200 MB RSS, zero late or missed rotations".into(),
        met,
        figures,
        note: notes.join("; "),
        seconds: 0.0,
        charts: vec![Chart::Lines {
            file: run.chart_file.into(),
            title: run.chart_title,
            x_label: run.x_label.into(),
            y_label: "agent RSS (MiB)".into(),
            series: vec![
                ("all streams open".into(), rss_open_line),
                ("peak, through the rotation".into(), rss_peak_line),
            ],
            limit: Some(("target: 200 MB (190.7 MiB)".into(), RSS_LIMIT_MIB)),
        }],
    })
}

/// Opens one stream, waits for all others to open, then for the next message. `Some(true)` when
/// it arrived before the first SVID's not-after, `Some(false)` when late, `None` when missed.
async fn watch_one_rotation(
    client: &mut WorkloadClient,
    opened: &Barrier,
    wait: Duration,
) -> Result<Option<bool>, BenchError> {
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await
        .map_err(status_failed("FetchX509SVID"))?
        .into_inner();
    let first = stream
        .message()
        .await
        .map_err(status_failed("stream"))?
        .ok_or_else(|| BenchError::Failed("stream ended".into()))?;
    let not_after = leaf_not_after(&first)?;
    opened.wait().await;
    match tokio::time::timeout(wait, stream.message()).await {
        Ok(Ok(Some(_))) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64;
            Ok(Some(now < not_after))
        }
        _ => Ok(None),
    }
}

fn leaf_not_after(
    response: &tessera::proto::workload::X509svidResponse,
) -> Result<i64, BenchError> {
    let svid = response
        .svids
        .first()
        .ok_or_else(|| BenchError::Failed("no SVID".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.x509_svid)
        .map_err(|e| BenchError::Failed(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// One FetchX509SVID from this (new) process, timed from the call to the first message.
pub async fn probe(socket: &Path) -> Result<Duration, BenchError> {
    let mut client = connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(failed("connecting"))?;
    let start = Instant::now();
    first_message(&mut client).await?;
    Ok(start.elapsed())
}

/// A bare tonic server (gRPC health only) on `socket`: the transport floor. Runs until killed.
pub async fn floor_server(socket: &Path) -> Result<(), BenchError> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(io_err(format!("binding {}", socket.display())))?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await
        .map_err(|e| BenchError::Failed(e.to_string()))
}
