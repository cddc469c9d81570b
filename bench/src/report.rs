//! The benchmark report: markdown for people, JSON for tools.

use std::path::Path;

use serde::Serialize;

use super::chart::Chart;
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
    /// Pictures of the figures: what each plots, and the data it is drawn from.
    pub charts: Vec<Chart>,
    /// How long the scenario took, set by the runner.
    pub seconds: f64,
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
    /// Why the charts were not drawn, when they were not (the figures stand without them).
    pub plots: Option<String>,
}

impl Report {
    /// Writes `report.md`, `report.json` and the charts' PNGs into `dir`.
    pub fn write(&mut self, dir: &Path) -> Result<(), BenchError> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let charts: Vec<&Chart> = self.scenarios.iter().flat_map(|s| &s.charts).collect();
        self.plots = match super::plot::draw_all(&charts, dir) {
            Ok(()) => None,
            Err(why) => Some(why.to_string()),
        };
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
            "# tessera benchmark\n\n- date: {}\n- mode: {}\n- machine: {}\n\n| scenario | target | met | seconds |\n|---|---|---|---|\n",
            self.date, self.mode, self.machine
        );
        for s in &self.scenarios {
            md += &format!(
                "| {} | {} | {} | {:.0} |\n",
                s.name,
                s.target,
                if s.met { "yes" } else { "**no**" },
                s.seconds
            );
        }
        if let Some(why) = &self.plots {
            md += &format!("\nCharts not drawn: {why}\n");
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
            if self.plots.is_none() {
                for chart in &s.charts {
                    md += &format!("\n![{}]({})\n", chart.title(), chart.file());
                }
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
