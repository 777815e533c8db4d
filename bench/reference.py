"""The Python references of `just bench`, one JSON line per run (as
`rlhf bench` prints):

  train    HF GPT2LMHeadModel (SDPA attention), PyTorch eager: forward,
           mean cross-entropy over every token, backward, clip to norm 1,
           torch.optim.AdamW. The same work as `rlhf bench train`.
  generate HF `generate` (KV cache, sampling at temperature 1, no early
           stop) of a GPT-2 folder, the one `rlhf bench generate` loads.
  ppo      TRL's PPOTrainer (trl.experimental.ppo, pinned in the justfile):
           one rollout + update per iteration, median iteration time.
  sft      TRL's SFTTrainer (PEFT LoRA with --lora-r).
  dpo      TRL's DPOTrainer (PEFT LoRA with --lora-r) on --data, two epochs,
           the second timed.
  grpo     TRL's GRPOTrainer without vLLM (HF generate), --reward-model
           scoring the answers to the prompts of --data.
  make-model DIR  writes a random GPT2LMHeadModel folder both sides load.

--autocast: train and generate under torch.autocast(dtype=torch.bfloat16),
the counterpart of `rlhf bench --precision bf16`.
"""

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def gpt2(a):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=a.vocab_size, n_positions=a.n_positions, n_embd=a.n_embd,
        n_layer=a.n_layer, n_head=a.n_head, bos_token_id=256, eos_token_id=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg)


def precision(a):
    """bf16 autocast when asked, on the device the work runs on (CPU here)."""
    if not a.autocast:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def train(a):
    torch.manual_seed(a.seed)
    model = gpt2(a)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, a.vocab_size, (a.batch, a.seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with precision(a):
            logits = model(input_ids=x).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    return {"mode": "train", "params": n_params, "batch": a.batch, "seq": a.seq,
            "step_seconds": s, "tokens_per_s": a.batch * a.seq / s}


def generate(a):
    """HF generate: random prompts without early stop, or the prompts of
    --prompts (token ids, as `rlhf bench generate --prompts` reads them)
    left-padded in batches of --batch until EOS. Tokens/s of generated
    (real) tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa").eval()
    if a.lora_r:
        # As TRL samples a PEFT policy: adapters unmerged on every projection.
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r,
                                                 target_modules=LORA_TARGETS)).eval()
    if a.prompts:
        spec = json.load(open(a.prompts))
        prompts, eos, pad = spec["prompts"], spec["eos"], spec["pad"]
    else:
        prompts = torch.randint(0, 256, (a.batch, a.prompt_len)).tolist()
        eos, pad = None, 0
    rates, lengths, times = [], [], []
    for rep in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), a.batch):
            batch = prompts[i:i + a.batch]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            stop = {} if eos is None else {"eos_token_id": eos}
            fixed = {} if eos is not None else {"min_new_tokens": a.new_tokens}
            with torch.no_grad(), precision(a):
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, max_new_tokens=a.new_tokens, pad_token_id=pad, use_cache=True,
                    **stop, **fixed,
                )
            for row in out[:, width:].tolist():
                generated += row.index(eos) + 1 if eos is not None and eos in row else len(row)
        if eos is None:
            assert generated == len(prompts) * a.new_tokens
        if rep >= a.warmup:
            seconds = time.perf_counter() - t0
            rates.append(generated / seconds)
            lengths.append(generated / len(prompts))
            times.append(seconds)
    return {"mode": "generate", "batch": a.batch, "prompts": len(prompts), "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens, "stop_at_eos": eos is not None,
            "mean_length": sum(lengths) / len(lengths), "seconds": statistics.median(times),
            "tokens_per_s": statistics.median(rates)}


def ppo(a):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, GPT2LMHeadModel,
                              PreTrainedTokenizerFast, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from tokenizers import Tokenizer, models

    torch.manual_seed(a.seed)
    # A byte-level tokenizer of 256 ids + eos/pad, like rlhf's built-in one.
    vocab = {chr(i) if i >= 33 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<0>", pad_token="<1>")
    policy = GPT2LMHeadModel.from_pretrained(a.model, attn_implementation="sdpa")
    ref = GPT2LMHeadModel.from_pretrained(a.model, attn_implementation="sdpa")
    rm = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
    for m in (rm, value):
        m.config.pad_token_id = 1
    prompts = [
        [((i * 7 + j * 13) % 26) + 97 for j in range(a.prompt_len)] for i in range(a.batch * (a.warmup + a.steps))
    ]
    ds = Dataset.from_dict({"input_ids": prompts})
    times = []

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    out = tempfile.mkdtemp()
    cfg = PPOConfig(
        # A rollout of `batch` answers, updated in minibatches of `minibatch`.
        output_dir=out, per_device_train_batch_size=a.minibatch,
        gradient_accumulation_steps=a.batch // a.minibatch,
        num_mini_batches=a.batch // a.minibatch, local_rollout_forward_batch_size=a.batch,
        total_episodes=a.batch * (a.warmup + a.steps), num_ppo_epochs=1, response_length=a.new_tokens,
        stop_token=None, temperature=1.0, learning_rate=3e-5, report_to=[], save_strategy="no",
        logging_steps=10_000, num_sample_generations=0, seed=a.seed, use_cpu=not torch.cuda.is_available(),
        bf16=False, fp16=False,
    )
    trainer = PPOTrainer(
        args=cfg, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
        train_dataset=ds, value_model=value, callbacks=[Timer()],
    )
    trainer.train()
    timed = times[a.warmup:]
    assert timed, f"TRL ran {len(times)} iterations"
    return {"mode": "ppo", "batch": a.batch, "new_tokens": a.new_tokens,
            "iteration_seconds": statistics.median(timed), "iterations": len(times)}


def sft(a):
    """TRL's SFTTrainer on a model folder (PEFT LoRA with --lora-r): random
    token rows of --seq + 1 tokens, batch --batch, AdamW at 1e-4, clip 1.0,
    the loss on every token. Tokens/s of the median step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(a.model)
    steps = a.warmup + a.steps
    ids = torch.randint(0, min(tok.vocab_size, model.config.vocab_size), (a.batch * steps, a.seq + 1))
    ds = Dataset.from_dict({"input_ids": ids.tolist()})
    peft = peft_lora(a.lora_r)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, max_steps=steps,
        learning_rate=1e-4, max_grad_norm=1.0, optim="adamw_torch", lr_scheduler_type="constant",
        max_length=a.seq + 1, packing=False, report_to=[], save_strategy="no", logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(), bf16=a.autocast, seed=a.seed, dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft,
                         callbacks=[Timer()])
    trainer.train()
    s = statistics.median(times[a.warmup:])
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"mode": "sft", "batch": a.batch, "seq": a.seq, "lora_r": a.lora_r, "trained_params": trained,
            "step_seconds": s, "tokens_per_s": a.batch * a.seq / s}


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora(r):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, task_type="CAUSAL_LM", target_modules=LORA_TARGETS) if r else None


class StepClock:
    """Trainer callback: the end time of every optimizer step (from the
    start of training), so that phases spanning steps are timed whole."""

    def __init__(self):
        self.ends = []

    def hooks(self):
        from transformers import TrainerCallback

        clock = self

        class Hooks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                clock.ends.append(time.perf_counter())

        return Hooks()

    def spans(self, every):
        """Seconds of each run of `every` consecutive steps."""
        marks = [self.start] + self.ends
        return [marks[i + every] - marks[i] for i in range(0, len(self.ends) - every + 1, every)]


def dpo(a):
    """--data: JSON lines {prompt, chosen, rejected} in TRL's conversational
    form. Two epochs of --batch pairs a step; the reference's
    log-probabilities computed once before the first step, as rlhf's dpo
    stage does (precompute_ref_log_probs). The second epoch timed: its
    seconds and real tokens (each pair's prompt twice, both answers)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(line) for line in open(a.data)]
    assert len(rows) % a.batch == 0, "whole steps"
    clock = StepClock()
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, num_train_epochs=2,
        learning_rate=1e-4, lr_scheduler_type="constant", max_grad_norm=1.0, beta=0.1, max_length=a.seq,
        precompute_ref_log_probs=True, report_to=[], save_strategy="no", logging_steps=10_000,
        use_cpu=not torch.cuda.is_available(), bf16=a.autocast, seed=a.seed, dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_lora(a.lora_r), callbacks=[clock.hooks()])
    trainer.train()
    steps = len(rows) // a.batch
    seconds = clock.spans(steps)[1]
    ds = trainer.train_dataset
    real = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    return {"mode": "dpo", "pairs": len(rows), "batch": a.batch, "lora_r": a.lora_r, "steps": steps,
            "epoch_seconds": seconds, "real_tokens": real, "tokens_per_s": real / seconds}


def grpo(a):
    """--data: JSON lines {prompt: [messages]}; --batch prompts an iteration,
    --group-size answers each (sampling at temperature 1 until EOS or
    --new-tokens), scored by --reward-model, updated in minibatches of
    --minibatch answers (one optimizer step each) with the KL to the
    reference in the loss (beta 0.04), as `rlhf bench grpo`. HF generate,
    no vLLM. The median iteration's seconds."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    rows = [json.loads(line) for line in open(a.data)]
    answers = a.batch * a.group_size
    per_iteration = answers // a.minibatch
    iterations = a.warmup + a.steps
    clock = StepClock()
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.minibatch, gradient_accumulation_steps=1,
        steps_per_generation=per_iteration, num_generations=a.group_size, max_completion_length=a.new_tokens,
        max_steps=per_iteration * iterations, learning_rate=1e-5, lr_scheduler_type="constant",
        max_grad_norm=1.0, beta=0.04, temperature=1.0, report_to=[], save_strategy="no",
        logging_steps=per_iteration,
        use_cpu=not torch.cuda.is_available(), bf16=a.autocast, seed=a.seed, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=a.reward_model, args=cfg,
                          train_dataset=Dataset.from_list(rows[:a.batch * iterations]), processing_class=tok,
                          peft_config=peft_lora(a.lora_r), callbacks=[clock.hooks()])
    trainer.train()
    spans = clock.spans(per_iteration)
    lengths = [x["completions/mean_length"] for x in trainer.state.log_history if "completions/mean_length" in x]
    return {"mode": "grpo", "prompts": a.batch, "group_size": a.group_size, "new_tokens": a.new_tokens,
            "lora_r": a.lora_r, "iteration_seconds": statistics.median(spans[a.warmup:]),
            "iterations": len(spans), "mean_length": statistics.median(lengths[a.warmup:] or lengths)}


def make_model(a):
    torch.manual_seed(a.seed)
    gpt2(a).save_pretrained(a.model)
    return {"mode": "make-model", "dir": a.model}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "generate", "ppo", "sft", "dpo", "grpo", "make-model"])
    p.add_argument("--model")
    for name, default in [("n-layer", 4), ("n-head", 4), ("n-embd", 128), ("n-positions", 256),
                          ("vocab-size", 264), ("batch", 16), ("seq", 128), ("prompt-len", 16),
                          ("new-tokens", 32), ("minibatch", 8), ("warmup", 2), ("steps", 5), ("seed", 0),
                          ("group-size", 8)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast")
    p.add_argument("--prompts", help="generate: a JSON file of prompt ids, eos and pad")
    p.add_argument("--lora-r", type=int, default=0, help="PEFT LoRA adapters of this rank")
    p.add_argument("--data", help="dpo: conversational pairs; grpo: conversational prompts (JSON lines)")
    p.add_argument("--reward-model", help="grpo: a sequence-classification model folder")
    a = p.parse_args()
    modes = {"train": train, "generate": generate, "ppo": ppo, "sft": sft, "dpo": dpo, "grpo": grpo,
             "make-model": make_model}
    print(json.dumps(modes[a.mode](a)))


if __name__ == "__main__":
    main()
