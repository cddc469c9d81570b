//! The benchmark harness in quick mode, so it cannot rot: every scenario runs on small numbers
//! and writes a complete report. Figures are not judged here (machines are shared and noisy);
//! the committed reports under bench/reports come from full runs.

use std::process::Command;

#[test]
fn quick_benchmark_writes_a_complete_report() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["bench", "run", "--quick", "--out"])
        .arg(out.path())
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
            "revocation_propagation",
            "event_ingest"
        ]
    );
    for scenario in report["scenarios"].as_array().unwrap() {
        for figure in scenario["figures"].as_array().unwrap() {
            let (name, value) = (figure[0].as_str().unwrap(), figure[1].as_f64().unwrap());
            if name.contains("late") || name.contains("missed") {
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
    assert!(markdown.contains("| streams_at_scale |"));
}
