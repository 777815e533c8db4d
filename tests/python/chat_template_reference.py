"""Chat templates rendered by transformers' apply_chat_template, for
tests/chat_templates.rs.

  render DIR OUT   load DIR (tokenizer.json + tokenizer_config.json with a
                   chat_template) as a PreTrainedTokenizerFast and write to
                   OUT, as JSON, the rendering of DIR/conversations.json
                   (a list of {"messages", "add_generation_prompt"}).
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


if __name__ == "__main__":
    if sys.argv[1] == "render":
        render(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
