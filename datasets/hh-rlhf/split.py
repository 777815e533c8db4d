"""Split HH-RLHF's helpful-base and harmless-base test pairs for the SmolLM2
recipe (configs/smollm2-hh.yaml): one part the policies and their proxy
reward model learn from, one that only the loop round's labeller (a reward
model standing in for fresh human labels) learns from, a held-out part
that only the judge reward model learns from, and held-out prompts the
policies are judged on.

    python datasets/hh-rlhf/split.py

writes, next to this file:
  policy.jsonl.gz  pairs for SFT (their chosen dialogues), the proxy reward
                   model, DPO, and PPO/GRPO prompts;
  labeller.jsonl.gz pairs for the reward model that labels the loop round;
  judge.jsonl.gz   pairs for the judge reward model and for the proxy
                   reward model's held-out accuracy on human labels;
  eval.jsonl.gz    held-out pairs: the prompts the policies are judged on,
                   and every reward model's held-out accuracy on human labels;
  dpo.jsonl.gz     the first pairs of policy.jsonl.gz, for DPO.

Every line is an HH-RLHF row as Anthropic wrote it, plus `source` (file and
line). Pairs go to one part by a hash of their first human turn, so that a
question asked in several dialogues stays on one side; pairs whose chosen
equals rejected, or that differ before their last assistant turn, say
nothing for these stages and are left out, as are dialogues longer than
MAX_CHARS (counted on stderr). Within a part, pairs are in a hashed order;
the eval prompts are the first of the judge's part and the judge does not
train on them. The split is deterministic: rerunning writes the same bytes.
"""

import gzip
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["helpful-base-test.jsonl.gz", "harmless-base-test.jsonl.gz"]
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"

# Sizes chosen so the whole recipe runs in about an hour on 2 CPU cores.
POLICY_ROWS = 1000
LABELLER_ROWS = 1000
JUDGE_ROWS = 1000
EVAL_ROWS = 200
# DPO computes its reference's log-probabilities of all its data first:
# its file is the first pairs of the policy part, as many as it trains on.
DPO_ROWS = 320
# Longest dialogue kept (prompt + longer answer), in characters.
MAX_CHARS = 1200


def digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def first_turn(dialogue):
    rest = dialogue[len(HUMAN):]
    return rest.split(ASSISTANT, 1)[0].strip().lower()


def differs_only_in_last_turn(chosen, rejected):
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen[:common].rfind(ASSISTANT)
    if cut < 0:
        return False
    tail = cut + len(ASSISTANT)
    return all(HUMAN not in t[tail:] and ASSISTANT not in t[tail:] for t in (chosen, rejected))


def read_rows():
    rows, skipped = [], {"identical": 0, "earlier_turns_differ": 0, "too_long": 0}
    for name in SOURCES:
        with gzip.open(os.path.join(HERE, name), "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                row = json.loads(line)
                chosen, rejected = row["chosen"], row["rejected"]
                if chosen == rejected:
                    skipped["identical"] += 1
                elif not differs_only_in_last_turn(chosen, rejected):
                    skipped["earlier_turns_differ"] += 1
                elif max(len(chosen), len(rejected)) > MAX_CHARS:
                    skipped["too_long"] += 1
                else:
                    rows.append({"chosen": chosen, "rejected": rejected,
                                 "source": f"{name}:{line_no}"})
    return rows, skipped


def write(name, rows):
    path = os.path.join(HERE, name)
    # mtime=0: the same rows give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main():
    rows, skipped = read_rows()
    parts = [[], [], []]
    for row in rows:
        parts[int(digest(first_turn(row["chosen"])), 16) % 3].append(row)
    for part in parts:
        part.sort(key=lambda r: digest(r["source"]))
    policy, labeller, judge = parts
    eval_rows, judge = judge[:EVAL_ROWS], judge[EVAL_ROWS:]
    sizes = {"policy": (policy, POLICY_ROWS), "labeller": (labeller, LABELLER_ROWS),
             "judge": (judge, JUDGE_ROWS)}
    for name, (part, n) in sizes.items():
        if len(part) < n:
            sys.exit(f"split: the {name} part has {len(part)} pairs, fewer than {n}")
        write(f"{name}.jsonl.gz", part[:n])
    write("eval.jsonl.gz", eval_rows)
    write("dpo.jsonl.gz", policy[:DPO_ROWS])
    print(f"split: {len(rows)} usable pairs of {len(rows) + sum(skipped.values())} "
          f"(skipped: {skipped}); parts of {len(policy)}, {len(labeller)} and "
          f"{len(judge) + EVAL_ROWS} pairs; wrote {POLICY_ROWS} policy, {LABELLER_ROWS} "
          f"labeller, {JUDGE_ROWS} judge, {EVAL_ROWS} eval and {DPO_ROWS} dpo rows", file=sys.stderr)


if __name__ == "__main__":
    main()
