//! PNG plots of a run's metrics (plotters, with an embedded font so that
//! no system fonts are needed), as each kind declares them
//! (`rlhf_stages::kind::Plot`): losses, pairwise accuracy, curves per RL
//! iteration, and gold and reward-model score against KL.

use std::path::Path;
use std::sync::Once;

use anyhow::anyhow;
use plotters::prelude::*;

use rlhf_stages::kind::Plot;

use super::FinishedStage;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FONT_NAME: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the embedded plot font did not load; plots will have no text");
        }
    });
}

/// One curve.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Palette index: the same stage keeps its colour across plots.
    pub color: usize,
    /// A faint line (noisy per-step values behind a smoothed one).
    pub faint: bool,
    /// Dots at each point (sparse series such as evaluations).
    pub markers: bool,
}

/// One chart of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

fn bounds(lines: &[Line]) -> Option<(f64, f64, f64, f64)> {
    let pts = lines
        .iter()
        .flat_map(|l| &l.points)
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for &(x, y) in pts {
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return None;
    }
    let pad = |lo: f64, hi: f64| {
        // A flat series still gets a readable axis around its value.
        let span = (hi - lo).abs().max(0.1 * lo.abs().max(hi.abs())).max(1e-3);
        (lo - 0.05 * span, hi + 0.05 * span)
    };
    let (x0, x1) = pad(x0, x1);
    let (y0, y1) = pad(y0, y1);
    Some((x0, x1, y0, y1))
}

/// Draws `panels` in a grid of `cols` columns into a PNG at `path`.
pub fn draw(path: &Path, panels: &[Panel], cols: usize) -> anyhow::Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (560 * cols as u32, 400 * rows as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    for (area, panel) in areas.iter().zip(panels) {
        let Some((x0, x1, y0, y1)) = bounds(&panel.lines) else {
            continue;
        };
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, (FONT_NAME, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(panel.x_label.as_str())
            .y_desc(panel.y_label.as_str())
            .label_style((FONT_NAME, 13))
            .axis_desc_style((FONT_NAME, 14))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for line in &panel.lines {
            let color = Palette99::pick(line.color).to_rgba();
            let style = if line.faint {
                color.mix(0.3).stroke_width(1)
            } else {
                color.stroke_width(2)
            };
            // A faint series with markers is a scatter: dots, no line.
            if !(line.faint && line.markers) {
                // Segment by segment: a 2-px polyline's miter joins turn a
                // path that folds back on itself into long spikes.
                let segments = line
                    .points
                    .windows(2)
                    .map(|w| PathElement::new(vec![w[0], w[1]], style));
                let series = chart.draw_series(segments).map_err(|e| err(&e))?;
                if !line.faint {
                    series
                        .label(line.name.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                }
            }
            if line.markers {
                let dot = if line.faint {
                    color.mix(0.35).filled()
                } else {
                    color.filled()
                };
                chart
                    .draw_series(line.points.iter().map(|&p| Circle::new(p, 3, dot)))
                    .map_err(|e| err(&e))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FONT_NAME, 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A stage's metrics lines (empty if it has none).
fn metrics(stage: &FinishedStage) -> Vec<serde_json::Value> {
    crate::run_folder::read_log_lines(&stage.metrics())
}

/// `(x, y)` for the lines that have both fields.
fn series(rows: &[serde_json::Value], x: &str, y: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((r[x].as_f64()?, r[y].as_f64()?)))
        .collect()
}

/// Exponential moving average of the y values, for noisy per-step curves.
pub fn smooth(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut ema = None;
    for &(x, y) in points {
        let v = match ema {
            None => y,
            Some(e) => alpha * e + (1.0 - alpha) * y,
        };
        ema = Some(v);
        out.push((x, v));
    }
    out
}

fn line(name: &str, points: Vec<(f64, f64)>, color: usize) -> Line {
    Line {
        name: name.to_owned(),
        points,
        color,
        faint: false,
        markers: false,
    }
}

/// The judge's mean score of each RL stage's saved rollouts
/// (`rollouts/iter-NNNN.parquet`), by iteration, with `score` scoring
/// every (prompt, answer) pair of the run in one call (a judging program
/// starts once); a stage with none saved, or whose prompts the judge does
/// not know, has none.
pub fn rollout_gold(
    stages: &[FinishedStage],
    score: impl FnOnce(&[(String, String)]) -> anyhow::Result<Vec<Option<f64>>>,
) -> anyhow::Result<RolloutGold> {
    // (stage, iteration, where its rows start) and every row, in order.
    let mut files: Vec<(&str, i64, usize)> = Vec::new();
    let mut pairs = Vec::new();
    for stage in stages {
        for (it, path) in rlhf_datasets::rollout::rollouts_files(&stage.dir) {
            if let Ok(rows) = rlhf_datasets::rollout::read_prompts_and_answers(&path) {
                files.push((&stage.label, it, pairs.len()));
                pairs.extend(rows);
            }
        }
    }
    if pairs.is_empty() {
        return Ok(RolloutGold::new());
    }
    let scores = score(&pairs)?;
    anyhow::ensure!(
        scores.len() == pairs.len(),
        "the judge gave {} scores for {} rollout answers",
        scores.len(),
        pairs.len()
    );
    let mut out = RolloutGold::new();
    for (i, &(label, it, start)) in files.iter().enumerate() {
        let end = files.get(i + 1).map_or(scores.len(), |f| f.2);
        let known: Vec<f64> = scores[start..end].iter().flatten().copied().collect();
        if !known.is_empty() {
            let mean = known.iter().sum::<f64>() / known.len() as f64;
            out.entry(label.to_owned()).or_default().push((it, mean));
        }
    }
    Ok(out)
}

/// A stage label's (iteration, mean judge score of its rollouts).
pub type RolloutGold = std::collections::BTreeMap<String, Vec<(i64, f64)>>;

/// Every plot this run has data for, as each kind declares its plots;
/// returns the file names written.
pub fn write_all(
    stages: &[FinishedStage],
    gold: &RolloutGold,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut plots = Vec::new();
    for kind in rlhf_stages::kinds::all() {
        let of_kind: Vec<&FinishedStage> = stages.iter().filter(|s| s.kind == kind.name).collect();
        if of_kind.is_empty() {
            continue;
        }
        plots.extend(kind.plots.iter().map(|plot| figure(plot, &of_kind, gold)));
    }
    let mut written = Vec::new();
    for (name, panels, cols) in plots {
        if panels
            .iter()
            .any(|p| p.lines.iter().any(|l| !l.points.is_empty()))
        {
            // Drawn beside, then renamed: a reader never sees half a PNG.
            let tmp = dir.join(format!(".tmp-{name}"));
            draw(&tmp, &panels, cols)?;
            std::fs::rename(&tmp, dir.join(name))
                .map_err(|e| anyhow!("writing {}: {e}", dir.join(name).display()))?;
            written.push(name.to_owned());
        }
    }
    Ok(written)
}

/// A declared plot drawn from its kind's stages: the file, its panels and
/// how many columns they take.
fn figure(
    plot: &Plot,
    stages: &[&FinishedStage],
    gold: &RolloutGold,
) -> (&'static str, Vec<Panel>, usize) {
    match *plot {
        Plot::Loss { file, title } => (file, vec![loss(stages, title)], 1),
        Plot::PairwiseAccuracy { file, title } => (file, vec![pairwise_accuracy(stages, title)], 1),
        Plot::Iterations { file, panels } => {
            let metrics: Vec<Vec<serde_json::Value>> = stages.iter().map(|s| metrics(s)).collect();
            (file, by_iteration(stages, &metrics, panels), 2)
        }
        Plot::ScoreAgainstKl { file } => {
            let metrics: Vec<Vec<serde_json::Value>> = stages.iter().map(|s| metrics(s)).collect();
            (file, overoptimization(stages, &metrics, gold), 2)
        }
    }
}

/// Per-step train loss (faint), its moving average, eval loss.
fn loss(stages: &[&FinishedStage], title: &str) -> Panel {
    let mut lines = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        let m = metrics(s);
        let train = series(&m, "step", "loss");
        lines.push(Line {
            faint: true,
            ..line("", train.clone(), 2 * i)
        });
        lines.push(line(
            &format!("{} train (EMA)", s.label),
            smooth(&train, 0.9),
            2 * i,
        ));
        lines.push(Line {
            markers: true,
            ..line(
                &format!("{} eval", s.label),
                series(&m, "step", "eval_loss"),
                2 * i + 1,
            )
        });
    }
    Panel {
        title: title.into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        lines,
    }
}

/// Reward models: held-out accuracy, one line per round.
fn pairwise_accuracy(stages: &[&FinishedStage], title: &str) -> Panel {
    let mut lines = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        let m = metrics(s);
        lines.push(Line {
            faint: true,
            ..line("", smooth(&series(&m, "step", "accuracy"), 0.95), i)
        });
        lines.push(Line {
            markers: true,
            ..line(
                &format!("{} held-out", s.label),
                series(&m, "step", "eval_accuracy"),
                i,
            )
        });
    }
    Panel {
        title: title.into(),
        x_label: "step".into(),
        y_label: "accuracy".into(),
        lines,
    }
}

/// One panel per `(metric, title, y axis)` against iteration, a line per
/// stage (each round's): raw values faint, their moving average bold.
fn by_iteration(
    stages: &[&FinishedStage],
    metrics: &[Vec<serde_json::Value>],
    panels: &[(&str, &str, &str)],
) -> Vec<Panel> {
    let panel = |&(key, title, y): &(&str, &str, &str)| Panel {
        title: title.into(),
        x_label: "iteration".into(),
        y_label: y.into(),
        lines: stages
            .iter()
            .zip(metrics)
            .enumerate()
            .flat_map(|(i, (s, m))| {
                let raw = series(m, "iteration", key);
                [
                    Line {
                        faint: true,
                        ..line("", raw.clone(), i)
                    },
                    line(&s.label, smooth(&raw, 0.7), i),
                ]
            })
            .collect(),
    };
    panels.iter().map(panel).collect()
}

/// Each iteration as a faint dot, and the bold path of both coordinates'
/// moving average over iterations: the path the policy took.
fn kl_path(name: &str, points: Vec<(f64, f64)>, color: usize) -> [Line; 2] {
    let xs: Vec<(f64, f64)> = points.iter().map(|&(x, _)| (0.0, x)).collect();
    let ys: Vec<(f64, f64)> = points.iter().map(|&(_, y)| (0.0, y)).collect();
    let smoothed = smooth(&xs, 0.8)
        .into_iter()
        .zip(smooth(&ys, 0.8))
        .map(|((_, x), (_, y))| (x, y))
        .collect();
    [
        Line {
            faint: true,
            markers: true,
            ..line("", points, color)
        },
        line(name, smoothed, color),
    ]
}

/// Over-optimisation (Gao et al.): gold and proxy score against KL.
fn overoptimization(
    stages: &[&FinishedStage],
    metrics: &[Vec<serde_json::Value>],
    rollout_gold: &RolloutGold,
) -> Vec<Panel> {
    let mut gold_lines = Vec::new();
    let mut proxy_lines = Vec::new();
    for (i, (s, m)) in stages.iter().zip(metrics).enumerate() {
        let kl_by_it: std::collections::BTreeMap<i64, f64> = m
            .iter()
            .filter_map(|r| Some((r["iteration"].as_i64()?, r["kl"].as_f64()?)))
            .collect();
        let gold: Vec<(f64, f64)> = rollout_gold
            .get(&s.label)
            .into_iter()
            .flatten()
            .filter_map(|&(it, g)| Some((*kl_by_it.get(&it)?, g)))
            .collect();
        if !gold.is_empty() {
            gold_lines.extend(kl_path(&s.label, gold, i));
        }
        proxy_lines.extend(kl_path(&s.label, series(m, "kl", "score"), i));
    }
    let mut panels = Vec::new();
    if gold_lines.iter().any(|l| !l.points.is_empty()) {
        panels.push(Panel {
            title: "The judge's score of rollouts against KL".into(),
            x_label: "KL to the reference (nats)".into(),
            y_label: "judge's score".into(),
            lines: gold_lines,
        });
    }
    panels.push(Panel {
        title: "Score trained on (reward model or program) against KL".into(),
        x_label: "KL to the reference (nats)".into(),
        y_label: "training score".into(),
        lines: proxy_lines,
    });
    panels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_starts_at_the_first_value_and_follows() {
        let s = smooth(&[(0.0, 1.0), (1.0, 3.0), (2.0, 3.0)], 0.5);
        assert_eq!(s, vec![(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]);
    }

    #[test]
    fn a_plot_is_a_png_of_the_requested_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.png");
        draw(
            &p,
            &[Panel {
                title: "t".into(),
                x_label: "x".into(),
                y_label: "y".into(),
                lines: vec![line("a", vec![(0.0, 1.0), (1.0, 2.0)], 0)],
            }],
            1,
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at bytes 16..24.
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 560);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 400);
    }
}
