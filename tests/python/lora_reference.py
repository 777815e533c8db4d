"""LoRA adapters written by rlhf, read by PEFT.

    lora_reference.py BASE STAGE_CHECKPOINT OUT

BASE: the base model folder; STAGE_CHECKPOINT: a LoRA stage's checkpoint
(merged `model.safetensors`, PEFT files in `adapter/`). Writes to OUT the
input ids and the logits of: the base alone, PeftModel.from_pretrained
(base + adapter), the merged folder loaded by transformers, and PEFT's own
merge_and_unload.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def load(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def main(base_dir, checkpoint, out):
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = load(base_dir)
        base_logits = base(input_ids=ids).logits
        peft = PeftModel.from_pretrained(base, f"{checkpoint}/adapter").eval()
        peft_logits = peft(input_ids=ids).logits
        peft_merged = peft.merge_and_unload()(input_ids=ids).logits
        merged_logits = load(checkpoint)(input_ids=ids).logits
    save_file(
        {
            "input_ids": ids,
            "base": base_logits.contiguous(),
            "peft": peft_logits.contiguous(),
            "peft_merged": peft_merged.contiguous(),
            "merged": merged_logits.contiguous(),
        },
        out,
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
