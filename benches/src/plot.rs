//! Line and scatter charts, each written as SVG and PNG.
//!
//! SVG needs no font (text stays text). PNG text needs a TrueType font: the
//! first one found among common system paths is registered; without one
//! only the SVG is written (and the caller is told).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Fonts tried for PNG text, in order.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

const SIZE: (u32, u32) = (1000, 620);

/// Tableau 10: distinct on screen and in print.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const FONT: &str = "sans-serif";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Line,
    Dashed,
    Points,
    LinePoints,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

impl Series {
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>, style: Style) -> Self {
        Self {
            label: label.into(),
            points,
            style,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Legend in the upper right corner instead of the upper left.
    pub legend_right: bool,
}

/// Registers a system font once; false when none was found.
fn png_font() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Writes `stem.svg` and `stem.png` in `dir`; returns the paths.
pub fn write(chart: &Chart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    write_labelled(chart, Vec::new(), dir, stem)
}

/// As [`write`], with a text label next to each given point.
pub fn write_labelled(
    chart: &Chart,
    labels: Vec<(f64, f64, String)>,
    dir: &Path,
    stem: &str,
) -> Result<Vec<PathBuf>> {
    // Text layout needs the font for both backends.
    if !png_font() {
        return Err(anyhow!(
            "no TrueType font found (tried {}); plots skipped, the CSV files hold the data",
            FONT_PATHS.join(", ")
        ));
    }
    let svg = dir.join(format!("{stem}.svg"));
    draw(
        SVGBackend::new(&svg, SIZE).into_drawing_area(),
        chart,
        &labels,
    )?;
    let png = dir.join(format!("{stem}.png"));
    draw(
        BitMapBackend::new(&png, SIZE).into_drawing_area(),
        chart,
        &labels,
    )?;
    Ok(vec![svg, png])
}

fn range(values: impl Iterator<Item = f64> + Clone, from_zero: bool) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let lo = if from_zero { lo.min(0.0) } else { lo };
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    c: &Chart,
    labels: &[(f64, f64, String)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {:?}: {e:?}", c.title);
    root.fill(&WHITE).map_err(err)?;
    let pts = c.series.iter().flat_map(|s| s.points.iter());
    let (x0, mut x1) = range(pts.clone().map(|p| p.0), true);
    if !labels.is_empty() {
        // Room for the label of the rightmost point.
        x1 += (x1 - x0) * 0.1;
    }
    let (y0, y1) = range(pts.map(|p| p.1), true);
    let mut chart = ChartBuilder::on(&root)
        .caption(&c.title, (FONT, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style((FONT, 14))
        .draw()
        .map_err(err)?;
    for (i, s) in c.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let stroke = color.stroke_width(2);
        let pts = s.points.clone();
        match s.style {
            Style::Line | Style::LinePoints => {
                chart
                    .draw_series(LineSeries::new(pts.clone(), stroke))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke));
                if s.style == Style::LinePoints {
                    chart
                        .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                        .map_err(err)?;
                }
            }
            Style::Dashed => {
                chart
                    .draw_series(DashedLineSeries::new(pts, 8, 5, stroke))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], stroke));
            }
            Style::Points => {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            }
        }
    }
    chart
        .draw_series(labels.iter().map(|(x, y, text)| {
            EmptyElement::at((*x, *y)) + Text::new(text.clone(), (6, -14), (FONT, 12))
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(if c.legend_right {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::UpperLeft
        })
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_svg_and_png() {
        let dir = std::env::temp_dir().join(format!("ksmvm-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chart = Chart {
            title: "test".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![
                Series::new(
                    "a",
                    vec![(0.0, 1.0), (1.0, 2.0), (2.0, 1.5)],
                    Style::LinePoints,
                ),
                Series::new("b", vec![(0.0, 0.5), (2.0, 3.0)], Style::Dashed),
                Series::new("c", vec![(1.0, 1.0)], Style::Points),
                Series::new("empty", vec![], Style::Line),
            ],
            legend_right: false,
        };
        match write(&chart, &dir, "t") {
            Ok(files) => {
                assert_eq!(files.len(), 2);
                let svg = std::fs::read_to_string(&files[0]).unwrap();
                assert!(svg.contains("<svg") && svg.contains("test"), "{svg}");
                assert!(std::fs::metadata(&files[1]).unwrap().len() > 1000);
            }
            Err(e) => eprintln!("SKIPPED: {e}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
