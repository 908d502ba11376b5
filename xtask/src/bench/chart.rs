//! The PNG chart of a bench run: one bar panel per headline figure, a bar per mode and
//! pair, with a line over each bar from the lowest to the highest run.
//!
//! Text needs a TrueType font, read at run time from the usual Debian paths. Without
//! one the chart is drawn without text, and the caller says so.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::markdown::number;
use super::rows::Row;
use super::testbed::Mode;

/// Fonts tried in order; the first that parses is used.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Font family name the chart's text uses; the font found is registered under it.
const FAMILY: &str = "sans-serif";

/// The panels: row id and title.
const PANELS: [(&str, &str); 6] = [
    ("throughput", "Bulk throughput, Gbit/s (higher is better)"),
    ("fixed_rate_added_p99", "p99 added, 1 KiB fixed rate, µs"),
    ("ping_pong_added_p99", "p99 added, 64 B ping-pong, µs"),
    ("conn_rate", "Connections per second (higher is better)"),
    ("mesh_cpu_per_gib", "Mesh CPU per GiB, core-seconds"),
    (
        "idle_kib_per_connection",
        "Proxy memory per idle connection, KiB",
    ),
];

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 950;

fn color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Plain => RGBColor(140, 140, 140),
        Mode::Sidecar => RGBColor(230, 120, 20),
        Mode::Ambient => RGBColor(30, 100, 200),
        Mode::AmbientKtls => RGBColor(40, 160, 60),
    }
}

/// Registers the first font of [`FONT_PATHS`] that exists and parses, once per
/// process. Returns its path, or `None` when there is none.
fn register_font() -> Option<&'static str> {
    static FOUND: OnceLock<Option<&'static str>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        FONT_PATHS.iter().copied().find(|path| {
            let Ok(bytes) = std::fs::read(path) else {
                return false;
            };
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
        })
    })
}

/// Draws the chart of `rows` for `modes` into `path`. Returns the font used, or `None`
/// when the chart has no text because no font was found.
pub fn draw(path: &Path, rows: &[Row], modes: &[Mode]) -> anyhow::Result<Option<&'static str>> {
    let font = register_font();
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (legend, panels) = root.split_vertically(50);
    draw_legend(&legend, modes, font.is_some())?;
    for (area, (id, title)) in panels.split_evenly((2, 3)).iter().zip(PANELS) {
        let panel_rows: Vec<&Row> = rows.iter().filter(|row| row.id == id).collect();
        draw_panel(area, title, &panel_rows, modes, font.is_some())
            .with_context(|| format!("drawing the {id} panel"))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(font)
}

fn draw_legend(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    modes: &[Mode],
    with_text: bool,
) -> anyhow::Result<()> {
    for (index, &mode) in modes.iter().enumerate() {
        let x = 20 + index as i32 * 220;
        area.draw(&Rectangle::new(
            [(x, 15), (x + 30, 35)],
            color(mode).filled(),
        ))?;
        if with_text {
            area.draw(&Text::new(
                mode.name(),
                (x + 40, 15),
                (FAMILY, 20).into_font(),
            ))?;
        }
    }
    Ok(())
}

/// A bar of one mode and pair, in chart coordinates.
struct Bar {
    from: f64,
    to: f64,
    median: f64,
    min: f64,
    max: f64,
    mode: Mode,
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    rows: &[&Row],
    modes: &[Mode],
    with_text: bool,
) -> anyhow::Result<()> {
    let slot = 0.8 / modes.len().max(1) as f64;
    let mut bars = Vec::new();
    for (group, row) in rows.iter().enumerate() {
        for (index, &mode) in modes.iter().enumerate() {
            let Some(value) = row.value(mode) else {
                continue;
            };
            let from = group as f64 - 0.4 + index as f64 * slot;
            bars.push(Bar {
                from,
                to: from + slot * 0.9,
                median: value.median,
                min: value.min,
                max: value.max,
                mode,
            });
        }
    }
    let low = bars.iter().map(|bar| bar.min.min(0.0)).fold(0.0, f64::min);
    let mut high = bars
        .iter()
        .map(|bar| bar.max.max(bar.median))
        .fold(0.0, f64::max)
        * 1.15;
    if high <= low {
        high = low + 1.0;
    }
    let groups = rows.len().max(1);
    let x_range = -0.5..groups as f64 - 0.5;

    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if with_text {
        builder
            .caption(title, (FAMILY, 18))
            .x_label_area_size(28)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(x_range.clone(), low..high)?;
    if with_text {
        let pair_names: Vec<&str> = rows.iter().map(|row| row.pair).collect();
        let x_label = |x: &f64| {
            let nearest = x.round();
            if (x - nearest).abs() < 1e-6 && nearest >= 0.0 {
                pair_names
                    .get(nearest as usize)
                    .map_or_else(String::new, |name| (*name).to_owned())
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * groups + 1)
            .x_label_formatter(&x_label)
            .y_label_formatter(&|y| number(*y))
            .label_style((FAMILY, 15))
            .draw()?;
    } else {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x_range.start, 0.0), (x_range.end, 0.0)],
            BLACK,
        )))?;
    }
    chart.draw_series(bars.iter().map(|bar| {
        Rectangle::new(
            [(bar.from, 0.0), (bar.to, bar.median)],
            color(bar.mode).filled(),
        )
    }))?;
    chart.draw_series(bars.iter().filter(|bar| bar.max > bar.min).map(|bar| {
        let middle = (bar.from + bar.to) / 2.0;
        PathElement::new(
            vec![(middle, bar.min), (middle, bar.max)],
            BLACK.stroke_width(2),
        )
    }))?;
    Ok(())
}
