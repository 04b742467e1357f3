//! The plot of a run: issued, booked and backlog (tokens) over time, as PNG or SVG.

use std::path::Path;

use anyhow::Context;

/// One reading of the service's progress, `t_s` seconds after the bench started.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub t_s: f64,
    pub issued: i64,
    pub booked: i64,
    pub backlog: i64,
}

/// Draws `samples` to `path`: SVG when it ends in `.svg`, else PNG.
pub fn draw(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").context(
        "the plot needs DejaVuSans (Debian fonts-dejavu-core; scripts/bench.sh installs it)",
    )?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("font not usable"))?;
    let t_max = samples.last().map(|s| s.t_s).unwrap_or(1.0).max(1.0);
    let y_max = samples
        .iter()
        .map(|s| s.issued.max(s.booked).max(s.backlog))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.05;
    fn draw_on<DB: DrawingBackend>(
        root: DrawingArea<DB, plotters::coord::Shift>,
        samples: &[Sample],
        t_max: f64,
        y_max: f64,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "redpacket-wallet: issued, booked and backlog (tokens)",
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the bench started")
            .y_desc("tokens")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        type Series = (&'static str, RGBColor, fn(&Sample) -> i64);
        let series: [Series; 3] = [
            ("issued", BLUE, |s| s.issued),
            ("booked", GREEN, |s| s.booked),
            ("backlog", RED, |s| s.backlog),
        ];
        for (name, color, f) in series {
            chart
                .draw_series(LineSeries::new(
                    samples.iter().map(|s| (s.t_s, f(s) as f64)),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    }
    if path.extension().and_then(|e| e.to_str()) == Some("svg") {
        draw_on(
            SVGBackend::new(path, (1000, 600)).into_drawing_area(),
            samples,
            t_max,
            y_max,
        )
    } else {
        draw_on(
            BitMapBackend::new(path, (1000, 600)).into_drawing_area(),
            samples,
            t_max,
            y_max,
        )
    }
}
