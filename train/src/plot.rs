//! The PNG of the loss and accuracy curves, redrawn after every epoch.
//!
//! Text is rendered with plotters' `ab_glyph` backend from a font compiled into the binary (Hack,
//! from the `epaint_default_fonts` crate), so no system fonts are needed.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::metrics::EpochMetrics;

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded plot font could not be loaded"))
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

#[allow(clippy::too_many_arguments)]
fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    history: &[EpochMetrics],
    train: impl Fn(&EpochMetrics) -> f64,
    test: impl Fn(&EpochMetrics) -> f64,
    y_range: Option<(f64, f64)>,
) -> Result<()> {
    let last_epoch = history.last().map_or(1, |m| m.epoch).max(2) as i32;
    let (lo, hi) = y_range.unwrap_or_else(|| {
        let vals = history.iter().flat_map(|m| [train(m), test(m)]);
        let hi = vals.filter(|v| v.is_finite()).fold(0.0f64, f64::max);
        (0.0, (hi * 1.1).max(1e-3))
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(1..last_epoch, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels((last_epoch as usize).min(20))
        .y_desc(y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(err)?;
    for (name, color, f) in [
        ("train", BLUE, &train as &dyn Fn(&EpochMetrics) -> f64),
        ("test", RED, &test),
    ] {
        let pts: Vec<(i32, f64)> = history.iter().map(|m| (m.epoch as i32, f(m))).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Draws `history` (loss left, accuracy right) into the PNG `path`, atomically.
pub fn plot_history(path: &Path, history: &[EpochMetrics]) -> Result<()> {
    register_font()?;
    let (w, h) = (1200u32, 480u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(w / 2);
        panel(
            &left,
            "cross-entropy loss",
            "loss",
            history,
            |m| m.train_loss,
            |m| m.test_loss,
            None,
        )?;
        panel(
            &right,
            "accuracy",
            "accuracy (%)",
            history,
            |m| 100.0 * m.train_acc,
            |m| 100.0 * m.test_acc,
            Some((0.0, 100.0)),
        )?;
        root.present().map_err(err)?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(&buf).map_err(err)?;
    }
    Ok(model::write_atomic(path, &png)?)
}
