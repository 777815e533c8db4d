//! `rlhf eval` of an experiment run once per seed (`seeds:`): every seed's
//! run folder gets its own report, then each policy's numbers are set
//! side by side over the seeds: each seed's row, their mean, min-max and
//! a 95% interval for the mean (Student's t over the seeds). RL results
//! move with the seed; one seed's row says little on its own.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FlaggedStage, PolicyRow, Report, RewardRow};

/// A number measured once per seed, summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// The sample standard deviation over the seeds (none for one seed).
    pub sd: Option<f64>,
    /// 95% interval for the mean: mean -/+ t(0.975, n-1) sd / sqrt(n).
    pub interval_95: Option<[f64; 2]>,
    /// Seeds that measured it.
    pub seeds: usize,
}

/// Student's t quantile at 0.975 for 1..=30 degrees of freedom.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// t(0.975, df); the normal's 1.96 beyond the table.
pub fn t_975(df: usize) -> f64 {
    T_975.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

impl Spread {
    /// `None` for no values.
    pub fn of(xs: &[f64]) -> Option<Self> {
        let n = xs.len();
        if n == 0 {
            return None;
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = (n > 1).then(|| {
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            var.sqrt()
        });
        let half = sd.map(|sd| t_975(n - 1) * sd / (n as f64).sqrt());
        Some(Self {
            mean,
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            sd,
            interval_95: half.map(|h| [mean - h, mean + h]),
            seeds: n,
        })
    }
}

/// One seed's numbers of a policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedRow {
    pub seed: u64,
    pub gold_score: Option<f64>,
    pub exact: Option<f64>,
    /// Gold win rate against the reference over the non-tied prompts.
    pub win_rate: Option<f64>,
    /// Wins, ties, losses against the reference.
    pub tally: Option<[usize; 3]>,
    pub kl_to_reference: Option<f64>,
}

/// A policy over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyOverSeeds {
    pub label: String,
    pub gold_score: Option<Spread>,
    pub exact: Option<Spread>,
    pub win_rate: Option<Spread>,
    pub kl_to_reference: Option<Spread>,
    pub seeds: Vec<SeedRow>,
}

/// A reward model over the seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewardOverSeeds {
    pub label: String,
    pub accuracy: Option<Spread>,
    pub length_accuracy: Option<Spread>,
}

/// The report of an experiment's seeds (`RUN/report/report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedsReport {
    /// The experiment's folder name.
    pub run: PathBuf,
    pub seeds: Vec<u64>,
    pub reference: String,
    pub judge: String,
    pub prompts: usize,
    pub policies: Vec<PolicyOverSeeds>,
    pub reward_models: Vec<RewardOverSeeds>,
    /// Flagged stages of every seed, named `seed-N/stage`.
    pub flagged: Vec<FlaggedStage>,
    /// Each seed's own report, relative to this report's folder.
    pub reports: Vec<PathBuf>,
    /// Seeds left out, and why (their run did not finish a policy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

/// Every label the reports hold, in order of first appearance.
fn labels_over<'a>(
    reports: &'a [(u64, Report)],
    of: fn(&'a Report) -> Vec<&'a str>,
) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for (_, r) in reports {
        for label in of(r) {
            if !out.contains(&label) {
                out.push(label);
            }
        }
    }
    out
}

/// Every policy and reward model of the seeds' reports, in order of first
/// appearance; one missing from a seed is summarised over the others (each
/// cell says over how many). `reports` is not empty.
pub fn aggregate(run: &Path, reports: &[(u64, Report)], left_out: Vec<String>) -> SeedsReport {
    let first = &reports[0].1;
    let policies = labels_over(reports, |r| {
        r.policies.iter().map(|p| p.label.as_str()).collect()
    })
    .into_iter()
    .map(|label| policy_over_seeds(label, reports))
    .collect();
    let reward_models = labels_over(reports, |r| {
        r.reward_models.iter().map(|m| m.label.as_str()).collect()
    })
    .into_iter()
    .map(|label| reward_over_seeds(label, reports))
    .collect();
    let folder = |seed: u64| PathBuf::from(crate::run_folder::seed_folder(seed));
    SeedsReport {
        run: PathBuf::from(run.file_name().unwrap_or(run.as_os_str())),
        seeds: reports.iter().map(|(s, _)| *s).collect(),
        reference: first.reference.clone(),
        judge: first.judge.clone(),
        prompts: first.prompts,
        policies,
        reward_models,
        flagged: reports
            .iter()
            .flat_map(|(seed, r)| {
                r.flagged.iter().map(move |f| FlaggedStage {
                    stage: format!("{}/{}", folder(*seed).display(), f.stage),
                    flags: f.flags.clone(),
                })
            })
            .collect(),
        reports: reports
            .iter()
            .map(|(s, _)| Path::new("..").join(folder(*s)).join("report/report.md"))
            .collect(),
        left_out,
    }
}

fn policy_over_seeds(label: &str, reports: &[(u64, Report)]) -> PolicyOverSeeds {
    let rows: Vec<(u64, &PolicyRow)> = reports
        .iter()
        .filter_map(|(s, r)| Some((*s, r.policies.iter().find(|p| p.label == label)?)))
        .collect();
    let seeds: Vec<SeedRow> = rows
        .iter()
        .map(|(seed, p)| {
            let versus = p.gold_vs_reference.as_ref();
            SeedRow {
                seed: *seed,
                gold_score: p.gold_score,
                exact: p.exact,
                win_rate: versus.and_then(|v| v.win_rate),
                tally: versus.map(|v| [v.wins, v.ties, v.losses]),
                kl_to_reference: p.kl_to_reference,
            }
        })
        .collect();
    let spread = |f: fn(&SeedRow) -> Option<f64>| {
        Spread::of(&seeds.iter().filter_map(f).collect::<Vec<_>>())
    };
    PolicyOverSeeds {
        label: label.to_owned(),
        gold_score: spread(|r| r.gold_score),
        exact: spread(|r| r.exact),
        win_rate: spread(|r| r.win_rate),
        kl_to_reference: spread(|r| r.kl_to_reference),
        seeds,
    }
}

fn reward_over_seeds(label: &str, reports: &[(u64, Report)]) -> RewardOverSeeds {
    let rows: Vec<&RewardRow> = reports
        .iter()
        .filter_map(|(_, r)| r.reward_models.iter().find(|m| m.label == label))
        .collect();
    let spread = |f: fn(&RewardRow) -> Option<f64>| {
        Spread::of(&rows.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
    };
    RewardOverSeeds {
        label: label.to_owned(),
        accuracy: spread(|r| r.accuracy),
        length_accuracy: spread(|r| r.length_accuracy),
    }
}

/// `0.806 [0.79-0.82]` style: the mean, then min-max, at `digits`.
fn spread_cell(s: &Option<Spread>, d: usize, scale: f64, unit: &str, seeds: usize) -> String {
    let Some(s) = s else {
        return "-".into();
    };
    let interval = s.interval_95.map_or_else(String::new, |[lo, hi]| {
        format!(" [{:.d$}, {:.d$}]", lo * scale, hi * scale)
    });
    let over = match s.seeds < seeds {
        true => format!(" over {} seeds", s.seeds),
        false => String::new(),
    };
    format!(
        "{:.d$}{unit} ({:.d$}-{:.d$}){interval}{over}",
        s.mean * scale,
        s.min * scale,
        s.max * scale,
    )
}

fn cell(x: Option<f64>, digits: usize, scale: f64, unit: &str) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{:.digits$}{unit}", x * scale))
}

/// The seeds' report as Markdown.
pub fn render(r: &SeedsReport) -> String {
    let mut out = String::new();
    let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
    let _ = writeln!(
        out,
        "# Evaluation of `{}` over {} seeds ({})\n",
        r.run.display(),
        r.seeds.len(),
        seeds.join(", ")
    );
    let _ = writeln!(
        out,
        "Each seed ran the whole experiment in its own folder, sharing nothing; each policy answered the same {} held-out prompts greedily. Gold scores: {}. A cell reads: the mean over the seeds (min-max) [95% interval for the mean, Student's t over the seeds]. Win rates against `{}` by the judge, over the prompts where the two answers differ.\n",
        r.prompts,
        if r.judge.is_empty() { "the bundled task's judge" } else { &r.judge },
        r.reference
    );
    for why in &r.left_out {
        let _ = writeln!(out, "**Left out:** {why}\n");
    }
    super::markdown::flagged_section(&mut out, &r.flagged);
    let _ = writeln!(out, "## Policies over the seeds\n");
    let _ = writeln!(
        out,
        "| policy | gold score | exactly right | gold win rate vs {0} | KL to {0} |",
        r.reference
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let n = r.seeds.len();
    for p in &r.policies {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            p.label,
            spread_cell(&p.gold_score, 3, 1.0, "", n),
            spread_cell(&p.exact, 1, 100.0, "%", n),
            spread_cell(&p.win_rate, 1, 100.0, "%", n),
            spread_cell(&p.kl_to_reference, 2, 1.0, "", n),
        );
    }
    per_seed(&mut out, r);
    reward_models(&mut out, &r.reward_models, n);
    let _ = writeln!(out, "## Each seed's report\n");
    for (seed, path) in r.seeds.iter().zip(&r.reports) {
        let _ = writeln!(out, "- seed {seed}: `{}`", path.display());
    }
    out
}

fn per_seed(out: &mut String, r: &SeedsReport) {
    let _ = writeln!(out, "\n### Each seed\n");
    let _ = writeln!(
        out,
        "| policy | seed | gold score | exactly right | gold win rate (W-T-L) | KL |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for p in &r.policies {
        for s in &p.seeds {
            let tally = s
                .tally
                .map_or_else(String::new, |[w, t, l]| format!(" ({w}-{t}-{l})"));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {}{tally} | {} |",
                p.label,
                s.seed,
                cell(s.gold_score, 3, 1.0, ""),
                cell(s.exact, 1, 100.0, "%"),
                cell(s.win_rate, 1, 100.0, "%"),
                cell(s.kl_to_reference, 2, 1.0, ""),
            );
        }
    }
    out.push('\n');
}

fn reward_models(out: &mut String, models: &[RewardOverSeeds], n: usize) {
    if models.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Reward models over the seeds\n");
    let _ = writeln!(
        out,
        "| reward model | held-out pairwise accuracy | longer answer wins | chance |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for m in models {
        let _ = writeln!(
            out,
            "| {} | {} | {} | 50.0% |",
            m.label,
            spread_cell(&m.accuracy, 1, 100.0, "%", n),
            spread_cell(&m.length_accuracy, 1, 100.0, "%", n),
        );
    }
    out.push('\n');
}

/// Writes `report.json` and `report.md` into `run/report/`; returns the
/// folder.
pub fn write(run: &Path, report: &SeedsReport) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let dir = run.join(super::REPORT_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(report)?;
    rlhf_datasets::atomic::write_file(&dir.join(super::REPORT_JSON), json.as_bytes())?;
    rlhf_datasets::atomic::write_file(&dir.join(super::REPORT_MD), render(report).as_bytes())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three seeds' means by hand: mean 0.8, sample sd 0.1, t(0.975, 2)
    /// = 4.303, half-width 4.303 * 0.1 / sqrt(3).
    #[test]
    fn a_spread_over_seeds_matches_the_hand_computed_one() {
        let s = Spread::of(&[0.7, 0.8, 0.9]).unwrap();
        assert!((s.mean - 0.8).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.seeds), (0.7, 0.9, 3));
        assert!((s.sd.unwrap() - 0.1).abs() < 1e-12);
        let half = 4.303 * 0.1 / 3f64.sqrt();
        let [lo, hi] = s.interval_95.unwrap();
        assert!((lo - (0.8 - half)).abs() < 1e-12 && (hi - (0.8 + half)).abs() < 1e-12);
        let one = Spread::of(&[0.5]).unwrap();
        assert_eq!((one.sd, one.interval_95), (None, None));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(t_975(30), 2.042);
        assert_eq!(t_975(31), 1.96);
    }
}
