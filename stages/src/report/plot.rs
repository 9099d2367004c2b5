//! SVG rendering of [`Figure`]s with `plotters`' SVG backend.
//!
//! Each model gets one colour; its test/validation (or W2/W∞) variants are solid/dashed lines of
//! that colour. Every series is in the legend. The SVG opens with `<title>` and `<desc>` (the
//! paper's caption and the series names) so browsers and screen readers show what it is.

use plotters::element::PathElement;
use plotters::prelude::*;
use plotters::series::DashedLineSeries;

use super::figures::{Figure, Kind};
use super::xml_escape;

/// One colour per model (Tableau 10).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Pixel size of the chart; the legend is drawn below it, one row per two series.
pub const SIZE: (u32, u32) = (800, 500);

/// One legend entry: text, colour, line (solid or dashed), marker.
struct Entry {
    name: String,
    colour: RGBColor,
    line: bool,
    dashed: bool,
    marker: bool,
}

fn range(vals: impl Iterator<Item = f64>, pad_frac: f64, min_span: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < min_span {
        let mid = (hi + lo) / 2.0;
        return (mid - min_span / 2.0, mid + min_span / 2.0);
    }
    let pad = (hi - lo) * pad_frac;
    (lo - pad, hi + pad)
}

/// Draws the figure; returns the SVG document.
pub fn render(fig: &Figure) -> Result<String, String> {
    let mut svg = String::new();
    draw(fig, &mut svg).map_err(|e| format!("drawing {}: {e}", fig.id))?;
    Ok(annotate(fig, &svg))
}

fn draw(fig: &Figure, out: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    let models = fig.models();
    let colour = |model: &str| PALETTE[models.iter().position(|m| m == model).unwrap_or(0) % PALETTE.len()];
    let xs = || fig.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = || fig.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1, y0, y1) = match fig.kind {
        Kind::ScatterDiagonal => {
            // Same range on both axes so the diagonal is at 45°, starting at 0 like the paper.
            let hi = xs().chain(ys()).fold(0.0f64, f64::max).max(1e-6) * 1.1;
            (0.0, hi, 0.0, hi)
        }
        Kind::Lines => {
            let (x0, x1) = if fig.integer_x { range(xs(), 0.05, 1.0) } else { range(xs(), 0.04, 1e-6) };
            let (y0, y1) = if fig.unit_y { (0.0, 1.0) } else { range(ys(), 0.1, 1e-6) };
            (x0, x1, y0.min(if fig.unit_y { 0.0 } else { y0 }), y1)
        }
    };

    // The legend goes below the chart so it never hides a point.
    let mut entries = Vec::new();
    if fig.kind == Kind::ScatterDiagonal {
        entries.push(Entry {
            name: "y = x (exact estimate)".into(),
            colour: RGBColor(150, 150, 150),
            line: true,
            dashed: true,
            marker: false,
        });
    }
    entries.extend(fig.series.iter().map(|s| Entry {
        name: s.name.clone(),
        colour: colour(&s.model),
        line: fig.kind == Kind::Lines,
        dashed: s.dashed,
        marker: true,
    }));
    let cols = if entries.len() > 1 { 2 } else { 1 };
    let rows = entries.len().div_ceil(cols) as u32;
    let legend_h = 14 + 26 * rows;
    let root = SVGBackend::with_string(out, (SIZE.0, SIZE.1 + legend_h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1);
    let mut chart = ChartBuilder::on(&top)
        .caption(&fig.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let mut mesh = chart.configure_mesh();
    mesh.x_desc(fig.x_desc.as_str())
        .y_desc(fig.y_desc.as_str())
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0));
    if fig.integer_x {
        let n = (x1 - x0).round().max(1.0) as usize + 1;
        mesh.x_labels(n.min(12)).x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                format!("{}", x.round() as i64)
            } else {
                String::new()
            }
        });
    }
    mesh.draw()?;

    if fig.kind == Kind::ScatterDiagonal {
        let grey = RGBColor(150, 150, 150);
        chart.draw_series(DashedLineSeries::new(vec![(0.0, 0.0), (x1, y1)], 6, 4, grey.stroke_width(1)))?;
    }
    for s in &fig.series {
        let c = colour(&s.model);
        let style = c.stroke_width(2);
        let mut pts = s.points.clone();
        if fig.kind == Kind::Lines {
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if s.dashed {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))?;
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style))?;
            }
        }
        let radius = if fig.kind == Kind::ScatterDiagonal { 5 } else { 3 };
        let dashed = s.dashed;
        chart.draw_series(pts.iter().map(|p| {
            if dashed {
                Circle::new(*p, radius, c.stroke_width(2))
            } else {
                Circle::new(*p, radius, c.filled())
            }
        }))?;
    }

    for (i, e) in entries.iter().enumerate() {
        let (r, c) = ((i / cols) as i32, (i % cols) as i32);
        let (x, y) = (90 + c * 350, 14 + r * 26);
        let style = e.colour.stroke_width(2);
        if e.line && e.dashed {
            bottom.draw(&PathElement::new(vec![(x, y), (x + 10, y)], style))?;
            bottom.draw(&PathElement::new(vec![(x + 18, y), (x + 28, y)], style))?;
        } else if e.line {
            bottom.draw(&PathElement::new(vec![(x, y), (x + 28, y)], style))?;
        }
        if e.marker {
            let m = if e.dashed { e.colour.stroke_width(2) } else { e.colour.filled() };
            bottom.draw(&Circle::new((x + 14, y), 4, m))?;
        }
        bottom.draw(&Text::new(e.name.clone(), (x + 38, y - 9), ("sans-serif", 18).into_font()))?;
    }
    root.present()?;
    Ok(())
}

/// Adds `<title>` and `<desc>` right after the opening `<svg …>` tag.
fn annotate(fig: &Figure, svg: &str) -> String {
    let Some(start) = svg.find("<svg") else { return svg.to_string() };
    let Some(end) = svg[start..].find('>').map(|i| start + i + 1) else { return svg.to_string() };
    let names: Vec<&str> = fig.series.iter().map(|s| s.name.as_str()).collect();
    format!(
        "{}\n<title>{}</title>\n<desc>{} Series: {}.</desc>{}",
        &svg[..end],
        xml_escape(&fig.title),
        xml_escape(&fig.caption),
        xml_escape(&names.join("; ")),
        &svg[end..]
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::figures::{all, tests as data};

    /// Checks what a browser needs and what the issue asks: well-formed XML with an `<svg>`
    /// root, both axis descriptions, and a legend entry for every series of every model.
    pub fn check_svg(svg: &str, fig: &Figure) {
        let doc = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{}: invalid XML: {e}", fig.id));
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect();
        assert!(texts.iter().any(|t| t == &fig.x_desc), "{}: no x axis description in {texts:?}", fig.id);
        assert!(texts.iter().any(|t| t == &fig.y_desc), "{}: no y axis description", fig.id);
        for s in &fig.series {
            assert!(texts.iter().any(|t| t == &s.name), "{}: no legend entry {:?} in {texts:?}", fig.id, s.name);
        }
        let lines = doc.descendants().filter(|n| n.has_tag_name("polyline") || n.has_tag_name("line")).count();
        assert!(lines >= 2 + fig.series.len(), "{}: {lines} lines", fig.id);
        let circles = doc.descendants().filter(|n| n.has_tag_name("circle")).count();
        assert!(circles >= fig.series.iter().map(|s| s.points.len()).sum::<usize>(), "{}: {circles} markers", fig.id);
        assert!(doc.descendants().any(|n| n.has_tag_name("title")), "{}: no <title>", fig.id);
    }

    #[test]
    fn all_figures_render_as_valid_svg_with_axes_and_series() {
        let (figs, skipped) = all(&data::tables(), &data::logs());
        assert!(skipped.is_empty(), "{skipped:?}");
        for f in &figs {
            let svg = render(f).unwrap();
            check_svg(&svg, f);
        }
    }

    #[test]
    fn degenerate_ranges_still_draw() {
        let mut f = crate::report::figures::attack_along_finetuning(
            &[crate::report::figures::FinetuneLog {
                label: "m & <n>".into(),
                epochs: crate::report::figures::parse_finetune_log(&serde_json::json!([{"test_w2_acc": 0.5}])).unwrap(),
            }],
            crate::report::figures::Order::W2,
        )
        .unwrap();
        f.title = "one \"epoch\" & <one> point".into();
        let svg = render(&f).unwrap();
        check_svg(&svg, &f);
        assert_eq!(range([2.0, 2.0].into_iter(), 0.1, 1.0), (1.5, 2.5));
        assert_eq!(range(std::iter::empty(), 0.1, 1.0), (0.0, 1.0));
    }
}
