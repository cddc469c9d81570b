//! The benchmark harness in quick mode, so it cannot rot: every scenario runs on small numbers
//! and writes a complete report with its charts. Figures are not judged here (machines are shared and noisy);
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
    assert!(markdown.contains("| scenario | target | met | seconds |\n|---|---|---|---|\n"));
    assert!(markdown.contains("| streams_at_scale |"));

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
                    "revocation_propagation.png"
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

fn cfssl_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("cfssl").is_file()))
}
