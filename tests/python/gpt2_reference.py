"""Reference logits from HF transformers, for tests/gpt_reference.rs.

  make-hf DIR    build a random GPT2LMHeadModel offline, save it to DIR
                 (save_pretrained), and write DIR/reference.safetensors with
                 fixed input_ids and their logits.
  logits DIR OUT load DIR with GPT2LMHeadModel.from_pretrained and write the
                 logits of OUT's input_ids back into OUT.
"""

import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def make_hf(out_dir):
    torch.manual_seed(1234)
    config = GPT2Config(
        vocab_size=264, n_positions=64, n_embd=48, n_layer=3, n_head=4,
        bos_token_id=256, eos_token_id=256,
    )
    model = GPT2LMHeadModel(config)
    # Non-trivial LayerNorm and bias values, so a transposed or skipped
    # tensor cannot hide behind ones and zeros.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    ids = torch.randint(0, 261, (3, 40), generator=torch.Generator().manual_seed(99))
    save_file({"input_ids": ids, "logits": logits_of(model, ids)}, f"{out_dir}/reference.safetensors")


def logits(model_dir, out):
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    ids = load_file(out)["input_ids"]
    save_file({"input_ids": ids, "logits": logits_of(model, ids)}, out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make-hf":
        make_hf(sys.argv[2])
    elif cmd == "logits":
        logits(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")
