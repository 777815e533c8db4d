//! A loop round's collection (`round-N/collect`): sample K answers per
//! prompt from the latest policy, have the labeller rank them, and leave
//! the round's rankings in the stage's `checkpoint/`: everything before
//! plus the new ones, with their round and policy. The experiment makes
//! these stages from `loop:`; the runner runs them like any other.

use anyhow::Context;
use rlhf_datasets::batch::epoch_order;
use rlhf_datasets::load::read_table;
use rlhf_datasets::preference::{ranked_groups, write_ranked_groups, RankedGroup};
use rlhf_datasets::schema::{prompt_texts, ChatTemplate};
use rlhf_stages::dist::Ranks;
use rlhf_stages::eval::answer::{answer_prompts, ANSWER_BATCH};
use rlhf_stages::kind::{KindConfig, PathSetting, Produces};
use rlhf_stages::train::{StageContext, StageError, FINAL_DIR};
use rlhf_stages::{Head, HeadChoice, Model};

use std::path::{Path, PathBuf};

use crate::experiment::{CollectConfig, Labeller, COLLECT_KIND, PREFERENCES_FILE};
use crate::label::programs;

impl KindConfig for CollectConfig {
    const KIND: &'static str = COLLECT_KIND;
    const PRODUCES: Produces = Produces::Rankings;
    type Summary = serde_json::Value;

    fn validate(&self) -> Result<(), StageError> {
        // The loop's settings were checked where `loop:` was read.
        Ok(())
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        let mut paths = vec![
            PathSetting::model("policy", "the policy to sample", &mut self.policy),
            PathSetting::data("base", "the rankings so far", &mut self.base),
            PathSetting::data(
                "prompts",
                "prompts to sample answers for",
                &mut self.prompts,
            ),
        ];
        if let Labeller::RewardModel { model } = &mut self.labeller {
            paths.push(PathSetting::model(
                "labeller",
                "the reward model that ranks the answers",
                model,
            ));
        }
        paths
    }

    fn seed_mut(&mut self) -> &mut Option<u64> {
        &mut self.seed
    }

    /// Ranks share the prompts (uneven shares allowed).
    fn shared_batches(&mut self) -> Vec<(&'static str, usize)> {
        vec![("prompts_per_round", self.prompts_per_round)]
    }

    fn run(&self, ctx: &StageContext) -> Result<serde_json::Value, StageError> {
        collect(self, ctx).map_err(|e| StageError::Config(format!("{e:#}")))
    }
}

/// Samples, ranks and writes the round; returns its summary (also in
/// `summary.json`).
fn collect(cfg: &CollectConfig, ctx: &StageContext) -> anyhow::Result<serde_json::Value> {
    let ranks: &Ranks = &ctx.ranks;
    let policy = Model::load(&cfg.policy, HeadChoice::Want(Head::Lm), ctx.device)?;
    let table = read_table(&cfg.prompts)?;
    let chat = ChatTemplate::for_tokenizer(&policy.tokenizer);
    let all_prompts = prompt_texts(&table, &cfg.prompts, &chat)?;
    let seed = cfg.seed.unwrap_or(0) ^ (cfg.round as u64).wrapping_mul(0x51_7c_c1_b7);
    let prompts: Vec<String> = epoch_order(all_prompts.len(), seed, 0)
        .into_iter()
        .take(cfg.prompts_per_round)
        .map(|i| all_prompts[i].clone())
        .collect();
    // Each rank answers its share of the prompts, with its own draws (rank
    // 0's are a single process's); rank 0 ranks and writes them all.
    tch::manual_seed((seed as i64).wrapping_add((ranks.rank() as i64) << 32));
    let answered = answer_prompts(
        &policy,
        &prompts[ranks.share(prompts.len())],
        cfg.k,
        &cfg.sampling,
        ANSWER_BATCH,
        ctx.device,
    )?;
    let texts = answered.texts(&policy.tokenizer)?;
    let mine: Vec<Vec<String>> = texts.chunks(cfg.k).map(<[String]>::to_vec).collect();
    let mut answers: Vec<Vec<String>> = Vec::new();
    let bytes = serde_json::to_vec(&mine)?;
    for (rank, part) in ranks.all_gather_bytes(&bytes)?.iter().enumerate() {
        let part: Vec<Vec<String>> = serde_json::from_slice(part)
            .with_context(|| format!("rank {rank}'s answers did not decode"))?;
        answers.extend(part);
    }
    if !ranks.is_main() {
        return Ok(serde_json::Value::Null);
    }
    let groups: Vec<(String, Vec<String>)> = prompts.into_iter().zip(answers).collect();
    let (ranked, labels) = rank_groups(cfg, groups, ctx.device)?;
    let mut new = Vec::new();
    let mut all_tied = 0;
    for g in ranked {
        if g.pairs().is_empty() {
            all_tied += 1; // every answer ranked equal: nothing to learn
        } else {
            new.push(g);
        }
    }
    let n_new = new.len();
    let (groups, round_col, policy_col) = with_base(cfg, new)?;
    write_rankings(&ctx.out_dir, &groups, &round_col, &policy_col)?;
    let summary = serde_json::json!({"round": cfg.round, "new_groups": n_new, "all_tied_dropped": all_tied, "total_groups": groups.len(), "labels": labels});
    tracing::info!(
        "round {}: {n_new} new ranked group(s), {} in all",
        cfg.round,
        groups.len()
    );
    let text = serde_json::to_string_pretty(&summary)?;
    rlhf_datasets::atomic::write_file(
        &ctx.out_dir.join(crate::run_folder::SUMMARY_FILE),
        text.as_bytes(),
    )?;
    Ok(summary)
}

/// The rankings and their checksum list, in a temporary folder renamed
/// to `checkpoint/`: a collection cut short leaves nothing finished.
fn write_rankings(
    out_dir: &Path,
    groups: &[RankedGroup],
    round_col: &[i64],
    policy_col: &[String],
) -> anyhow::Result<()> {
    let done = out_dir.join(FINAL_DIR);
    let tmp = out_dir.join(format!(".{FINAL_DIR}.tmp"));
    for dir in [&tmp, &done] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_ranked_groups(&tmp.join(PREFERENCES_FILE), groups, round_col, policy_col)?;
    rlhf_datasets::checksum::write(&tmp)?;
    std::fs::rename(&tmp, &done)
        .with_context(|| format!("renaming {} to {}", tmp.display(), done.display()))?;
    Ok(())
}

/// The round's groups ranked by its labeller; for people, their labels'
/// summary too (agreement, skips).
fn rank_groups(
    cfg: &CollectConfig,
    groups: Vec<(String, Vec<String>)>,
    device: tch::Device,
) -> anyhow::Result<(Vec<RankedGroup>, serde_json::Value)> {
    let mut labels = serde_json::Value::Null;
    let ranked = match &cfg.labeller {
        Labeller::Web {
            labels_per_group,
            bind,
            timeout_seconds,
            guidelines,
        } => {
            let web = WebRound {
                queue: cfg.queue.clone(),
                round: cfg.round as i64,
                policy: cfg.policy.display().to_string(),
                serve: crate::label::ServeOptions {
                    bind: bind.parse()?,
                    labels_per_group: *labels_per_group,
                    guidelines: guidelines.clone(),
                },
                timeout: std::time::Duration::from_secs_f64(*timeout_seconds),
            };
            let (ranked, summary) = web.label(&groups)?;
            labels = serde_json::to_value(summary)?;
            ranked
        }
        other => {
            let rankings = match other {
                Labeller::RewardModel { model } => {
                    programs::rank_by_reward_model(model, &groups, device)?
                }
                _ => programs::rank(other, &groups)?,
            };
            groups
                .into_iter()
                .zip(rankings)
                .map(|((prompt, responses), ranking)| RankedGroup {
                    prompt,
                    responses,
                    ranking,
                    margin: 0.0,
                })
                .collect()
        }
    };
    Ok((ranked, labels))
}

/// The round's data: every group so far (with its provenance where the base
/// file has it) and the new ones, with their round and policy columns.
fn with_base(
    cfg: &CollectConfig,
    new: Vec<RankedGroup>,
) -> anyhow::Result<(Vec<RankedGroup>, Vec<i64>, Vec<String>)> {
    // Everything so far, with its provenance where the file has it.
    let base_table = read_table(&cfg.base)?;
    let base = ranked_groups(&base_table, &cfg.base)?;
    if let Some(note) = base.skipped_note() {
        tracing::warn!("{}: {note}", cfg.base.display());
    }
    // Provenance of the kept rows, where the file has it.
    let rounds: Vec<i64> = match base_table.column("round").ok().and_then(|c| c.i64().ok()) {
        Some(c) => base.rows.iter().map(|&i| c.get(i).unwrap_or(0)).collect(),
        None => vec![0; base.groups.len()],
    };
    let policies: Vec<String> = match base_table.column("policy").ok().and_then(|c| c.str().ok()) {
        Some(c) => base
            .rows
            .iter()
            .map(|&i| c.get(i).unwrap_or("").to_owned())
            .collect(),
        None => vec![String::new(); base.groups.len()],
    };
    let base = base.groups;
    let n_new = new.len();
    let mut groups = base;
    groups.extend(new);
    let mut round_col = rounds;
    round_col.extend(std::iter::repeat_n(cfg.round as i64, n_new));
    let mut policy_col = policies;
    policy_col.extend(std::iter::repeat_n(cfg.policy.display().to_string(), n_new));
    Ok((groups, round_col, policy_col))
}

/// A round labelled by people: its queue, served until every group has
/// its labels.
struct WebRound {
    queue: PathBuf,
    round: i64,
    policy: String,
    serve: crate::label::ServeOptions,
    timeout: std::time::Duration,
}

impl WebRound {
    /// The round's rankings (one group per ranking given: with two
    /// labellers a group counts twice, as InstructGPT's comparisons do)
    /// and the labels in numbers.
    fn label(
        &self,
        groups: &[(String, Vec<String>)],
    ) -> anyhow::Result<(Vec<RankedGroup>, rlhf_datasets::labels::LabelSummary)> {
        use rlhf_datasets::labels::{Group, Queue};
        let groups: Vec<Group> = groups
            .iter()
            .map(|(prompt, responses)| Group {
                prompt: prompt.clone(),
                responses: responses.clone(),
                round: self.round,
                policy: self.policy.clone(),
            })
            .collect();
        // Written once: a rerun keeps the groups and the labels given; a
        // queue of other answers (a retrained policy) is moved aside.
        let per_group = self.serve.labels_per_group;
        let (mut queue, moved) = Queue::open_for_round(&self.queue, &groups, per_group)?;
        if let Some(old) = moved {
            tracing::warn!(
                "round {}: {} held other answers than this round sampled (the policy changed); it was moved, with its labels, to {}",
                self.round,
                self.queue.display(),
                old.display()
            );
        }
        if let Some(g) = &self.serve.guidelines {
            let to = self.queue.join(crate::label::GUIDELINES_FILE);
            rlhf_datasets::files::bounded_size(g, 1 << 20, "the limit for guidelines")
                .map_err(|e| anyhow::anyhow!("labeller.guidelines {}: {e}", g.display()))?;
            let text =
                std::fs::read(g).with_context(|| format!("labeller.guidelines {}", g.display()))?;
            rlhf_datasets::atomic::write_file(&to, &text)?;
        }
        if !queue.done() {
            let (left, total) = queue.progress();
            tracing::info!(
                "round {}: {left} of {total} groups await labels in {}; make a labeller's token with `rlhf label token NAME --queue {}`",
                self.round,
                self.queue.display(),
                self.queue.display()
            );
            queue = crate::label::serve_until_labelled(queue, &self.serve, self.timeout)?;
        }
        let (ranked, dropped) = queue.ranked_groups();
        if dropped > 0 {
            tracing::info!(
                "round {}: {dropped} label(s) skipped or not rankable, left out",
                self.round
            );
        }
        if let Some((agree, tau)) = queue.agreement() {
            tracing::info!(
                "round {}: labellers agree on {:.1}% of answer pairs (Kendall's tau {tau:.2})",
                self.round,
                100.0 * agree
            );
        }
        Ok((ranked, queue.summary()))
    }
}
