//! `rlhf collect` (run by the loop): sample K answers per prompt from a
//! policy, have the labeller rank them, and write the round's preference
//! data: everything before plus the new rankings, with provenance.

use anyhow::Context;
use rlhf_datasets::batch::epoch_order;
use rlhf_datasets::load::{read_table, string_column};
use rlhf_datasets::preference::{ranked_groups, write_ranked_groups, RankedGroup};
use rlhf_stages::eval::answer::{answer_prompts, ANSWER_BATCH};
use rlhf_stages::model::device::parse_device;
use rlhf_stages::{Head, HeadChoice, Model};

use std::path::{Path, PathBuf};

use crate::cli::CollectArgs;
use crate::experiment::{Experiment, Labeller};
use crate::label::programs;

pub fn run(args: CollectArgs) -> anyhow::Result<()> {
    crate::exec::children::stop_when_orphaned();
    let exp = Experiment::load(&args.config, &args.overrides)?;
    let spec = exp
        .spec
        .rounds
        .as_ref()
        .context("the experiment has no `loop` section")?;
    let topology = rlhf_stages::dist::Topology::from_env()?;
    let device = super::stage::rank_device(parse_device(&exp.spec.device)?, topology.as_ref());
    crate::threads::apply(None, exp.spec.threads)?;
    let timeout = exp.spec.distributed.timeout_seconds;
    let ranks = super::stage::join_ranks(topology.as_ref(), device, timeout)?;
    let policy = Model::load(&args.policy, HeadChoice::Want(Head::Lm), device)?;
    let table = read_table(&spec.prompts)?;
    let all_prompts = string_column(&table, &spec.prompts, "prompt", "{prompt}")?;
    let seed = exp.spec.seed ^ (args.round as u64).wrapping_mul(0x51_7c_c1_b7);
    let prompts: Vec<String> = epoch_order(all_prompts.len(), seed, 0)
        .into_iter()
        .take(spec.prompts_per_round)
        .map(|i| all_prompts[i].clone())
        .collect();
    // Each rank answers its share of the prompts, with its own draws (rank
    // 0's are a single process's); rank 0 ranks and writes them all.
    tch::manual_seed((seed as i64).wrapping_add((ranks.rank() as i64) << 32));
    let answered = answer_prompts(
        &policy,
        &prompts[ranks.share(prompts.len())],
        spec.k,
        &spec.sampling,
        ANSWER_BATCH,
        device,
    )?;
    let texts = answered.texts(&policy.tokenizer)?;
    let mine: Vec<Vec<String>> = texts.chunks(spec.k).map(<[String]>::to_vec).collect();
    let mut answers: Vec<Vec<String>> = Vec::new();
    let bytes = serde_json::to_vec(&mine)?;
    for (rank, part) in ranks.all_gather_bytes(&bytes)?.iter().enumerate() {
        let part: Vec<Vec<String>> = serde_json::from_slice(part)
            .with_context(|| format!("rank {rank}'s answers did not decode"))?;
        answers.extend(part);
    }
    if !ranks.is_main() {
        return Ok(());
    }
    let groups: Vec<(String, Vec<String>)> = prompts.into_iter().zip(answers).collect();
    let (ranked, labels) = rank_groups(&args, &spec.labeller, groups)?;
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
    let (groups, round_col, policy_col) = with_base(&args, new)?;
    write_ranked_groups(&args.out, &groups, &round_col, &policy_col)?;
    println!(
        "{}",
        serde_json::json!({"round": args.round, "new_groups": n_new, "all_tied_dropped": all_tied, "total_groups": groups.len(), "labels": labels})
    );
    Ok(())
}

/// The round's groups ranked by its labeller; for people, their labels'
/// summary too (agreement, skips).
fn rank_groups(
    args: &CollectArgs,
    labeller: &Labeller,
    groups: Vec<(String, Vec<String>)>,
) -> anyhow::Result<(Vec<RankedGroup>, serde_json::Value)> {
    let mut labels = serde_json::Value::Null;
    let ranked = match labeller {
        Labeller::Web {
            labels_per_group,
            bind,
            timeout_seconds,
            guidelines,
        } => {
            let queue = args
                .out
                .parent()
                .unwrap_or(Path::new("."))
                .join(crate::run_folder::QUEUE_DIR);
            let web = WebRound {
                queue,
                round: args.round as i64,
                policy: args.policy.display().to_string(),
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
            let rankings = programs::rank(other, &groups)?;
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
    args: &CollectArgs,
    new: Vec<RankedGroup>,
) -> anyhow::Result<(Vec<RankedGroup>, Vec<i64>, Vec<String>)> {
    // Everything so far, with its provenance where the file has it.
    let base_table = read_table(&args.base)?;
    let base = ranked_groups(&base_table, &args.base)?;
    if let Some(note) = base.skipped_note() {
        tracing::warn!("{}: {note}", args.base.display());
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
    round_col.extend(std::iter::repeat_n(args.round as i64, n_new));
    let mut policy_col = policies;
    policy_col.extend(std::iter::repeat_n(
        args.policy.display().to_string(),
        n_new,
    ));
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
