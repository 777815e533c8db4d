"""Chat templates rendered by transformers' apply_chat_template, for
tests/chat_templates.rs.

  render DIR OUT   load DIR (tokenizer.json + tokenizer_config.json with a
                   chat_template) as a PreTrainedTokenizerFast and write to
                   OUT, as JSON, the rendering of DIR/conversations.json
                   (a list of {"messages", "add_generation_prompt"}).
  prefix OUT DIR.. TRL's is_chat_template_prefix_preserving of each
                   folder, as a JSON list.
  qwen3 OUT        TRL's copies of Qwen3's template and its training one.
"""

import json
import sys

from transformers import PreTrainedTokenizerFast


def render(model_dir, out):
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    cases = json.load(open(f"{model_dir}/conversations.json"))
    rendered = [
        tok.apply_chat_template(c["messages"], tokenize=False,
                                add_generation_prompt=c["add_generation_prompt"])
        for c in cases
    ]
    json.dump(rendered, open(out, "w"))


def prefix(out, *model_dirs):
    """TRL's is_chat_template_prefix_preserving of each folder."""
    from trl.chat_template_utils import is_chat_template_prefix_preserving
    verdicts = [is_chat_template_prefix_preserving(PreTrainedTokenizerFast.from_pretrained(d))
                for d in model_dirs]
    json.dump(verdicts, open(out, "w"))


def qwen3(out):
    """TRL's copies of Qwen3's chat template and of its training variant."""
    from trl import chat_template_utils as u
    json.dump({"qwen3": u.qwen3_chat_template,
               "qwen3_training": u.qwen3_training_chat_template}, open(out, "w"))


if __name__ == "__main__":
    if sys.argv[1] == "render":
        render(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "prefix":
        prefix(sys.argv[2], *sys.argv[3:])
    elif sys.argv[1] == "qwen3":
        qwen3(sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
