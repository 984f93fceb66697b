//! PNG plots of a report, so a reader can look instead of read.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{mean, KafkaStep, Report, Session, Step};
use crate::results::number;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn all(report: &Report, dir: &Path) -> Result<()> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    throughput(report, &dir.join("throughput.png"))?;
    latency(report, &dir.join("latency.png"))?;
    resources(report, &dir.join("resources.png"))?;
    Ok(())
}

/// Plotters draws text with a font it is given (no fontconfig): DejaVu Sans, from
/// Debian's fonts-dejavu-core, which scripts/setup installs.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("{FONT}: {e}; install it with apt-get install fonts-dejavu-core")
            })?;
            plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn color(system: &str) -> RGBColor {
    match system {
        "polling" => RGBColor(31, 119, 180),
        "cdc" => RGBColor(44, 160, 44),
        "debezium" => RGBColor(214, 39, 40),
        "debezium-tuned" => RGBColor(255, 127, 14),
        _ => LIMIT_COLOR,
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A limit of the machine drawn across a panel: its label and value.
type LimitLine = (String, f64);

/// One bar per system, on a log scale when the values span more than a factor of 20,
/// with the machine's `limits` as dashed lines across.
fn bars(
    area: &Area,
    title: &str,
    unit: &str,
    values: &[(&str, f64)],
    limits: &[LimitLine],
) -> Result<()> {
    let limits: Vec<&LimitLine> = limits
        .iter()
        .filter(|(_, v)| v.is_finite() && *v > 0.0)
        .collect();
    let finite: Vec<f64> = values
        .iter()
        .map(|(_, v)| *v)
        .chain(limits.iter().map(|(_, v)| *v))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let max = finite.iter().cloned().fold(0.0, f64::max).max(1e-9);
    let min = finite
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .min(max);
    let n = values.len() as f64;
    let names: Vec<String> = values.iter().map(|(s, _)| s.to_string()).collect();
    let label = move |x: &f64| category(&names, *x);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70);
    let draw_bar = |i: usize, v: f64, base: f64| {
        Rectangle::new(
            [(i as f64 - 0.35, base), (i as f64 + 0.35, v)],
            color(values[i].0).filled(),
        )
    };
    // The value above its bar, at height `at`.
    let text = |i: usize, v: f64, at: f64| {
        Text::new(
            number(v),
            (i as f64 - 0.3, at),
            ("sans-serif", 15).into_font(),
        )
    };
    if max / min > 20.0 {
        let low = min / 2.0;
        let mut chart = builder.build_cartesian_2d(-0.5..n - 0.5, (low..max * 3.0).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(values.len() * 2 + 1)
            .x_label_formatter(&label)
            .y_labels(12)
            .y_label_formatter(&|v| number(*v))
            .y_desc(format!("{unit} (log scale)"))
            .draw()?;
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| v.is_finite())
                .map(|(i, (_, v))| draw_bar(i, *v, low)),
        )?;
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| v.is_finite())
                .map(|(i, (_, v))| text(i, *v, *v * 1.3)),
        )?;
        for (label, v) in &limits {
            draw_limit(&mut chart, n, label, *v, *v * 1.08)?;
        }
    } else {
        let mut chart = builder.build_cartesian_2d(-0.5..n - 0.5, 0.0..max * 1.15)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(values.len() * 2 + 1)
            .x_label_formatter(&label)
            .y_label_formatter(&|v| number(*v))
            .y_desc(unit)
            .draw()?;
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| v.is_finite())
                .map(|(i, (_, v))| draw_bar(i, *v, 0.0)),
        )?;
        chart.draw_series(
            values
                .iter()
                .enumerate()
                .filter(|(_, (_, v))| v.is_finite())
                .map(|(i, (_, v))| text(i, *v, *v + max * 0.05)),
        )?;
        for (label, v) in &limits {
            draw_limit(&mut chart, n, label, *v, *v + max * 0.06)?;
        }
    }
    Ok(())
}

const LIMIT_COLOR: RGBColor = RGBColor(110, 110, 110);

/// A dashed line across a bar chart at `value`, labelled at height `label_at`.
fn draw_limit<'a, Y>(
    chart: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    n: f64,
    label: &str,
    value: f64,
    label_at: f64,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart.draw_series(DashedLineSeries::new(
        vec![(-0.5, value), (n - 0.5, value)],
        8,
        5,
        LIMIT_COLOR.stroke_width(2),
    ))?;
    chart.draw_series(std::iter::once(Text::new(
        format!("{label}: {}", number(value)),
        (-0.45, label_at),
        ("sans-serif", 14).into_font().color(&LIMIT_COLOR),
    )))?;
    Ok(())
}

/// The label of an integer position on a categorical axis; nothing in between.
fn category(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
        names[i as usize].clone()
    } else {
        String::new()
    }
}

/// One line per system over the steps, log-scaled y.
fn step_lines(
    area: &Area,
    report: &Report,
    title: &str,
    unit: &str,
    figure: impl Fn(&Step) -> f64,
    floor: Option<fn(&KafkaStep) -> f64>,
) -> Result<()> {
    let steps = &report.plan.steps;
    let mut lines: Vec<(&str, Vec<(f64, f64)>)> = report
        .by_system()
        .into_iter()
        .map(|(name, sessions)| {
            let points = steps
                .iter()
                .enumerate()
                .filter_map(|(i, rate)| {
                    let values: Vec<f64> = sessions
                        .iter()
                        .filter_map(|s| s.step(*rate))
                        .map(&figure)
                        .filter(|v| v.is_finite() && *v > 0.0)
                        .collect();
                    (!values.is_empty())
                        .then(|| (i as f64, values.iter().sum::<f64>() / values.len() as f64))
                })
                .collect();
            (name, points)
        })
        .collect();
    if let Some(floor) = floor {
        for (name, transactions) in [
            ("Kafka alone", true),
            ("Kafka alone, no transactions", false),
        ] {
            let points: Vec<(f64, f64)> = steps
                .iter()
                .enumerate()
                .map(|(i, rate)| {
                    let v = report.limit(|l| l.kafka(transactions)?.step(*rate).map(floor));
                    (i as f64, v)
                })
                .filter(|(_, v)| v.is_finite() && *v > 0.0)
                .collect();
            if !points.is_empty() {
                lines.push((name, points));
            }
        }
    }
    let all: Vec<f64> = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .collect();
    let max = all.iter().cloned().fold(1e-3, f64::max);
    let min = all.iter().cloned().fold(f64::INFINITY, f64::min).min(max);
    let names: Vec<String> = steps.iter().map(|s| format!("{s}/s")).collect();
    let label = move |x: &f64| category(&names, *x);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(
            -0.3..steps.len() as f64 - 0.7,
            (min / 2.0..max * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_labels(steps.len() * 4)
        .x_label_formatter(&label)
        .x_desc("target rate (events/s)")
        .y_labels(12)
        .y_label_formatter(&|v| number(*v))
        .y_desc(format!("{unit} (log scale)"))
        .draw()?;
    for (name, points) in lines {
        let c = color(name);
        if name.starts_with("Kafka alone") {
            // The limits, dashed: what a system's line is read against.
            let width = if name == "Kafka alone" { 3 } else { 1 };
            chart
                .draw_series(DashedLineSeries::new(
                    points.clone(),
                    8,
                    5,
                    c.stroke_width(width),
                ))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
                });
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    Ok(())
}

fn per_system(report: &Report, figure: impl Fn(&Session) -> Option<f64>) -> Vec<(&str, f64)> {
    report
        .by_system()
        .into_iter()
        .map(|(name, sessions)| (name, mean(&sessions, &figure)))
        .collect()
}

fn throughput(report: &Report, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let top_shape = report
        .plan
        .steps
        .last()
        .map(|rate| rate.div_ceil(report.plan.max_tx_per_sec).max(1) as usize)
        .unwrap_or(1);
    bars(
        &panels[0],
        "Highest rate kept up with (open loop)",
        "events/s",
        &per_system(report, |s| Some(s.max_sustained.events_per_sec)),
        &[(
            format!("writers alone, {top_shape}/tx"),
            report.limit(|l| l.writers_at(top_shape)),
        )],
    )?;
    bars(
        &panels[1],
        "Backlog drain",
        "events/s",
        &per_system(report, |s| Some(s.backlog.events_per_sec)),
        &[
            (
                "Kafka alone".into(),
                report.limit(|l| l.kafka(true).map(|k| k.drain_events_per_sec)),
            ),
            (
                "stream alone".into(),
                report.limit(|l| Some(l.stream.events_per_sec)),
            ),
        ],
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn latency(report: &Report, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    step_lines(
        &panels[0],
        report,
        "Latency p50, commit → consume",
        "ms",
        |s| s.p50_ms,
        Some(|s| s.p50_ms),
    )?;
    step_lines(
        &panels[1],
        report,
        "Latency p99",
        "ms",
        |s| s.p99_ms,
        Some(|s| s.p99_ms),
    )?;
    step_lines(
        &panels[2],
        report,
        "Latency p99.9",
        "ms",
        |s| s.p999_ms,
        Some(|s| s.p999_ms),
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn resources(report: &Report, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1500, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    bars(
        &panels[0],
        "Peak resident memory",
        "MiB",
        &per_system(report, |s| Some(s.peak_rss_mib)),
        &[],
    )?;
    step_lines(
        &panels[1],
        report,
        "CPU per million events",
        "CPU-seconds",
        |s| s.cpu_seconds_per_million,
        None,
    )?;
    bars(
        &panels[2],
        "CPU while idle",
        "% of a core",
        &per_system(report, |s| Some(s.idle.cpu_percent)),
        &[],
    )?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
