"""DPO's and GRPO's losses as TRL computes them, on fixed inputs.

    trl_reference.py OUT.json

Calls TRL's own loss code: `DPOTrainer._compute_loss` and
`GRPOTrainer._compute_loss` (trl==0.29.1, the version `just bench` and
`just test` install), each on a stand-in for the trainer that carries only
the attributes the method reads, so no model, tokenizer or dataset is
built. Writes the inputs and TRL's outputs as JSON for tests/trl_reference.rs
to feed to rlhf's own functions.

TRL 0.29 dropped label smoothing from its `sigmoid` loss; cDPO,
`(1 - e) L(h) + e L(-h)`, is taken as TRL's sigmoid loss on the pairs
weighted 1 - e plus TRL's sigmoid loss on the swapped pairs weighted e.
"""
import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.experimental.kto.kto_trainer import KTOTrainer

TRL_VERSION = "0.29.1"


class FixedLogits(torch.nn.Module):
    """A "model" whose logits are given: TRL derives the log-probabilities."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **_kwargs):
        return SimpleNamespace(logits=self.logits)


def accelerator():
    same = lambda x: x  # noqa: E731 (one process: gathering changes nothing)
    return SimpleNamespace(
        device=torch.device("cpu"), gather=same, gather_for_metrics=same, num_processes=1
    )


def dpo_trainer(model, loss_type, beta):
    return SimpleNamespace(
        model=model,
        accelerator=accelerator(),
        _truncate_inputs=lambda ids, att, comp: (ids, att, comp),
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
    )


def dpo_inputs(gen, pairs=3, width=7, vocab=11):
    """Chosen rows then rejected rows; completions of different lengths."""
    ids = torch.randint(0, vocab, (2 * pairs, width), generator=gen)
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row, start in enumerate([2, 3, 4, 2, 5, 3][: 2 * pairs]):
        end = width - (row % 2)  # some rows end one token early (padding)
        completion[row, start:end] = 1
    attention = torch.ones_like(ids)
    attention[completion.sum(1) == 0] = 0
    for row in range(2 * pairs):
        if row % 2:
            attention[row, -1] = 0
    logits = torch.randn(2 * pairs, width, vocab, generator=gen, dtype=torch.float64)
    ref = -torch.rand(2 * pairs, generator=gen, dtype=torch.float64) * 10
    return ids, completion, attention, logits, ref


def dpo_case(gen, loss_type, beta, smoothing):
    ids, completion, attention, logits, ref = dpo_inputs(gen)
    pairs = ids.shape[0] // 2

    def trl_loss(swap):
        order = torch.cat([torch.arange(pairs, 2 * pairs), torch.arange(pairs)]) if swap else torch.arange(2 * pairs)
        model = FixedLogits(logits[order]).train()
        trainer = dpo_trainer(model, loss_type, beta)
        r = ref[order]
        inputs = {
            "input_ids": ids[order],
            "attention_mask": attention[order],
            "completion_mask": completion[order],
            "ref_chosen_logps": r[:pairs],
            "ref_rejected_logps": r[pairs:],
        }
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
        return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}

    loss, metrics = trl_loss(swap=False)
    if smoothing:
        swapped, _ = trl_loss(swap=True)
        loss = (1 - smoothing) * loss + smoothing * swapped
    # The answers' summed log-probabilities, the way TRL takes them (the
    # logits at position t predict token t + 1, completion tokens only).
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    logps = (lp * completion[:, 1:]).sum(1)
    return {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": smoothing,
        "policy_logps": logps.tolist(),
        "reference_logps": ref.tolist(),
        "tokens": completion.sum(1).tolist(),
        "loss": loss,
        "rewards/chosen": metrics["rewards/chosen"],
        "rewards/rejected": metrics["rewards/rejected"],
        "rewards/margins": metrics["rewards/margins"],
        "rewards/accuracies": metrics["rewards/accuracies"],
        "logps/chosen": metrics["logps/chosen"],
        "logps/rejected": metrics["logps/rejected"],
    }


def grpo_advantages(rewards, group, scale):
    """TRL 0.29.1 GRPOTrainer._generate_and_score_completions, the lines that
    turn rewards into advantages (scale_rewards "group" or "none"); that
    method samples and scores, so it cannot be called on fixed rewards."""
    mean = rewards.view(-1, group).mean(dim=1).repeat_interleave(group, dim=0)
    std = rewards.view(-1, group).std(dim=1).repeat_interleave(group, dim=0)
    advantages = rewards - mean
    if scale:
        advantages = advantages / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return advantages, int(zero_std.view(-1, group)[:, 0].sum())


def completion_inputs(mask, **extra):
    """The batch fields a trainer's `_compute_loss` reads besides the
    log-probabilities its stand-in model returns: two prompt tokens, the
    completions' mask, and `extra`."""
    answers, width = mask.shape
    return {
        "prompt_ids": torch.zeros(answers, 2, dtype=torch.long),
        "prompt_mask": torch.ones(answers, 2, dtype=torch.long),
        "completion_ids": torch.zeros(answers, width, dtype=torch.long),
        "completion_mask": mask,
        **extra,
    }


def grpo_case(gen, beta, epsilon, loss_type="grpo", epsilon_high=None, level="token"):
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    answers, width, group = 6, 5, 3
    rewards = torch.tensor([1.0, 2.0, 3.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    scaled, zero = grpo_advantages(rewards, group, scale=True)
    plain, _ = grpo_advantages(rewards, group, scale=False)
    lp = -torch.rand(answers, width, generator=gen, dtype=torch.float64) * 3
    old = lp + (torch.rand(answers, width, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    ref = lp + (torch.rand(answers, width, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    mask = torch.ones(answers, width, dtype=torch.long)
    for row, length in enumerate([5, 3, 1, 4, 5, 2]):
        mask[row, length:] = 0
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp)),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon_high,
        max_completion_length=width,
        use_vllm=False,
        model=torch.nn.Module().train(),
        current_gradient_accumulation_steps=1,
        accelerator=accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = completion_inputs(mask, advantages=scaled, old_per_token_logps=old, ref_per_token_logps=ref,
                               num_items_in_batch=mask.sum())
    loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    metrics = trainer._metrics["train"]
    clip = metrics["cispo_clip_ratio"] if loss_type == "cispo" else metrics["clip_ratio/region_mean"]
    return {
        "loss_type": "gspo" if level == "sequence" else loss_type,
        "group": group,
        "beta": beta,
        "epsilon": epsilon,
        "epsilon_high": epsilon_high,
        "max_completion_length": width,
        "rewards": rewards.tolist(),
        "advantages": scaled.tolist(),
        "advantages_unscaled": plain.tolist(),
        "zero_spread_groups": zero,
        "logps": lp.tolist(),
        "old_logps": old.tolist(),
        "ref_logps": ref.tolist(),
        "mask": mask.tolist(),
        "loss": loss.item(),
        # TRL logs the KL only when it is in the loss.
        "kl": metrics["kl"][0] if metrics["kl"] else None,
        "clip_ratio": clip[0],
    }


def rloo_advantages(rewards, kl, group, beta):
    """TRL 0.29.1 RLOOTrainer._generate_and_score_completions, the lines that
    turn rewards into advantages: the summed KL to the reference in the
    reward, then each reward against the mean of its group's others
    (normalize_advantages off, TRL's default)."""
    rewards = rewards - beta * kl
    grouped = rewards.view(-1, group)
    baselines = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
    return rewards - baselines.view(-1)


def rloo_case(gen, beta, epsilon):
    """RLOOTrainer._compute_loss: one ratio per answer from summed
    log-probabilities, clipped, the mean over answers."""
    answers, width, group = 6, 5, 3
    rewards = torch.tensor([1.0, 2.0, 3.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    lp = -torch.rand(answers, width, generator=gen, dtype=torch.float64) * 3
    old = lp + (torch.rand(answers, width, generator=gen, dtype=torch.float64) - 0.5) * 0.4
    ref = lp + (torch.rand(answers, width, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    mask = torch.ones(answers, width, dtype=torch.long)
    for row, length in enumerate([5, 3, 1, 4, 5, 2]):
        mask[row, length:] = 0
    kl = ((old - ref) * mask).sum(-1)
    advantages = rloo_advantages(rewards, kl, group, beta)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp)),
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        model=torch.nn.Module().train(),
        accelerator=accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = completion_inputs(mask, old_logps=(old * mask).sum(1), advantages=advantages)
    loss = RLOOTrainer._compute_loss(trainer, trainer.model, inputs)
    return {
        "group": group,
        "beta": beta,
        "epsilon": epsilon,
        "rewards": rewards.tolist(),
        "advantages": advantages.tolist(),
        "logps": lp.tolist(),
        "old_logps": old.tolist(),
        "ref_logps": ref.tolist(),
        "mask": mask.tolist(),
        "loss": loss.item(),
        "clip_ratio": trainer._metrics["train"]["clip_ratio/region_mean"][0],
    }


def reference_free_case(gen, loss_type, beta, gamma, smoothing):
    """SimPO (CPOTrainer.cpo_loss, loss_type simpo) and ORPO's odds-ratio
    term (ORPOTrainer.odds_ratio_loss) on mean token log-probabilities."""
    chosen = -torch.rand(4, generator=gen, dtype=torch.float64) * 2 - 0.05
    rejected = -torch.rand(4, generator=gen, dtype=torch.float64) * 2 - 0.05
    trainer = SimpleNamespace(alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=smoothing,
                              loss_type="simpo", accelerator=accelerator())
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    else:
        terms, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
        losses = -terms  # TRL's loss is the NLL minus these terms' mean
    return {
        "loss_type": loss_type,
        "beta": beta,
        "gamma": gamma,
        "label_smoothing": smoothing,
        "chosen": chosen.tolist(),
        "rejected": rejected.tolist(),
        "losses": losses.tolist(),
        "chosen_rewards": chosen_rewards.tolist(),
        "rejected_rewards": rejected_rewards.tolist(),
    }


def kto_case(gen, beta, desirable_weight, undesirable_weight):
    """KTOTrainer.kto_loss: six answers, three good (TRL takes them apart:
    chosen then rejected), and six mismatched ones for the KL estimate."""
    desirable = torch.tensor([True, False, True, True, False, False])
    policy = -torch.rand(6, generator=gen, dtype=torch.float64) * 20
    reference = policy + (torch.rand(6, generator=gen, dtype=torch.float64) - 0.5) * 4
    policy_kl = -torch.rand(6, generator=gen, dtype=torch.float64) * 20
    reference_kl = policy_kl - torch.rand(6, generator=gen, dtype=torch.float64)
    trainer = SimpleNamespace(calculate_KL=True, accelerator=accelerator(), loss_type="kto", beta=beta,
                              desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    losses, chosen_rewards, rejected_rewards, kl = KTOTrainer.kto_loss(
        trainer, policy[desirable], policy[~desirable], policy_kl, reference[desirable], reference[~desirable],
        reference_kl)
    return {
        "beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight,
        "desirable": desirable.tolist(), "policy": policy.tolist(), "reference": reference.tolist(),
        "policy_kl": policy_kl.tolist(), "reference_kl": reference_kl.tolist(),
        # TRL's order: the good answers' losses, then the bad ones'.
        "losses": losses.tolist(), "chosen_rewards": chosen_rewards.tolist(),
        "rejected_rewards": rejected_rewards.tolist(), "kl": kl.item(),
    }


def main(out):
    assert trl.__version__ == TRL_VERSION, f"trl {trl.__version__}; this check was written for {TRL_VERSION}"
    gen = torch.Generator().manual_seed(19)
    cases = {
        "dpo": [
            dpo_case(gen, "sigmoid", 0.1, 0.0),
            dpo_case(gen, "sigmoid", 0.5, 0.2),
            dpo_case(gen, "ipo", 0.1, 0.0),
        ],
        "grpo": [grpo_case(gen, 0.04, 0.2), grpo_case(gen, 0.0, 0.1)],
        "losses": [
            grpo_case(gen, 0.04, 0.2, "dr_grpo"),
            grpo_case(gen, 0.0, 0.2, "dapo", epsilon_high=0.28),
            grpo_case(gen, 0.04, 0.2, "bnpo", epsilon_high=0.28),
            grpo_case(gen, 0.04, 0.2, "cispo", epsilon_high=1.1),
            grpo_case(gen, 0.04, 0.1, "grpo", level="sequence"),
        ],
        "rloo": [rloo_case(gen, 0.05, 0.2), rloo_case(gen, 0.0, 0.1)],
        "kto": [kto_case(gen, 0.1, 1.0, 1.0), kto_case(gen, 0.5, 1.0, 1.33)],
        "reference_free": [
            reference_free_case(gen, "simpo", 2.0, 0.5, 0.0),
            reference_free_case(gen, "simpo", 2.5, 1.0, 0.1),
            reference_free_case(gen, "orpo", 0.1, 0.0, 0.0),
        ],
    }
    with open(out, "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main(sys.argv[1])
