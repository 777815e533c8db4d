//! DPO's and GRPO's arithmetic against TRL's own code (trl==0.29.1 in the
//! venv; `just test` installs it): tests/python/trl_reference.py calls
//! `DPOTrainer._compute_loss` and `GRPOTrainer._compute_loss` on fixed
//! inputs, and this test feeds the same inputs to rlhf's functions.
//!
//! - DPO: sigmoid, cDPO (label smoothing 0.2) and IPO losses, and the
//!   implicit rewards, margins and accuracy TRL logs.
//! - GRPO: group advantages (scaled by the group's std, and not: Dr.
//!   GRPO), the count of groups without spread, and the clipped loss with
//!   its k3 KL and clip ratio, with the KL in the loss and without.
//! - The critic-free family (`loss_type`): dr_grpo, dapo and bnpo with
//!   clip-higher (`epsilon_high`), cispo, GSPO's sequence-level ratio
//!   (TRL's `importance_sampling_level: sequence`), and TRL's RLOO: its
//!   leave-one-out advantages with the KL in the reward and its loss
//!   (`RLOOTrainer._compute_loss`).
//! - KTO's loss (`KTOTrainer.kto_loss`): good and bad answers, the KL
//!   estimate from mismatched ones, the two weights.
//! - SimPO (`CPOTrainer.cpo_loss`, `loss_type: simpo`) and ORPO's
//!   odds-ratio term (`ORPOTrainer.odds_ratio_loss`; rlhf adds the chosen
//!   answer's mean NLL, here `-chosen`).

use crate::common;

use rlhf_stages::kinds::dpo::{
    kto_losses, pair_losses, per_token, reference_free_losses, DpoLoss, PairLogps,
};
use rlhf_stages::rl::grpo::math::{
    group_advantages, grpo_loss, leave_one_out, policy_loss, LossSpec, LossType,
};
use serde_json::Value;
use tch::{Kind, Tensor};

fn trl_cases() -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trl.json");
    common::run_python("trl_reference.py", &[out.to_str().unwrap()]);
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn tensor(v: &Value) -> Tensor {
    match v.as_array().unwrap().first() {
        Some(Value::Array(_)) => {
            let rows: Vec<Tensor> = v.as_array().unwrap().iter().map(tensor).collect();
            Tensor::stack(&rows, 0)
        }
        _ => Tensor::from_slice(&floats(v)),
    }
}

fn mean(t: &Tensor) -> f64 {
    t.mean(Kind::Double).double_value(&[])
}

fn close(what: &str, ours: f64, trl: f64, tol: f64) {
    assert!(
        (ours - trl).abs() <= tol * (1.0 + trl.abs()),
        "{what}: rlhf {ours} vs TRL {trl}"
    );
}

fn check_dpo(case: &Value) {
    let loss = match case["loss_type"].as_str().unwrap() {
        "sigmoid" => DpoLoss::Sigmoid,
        "ipo" => DpoLoss::Ipo,
        other => panic!("loss {other}"),
    };
    let (beta, smoothing) = (
        case["beta"].as_f64().unwrap(),
        case["label_smoothing"].as_f64().unwrap(),
    );
    let name = format!("dpo {loss:?} beta {beta} label_smoothing {smoothing}");
    let (mut policy, mut reference) = (
        tensor(&case["policy_logps"]),
        tensor(&case["reference_logps"]),
    );
    let raw_policy = policy.shallow_clone();
    if loss == DpoLoss::Ipo {
        let tokens = tensor(&case["tokens"]);
        policy = per_token(&policy, &tokens);
        reference = per_token(&reference, &tokens);
    }
    // TRL's batch: the chosen rows, then the rejected rows.
    let pairs = policy.size()[0] / 2;
    let logps = PairLogps {
        policy_chosen: policy.narrow(0, 0, pairs),
        policy_rejected: policy.narrow(0, pairs, pairs),
        reference_chosen: reference.narrow(0, 0, pairs),
        reference_rejected: reference.narrow(0, pairs, pairs),
    };
    let (losses, chosen, rejected) = pair_losses(loss, beta, smoothing, &logps);
    close(
        &format!("{name}: loss"),
        mean(&losses),
        case["loss"].as_f64().unwrap(),
        1e-9,
    );
    if loss == DpoLoss::Ipo {
        // TRL's implicit rewards stay on the summed log-probabilities.
        return;
    }
    let metric = |key: &str| case[key].as_f64().unwrap();
    close(
        &format!("{name}: rewards/chosen"),
        mean(&chosen),
        metric("rewards/chosen"),
        1e-9,
    );
    close(
        &format!("{name}: rewards/rejected"),
        mean(&rejected),
        metric("rewards/rejected"),
        1e-9,
    );
    close(
        &format!("{name}: rewards/margins"),
        mean(&(&chosen - &rejected)),
        metric("rewards/margins"),
        1e-9,
    );
    let accuracy = mean(&chosen.gt_tensor(&rejected).to_kind(Kind::Double));
    close(
        &format!("{name}: rewards/accuracies"),
        accuracy,
        metric("rewards/accuracies"),
        1e-6,
    );
    close(
        &format!("{name}: logps/chosen"),
        mean(&raw_policy.narrow(0, 0, pairs)),
        metric("logps/chosen"),
        1e-9,
    );
}

fn check_grpo(case: &Value) {
    let (group, beta, epsilon) = (
        case["group"].as_u64().unwrap() as usize,
        case["beta"].as_f64().unwrap(),
        case["epsilon"].as_f64().unwrap(),
    );
    let rewards = floats(&case["rewards"]);
    let (scaled, zero) = group_advantages(&rewards, group, true);
    let (plain, _) = group_advantages(&rewards, group, false);
    for (ours, trl) in scaled.iter().zip(floats(&case["advantages"])) {
        close("grpo advantage (scaled)", *ours, trl, 1e-12);
    }
    for (ours, trl) in plain.iter().zip(floats(&case["advantages_unscaled"])) {
        close("grpo advantage (Dr. GRPO)", *ours, trl, 1e-12);
    }
    assert_eq!(zero as u64, case["zero_spread_groups"].as_u64().unwrap());
    let out = grpo_loss(
        &tensor(&case["logps"]),
        &tensor(&case["old_logps"]),
        &tensor(&case["ref_logps"]),
        &Tensor::from_slice(&scaled),
        &tensor(&case["mask"]).to_kind(Kind::Double),
        epsilon,
        beta,
    );
    let name = format!("grpo beta {beta} epsilon {epsilon}");
    close(
        &format!("{name}: loss"),
        out.loss.double_value(&[]),
        case["loss"].as_f64().unwrap(),
        1e-9,
    );
    close(
        &format!("{name}: clip ratio"),
        out.clip_fraction,
        case["clip_ratio"].as_f64().unwrap(),
        1e-6,
    );
    if let Some(kl) = case["kl"].as_f64() {
        close(&format!("{name}: kl"), out.kl, kl, 1e-9);
    }
}

/// A `loss_type` case: TRL's GRPO loss, clip ratio and KL on the case's
/// log-probabilities, with its scaled group advantages.
fn check_loss_type(case: &Value) {
    let loss_type: LossType =
        serde_json::from_value(case["loss_type"].clone()).expect("a loss type rlhf knows");
    let group = case["group"].as_u64().unwrap() as usize;
    let (advantages, _) = group_advantages(&floats(&case["rewards"]), group, true);
    let spec = LossSpec {
        loss_type,
        clip_low: case["epsilon"].as_f64().unwrap(),
        clip_high: case["epsilon_high"].as_f64().unwrap(),
        beta: case["beta"].as_f64().unwrap(),
        max_new_tokens: case["max_completion_length"].as_f64().unwrap(),
    };
    check_policy_loss(case, &Tensor::from_slice(&advantages), &spec);
}

fn check_policy_loss(case: &Value, advantages: &Tensor, spec: &LossSpec) {
    let out = policy_loss(
        &tensor(&case["logps"]),
        &tensor(&case["old_logps"]),
        &tensor(&case["ref_logps"]),
        advantages,
        &tensor(&case["mask"]).to_kind(Kind::Double),
        spec,
        None,
    );
    let name = format!("{:?} beta {}", spec.loss_type, spec.beta);
    let loss = out.loss.double_value(&[]);
    close(
        &format!("{name}: loss"),
        loss,
        case["loss"].as_f64().unwrap(),
        1e-9,
    );
    let clip = case["clip_ratio"].as_f64().unwrap();
    close(
        &format!("{name}: clip ratio"),
        out.clip_fraction,
        clip,
        1e-6,
    );
    if let Some(kl) = case["kl"].as_f64() {
        close(&format!("{name}: kl"), out.kl, kl, 1e-9);
    }
}

/// TRL's RLOO: leave-one-out advantages of rewards less beta times the
/// summed KL (old - reference), and its per-answer ratio loss.
fn check_rloo(case: &Value) {
    let (group, beta) = (
        case["group"].as_u64().unwrap() as usize,
        case["beta"].as_f64().unwrap(),
    );
    let mask = tensor(&case["mask"]);
    let kl = ((tensor(&case["old_logps"]) - tensor(&case["ref_logps"])) * &mask).sum_dim_intlist(
        1,
        false,
        Kind::Double,
    );
    let kl: Vec<f64> = Vec::try_from(kl).unwrap();
    let shaped: Vec<f64> = floats(&case["rewards"])
        .iter()
        .zip(kl)
        .map(|(r, k)| r - beta * k)
        .collect();
    let advantages = leave_one_out(&shaped, group);
    for (ours, trl) in advantages.iter().zip(floats(&case["advantages"])) {
        close("rloo advantage", *ours, trl, 1e-12);
    }
    let epsilon = case["epsilon"].as_f64().unwrap();
    let spec = LossSpec {
        loss_type: LossType::Rloo,
        clip_low: epsilon,
        clip_high: epsilon,
        // The KL is in the reward: none in the loss.
        beta: 0.0,
        max_new_tokens: 1.0,
    };
    check_policy_loss(case, &Tensor::from_slice(&advantages), &spec);
}

fn check_reference_free(case: &Value) {
    let loss = match case["loss_type"].as_str().unwrap() {
        "simpo" => DpoLoss::Simpo,
        "orpo" => DpoLoss::Orpo,
        other => panic!("loss {other}"),
    };
    let f = |k: &str| case[k].as_f64().unwrap();
    let (chosen, rejected) = (tensor(&case["chosen"]), tensor(&case["rejected"]));
    let (losses, c, r) = reference_free_losses(
        loss,
        f("beta"),
        f("gamma"),
        f("label_smoothing"),
        &chosen,
        &rejected,
    );
    // ORPO: TRL's odds-ratio term; rlhf's per-pair loss adds the NLL.
    let losses = match loss {
        DpoLoss::Orpo => losses + &chosen,
        _ => losses,
    };
    // TRL's ORPO computes in float32 (`.float()`); SimPO stays in f64.
    let tol = if loss == DpoLoss::Orpo { 1e-6 } else { 1e-9 };
    let pairs = [
        (losses, "losses"),
        (c, "chosen_rewards"),
        (r, "rejected_rewards"),
    ];
    for (ours, key) in pairs {
        let ours: Vec<f64> = Vec::try_from(ours).unwrap();
        for (o, t) in ours.iter().zip(floats(&case[key])) {
            close(&format!("{loss:?} {key}"), *o, t, tol);
        }
    }
}

fn check_kto(case: &Value) {
    let f = |k: &str| case[k].as_f64().unwrap();
    let flags: Vec<bool> = case["desirable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect();
    let (losses, rewards, kl) = kto_losses(
        &tensor(&case["policy"]),
        &tensor(&case["reference"]),
        &Tensor::from_slice(&flags),
        &tensor(&case["policy_kl"]),
        &tensor(&case["reference_kl"]),
        f("beta"),
        f("desirable_weight"),
        f("undesirable_weight"),
    );
    close("kto kl", kl.double_value(&[]), f("kl"), 1e-12);
    let (losses, rewards): (Vec<f64>, Vec<f64>) = (
        Vec::try_from(losses).unwrap(),
        Vec::try_from(rewards).unwrap(),
    );
    // TRL's order: the good answers, then the bad ones.
    let order = |good: bool| {
        flags
            .iter()
            .enumerate()
            .filter(move |(_, &d)| d == good)
            .map(|(i, _)| i)
    };
    let ours: Vec<usize> = order(true).chain(order(false)).collect();
    for (i, trl) in ours.iter().zip(floats(&case["losses"])) {
        close("kto loss", losses[*i], trl, 1e-12);
    }
    let trl_rewards = [
        floats(&case["chosen_rewards"]),
        floats(&case["rejected_rewards"]),
    ]
    .concat();
    for (i, trl) in ours.iter().zip(trl_rewards) {
        close("kto implicit reward", rewards[*i], trl, 1e-12);
    }
}

#[test]
fn dpo_and_grpo_losses_match_trl() {
    let cases = trl_cases();
    let dpo = cases["dpo"].as_array().unwrap();
    let grpo = cases["grpo"].as_array().unwrap();
    assert_eq!((dpo.len(), grpo.len()), (3, 2), "{cases}");
    dpo.iter().for_each(check_dpo);
    grpo.iter().for_each(check_grpo);
    let losses = cases["losses"].as_array().unwrap();
    let rloo = cases["rloo"].as_array().unwrap();
    assert_eq!((losses.len(), rloo.len()), (5, 2));
    losses.iter().for_each(check_loss_type);
    rloo.iter().for_each(check_rloo);
    let free = cases["reference_free"].as_array().unwrap();
    assert_eq!(free.len(), 3);
    free.iter().for_each(check_reference_free);
    let kto = cases["kto"].as_array().unwrap();
    assert_eq!(kto.len(), 2);
    kto.iter().for_each(check_kto);
}
