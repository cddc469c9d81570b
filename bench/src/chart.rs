//! What a report pictures: latency distributions and charts, as data (drawn by `plot`, written
//! into the JSON by `report`).

use std::time::Duration;

use serde::Serialize;

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
