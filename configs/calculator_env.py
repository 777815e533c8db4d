"""The calculator environment of configs/calculator.yaml (rlhf's `env:`).

One JSON line in per live episode per policy turn:
  {"episode", "turn", "prompt", "answer", "history", "response"}
one JSON line out for each, in order:
  {"observation": text or null, "done": bool, "reward": number}

A turn `CALC a*b` (or a+b, a-b) is a call: the result comes back as
the observation `= r` on a line of its own, reward 0. Any other turn is
the final answer: done, reward 1 when its last number is the prompt's
answer, else 0. The same rules as rlhf_datasets::calculator::reply.
"""

import json
import re
import sys

CALL = re.compile(r"^CALC\s*(-?\d+)\s*([*+-])\s*(-?\d+)\s*$")


def reply(response, answer):
    text = response.strip()
    if text.startswith("CALC"):
        m = CALL.match(text)
        if m is None:
            result = "?"
        else:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            result = str({"*": a * b, "+": a + b, "-": a - b}[op])
        return {"observation": f"= {result}\n", "done": False, "reward": 0.0}
    numbers = re.findall(r"-?\d+", text)
    right = answer is not None and bool(numbers) and numbers[-1] == str(answer).strip()
    return {"observation": None, "done": True, "reward": 1.0 if right else 0.0}


for line in sys.stdin:
    if line.strip():
        request = json.loads(line)
        print(json.dumps(reply(request["response"], request["answer"])), flush=True)
