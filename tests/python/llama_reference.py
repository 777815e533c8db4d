"""Reference logits from HF transformers for Llama-layout models, for
stages/tests/llama_reference.rs.

  make-hf DIR FAMILY TIED   build a random LlamaForCausalLM (FAMILY llama) or
                            Qwen2ForCausalLM (qwen2) with grouped-query
                            attention (4 query heads, 2 key/value heads),
                            tied embeddings if TIED is 1, save it to DIR and
                            write DIR/reference.safetensors with fixed
                            input_ids and their logits.
  logits DIR REF OUT        load DIR with AutoModelForCausalLM and write the
                            logits of REF's input_ids to OUT.
"""

import sys

import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)


def make_hf(out_dir, family, tied):
    torch.manual_seed(4321)
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=10000.0,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        # Its sliding window (longer than the test's sequences) is the
        # context limit rlhf reads.
        model = MistralForCausalLM(MistralConfig(sliding_window=96, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    # Norm weights and biases away from ones and zeros, so that a skipped or
    # misnamed tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    # Qwen2's folder in shards with an index file, as large models ship.
    model.save_pretrained(out_dir, max_shard_size="100KB" if family == "qwen2" else "5GB")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids, "logits": logits}, f"{out_dir}/reference.safetensors")


def logits(model_dir, ref, out):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    ids = load_file(ref)["input_ids"]
    with torch.no_grad():
        result = model(input_ids=ids).logits.float().contiguous()
    save_file({"logits": result}, out)


if __name__ == "__main__":
    if sys.argv[1] == "make-hf":
        make_hf(sys.argv[2], sys.argv[3], sys.argv[4] == "1")
    elif sys.argv[1] == "logits":
        logits(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
