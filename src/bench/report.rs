//! The benchmark report: markdown for people, JSON for tools.

use std::path::Path;

use serde::Serialize;

use super::{BenchError, io_err};

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Short name, e.g. `fetch_latency`.
    pub name: String,
    /// What was measured, in one sentence.
    pub description: String,
    /// The target from the design, as text.
    pub target: String,
    /// Whether the target was met.
    pub met: bool,
    /// Named figures (units in the name).
    pub figures: Vec<(String, f64)>,
    /// Why a target was missed, or what to keep in mind.
    pub note: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (RFC 3339).
    pub date: String,
    /// `quick` or `full`.
    pub mode: String,
    /// Machine facts: cores, kernel, build profile.
    pub machine: String,
    /// The scenarios.
    pub scenarios: Vec<ScenarioResult>,
}

impl Report {
    /// Writes `report.md` and `report.json` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), BenchError> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let json =
            serde_json::to_string_pretty(self).map_err(|e| BenchError::Failed(e.to_string()))?;
        std::fs::write(dir.join("report.json"), json).map_err(io_err("writing report.json"))?;
        std::fs::write(dir.join("report.md"), self.markdown())
            .map_err(io_err("writing report.md"))?;
        Ok(())
    }

    /// The report as markdown.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# tessera agent benchmark\n\n- date: {}\n- mode: {}\n- machine: {}\n\n| scenario | target | met |\n|---|---|---|\n",
            self.date, self.mode, self.machine
        );
        for s in &self.scenarios {
            md += &format!(
                "| {} | {} | {} |\n",
                s.name,
                s.target,
                if s.met { "yes" } else { "**no**" }
            );
        }
        for s in &self.scenarios {
            md += &format!(
                "\n## {}\n\n{}\n\n| figure | value |\n|---|---|\n",
                s.name, s.description
            );
            for (name, value) in &s.figures {
                md += &format!("| {name} | {} |\n", format_value(*value));
            }
            if !s.note.is_empty() {
                md += &format!("\n{}\n", s.note);
            }
        }
        md
    }
}

fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
