//! The report as Markdown: the tables a person reads first.

use std::fmt::Write;

use rlhf_stages::eval::verifiable::CheckerKind;

use super::{PolicyRow, PromptAnswers, Report, VersusReference};

fn num(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}%", 100.0 * v))
}

fn versus(v: &Option<VersusReference>) -> String {
    match v {
        Some(v) => {
            let interval = v.win_rate_95.map_or_else(String::new, |[lo, hi]| {
                format!(" [{:.0}-{:.0}]", 100.0 * lo, 100.0 * hi)
            });
            format!(
                "{}{interval} ({}-{}-{})",
                pct(v.win_rate),
                v.wins,
                v.ties,
                v.losses
            )
        }
        None => "-".into(),
    }
}

fn policy_line(out: &mut String, p: &PolicyRow) {
    let _ = writeln!(
        out,
        "| {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0}% | {} | {} |",
        p.label,
        num(p.gold_score, 3),
        pct(p.exact),
        versus(&p.gold_vs_reference),
        num(p.reward_score, 3),
        versus(&p.reward_vs_reference),
        num(p.kl_to_reference, 2),
        p.answer_tokens,
        100.0 * p.finished,
        minutes(p.seconds),
        minutes(p.route_seconds),
    );
}

fn minutes(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".into(), |s| format!("{:.1}", s / 60.0))
}

/// People's labels per round (web labeller rounds only).
fn labelling(out: &mut String, rounds: &[serde_json::Value]) {
    let labelled: Vec<&serde_json::Value> =
        rounds.iter().filter(|r| r["labels"].is_object()).collect();
    if labelled.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Labelling
"
    );
    let _ = writeln!(
        out,
        "| round | groups | labellers | ranked | skipped | not rankable | agreement | Kendall's tau | median seconds |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for r in labelled {
        let l = &r["labels"];
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["round"],
            l["groups"],
            l["labellers"],
            l["ranked"],
            l["skipped"],
            l["not_rankable"],
            pct(l["agreement"].as_f64()),
            num(l["kendall_tau"].as_f64(), 2),
            num(l["median_seconds"].as_f64(), 1),
        );
    }
    out.push('\n');
}

/// How much the judge and the reward model pay for length.
fn length_line(out: &mut String, r: &Report) {
    if r.gold_length_correlation.is_none() && r.reward_length_correlation.is_none() {
        return;
    }
    let _ = writeln!(
        out,
        "Correlation of score with answer length (Pearson's r over every policy's answers): gold {}, reward model {}.\n",
        num(r.gold_length_correlation, 2),
        num(r.reward_length_correlation, 2)
    );
}

/// The first prompts with every policy's answer and its scores.
fn examples(out: &mut String, examples: &[PromptAnswers]) {
    if examples.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Answers side by side\n");
    for (i, e) in examples.iter().enumerate() {
        // A fence longer than any run of backticks inside the prompt.
        let longest = e
            .prompt
            .split(|c| c != '`')
            .map(str::len)
            .max()
            .unwrap_or(0);
        let fence = "`".repeat(longest.max(2) + 1);
        let prompt = e.prompt.trim_end();
        let _ = writeln!(
            out,
            "### Prompt {}\n\n{fence}text\n{prompt}\n{fence}\n",
            i + 1
        );
        for a in &e.answers {
            let answer = a.answer.trim();
            let quoted = if answer.is_empty() {
                "> (empty)".to_owned()
            } else {
                let lines: Vec<String> = answer.lines().map(|l| format!("> {l}")).collect();
                lines.join("\n")
            };
            let _ = writeln!(
                out,
                "**{}** (gold {}, reward model {}):\n\n{quoted}\n",
                a.policy,
                num(a.gold, 3),
                num(a.reward, 3)
            );
        }
    }
}

/// Greedy accuracy, pass@1, pass@k and cons@k, where a checker ran.
fn verifiable_table(out: &mut String, r: &Report) {
    let Some(first) = r.policies.iter().find_map(|p| p.verifiable) else {
        return;
    };
    let (k, checker) = (first.k, first.checker.name());
    let vote = match first.checker {
        CheckerKind::Math => "final answer",
        CheckerKind::Code => "code, blank space collapsed",
    };
    let _ = writeln!(
        out,
        "### Verifiable answers (the {checker} checker against the prompts' `answer`)
"
    );
    let _ = writeln!(
        out,
        "| policy | greedy accepted | pass@1 | pass@{k} | cons@{k} |\n|---|---|---|---|---|"
    );
    for p in &r.policies {
        if let Some(v) = p.verifiable {
            let cells = [v.greedy, v.pass_at_1, v.pass_at_k, v.cons_at_k].map(|x| pct(Some(x)));
            let _ = writeln!(out, "| {} | {} |", p.label, cells.join(" | "));
        }
    }
    let _ = writeln!(
        out,
        "\npass@1: the share of the {k} answers sampled per prompt (temperature 1) the checker accepts; pass@{k}: prompts with at least one accepted; cons@{k}: prompts whose majority answer (by {vote}) is accepted.\n"
    );
}

/// Each policy's mean score from the reward program, and its components.
fn program_table(out: &mut String, r: &Report) {
    let Some(first) = r.policies.iter().find_map(|p| p.program_score.as_ref()) else {
        return;
    };
    let names: Vec<&String> = r
        .policies
        .iter()
        .filter_map(|p| p.program_score.as_ref())
        .flat_map(|s| s.components.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let _ = writeln!(out, "### Reward program (`{}`)\n", first.scorer);
    let header: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    let _ = writeln!(
        out,
        "| policy | mean score |{}\n|---|---|{}",
        header.iter().map(|n| format!(" {n} |")).collect::<String>(),
        "---|".repeat(names.len())
    );
    for p in &r.policies {
        if let Some(s) = &p.program_score {
            let cells: String = names
                .iter()
                .map(|n| match s.components.get(*n) {
                    Some(v) => format!(" {v:.3} |"),
                    None => " |".into(),
                })
                .collect();
            let _ = writeln!(out, "| {} | {:.3} |{cells}", p.label, s.mean);
        }
    }
    let _ = writeln!(
        out,
        "\nThe mean over the greedy answers; each component's over the answers that have it.\n"
    );
}

/// The title, what was evaluated and how, and the stages' warnings.
fn heading(out: &mut String, r: &Report) {
    let _ = writeln!(out, "# Evaluation of `{}`\n", r.run.display());
    let _ = writeln!(
        out,
        "{} held-out prompts from `{}`, greedy answers of up to {} tokens. \
         Reference policy: `{}`; reward model scoring every policy: `{}`. \
         KL to the reference is measured on {} sampled answers per prompt (temperature 1). \
         Gold scores: {}.\n",
        r.prompts,
        r.prompts_file.display(),
        r.settings.max_new_tokens,
        r.reference,
        r.reward_model.as_deref().unwrap_or("none"),
        r.settings.kl_samples_per_prompt,
        if r.judge.is_empty() {
            "the bundled task's judge"
        } else {
            &r.judge
        },
    );
    if !r.warnings.is_empty() {
        let _ = writeln!(out, "## Warnings\n");
        for w in &r.warnings {
            let _ = writeln!(out, "- {w}");
        }
        out.push('\n');
    }
    flagged_section(out, &r.flagged);
}

/// The stages that did not clear a baseline, each reason on its line.
pub(super) fn flagged_section(out: &mut String, flagged: &[super::FlaggedStage]) {
    if flagged.is_empty() {
        return;
    }
    let _ = writeln!(out, "## Flagged stages\n");
    let _ = writeln!(
        out,
        "These stages did not clear a baseline; what depends on them was trained on a stage that may not have learnt.\n"
    );
    for f in flagged {
        for why in &f.flags {
            let _ = writeln!(out, "- `{}`: {why}", f.stage);
        }
    }
    out.push('\n');
}

/// Each SFT stage's held-out loss beside the frequency baseline, and the
/// judge's score at step 0 and at the end.
fn sft_baselines(out: &mut String, r: &Report) {
    if r.sft_baselines.is_empty() {
        return;
    }
    let _ = writeln!(out, "## SFT against its baselines\n");
    let _ = writeln!(
        out,
        "| stage | held-out loss per answer token | frequency baseline | share of it | judge score at step 0 | at the end |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for b in &r.sft_baselines {
        let share = match (b.eval_loss, b.frequency_loss) {
            (Some(l), Some(f)) if f > 0.0 => format!("{:.0}%", 100.0 * l / f),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {share} | {} | {} |",
            b.stage,
            num(b.eval_loss, 3),
            num(b.frequency_loss, 3),
            num(b.eval_gold_before, 3),
            num(b.eval_gold_after, 3),
        );
    }
    let _ = writeln!(
        out,
        "\nThe frequency baseline is the loss of a model that knows only how often each answer token occurs in the training answers (their entropy); a stage ending above 75% of it is flagged.\n"
    );
}

pub fn render(r: &Report) -> String {
    let mut out = String::new();
    heading(&mut out, r);
    let _ = writeln!(out, "## Policies\n");
    let _ = writeln!(
        out,
        "| policy | gold score | exact | gold win rate vs {0} (W-T-L) | RM score | RM win rate vs {0} (W-T-L) | KL to {0} (nats) | answer tokens | ended with EOS | stage minutes | route minutes |",
        r.reference
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for p in &r.policies {
        policy_line(&mut out, p);
    }
    let _ = writeln!(
        out,
        "\nWin rates count only the prompts where the two answers' scores differ; ties are shown apart. In brackets: the win rate's 95% Wilson interval over the non-tied prompts. Stage minutes: the stage's own wall time; route minutes: with every stage it was trained from (SFT, reward models, earlier rounds and their labelling), each counted once.\n"
    );
    length_line(&mut out, r);
    verifiable_table(&mut out, r);
    program_table(&mut out, r);
    let families: std::collections::BTreeSet<&String> = r
        .policies
        .iter()
        .flat_map(|p| p.gold_vs_reference_by_family.keys())
        .collect();
    if !families.is_empty() {
        let _ = writeln!(
            out,
            "### Gold win rate vs {} by family (W-T-L)\n",
            r.reference
        );
        let names: Vec<&str> = families.iter().map(|f| f.as_str()).collect();
        let _ = writeln!(out, "| policy | {} |", names.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(names.len()));
        for p in &r.policies {
            let cells: Vec<String> = families
                .iter()
                .map(|f| versus(&p.gold_vs_reference_by_family.get(*f).cloned()))
                .collect();
            let _ = writeln!(out, "| {} | {} |", p.label, cells.join(" | "));
        }
        out.push('\n');
    }
    if !r.reward_models.is_empty() {
        let _ = writeln!(out, "## Reward models\n");
        let _ = writeln!(
            out,
            "| reward model | trained on (groups) | held-out pairwise accuracy | longer answer wins | chance | pairs | held-out loss | held-out rankings |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for m in &r.reward_models {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | 50.0% | {} | {} | {} |",
                m.label,
                m.train_groups.map_or_else(|| "-".into(), |g| g.to_string()),
                pct(m.accuracy),
                pct(m.length_accuracy),
                m.pairs,
                num(m.loss, 3),
                m.eval_data
                    .as_ref()
                    .map_or_else(|| "-".into(), |p| format!("`{}`", p.display())),
            );
        }
        let _ = writeln!(
            out,
            "\n\"Longer answer wins\": the same held-out pairs ranked by answer length alone (an equal length counts one half), what a reward model must beat besides chance.\n"
        );
    }
    sft_baselines(&mut out, r);
    labelling(&mut out, &r.rounds);
    examples(&mut out, &r.examples);
    if !r.plots.is_empty() {
        let _ = writeln!(out, "## Plots\n");
        for p in &r.plots {
            let _ = writeln!(out, "![{p}]({p})\n");
        }
    }
    out
}
