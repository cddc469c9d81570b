//! The benchmark harness in quick mode, so it cannot rot: every scenario runs on small numbers
//! and writes a complete report with its charts. Figures are not judged here (machines are shared and noisy);
//! the committed reports under bench/reports come from full runs.
//!
//! The harness measures the `tessera` binary beside its own, where a workspace build
//! (`cargo nextest run --workspace`, as scripts/test.sh runs it) leaves a fresh one.

use std::path::Path;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_tessera-bench");

#[test]
fn quick_benchmark_writes_a_complete_report() {
    let tessera = Path::new(BENCH).with_file_name("tessera");
    assert!(
        tessera.is_file(),
        "{} is missing: build the workspace (cargo build --workspace, or run the suite with \
         --workspace) so that the binary under test stands beside tessera-bench",
        tessera.display()
    );
    let built = std::fs::metadata(&tessera).unwrap().modified().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    if let Some(newer) = newer_than(&root.join("src"), built) {
        panic!(
            "{} is older than {}: build the workspace (cargo build --workspace) so that the \
             binary under test is the code under test",
            tessera.display(),
            newer.display()
        );
    }
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(BENCH)
        .args(["run", "--quick", "--out"])
        .arg(out.path())
        .env_remove("TESSERA_BIN")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mode"], "quick");
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fetch_latency",
            "first_fetch",
            "mint_throughput",
            "streams_at_scale",
            "streams_many_identities",
            "sds_streams",
            "revocation_propagation",
            "revocation_to_relying_party",
            "event_ingest",
            "crl_size",
            "task_start",
            "task_cascade",
            "task_ends",
            "policy_cost",
            "jwt_fetch",
            "jwt_server",
            "fleet",
        ]
    );
    for scenario in report["scenarios"].as_array().unwrap() {
        for figure in scenario["figures"].as_array().unwrap() {
            let (name, value) = (figure[0].as_str().unwrap(), figure[1].as_f64().unwrap());
            if name.starts_with("added p50") {
                // A difference of two medians: noise may make it zero or less.
                assert!(value.is_finite(), "{name} = {value}");
            } else if name.contains("sent everything") || name.contains("idle CPU") {
                // Nodes that could not catch up after a restart; CPU below the clock tick.
                assert!(value.is_finite() && value >= 0.0, "{name} = {value}");
            } else if name.starts_with("deadline (SVID expiry after it)") {
                assert_eq!(value, 0.0, "{name}: a task's SVID never outlives its task");
            } else if name.contains("late") || name.contains("missed") {
                assert_eq!(
                    value, 0.0,
                    "{name}: every stream gets its rotation before expiry"
                );
            } else {
                assert!(value.is_finite() && value > 0.0, "{name} = {value}");
            }
        }
    }
    let markdown = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(markdown.contains("| scenario | target | met | seconds |\n|---|---|---|---|\n"));
    assert!(markdown.contains("| streams_at_scale |"));
    assert!(markdown.contains("| sds_streams |"));

    let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    let mint = &report["scenarios"][2];
    let cfssl_measured = mint["figures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f[0] == "ratio agent/cfssl per core");
    if in_ci || cfssl_on_path() {
        assert!(cfssl_measured, "cfssl is installed: {mint}");
    } else {
        assert!(!cfssl_measured && mint["met"] == false, "{mint}");
        eprintln!("\n*** cfssl comparison NOT RUN: cfssl is not on PATH (golang-cfssl) ***\n");
    }

    match report["plots"].as_str() {
        None => {
            let charts: Vec<&str> = report["scenarios"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["charts"].as_array().unwrap())
                .map(|c| c["file"].as_str().unwrap())
                .collect();
            assert_eq!(
                charts,
                [
                    "fetch_latency.png",
                    "first_fetch.png",
                    "streams_rss.png",
                    "identities_rss.png",
                    "sds_streams_rss.png",
                    "revocation_propagation.png",
                    "revocation_to_relying_party.png",
                    "crl_size.png",
                    "task_start.png",
                    "task_cascade.png",
                    "task_ends.png",
                    "policy_cost.png",
                    "jwt_fetch.png",
                    "jwt_server.png",
                    "fleet_change.png",
                    "fleet_sync.png",
                    "fleet_attest.png",
                    "fleet_cost.png",
                ]
            );
            for file in charts {
                let bytes = std::fs::read(out.path().join(file)).unwrap();
                assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{file} is a PNG");
                assert!(
                    markdown.contains(&format!("]({file})")),
                    "report.md shows {file}"
                );
            }
        }
        Some(why) => {
            assert!(
                !in_ci,
                "CI draws the charts (scripts/test.sh installs a font): {why}"
            );
            assert!(markdown.contains(why));
            eprintln!("\n*** benchmark charts NOT DRAWN: {why} ***\n");
        }
    }
}

/// A file under `dir` modified after `time`, if any.
fn newer_than(dir: &Path, time: std::time::SystemTime) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
        let path = entry.path();
        let meta = entry.metadata().ok()?;
        if meta.is_dir() {
            newer_than(&path, time)
        } else {
            (meta.modified().ok()? > time).then_some(path)
        }
    })
}

fn cfssl_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("cfssl").is_file()))
}
