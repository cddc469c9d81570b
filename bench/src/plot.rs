//! The report's charts as PNG: drawn with plotters into a pixel buffer, encoded with `png`.
//!
//! Text needs a TrueType font, which is read once from the system's font directories (Debian:
//! `fonts-dejavu-core`); without one the charts are left out and the report says why.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::chart::{Chart, Distribution};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 560;
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";
/// Fonts tried in order, then any `.ttf` under these directories.
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];
const FONT_DIRS: &[&str] = &["/usr/share/fonts", "/usr/local/share/fonts"];
const LIGHT_GRID: RGBColor = RGBColor(236, 236, 236);
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Why charts could not be drawn.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlotError {
    /// No usable TrueType font on this machine.
    #[error(
        "no TrueType font found (looked for {FONT_FILES:?} and any .ttf under {FONT_DIRS:?}; on Debian: apt-get install fonts-dejavu-core)"
    )]
    NoFont,
    /// plotters refused to draw.
    #[error("drawing {file}: {message}")]
    Draw {
        /// The chart's file.
        file: String,
        /// What plotters said.
        message: String,
    },
    /// The PNG could not be written.
    #[error("writing {path}: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Draws every chart into `dir`, each as its own PNG.
pub fn draw_all(charts: &[&Chart], dir: &Path) -> Result<(), PlotError> {
    if charts.is_empty() {
        return Ok(());
    }
    font_registered()?;
    for chart in charts {
        let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
        render(chart, &mut pixels).map_err(|message| PlotError::Draw {
            file: chart.file().to_owned(),
            message,
        })?;
        let path = dir.join(chart.file());
        write_png(&path, &pixels).map_err(|message| PlotError::Write { path, message })?;
    }
    Ok(())
}

/// Registers the first usable font under [`FAMILY`], once per process.
fn font_registered() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let found = *REGISTERED.get_or_init(|| {
        font_candidates().into_iter().any(|path| {
            let Ok(bytes) = std::fs::read(&path) else {
                return false;
            };
            // plotters keeps fonts for the life of the process; one font, leaked once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        })
    });
    if found {
        Ok(())
    } else {
        Err(PlotError::NoFont)
    }
}

fn font_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = FONT_FILES.iter().map(PathBuf::from).collect();
    let mut dirs: Vec<PathBuf> = FONT_DIRS.iter().map(PathBuf::from).collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        found.sort();
        for path in found {
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
            {
                candidates.push(path);
            }
        }
    }
    candidates
}

fn render(chart: &Chart, pixels: &mut [u8]) -> Result<(), String> {
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    match chart {
        Chart::Cdf { title, series, .. } => cdf(&root, title, series),
        Chart::Lines {
            title,
            x_label,
            y_label,
            series,
            limit,
            ..
        } => lines(&root, title, x_label, y_label, series, limit.as_ref()),
    }
    .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

type Plot<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;
type Axis = plotters::coord::types::RangedCoordf64;

/// A titled plot area over `x` and `y`, with room for the axis labels.
fn framed<'a, 'b>(
    root: &'a Area<'b>,
    title: &str,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Plot<'a, 'b>, DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>
{
    ChartBuilder::on(root)
        .caption(title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
}

/// The series' names and colours, boxed at `position`.
fn legend<'a, 'b: 'a>(chart: &mut Plot<'a, 'b>, position: SeriesLabelPosition) -> DrawResult {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
}

/// Fraction of samples at or below each latency, latency on a logarithmic axis.
fn cdf(root: &Area<'_>, title: &str, series: &[Distribution]) -> DrawResult {
    let values = || {
        series
            .iter()
            .flat_map(|d| d.quantiles.iter().map(|&(_, v)| v))
    };
    let low = values().fold(f64::INFINITY, f64::min).max(1.0);
    let high = values().fold(0.0, f64::max).max(low * 2.0);
    // The axis is linear in log10(µs), labelled in µs: plotters' own log axis leaves a range
    // narrower than a decade without labels.
    let mut chart = framed(
        root,
        title,
        (low / 1.2).log10()..(high * 1.2).log10(),
        0.0..1.0,
    )?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("fraction of calls at or below")
        .x_label_formatter(&|exponent| two_significant_digits(10f64.powf(*exponent)))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .light_line_style(LIGHT_GRID)
        .label_style((FAMILY, 14))
        .draw()?;
    for (distribution, color) in series.iter().zip(PALETTE.iter().cycle()) {
        let label = format!(
            "{} (n={}, p50 {:.0} µs, p99 {:.0} µs)",
            distribution.name,
            distribution.samples,
            distribution.at(0.5),
            distribution.at(0.99)
        );
        let points = distribution
            .quantiles
            .iter()
            .map(|&(q, v)| (v.max(low).log10(), q));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// `v` rounded to two significant digits, as an axis label: 1585 reads 1600.
fn two_significant_digits(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return format!("{v:.0}");
    }
    let scale = 10f64.powi(v.log10().floor() as i32 - 1);
    let rounded = (v / scale).round() * scale;
    if rounded >= 10.0 {
        format!("{rounded:.0}")
    } else {
        format!("{rounded:.1}")
    }
}

/// Lines with their points marked, and the target as a red line across.
fn lines(
    root: &Area<'_>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
    limit: Option<&(String, f64)>,
) -> DrawResult {
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_high = points().map(|(x, _)| x).fold(1.0, f64::max);
    let y_high = points()
        .map(|(_, y)| y)
        .chain(limit.map(|&(_, y)| y))
        .fold(1.0, f64::max);
    let mut chart = framed(root, title, 0.0..x_high * 1.05, 0.0..y_high * 1.15)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(LIGHT_GRID)
        .label_style((FAMILY, 14))
        .draw()?;
    for ((name, line), color) in series.iter().zip(PALETTE.iter().cycle()) {
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        chart.draw_series(
            line.iter()
                .map(|&point| Circle::new(point, 4, color.filled())),
        )?;
    }
    if let Some((name, y)) = limit {
        chart
            .draw_series(LineSeries::new(
                [(0.0, *y), (x_high * 1.05, *y)],
                RED.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 24, y)], RED.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn write_png(path: &Path, pixels: &[u8]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn log_axis_labels_keep_two_significant_digits() {
        assert_eq!(two_significant_digits(1584.9), "1600");
        assert_eq!(two_significant_digits(251.2), "250");
        assert_eq!(two_significant_digits(10_000.0), "10000");
        assert_eq!(two_significant_digits(3.162), "3.2");
    }

    #[test]
    fn charts_are_written_as_png_files_of_the_set_size() {
        if let Err(why) = font_registered() {
            let in_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
            assert!(
                !in_ci,
                "CI must draw charts (scripts/test.sh installs a font): {why}"
            );
            eprintln!("\n*** chart drawing NOT TESTED: {why} ***\n");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut samples: Vec<Duration> = (1..=500).map(|i| Duration::from_micros(i * 3)).collect();
        let charts = [
            Chart::Cdf {
                file: "cdf.png".into(),
                title: "a distribution".into(),
                series: vec![Distribution::of("series", &mut samples)],
            },
            Chart::Lines {
                file: "lines.png".into(),
                title: "a line".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                series: vec![("memory".into(), vec![(1.0, 2.0), (5.0, 8.0), (10.0, 15.0)])],
                limit: Some(("limit".into(), 20.0)),
            },
        ];
        draw_all(&charts.iter().collect::<Vec<_>>(), dir.path()).unwrap();
        for name in ["cdf.png", "lines.png"] {
            let file = std::fs::File::open(dir.path().join(name)).unwrap();
            let reader = png::Decoder::new(std::io::BufReader::new(file))
                .read_info()
                .unwrap();
            assert_eq!((reader.info().width, reader.info().height), (WIDTH, HEIGHT));
        }
    }
}
