//! `hookline experiment`: the rollout question as a picture. The demo engine runs over a grid of
//! consumer lags and inline percentages (one seed for every point), and the figures are drawn as
//! an SVG chart: stale deliveries (% of all deliveries) against consumer lag, one line per inline
//! percentage, and beside it the producer's render cost per event against the inline percentage.
//!
//! Writes `<out>/rollout.svg` and `<out>/rollout.json` (every point's figures).

use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use serde::Serialize;

use crate::demo::{self, DemoOptions};
use crate::error::CliError;

/// The grid and the world every point runs.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub lags: Vec<Duration>,
    pub inline_percents: Vec<f64>,
    pub projects: usize,
    pub builds: usize,
    pub seed: u64,
    pub out: PathBuf,
}

/// One demo run of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub consumer_lag_ms: u64,
    pub inline_percent: f64,
    pub events: usize,
    pub deliveries: usize,
    pub stale: usize,
    /// Stale deliveries, % of every delivery.
    pub stale_pct: f64,
    /// The producer's render time summed over the run, per accepted event (deferred events
    /// cost none), microseconds.
    pub render_us_per_event: f64,
    pub missing: usize,
}

/// Every point of the grid, and where the chart went.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentReport {
    pub seed: u64,
    pub projects: usize,
    pub builds: usize,
    pub points: Vec<Point>,
    pub svg: PathBuf,
    pub json: PathBuf,
}

/// Runs the grid (lag-major), then writes the chart and the figures.
pub async fn run(options: &ExperimentOptions) -> Result<ExperimentReport, CliError> {
    if options.lags.is_empty() || options.inline_percents.is_empty() {
        return Err(CliError::Usage(
            "the grid needs at least one lag and one inline percentage".into(),
        ));
    }
    std::fs::create_dir_all(&options.out)
        .map_err(|e| CliError::Io(format!("creating {}: {e}", options.out.display())))?;
    let total = (options.lags.len() * options.inline_percents.len()) as u64;
    let bar = hookline_shell::progress_bar(total, "experiment");
    let mut points = Vec::new();
    for &lag in &options.lags {
        for &pct in &options.inline_percents {
            bar.set_message(format!("lag {} ms, inline {pct} %", lag.as_millis()));
            let report = demo::run(DemoOptions {
                projects: options.projects,
                builds: options.builds,
                inline_percent: pct,
                consumer_lag: lag,
                seed: options.seed,
                wait: Duration::from_secs(30),
                progress: false,
                // The chart is about staleness: receivers that always answer 200.
                receiver_failure_percent: 0.0,
                ordering: hookline_consumer::config::Ordering::default(),
            })
            .await?;
            let l = &report.ledger;
            let inline = &l.by_timing.inline;
            let render_total = inline.render_us_mean.unwrap_or(0.0) * inline.events as f64;
            let stale = l.by_timing.inline.stale + l.by_timing.deferred.stale;
            points.push(Point {
                consumer_lag_ms: lag.as_millis() as u64,
                inline_percent: pct,
                events: l.events,
                deliveries: l.deliveries,
                stale,
                stale_pct: percent(stale, l.deliveries),
                render_us_per_event: if l.events == 0 {
                    0.0
                } else {
                    render_total / l.events as f64
                },
                missing: l.missing,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let svg = options.out.join("rollout.svg");
    let json = options.out.join("rollout.json");
    draw(&svg, &points, options)?;
    let report = ExperimentReport {
        seed: options.seed,
        projects: options.projects,
        builds: options.builds,
        points,
        svg,
        json: json.clone(),
    };
    let text =
        serde_json::to_string_pretty(&report).map_err(|e| CliError::Internal(e.to_string()))?;
    std::fs::write(&json, text + "\n")
        .map_err(|e| CliError::Io(format!("writing {}: {e}", json.display())))?;
    Ok(report)
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The lags are far apart (0 ms to seconds): the x axis places them evenly, labelled with their
/// values, rather than on a linear scale that would crowd the short ones into one point.
fn lag_label(ms: u64) -> String {
    if ms >= 1_000 {
        format!("{} s", ms as f64 / 1_000.0)
    } else {
        format!("{ms} ms")
    }
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(0x44, 0x77, 0xaa),
    RGBColor(0x66, 0xcc, 0xee),
    RGBColor(0x22, 0x88, 0x33),
    RGBColor(0xcc, 0xbb, 0x44),
    RGBColor(0xee, 0x66, 0x77),
    RGBColor(0xaa, 0x33, 0x77),
];

fn draw(path: &Path, points: &[Point], options: &ExperimentOptions) -> Result<(), CliError> {
    let plot =
        |e: Box<dyn std::error::Error>| CliError::Internal(format!("drawing the chart: {e}"));
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(e.into()))?;
    let (left, right) = root.split_horizontally(640);
    let lags: Vec<u64> = options.lags.iter().map(|l| l.as_millis() as u64).collect();
    let max_stale = points.iter().map(|p| p.stale_pct).fold(0.0, f64::max);

    let mut chart = ChartBuilder::on(&left)
        .caption("Stale deliveries against consumer lag", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(
            -0.3f64..(lags.len() as f64 - 0.7),
            0f64..(max_stale * 1.1).max(1.0),
        )
        .map_err(|e| plot(e.into()))?;
    chart
        .configure_mesh()
        .x_labels(lags.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < lags.len() {
                lag_label(lags[i as usize])
            } else {
                String::new()
            }
        })
        .x_desc("consumer lag")
        .y_desc("stale deliveries, %")
        .draw()
        .map_err(|e| plot(e.into()))?;
    for (k, &pct) in options.inline_percents.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let series: Vec<(f64, f64)> = lags
            .iter()
            .enumerate()
            .filter_map(|(i, &lag)| {
                points
                    .iter()
                    .find(|p| p.consumer_lag_ms == lag && p.inline_percent == pct)
                    .map(|p| (i as f64, p.stale_pct))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))
            .map_err(|e| plot(e.into()))?
            .label(format!("inline {pct} %"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 3, colour.filled())),
            )
            .map_err(|e| plot(e.into()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot(e.into()))?;

    // The cost side: render time per accepted event, averaged over the lags (the lag does not
    // change what the producer does).
    let costs: Vec<(f64, f64)> = options
        .inline_percents
        .iter()
        .map(|&pct| {
            let at: Vec<f64> = points
                .iter()
                .filter(|p| p.inline_percent == pct)
                .map(|p| p.render_us_per_event)
                .collect();
            (pct, at.iter().sum::<f64>() / at.len().max(1) as f64)
        })
        .collect();
    let max_cost = costs.iter().map(|c| c.1).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("Producer render cost per event", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-5f64..105f64, 0f64..(max_cost * 1.15).max(1.0))
        .map_err(|e| plot(e.into()))?;
    chart
        .configure_mesh()
        .x_desc("inline, % of projects")
        .y_desc("render time per event, µs")
        .draw()
        .map_err(|e| plot(e.into()))?;
    chart
        .draw_series(LineSeries::new(costs.clone(), COLOURS[0].stroke_width(2)))
        .map_err(|e| plot(e.into()))?;
    chart
        .draw_series(
            costs
                .into_iter()
                .map(|p| Circle::new(p, 3, COLOURS[0].filled())),
        )
        .map_err(|e| plot(e.into()))?;
    root.present().map_err(|e| plot(e.into()))?;
    Ok(())
}
