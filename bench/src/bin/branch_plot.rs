//! `bench/branch_plot`: draws `bench/results/branch.svg` and `branch.png`
//! (the PNG's text in DejaVu Sans, Debian's `fonts-dejavu-core`) from the JSON that
//! bench/branch wrote (one or more runs, e.g. `branch` and `branch-4k`): the
//! live-branch pause p50 and p99 and the guest-visible stall (heartbeat gap)
//! p50 against guest RAM size, one colour per RAM backing (spawned children
//! on 4 KiB or huge pages included), log scales. A backing and size found
//! in several of the runs named is drawn from the first one named.
//!
//!     cargo run --release -p forkd-bench --bin branch_plot -- [NAME ...]   # default: branch branch-4k branch-children branch-children-8g

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// One line of the plot.
struct Series {
    label: String,
    color: RGBColor,
    /// Dash and gap lengths in pixels; a solid line when `None`.
    dash: Option<(u32, u32)>,
    points: Vec<(f64, f64)>,
}

fn main() -> Result<()> {
    let mut names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        names = [
            "branch",
            "branch-4k",
            "branch-children",
            "branch-children-8g",
        ]
        .map(String::from)
        .to_vec();
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let mut rows: Vec<Value> = Vec::new();
    for n in &names {
        let path = dir.join(format!("{n}.json"));
        let v: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        if let Some(r) = v["results"].as_array() {
            for r in r.iter().filter(|r| {
                r["mode"]
                    .as_str()
                    .is_some_and(|m| m.eq_ignore_ascii_case("live"))
            }) {
                // A backing and size measured in several of the runs named
                // is drawn from the first one named (the newest first).
                let seen = rows.iter().any(|o| {
                    o["backing"] == r["backing"]
                        && o["mem_mib"] == r["mem_mib"]
                        && o["qemu"] == r["qemu"]
                });
                if !seen {
                    rows.push(r.clone());
                }
            }
        }
    }
    let mut backings: Vec<String> = rows
        .iter()
        .filter_map(|r| r["backing"].as_str().map(str::to_string))
        .collect();
    backings.sort();
    backings.dedup();
    let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
    let mut series = Vec::new();
    for (i, b) in backings.iter().enumerate() {
        let color = palette[i % palette.len()];
        let mut of = |what: &str, field: &str, key: &str, dash: Option<(u32, u32)>| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r["backing"] == b.as_str())
                .filter_map(|r| {
                    Some((
                        r["mem_mib"].as_f64()? / 1024.0,
                        r[field][key].as_f64()?.max(0.1),
                    ))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            series.push(Series {
                label: format!("{b}: {what}"),
                color,
                dash,
                points,
            });
        };
        of("pause p50 (solid)", "pause", "median_ms", None);
        of("pause p99 (dashed)", "pause", "p99_ms", Some((8, 5)));
        of(
            "guest stall p50 (dotted)",
            "heartbeat_gap",
            "median_ms",
            Some((2, 4)),
        );
    }
    // Text is measured and drawn with fonts registered here (no system font
    // lookup in plotters without its `ttf` feature).
    let font = std::fs::read(FONT)
        .with_context(|| format!("reading {FONT} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| anyhow::anyhow!("{FONT} is not a font plotters can read"))?;
    let svg = dir.join("branch.svg");
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &series)?;
    eprintln!("wrote {}", svg.display());
    let png = dir.join("branch.png");
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &series)?;
    eprintln!("wrote {}", png.display());
    Ok(())
}

/// The picture's size in pixels.
const SIZE: (u32, u32) = (900, 560);
/// The font of the PNG's text.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Draws the chart of `series` on `root` (any plotters backend).
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    series: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "live BRANCH: pause and guest stall vs guest RAM",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.4f64..10.0).log_scale(), (1.0f64..5000.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("guest RAM, GiB")
        .y_desc("ms")
        .draw()?;
    for s in series {
        let style = ShapeStyle::from(&s.color).stroke_width(2);
        let drawn = match s.dash {
            Some((dash, gap)) => {
                chart.draw_series(DashedLineSeries::new(s.points.clone(), dash, gap, style))?
            }
            None => chart.draw_series(LineSeries::new(s.points.clone(), style))?,
        };
        let c = s.color;
        drawn
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        chart.draw_series(
            s.points
                .iter()
                .map(|p| Circle::new(*p, 3, ShapeStyle::from(&s.color).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
