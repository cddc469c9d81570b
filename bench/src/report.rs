//! The benchmark report: markdown for people, JSON for tools.

use std::path::Path;
use std::time::Duration;

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
    /// Pictures of the figures: what each plots, and the data it is drawn from.
    pub charts: Vec<Chart>,
    /// How long the scenario took, set by the runner.
    pub seconds: f64,
}

/// A latency distribution, kept as quantiles so that the JSON stays small and any plot of it
/// can be drawn again from the JSON alone.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    /// What was timed, e.g. `agent` or `floor`.
    pub name: String,
    /// Number of samples.
    pub samples: usize,
    /// (fraction of samples at or below, microseconds), fraction rising from 0 to 1.
    pub quantiles: Vec<(f64, f64)>,
}

/// Quantiles kept per distribution: every percent, and finer in the tail where p99 lives.
const TAIL_FRACTIONS: &[f64] = &[0.995, 0.999];

impl Distribution {
    /// The distribution of `samples` (sorted in place).
    pub fn of(name: &str, samples: &mut [Duration]) -> Self {
        samples.sort();
        let at = |q: f64| {
            let index = ((samples.len().saturating_sub(1)) as f64 * q).round() as usize;
            samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        let mut fractions: Vec<f64> = (0..=100).map(|p| f64::from(p) / 100.0).collect();
        fractions.extend_from_slice(TAIL_FRACTIONS);
        fractions.sort_by(f64::total_cmp);
        Self {
            name: name.to_owned(),
            samples: samples.len(),
            quantiles: fractions.into_iter().map(|q| (q, at(q))).collect(),
        }
    }

    /// The value at fraction `q` (one of those kept).
    pub fn at(&self, q: f64) -> f64 {
        self.quantiles
            .iter()
            .find(|(fraction, _)| (fraction - q).abs() < 1e-9)
            .map_or(0.0, |&(_, value)| value)
    }
}

/// One picture in a report, written as a PNG beside `report.md`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Chart {
    /// Cumulative distributions of latencies, on a logarithmic time axis.
    Cdf {
        /// File name, e.g. `fetch_latency.png`.
        file: String,
        /// Title drawn above the plot.
        title: String,
        /// One curve each.
        series: Vec<Distribution>,
    },
    /// Lines of y against x, with a horizontal limit drawn across.
    Lines {
        /// File name.
        file: String,
        /// Title drawn above the plot.
        title: String,
        /// What x is, with its unit.
        x_label: String,
        /// What y is, with its unit.
        y_label: String,
        /// (name, points) per line.
        series: Vec<(String, Vec<(f64, f64)>)>,
        /// (name, y) of a target line, if any.
        limit: Option<(String, f64)>,
    },
}

impl Chart {
    /// The PNG's file name.
    pub fn file(&self) -> &str {
        match self {
            Chart::Cdf { file, .. } | Chart::Lines { file, .. } => file,
        }
    }

    /// The title.
    pub fn title(&self) -> &str {
        match self {
            Chart::Cdf { title, .. } | Chart::Lines { title, .. } => title,
        }
    }
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
