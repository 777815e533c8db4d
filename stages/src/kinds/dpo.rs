//! Direct preference optimisation (Rafailov et al., 2023): the policy
//! trained on rankings directly, with no reward model and no sampling.
//!
//! For a pair (chosen `w`, rejected `l`) of answers to one prompt, with
//! `h = [log pi(w) - log pi(l)] - [log ref(w) - log ref(l)]` (sums over the
//! answers' tokens, EOS included):
//!
//! - `sigmoid` (DPO): `-(1 - e) log s(beta h) - e log s(-beta h)`, with
//!   `e = label_smoothing` (cDPO; 0 is plain DPO);
//! - `ipo` (Azar et al., 2023): `(h - 1 / (2 beta))^2`, on log-probabilities
//!   averaged over each answer's tokens, as TRL computes it.
//!
//! Two losses need no reference (no reference pass), on log-probabilities
//! averaged over each answer's tokens, `w` and `l`:
//! - `simpo` (Meng et al., 2024): `-log s(beta (w - l) - gamma)` (with
//!   cDPO's smoothing), as TRL's `CPOTrainer` with `loss_type: simpo`;
//! - `orpo` (Hong et al., 2024): the chosen answer's NLL (its mean token
//!   loss) `- beta log s(log odds(w) - log odds(l))`, `odds(x) = e^x /
//!   (1 - e^x)`, the odds-ratio term as TRL's `ORPOTrainer`.
//!
//! `kto` (Ethayarajh et al., 2024) learns from answers labelled good or bad
//! on their own (TRL's unpaired `{prompt, completion, label}`, a thumbs
//! queue's labels, or rankings: best good, worst bad), with summed
//! log-probabilities and a KL estimate from mismatched answers, as TRL's
//! `KTOTrainer` ([`kto_losses`]). Its estimate is taken over a rank's share
//! of each micro-batch (TRL gathers it over the ranks), so a KTO run on
//! several ranks is close to, not equal to, one on one process.
//!
//! The implicit rewards are `beta (log pi(y) - log ref(y))`; metrics use
//! TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
//! `rewards/accuracies`). Rankings are read as the reward model reads them
//! (pairwise, implicit prompt, K-wise: C(K,2) pairs, ties skipped), each
//! prompt weighing the same in a batch. The reference's log-probabilities
//! are computed once, before the first step, and kept in the stage folder
//! (`reference_logps.json`), so a resumed run reads them back.

use std::path::PathBuf;
use std::time::Instant;

use rlhf_datasets::batch::{collate_groups, train_eval_split, GroupBatch, TokenizedGroup};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::check;
use crate::kind::{KindConfig, LoopRole, PathSetting, Plot, Produces};
use crate::model::checkpoint::{HeadChoice, Model};
use crate::model::gpt::Head;
use crate::model::network::Network;
use crate::optim::{AdamWConfig, LrSchedule};
use crate::train::{
    finish, fit, learning, write_summary, Evaluation, FitRun, Objective, Ratio, Share,
    StageContext, StageError, Tokens, TrainSettings, SAMPLES_AFTER,
};

/// Where the reference's log-probabilities are kept in the stage folder.
pub const REFERENCE_FILE: &str = "reference_logps.json";

/// Settings of a DPO stage (`kind: dpo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// `batch_size` counts prompts (each with its ranked answers).
    #[serde(flatten, skip_deserializing)]
    pub train: TrainSettings,
    /// The model to train (the SFT stage, or a folder); unset: a random
    /// model of the experiment's shape.
    pub policy: Option<PathBuf>,
    /// The frozen reference; unset: the policy as it starts.
    pub reference: Option<PathBuf>,
    /// Rankings: pairwise, implicit-prompt pairwise or K-wise rows.
    pub data: PathBuf,
    /// Held-out rankings for eval; unset: `eval_fraction` of `data`.
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    pub max_len: usize,
    /// How far the policy may move from the reference (DPO's beta).
    pub beta: f64,
    pub loss: DpoLoss,
    /// cDPO's share of labels assumed flipped (sigmoid and simpo).
    pub label_smoothing: f64,
    /// SimPO's target reward margin (gamma).
    #[serde(skip_serializing_if = "is_default_gamma")]
    pub simpo_gamma: f64,
    /// KTO's weight of a good answer's loss (TRL's `desirable_weight`).
    #[serde(skip_serializing_if = "is_one")]
    pub desirable_weight: f64,
    /// KTO's weight of a bad answer's loss.
    #[serde(skip_serializing_if = "is_one")]
    pub undesirable_weight: f64,
    /// Prompts to answer greedily before and after training, scored by
    /// the judge: the stage is flagged when its answers score no better.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_prompts: Option<PathBuf>,
    #[serde(skip_serializing_if = "is_default_eval_tokens")]
    pub eval_max_new_tokens: i64,
}

const DEFAULT_EVAL_TOKENS: i64 = 24;

fn is_default_eval_tokens(n: &i64) -> bool {
    *n == DEFAULT_EVAL_TOKENS
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

const DEFAULT_SIMPO_GAMMA: f64 = 0.5;

fn is_default_gamma(gamma: &f64) -> bool {
    *gamma == DEFAULT_SIMPO_GAMMA
}

/// The preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    #[default]
    Sigmoid,
    Ipo,
    /// Reference-free, length-normalised, with a margin (SimPO).
    Simpo,
    /// Reference-free: an odds-ratio term plus the chosen answer's NLL.
    Orpo,
    /// Answers labelled good or bad on their own (KTO).
    Kto,
}

impl DpoLoss {
    /// Whether the loss compares with a frozen reference (SimPO and ORPO
    /// do not: no reference pass).
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Sigmoid | Self::Ipo | Self::Kto)
    }

    /// Whether answers are compared by their mean token log-probability
    /// (as TRL's IPO, SimPO and ORPO), not their sum.
    fn per_token(self) -> bool {
        matches!(self, Self::Ipo | Self::Simpo | Self::Orpo)
    }
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            train: TrainSettings::new(
                8,
                1,
                AdamWConfig {
                    lr: 1e-5,
                    weight_decay: 0.0,
                    ..AdamWConfig::default()
                },
                LrSchedule {
                    warmup_steps: 10,
                    min_lr_ratio: 0.1,
                },
            ),
            policy: None,
            reference: None,
            data: PathBuf::new(),
            eval_data: None,
            eval_fraction: 0.05,
            max_len: 128,
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            simpo_gamma: DEFAULT_SIMPO_GAMMA,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            eval_prompts: None,
            eval_max_new_tokens: DEFAULT_EVAL_TOKENS,
        }
    }
}

impl KindConfig for DpoConfig {
    const KIND: &'static str = "dpo";
    const PRODUCES: Produces = Produces::Policy;
    const LOOP_ROLE: LoopRole = LoopRole::LearnsFromRankings;
    const PLOTS: &'static [Plot] = &[Plot::Loss {
        file: "dpo_loss.png",
        title: "DPO loss (per ranked pair)",
    }];
    type Summary = DpoSummary;

    fn validate(&self) -> Result<(), StageError> {
        check::at_least("eval_max_new_tokens", self.eval_max_new_tokens, 1)?;
        self.train.validate()?;
        check::example_split(self.eval_fraction, self.max_len)?;
        check::require(
            "beta",
            self.beta.is_finite() && self.beta > 0.0 && self.beta <= 100.0,
            "in (0, 100]",
            self.beta,
        )?;
        check::require(
            "label_smoothing",
            (0.0..0.5).contains(&self.label_smoothing),
            "in [0, 0.5)",
            self.label_smoothing,
        )?;
        if !matches!(self.loss, DpoLoss::Sigmoid | DpoLoss::Simpo) && self.label_smoothing > 0.0 {
            return Err(StageError::setting(
                "label_smoothing",
                "applies to `loss: sigmoid` (cDPO) and `loss: simpo` only",
            ));
        }
        let gamma = self.simpo_gamma;
        check::require(
            "simpo_gamma",
            gamma.is_finite() && (0.0..=100.0).contains(&gamma),
            "in [0, 100]",
            gamma,
        )?;
        for (name, w) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            check::require(
                name,
                w.is_finite() && w > 0.0 && w <= 100.0,
                "in (0, 100]",
                w,
            )?;
            if self.loss != DpoLoss::Kto && w != 1.0 {
                return Err(StageError::setting(name, "applies to `loss: kto` only"));
            }
        }
        if self.loss == DpoLoss::Kto && self.train.batch_size < 2 {
            return Err(StageError::setting(
                "batch_size",
                "KTO estimates its KL term from the other answers of a batch: at least 2",
            ));
        }
        if !self.loss.needs_reference() && self.reference.is_some() {
            return Err(StageError::setting(
                "reference",
                "SimPO and ORPO use no reference model: remove `reference`",
            ));
        }
        Ok(())
    }

    fn paths(&mut self) -> Vec<PathSetting<'_>> {
        vec![
            PathSetting::data(
                "data",
                match self.loss {
                    DpoLoss::Kto => crate::objectives::unpaired::LABELLED_ABOUT,
                    _ => crate::objectives::rankings::RANKINGS_ABOUT,
                },
                &mut self.data,
            ),
            PathSetting::optional_data("eval_data", &mut self.eval_data),
            PathSetting::optional_model("policy", &mut self.policy),
            PathSetting::optional_model("reference", &mut self.reference),
            PathSetting::optional_data("eval_prompts", &mut self.eval_prompts),
        ]
    }

    fn run(&self, ctx: &StageContext) -> Result<DpoSummary, StageError> {
        run(self, ctx)
    }

    fn train(&mut self) -> Option<&mut TrainSettings> {
        Some(&mut self.train)
    }
}

/// Log-probabilities of the pairs of a batch: the policy's and the
/// reference's, of the chosen and of the rejected answer, one per pair.
#[derive(Debug)]
pub struct PairLogps {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub reference_chosen: Tensor,
    pub reference_rejected: Tensor,
}

/// Per pair: the loss, and the chosen and rejected answers' implicit
/// rewards `beta (log pi - log ref)`.
pub fn pair_losses(
    loss: DpoLoss,
    beta: f64,
    label_smoothing: f64,
    p: &PairLogps,
) -> (Tensor, Tensor, Tensor) {
    let chosen = &p.policy_chosen - &p.reference_chosen;
    let rejected = &p.policy_rejected - &p.reference_rejected;
    let h = &chosen - &rejected;
    let losses = match loss {
        DpoLoss::Sigmoid => {
            -(&h * beta).log_sigmoid() * (1.0 - label_smoothing)
                - (&h * -beta).log_sigmoid() * label_smoothing
        }
        DpoLoss::Ipo => (h - 1.0 / (2.0 * beta)).square(),
        DpoLoss::Simpo | DpoLoss::Orpo | DpoLoss::Kto => {
            panic!("{loss:?} is not a pair loss with a reference")
        }
    };
    (losses, chosen * beta, rejected * beta)
}

/// `log(1 - e^x)` for `x < 0`, without cancellation near 0 (TRL's
/// `log1mexp`).
fn log1mexp(x: &Tensor) -> Tensor {
    let near = (-x.expm1()).log();
    let far = (-x.exp()).log1p();
    far.where_self(&x.lt(-std::f64::consts::LN_2), &near)
}

/// KTO's losses (Ethayarajh et al., 2024), as TRL's `KTOTrainer.kto_loss`
/// computes them: for answers labelled good or bad (`desirable`), each
/// with its summed log-probability under the policy and the reference,
/// and a KL estimate from mismatched answers (`policy_kl`, `reference_kl`:
/// `z = max(0, mean(policy_kl - reference_kl))`, no gradient), a good
/// answer's loss is `w_d (1 - s(beta (r - z)))` and a bad one's `w_u (1 -
/// s(beta (z - r)))`, with `r` the answer's log-ratio to the reference.
/// The losses in the answers' order, their implicit rewards `beta r`, and
/// `z`.
#[allow(clippy::too_many_arguments)]
pub fn kto_losses(
    policy: &Tensor,
    reference: &Tensor,
    desirable: &Tensor,
    policy_kl: &Tensor,
    reference_kl: &Tensor,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> (Tensor, Tensor, Tensor) {
    let kl = (policy_kl - reference_kl)
        .mean(policy.kind())
        .detach()
        .clamp_min(0.0);
    let ratio = policy - reference;
    let good = ((&ratio - &kl) * beta).sigmoid().neg() + 1.0;
    let bad = ((&kl - &ratio) * beta).sigmoid().neg() + 1.0;
    let losses = (good * desirable_weight).where_self(desirable, &(bad * undesirable_weight));
    (losses, ratio.detach() * beta, kl)
}

/// Per pair of answers with mean token log-probabilities `chosen` and
/// `rejected`: the SimPO or ORPO loss and the implicit rewards `beta x`
/// TRL logs.
pub fn reference_free_losses(
    loss: DpoLoss,
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
    chosen: &Tensor,
    rejected: &Tensor,
) -> (Tensor, Tensor, Tensor) {
    let losses = match loss {
        DpoLoss::Simpo => {
            let logits = (chosen - rejected - gamma / beta) * beta;
            -logits.log_sigmoid() * (1.0 - label_smoothing)
                - (-logits).log_sigmoid() * label_smoothing
        }
        DpoLoss::Orpo => {
            let log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected));
            -chosen - log_odds.log_sigmoid() * beta
        }
        DpoLoss::Sigmoid | DpoLoss::Ipo | DpoLoss::Kto => {
            panic!("{loss:?} compares with a reference")
        }
    };
    (losses, chosen * beta, rejected * beta)
}

/// IPO compares log-probabilities averaged over each answer's tokens, as
/// TRL computes it: `logps` summed over `tokens` tokens per row.
pub fn per_token(logps: &Tensor, tokens: &Tensor) -> Tensor {
    logps / tokens.clamp_min(1.0)
}

/// Per row of `batch`: the summed log-probability of its answer's tokens
/// (EOS included) given what precedes them, and how many there are.
pub fn answer_logps(
    model: &Network,
    batch: &GroupBatch,
    device: Device,
    train: bool,
) -> (Tensor, Tensor) {
    let (rows, width) = (batch.rows as i64, batch.width as i64);
    let ids = Tensor::from_slice(&batch.input_ids)
        .view([rows, width])
        .to_device(device);
    if model.has_real_vocabulary() {
        return answer_logps_sparse(model, batch, &ids, device, train);
    }
    let logits = model.forward_logits(&ids, None, train);
    let next = width - 1;
    let lp =
        crate::model::score::gather_logprobs(&logits.narrow(1, 0, next), &ids.narrow(1, 1, next));
    // Position p predicts token p + 1: the answer's tokens are predicted
    // from answer_start - 1 to last_index - 1.
    let pos = Tensor::arange(next, (Kind::Int64, device)).unsqueeze(0);
    let start = (Tensor::from_slice(&batch.answer_start).to_device(device) - 1).unsqueeze(1);
    let end = (Tensor::from_slice(&batch.last_index).to_device(device) - 1).unsqueeze(1);
    let mask = pos
        .ge_tensor(&start)
        .logical_and(&pos.le_tensor(&end))
        .to_kind(Kind::Float);
    let sum = (lp * &mask).sum_dim_intlist(1, false, Kind::Float);
    (sum, mask.sum_dim_intlist(1, false, Kind::Float))
}

/// [`answer_logps`] with logits at the answers' positions only.
fn answer_logps_sparse(
    model: &Network,
    batch: &GroupBatch,
    ids: &Tensor,
    device: Device,
    train: bool,
) -> (Tensor, Tensor) {
    let width = batch.width;
    // Hidden state p predicts token p + 1.
    let (mut rows, mut targets, mut counts) = (vec![], vec![], vec![]);
    for r in 0..batch.rows {
        // A first token has no context: an answer starting there loses it,
        // as in the dense path.
        let start = (batch.answer_start[r] as usize).max(1);
        let last = batch.last_index[r] as usize;
        counts.push((last + 1).saturating_sub(start) as f32);
        for t in start..=last {
            rows.push((r * width + t - 1) as i64);
            targets.push(batch.input_ids[r * width + t]);
        }
    }
    let hidden = model.hidden(ids, None, None, train);
    let lp = crate::model::score::logprobs_at(
        model,
        &hidden,
        &Tensor::from_slice(&rows).to_device(device),
        &Tensor::from_slice(&targets).to_device(device),
    );
    // Each value into its own slot, then ordered row sums: index_add's
    // atomic adds on CUDA would sum in no fixed order (no exact resume).
    let rows_t = Tensor::from_slice(&rows).to_device(device);
    let slots = Tensor::zeros([(batch.rows * width) as i64], (Kind::Float, device))
        .index_copy(0, &rows_t, &lp)
        .view([batch.rows as i64, width as i64]);
    let sum = slots.sum_dim_intlist(1, false, Kind::Float);
    (sum, Tensor::from_slice(&counts).to_device(device))
}

/// A prompt's ranked answers and the reference's log-probability of each;
/// for KTO, one labelled answer and its mismatched answer.
#[derive(Debug, Clone)]
pub struct DpoExample {
    pub group: TokenizedGroup,
    pub reference: Vec<f64>,
    /// KTO's label: whether the answer is good.
    pub desirable: Option<bool>,
}

/// A collated batch and the reference's log-probabilities of its rows.
#[derive(Debug)]
pub struct DpoBatch {
    pub groups: GroupBatch,
    pub reference: Vec<f32>,
    /// KTO's labels, one per group.
    pub desirable: Vec<bool>,
}

impl Tokens for DpoBatch {
    fn tokens(&self) -> usize {
        self.groups.tokens()
    }

    fn real_tokens(&self) -> usize {
        self.groups.real_tokens()
    }
}

fn collate(examples: &[&DpoExample], pad: i64) -> DpoBatch {
    let groups: Vec<&TokenizedGroup> = examples.iter().map(|e| &e.group).collect();
    DpoBatch {
        groups: collate_groups(&groups, pad),
        reference: examples
            .iter()
            .flat_map(|e| e.reference.iter().map(|&x| x as f32))
            .collect(),
        desirable: examples.iter().filter_map(|e| e.desirable).collect(),
    }
}

/// What one forward of a batch gives: the losses (per pair, or per KTO
/// answer) and their weights (each prompt, or each answer, weighs the
/// same), the implicit rewards of the chosen (good) and rejected (bad)
/// answers, and how many pairs or answers the rewards judge right.
struct Forward {
    losses: Tensor,
    weight: Tensor,
    chosen: Vec<f64>,
    rejected: Vec<f64>,
    right: usize,
    judged: usize,
    /// KTO's KL estimate.
    kl: Option<f64>,
}

impl Forward {
    /// Pairs: right when the chosen answer's reward is the larger.
    fn of_pairs(losses: Tensor, weight: Tensor, chosen: &Tensor, rejected: &Tensor) -> Self {
        let (chosen, rejected) = (to_vec(chosen), to_vec(rejected));
        let right = chosen.iter().zip(&rejected).filter(|(c, r)| c > r).count();
        Forward {
            losses,
            weight,
            judged: chosen.len(),
            chosen,
            rejected,
            right,
            kl: None,
        }
    }
}

fn forward(cfg: &DpoConfig, model: &Network, b: &DpoBatch, device: Device, train: bool) -> Forward {
    let (mut policy, count) = answer_logps(model, &b.groups, device, train);
    let mut reference = Tensor::from_slice(&b.reference).to_device(device);
    if cfg.loss.per_token() {
        policy = per_token(&policy, &count);
        reference = per_token(&reference, &count);
    }
    if cfg.loss == DpoLoss::Kto {
        return kto_forward(cfg, &policy, &reference, &b.desirable);
    }
    let pick =
        |t: &Tensor, rows: &[i64]| t.index_select(0, &Tensor::from_slice(rows).to_device(device));
    let weight = Tensor::from_slice(&b.groups.pair_weight).to_device(device);
    let (losses, chosen, rejected) = match cfg.loss.needs_reference() {
        false => reference_free_losses(
            cfg.loss,
            cfg.beta,
            cfg.simpo_gamma,
            cfg.label_smoothing,
            &pick(&policy, &b.groups.better),
            &pick(&policy, &b.groups.worse),
        ),
        true => {
            let logps = PairLogps {
                policy_chosen: pick(&policy, &b.groups.better),
                policy_rejected: pick(&policy, &b.groups.worse),
                reference_chosen: pick(&reference, &b.groups.better),
                reference_rejected: pick(&reference, &b.groups.worse),
            };
            pair_losses(cfg.loss, cfg.beta, cfg.label_smoothing, &logps)
        }
    };
    Forward::of_pairs(losses, weight, &chosen, &rejected)
}

/// KTO over rows in pairs (each answer, then its mismatched answer): an
/// answer is judged right when its log-ratio is on its label's side of the
/// KL estimate.
fn kto_forward(
    cfg: &DpoConfig,
    policy: &Tensor,
    reference: &Tensor,
    desirable: &[bool],
) -> Forward {
    let device = policy.device();
    let n = desirable.len() as i64;
    let rows = |first: i64| Tensor::arange_start_step(first, 2 * n, 2, (Kind::Int64, device));
    let (answers, others) = (rows(0), rows(1));
    let label = Tensor::from_slice(desirable).to_device(device);
    let (losses, rewards, kl) = kto_losses(
        &policy.index_select(0, &answers),
        &reference.index_select(0, &answers),
        &label,
        &policy.index_select(0, &others).detach(),
        &reference.index_select(0, &others),
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    );
    let kl = kl.double_value(&[]);
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    let mut right = 0;
    for (&good, reward) in desirable.iter().zip(to_vec(&rewards)) {
        let above = reward > cfg.beta * kl;
        right += usize::from(good == above);
        match good {
            true => chosen.push(reward),
            false => rejected.push(reward),
        }
    }
    Forward {
        weight: Tensor::full([n], 1.0 / n as f64, (Kind::Float, device)),
        losses,
        chosen,
        rejected,
        right,
        judged: desirable.len(),
        kl: Some(kl),
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::try_from(t.detach().to_kind(Kind::Double).to_device(Device::Cpu)).unwrap_or_default()
}

/// Held-out quality of a DPO policy, as TRL reports it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct DpoEval {
    pub loss: f64,
    /// Share of pairs whose chosen answer gets the larger implicit reward.
    pub accuracy: f64,
    pub rewards_chosen: f64,
    pub rewards_rejected: f64,
    pub margins: f64,
    /// Pairs judged (KTO: labelled answers, judged against the KL
    /// estimate).
    pub pairs: usize,
}

impl Evaluation for DpoEval {
    fn loss(&self) -> f64 {
        self.loss
    }
    fn record(&self, record: &mut serde_json::Value) {
        record["eval_loss"] = json!(self.loss);
        record["eval_rewards/accuracies"] = json!(self.accuracy);
        record["eval_rewards/chosen"] = json!(self.rewards_chosen);
        record["eval_rewards/rejected"] = json!(self.rewards_rejected);
        record["eval_rewards/margins"] = json!(self.margins);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DpoSummary {
    pub steps: i64,
    pub train_groups: usize,
    pub train_pairs: usize,
    /// Rows of `data` passed over as saying nothing.
    #[serde(default)]
    pub skipped_rows: usize,
    /// KTO: the good and the bad answers trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labelled: Option<Labelled>,
    pub eval: Option<DpoEval>,
    pub tokens_per_second: f64,
    pub wall_seconds: f64,
    /// Of `wall_seconds`, the reference's pass before the first step (0
    /// when read back on resume).
    #[serde(default)]
    pub reference_seconds: f64,
    /// The judge's mean score of greedy answers to `eval_prompts`: the
    /// starting policy's, the trained one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_gold_before: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_gold_after: Option<f64>,
    /// Why the stage may not have learnt, each naming its baseline (the
    /// eval loss at its start or by chance; the judge's score of the
    /// starting policy's answers) and the numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// KTO's training answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    pub desirable: usize,
    pub undesirable: usize,
}

/// The DPO loss over ranked groups: a step's loss is the mean over its
/// micro-batches of each prompt's mean pair loss.
struct Preferences<'a> {
    cfg: &'a DpoConfig,
    eval: Vec<&'a DpoExample>,
    eval_batch: usize,
    pad: i64,
    device: Device,
}

impl Objective for Preferences<'_> {
    type Example = DpoExample;
    type Batch = DpoBatch;
    type Eval = DpoEval;
    const LOSS: &'static str = "DPO loss";

    fn collate(&self, examples: &[&DpoExample]) -> DpoBatch {
        collate(examples, self.pad)
    }

    fn length(&self, example: &DpoExample) -> usize {
        rlhf_datasets::batch::group_width(&example.group)
    }

    fn weight(&self, batch: &DpoBatch) -> f64 {
        batch.groups.groups as f64
    }

    fn loss(&self, model: &Network, batch: &DpoBatch, share: &Share) -> (Tensor, Vec<Ratio>) {
        // Dropout off, as in the reference pass: at the first step h = 0.
        let f = forward(self.cfg, model, batch, self.device, false);
        let loss = (&f.losses * &f.weight).sum(Kind::Float) * (share.local / share.micro);
        (loss / share.micro_batches as f64, ratios(&f))
    }

    /// The loss of a policy equal to its reference: `h = 0`.
    fn chance_loss(&self) -> Option<f64> {
        Some(match self.cfg.loss {
            DpoLoss::Sigmoid => std::f64::consts::LN_2,
            DpoLoss::Ipo => (0.5 / self.cfg.beta).powi(2),
            // Every answer's loss is its weight times 1 - s(0).
            DpoLoss::Kto if self.cfg.desirable_weight == self.cfg.undesirable_weight => {
                0.5 * self.cfg.desirable_weight
            }
            DpoLoss::Kto => return None,
            // Their loss at the start depends on the policy's answers.
            DpoLoss::Simpo | DpoLoss::Orpo => return None,
        })
    }

    fn evaluate(&self, model: &Network) -> Option<DpoEval> {
        if self.eval.is_empty() {
            return None;
        }
        tch::no_grad(|| {
            let mut loss = 0.0;
            let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
            let (mut right, mut judged) = (0, 0);
            for chunk in self.eval.chunks(self.eval_batch.max(1)) {
                let b = collate(chunk, self.pad);
                let f = forward(self.cfg, model, &b, self.device, false);
                let l = (&f.losses * &f.weight).sum(Kind::Double).double_value(&[]);
                loss += l * chunk.len() as f64;
                chosen.extend(f.chosen);
                rejected.extend(f.rejected);
                (right, judged) = (right + f.right, judged + f.judged);
            }
            let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
            Some(DpoEval {
                loss: loss / self.eval.len() as f64,
                accuracy: right as f64 / judged.max(1) as f64,
                rewards_chosen: mean(&chosen),
                rewards_rejected: mean(&rejected),
                margins: mean(&chosen) - mean(&rejected),
                pairs: judged,
            })
        })
    }
}

/// A forward's metrics, under TRL's names: per pair (or per KTO answer)
/// means, KTO's KL estimate per micro-batch.
fn ratios(f: &Forward) -> Vec<Ratio> {
    let sum = |xs: &[f64]| xs.iter().sum::<f64>();
    let ratio = |name, num, den: usize| Ratio {
        name,
        num,
        den: den as f64,
    };
    let mut out = vec![
        ratio("rewards/accuracies", f.right as f64, f.judged),
        ratio("rewards/chosen", sum(&f.chosen), f.chosen.len()),
        ratio("rewards/rejected", sum(&f.rejected), f.rejected.len()),
    ];
    match f.kl {
        Some(kl) => out.push(ratio("kl", kl, 1)),
        None => out.push(ratio(
            "rewards/margins",
            sum(&f.chosen) - sum(&f.rejected),
            f.judged,
        )),
    }
    out
}

/// The reference's log-probability of every answer of `groups`.
fn reference_logps(
    model: &Network,
    groups: &[TokenizedGroup],
    batch: usize,
    pad: i64,
    device: Device,
) -> Vec<Vec<f64>> {
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(groups.len());
        for chunk in groups.chunks(batch.max(1)) {
            let refs: Vec<&TokenizedGroup> = chunk.iter().collect();
            let (sum, _) = answer_logps(model, &collate_groups(&refs, pad), device, false);
            let mut rows = to_vec(&sum).into_iter();
            for g in chunk {
                out.push(rows.by_ref().take(g.responses.len()).collect());
            }
        }
        out
    })
}

/// The reference's log-probabilities of the training and held-out
/// rankings: read back from the stage folder, or computed (by `start`, the
/// policy before its first step, or by the `reference` model) and kept.
fn reference_of(
    cfg: &DpoConfig,
    ctx: &StageContext,
    start: &Model,
    fresh: bool,
    data: [&[TokenizedGroup]; 2],
) -> Result<[Vec<Vec<f64>>; 2], StageError> {
    let path = ctx.out_dir.join(REFERENCE_FILE);
    let fits = |kept: &[Vec<Vec<f64>>; 2]| {
        (0..2).all(|i| {
            kept[i].len() == data[i].len()
                && kept[i]
                    .iter()
                    .zip(data[i])
                    .all(|(r, g)| r.len() == g.responses.len())
        })
    };
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(kept) = serde_json::from_str::<[Vec<Vec<f64>>; 2]>(&text) {
            if fits(&kept) {
                return Ok(kept);
            }
        }
    }
    let loaded;
    let model = match (&cfg.reference, &cfg.policy, fresh) {
        (None, _, true) => start,
        (Some(dir), _, _) | (None, Some(dir), false) => {
            loaded = Model::load(dir, HeadChoice::Want(Head::Lm), ctx.device)?;
            &loaded
        }
        (None, None, false) => {
            return Err(StageError::setting(
                "reference",
                format!(
                    "{} is missing and the policy started from a random model: rerun the stage from the start (rlhf run --force STAGE)",
                    path.display()
                ),
            ))
        }
    };
    let (batch, pad) = (cfg.train.batch_size, model.tokenizer.pad_id());
    let answers: usize = data
        .iter()
        .flat_map(|d| d.iter().map(|g| g.responses.len()))
        .sum();
    tracing::info!("dpo: the reference's log-probabilities of {answers} answers, once");
    let t0 = Instant::now();
    let computed = data.map(|d| reference_logps(&model.net, d, batch, pad, ctx.device));
    tracing::info!(
        "dpo: reference done in {:.0} s, kept in {}",
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    if ctx.ranks.is_main() {
        let text = serde_json::to_vec(&computed).expect("numbers serialise");
        rlhf_datasets::atomic::write_file(&path, &text)?;
    }
    Ok(computed)
}

/// The examples of `path` (ranked groups, or KTO's labelled answers each
/// with its mismatched answer), their KTO labels, and the rows skipped.
type Loaded = (Vec<TokenizedGroup>, Vec<Option<bool>>, usize);

fn load_examples(
    cfg: &DpoConfig,
    path: &std::path::Path,
    model: &Model,
    max_len: usize,
) -> Result<Loaded, StageError> {
    if cfg.loss == DpoLoss::Kto {
        let l = crate::objectives::unpaired::load_labelled(path, model, max_len)?;
        return Ok((
            l.groups,
            l.desirable.into_iter().map(Some).collect(),
            l.skipped,
        ));
    }
    let (groups, skipped) = crate::objectives::rankings::load_groups(path, model, max_len)?;
    let labels = vec![None; groups.len()];
    Ok((groups, labels, skipped))
}

/// The training and held-out examples: their groups and labels with the
/// reference's log-probabilities (computed once by `start`, the policy
/// before its first step when `fresh`, or read back; zeros for a loss
/// without a reference).
fn with_reference(
    cfg: &DpoConfig,
    ctx: &StageContext,
    (start, fresh): (&Model, bool),
    sets: [(Vec<TokenizedGroup>, Vec<Option<bool>>); 2],
) -> Result<[Vec<DpoExample>; 2], StageError> {
    let [reference, held_out] = match cfg.loss.needs_reference() {
        true => reference_of(cfg, ctx, start, fresh, [&sets[0].0, &sets[1].0])?,
        false => [&sets[0].0, &sets[1].0]
            .map(|d| d.iter().map(|g| vec![0.0; g.responses.len()]).collect()),
    };
    Ok(sets
        .into_iter()
        .zip([reference, held_out])
        .map(|((groups, labels), reference)| {
            groups
                .into_iter()
                .zip(reference)
                .zip(labels)
                .map(|((group, reference), desirable)| DpoExample {
                    group,
                    reference,
                    desirable,
                })
                .collect()
        })
        .collect::<Vec<_>>()
        .try_into()
        .expect("two sets"))
}

/// KTO's good and bad training answers. KTO's paper and TRL advise
/// weights with `w_d n_d / (w_u n_u)` in [1, 4/3]; outside, say so (it
/// still runs).
fn kto_balance(cfg: &DpoConfig, examples: &[&DpoExample]) -> Labelled {
    let desirable = examples
        .iter()
        .filter(|e| e.desirable == Some(true))
        .count();
    let undesirable = examples.len() - desirable;
    log_kto_balance(cfg, desirable, undesirable);
    Labelled {
        desirable,
        undesirable,
    }
}

fn log_kto_balance(cfg: &DpoConfig, desirable: usize, undesirable: usize) {
    let ratio = (cfg.desirable_weight * desirable as f64)
        / (cfg.undesirable_weight * undesirable as f64).max(f64::MIN_POSITIVE);
    tracing::info!("kto: {desirable} good and {undesirable} bad answers");
    if !(1.0..=4.0 / 3.0).contains(&ratio) {
        tracing::warn!(
            "kto: desirable_weight x good / (undesirable_weight x bad) is {ratio:.2}; KTO's authors advise [1, 1.33]: set desirable_weight or undesirable_weight"
        );
    }
}

/// Runs (or resumes, or finds done) a DPO run.
pub fn run(cfg: &DpoConfig, ctx: &StageContext) -> Result<DpoSummary, StageError> {
    KindConfig::validate(cfg)?;
    let started = Instant::now();
    let train = &cfg.train;
    let run = FitRun::new("dpo", train, ctx);
    let start = match run.begin(Head::Lm, cfg.policy.as_deref(), ctx)? {
        Ok(start) => start,
        Err(done) => return Ok(done),
    };
    let max_len = cfg.max_len.min(start.model.net.n_positions() as usize);
    let load = |path: &std::path::Path| load_examples(cfg, path, &start.model, max_len);
    let (all, labels, skipped_rows) = load(&cfg.data)?;
    let (held_out, held_out_labels) = match &cfg.eval_data {
        Some(p) => {
            let (groups, labels, _) = load(p)?;
            (groups, labels)
        }
        None => (vec![], vec![]),
    };
    // Checked before the reference pass, the stage's first long step.
    crate::train::check_groups_memory(&start.model, all.iter(), train.batch_size, run.ranks)?;
    let fresh = start.state.is_none();
    let reference_started = Instant::now();
    let [all, held_out] = with_reference(
        cfg,
        ctx,
        (&start.model, fresh),
        [(all, labels), (held_out, held_out_labels)],
    )?;
    let reference_seconds = reference_started.elapsed().as_secs_f64();
    let (train_idx, eval_idx) = match &cfg.eval_data {
        Some(_) => ((0..all.len()).collect(), vec![]),
        None => train_eval_split(all.len(), cfg.eval_fraction, usize::MAX, train.seed()),
    };
    let examples: Vec<&DpoExample> = train_idx.iter().map(|&i| &all[i]).collect();
    let objective = Preferences {
        cfg,
        eval: match &cfg.eval_data {
            Some(_) => held_out.iter().collect(),
            None => eval_idx.iter().map(|&i| &all[i]).collect(),
        },
        eval_batch: train.batch_size,
        pad: start.model.tokenizer.pad_id(),
        device: ctx.device,
    };
    let train_pairs: usize = examples.iter().map(|e| e.group.pairs.len()).sum();
    let labelled = (cfg.loss == DpoLoss::Kto).then(|| kto_balance(cfg, &examples));
    tracing::info!(
        "dpo: {} train prompts ({train_pairs} pairs) / {} eval prompts, {} steps of {} prompts, beta {}, {:?} loss",
        examples.len(),
        objective.eval.len(),
        train.total_steps(examples.len()),
        train.batch_size * train.grad_accum,
        cfg.beta,
        cfg.loss
    );
    let main = run.ranks.is_main();
    let (prompts, max_new) = (cfg.eval_prompts.as_deref(), cfg.eval_max_new_tokens);
    // One process only: with several ranks, rank 0 would judge while the
    // others wait in fit's first collective, which has a timeout.
    let gold_before = match run.ranks.world() {
        1 => ctx.judged_start(&start.model, prompts, max_new, fresh)?,
        _ => None,
    };
    let fitted = fit(&run, start, &objective, &examples)?;
    let final_eval = objective.evaluate(&fitted.model.net).or(fitted.last_eval);
    finish(&run, &fitted)?;
    let gold_after = match main {
        true => ctx.judged_eval(&fitted.model, prompts, max_new, SAMPLES_AFTER)?,
        false => None,
    };
    let (gold_before, gold_after) = (gold_before.map(|j| j.mean), gold_after.map(|j| j.mean));
    let summary = DpoSummary {
        steps: fitted.steps,
        train_groups: examples.len(),
        train_pairs,
        skipped_rows,
        labelled,
        eval: final_eval,
        tokens_per_second: fitted.tokens_per_second,
        wall_seconds: started.elapsed().as_secs_f64(),
        reference_seconds,
        eval_gold_before: gold_before,
        eval_gold_after: gold_after,
        flags: learning::flags(
            main,
            [
                fitted.warning.clone(),
                learning::no_judge_gain("dpo", "the starting policy's", gold_before, gold_after),
            ],
        ),
    };
    if main {
        write_summary(&ctx.out_dir, &summary)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logps(pc: &[f64], pr: &[f64], rc: &[f64], rr: &[f64]) -> PairLogps {
        let t = |x: &[f64]| Tensor::from_slice(x);
        PairLogps {
            policy_chosen: t(pc),
            policy_rejected: t(pr),
            reference_chosen: t(rc),
            reference_rejected: t(rr),
        }
    }

    /// -log sigmoid(x)
    fn nls(x: f64) -> f64 {
        (1.0 + (-x).exp()).ln()
    }

    #[test]
    fn dpo_cdpo_and_ipo_losses_match_hand_computed_values() {
        // Pair 1: h = (-5 - -9) - (-6 - -7) = 3; pair 2: h = (-4 - -2) - (-3 - -3) = -2.
        let p = logps(&[-5.0, -4.0], &[-9.0, -2.0], &[-6.0, -3.0], &[-7.0, -3.0]);
        let beta = 0.1;
        let (l, chosen, rejected) = pair_losses(DpoLoss::Sigmoid, beta, 0.0, &p);
        let l = to_vec(&l);
        assert!(
            (l[0] - nls(0.3)).abs() < 1e-12 && (l[1] - nls(-0.2)).abs() < 1e-12,
            "{l:?}"
        );
        // Implicit rewards: beta (pi - ref).
        assert_eq!(to_vec(&chosen), [0.1, -0.1]);
        let r = to_vec(&rejected);
        assert!(
            (r[0] - 0.1 * -2.0).abs() < 1e-12 && (r[1] - 0.1 * 1.0).abs() < 1e-12,
            "{r:?}"
        );
        // cDPO: (1 - e) nls(beta h) + e nls(-beta h).
        let l = to_vec(&pair_losses(DpoLoss::Sigmoid, beta, 0.2, &p).0);
        let want = 0.8 * nls(0.3) + 0.2 * nls(-0.3);
        assert!((l[0] - want).abs() < 1e-12, "{} vs {want}", l[0]);
        // IPO: (h - 1 / (2 beta))^2 = (3 - 5)^2 and (-2 - 5)^2.
        assert_eq!(
            to_vec(&pair_losses(DpoLoss::Ipo, beta, 0.0, &p).0),
            [4.0, 49.0]
        );
        // By the numbers: nls(0.3) = 0.554355, nls(-0.2) = 0.798139.
        assert!((nls(0.3) - 0.554355).abs() < 1e-6 && (nls(-0.2) - 0.798139).abs() < 1e-6);
    }

    #[test]
    fn kto_losses_match_hand_computed_values() {
        // Log-ratios 1 (good) and -2 (bad); the KL pairs give z = 0.5.
        let f = |x: &[f64]| Tensor::from_slice(x);
        let (losses, rewards, z) = kto_losses(
            &f(&[-3.0, -6.0]),
            &f(&[-4.0, -4.0]),
            &Tensor::from_slice(&[true, false]),
            &f(&[-1.0, -2.0]),
            &f(&[-1.5, -2.5]),
            0.1,
            1.0,
            1.5,
        );
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = [
            1.0 - s(0.1 * (1.0 - 0.5)),
            1.5 * (1.0 - s(0.1 * (0.5 + 2.0))),
        ];
        let got = to_vec(&losses);
        assert!(
            (got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12,
            "{got:?}"
        );
        assert_eq!(to_vec(&rewards), [0.1, -0.2]);
        assert_eq!(z.double_value(&[]), 0.5);
    }

    #[test]
    fn a_kto_batch_reads_answers_and_mismatched_answers_in_turn() {
        // Rows: answer 0, its mismatched answer, answer 1, its mismatched.
        let policy = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0]);
        let reference = Tensor::from_slice(&[0.5f64, 1.0, 1.0, 1.0]);
        let cfg = DpoConfig {
            loss: DpoLoss::Kto,
            undesirable_weight: 2.0,
            ..DpoConfig::default()
        };
        let f = kto_forward(&cfg, &policy, &reference, &[true, false]);
        // z = mean(2 - 1, 4 - 1) = 2; log-ratios 0.5 (good) and 2 (bad).
        assert_eq!(f.kl, Some(2.0));
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = [1.0 - s(0.1 * (0.5 - 2.0)), 2.0 * (1.0 - s(0.0))];
        let got = to_vec(&f.losses);
        assert!((got[0] - want[0]).abs() < 1e-12 && (got[1] - want[1]).abs() < 1e-12);
        assert_eq!((f.chosen, f.rejected), (vec![0.05], vec![0.2]));
        // The good answer sits below z (wrong), the bad one not above (right).
        assert_eq!((f.right, f.judged), (1, 2));
        assert_eq!(to_vec(&f.weight), [0.5, 0.5]);
    }

    #[test]
    fn simpo_and_orpo_losses_match_hand_computed_values() {
        // Mean token log-probabilities: chosen -0.5, rejected -1.5.
        let (w, l) = (
            Tensor::from_slice(&[-0.5f64]),
            Tensor::from_slice(&[-1.5f64]),
        );
        // SimPO, beta 2, gamma 0.5: nls(2 (1 - 0.25)) = nls(1.5).
        let (loss, chosen, _) = reference_free_losses(DpoLoss::Simpo, 2.0, 0.5, 0.0, &w, &l);
        assert!((to_vec(&loss)[0] - nls(1.5)).abs() < 1e-12);
        assert_eq!(to_vec(&chosen), [-1.0]);
        // ORPO, beta 0.1: log odds(x) = x - ln(1 - e^x); NLL 0.5.
        let odds = |x: f64| x - (1.0 - x.exp()).ln();
        let want = 0.5 + 0.1 * nls(odds(-0.5) - odds(-1.5));
        let (loss, _, _) = reference_free_losses(DpoLoss::Orpo, 0.1, 0.0, 0.0, &w, &l);
        assert!(
            (to_vec(&loss)[0] - want).abs() < 1e-12,
            "{:?} vs {want}",
            to_vec(&loss)
        );
        // log(1 - e^x) on both sides of -ln 2, and near 0.
        for x in [-3.0f64, -0.7, -0.69, -1e-6] {
            let got = log1mexp(&Tensor::from_slice(&[x])).double_value(&[0]);
            assert!((got - (-x.exp_m1()).ln()).abs() < 1e-9, "{x}: {got}");
        }
    }

    #[test]
    fn answer_logps_sum_the_answer_tokens_only() {
        let _rng = crate::rng_lock();
        // A small vocabulary, and one large enough for logits at the
        // answers only.
        for vocab in [20, crate::model::score::SPARSE_LOGITS_VOCAB + 8] {
            answer_logps_by_hand(vocab);
        }
    }

    fn answer_logps_by_hand(vocab: i64) {
        let (_vs, net) = crate::tiny_gpt(5, vocab, 16, 1, Head::Lm);
        // Prompt [1, 2], answers [3, 4] and [5]; padded with 0.
        let group = TokenizedGroup {
            prompt: vec![1, 2],
            responses: vec![vec![3, 4], vec![5]],
            pairs: vec![(0, 1)],
            margin: 0.0,
        };
        let batch = collate_groups(&[&group], 0);
        let (sum, count) = answer_logps(&net, &batch, Device::Cpu, false);
        assert_eq!(to_vec(&count), [2.0, 1.0]);
        // By hand: log p(3 | 1 2) + log p(4 | 1 2 3), and log p(5 | 1 2).
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let lp = net
            .forward_logits(&ids, None, false)
            .log_softmax(-1, Kind::Double);
        let want = lp.double_value(&[0, 1, 3]) + lp.double_value(&[0, 2, 4]);
        let got = to_vec(&sum);
        assert!((got[0] - want).abs() < 1e-5, "{} vs {want}", got[0]);
        let ids = Tensor::from_slice(&[1i64, 2, 5]).view([1, 3]);
        let lp = net
            .forward_logits(&ids, None, false)
            .log_softmax(-1, Kind::Double);
        assert!((got[1] - lp.double_value(&[0, 1, 5])).abs() < 1e-5);
    }
}
