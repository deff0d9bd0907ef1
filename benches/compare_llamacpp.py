#!/usr/bin/env python3
"""Single-sequence decode: `adadim generate` on a packed checkpoint against llama.cpp (through
llama-cpp-python) on the shipped GGUF, same prompt, same number of new tokens, same threads,
taking turns round after round so that a change in the machine's load hits both alike.

llama.cpp must be built without its AMX path, which crashes on this project's machines:

    python3 -m venv venv && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AMX_INT8=OFF" \
        venv/bin/pip install llama-cpp-python
    venv/bin/python benches/compare_llamacpp.py

Decode rates only: llama.cpp's come from its own performance counters (`llama_perf_context`,
evaluation of the generated tokens), ours from `adadim generate`'s report of its decode loop.
Both suppress nothing else: greedy sampling, no stop token reached within the budget is
required (the prompt asks for a long text), and the rate is tokens over decode seconds.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import llama_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The history of the Roman Empire"


def llama_cpp_rate(llm, tokens):
    """Decode tokens/s of one greedy completion, from llama.cpp's counters."""
    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.reset()
    # The end-of-text token is banned so that every run decodes `tokens` tokens.
    out = llm.create_completion(
        PROMPT,
        max_tokens=tokens,
        temperature=0.0,
        logit_bias={llm.token_eos(): -1e9},
    )
    perf = llama_cpp.llama_perf_context(llm.ctx)
    n = out["usage"]["completion_tokens"]
    # `n_eval` counts the decode evaluations (the last sampled token is not evaluated).
    return perf.n_eval / (perf.t_eval_ms / 1e3), n


def adadim_rate(binary, model, tokens, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(
        [binary, "generate", "--model", model, "--prompt", PROMPT, "--max-tokens", str(tokens)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    text = out.stdout + out.stderr
    m = re.search(r"decode (\d+) tokens: ([0-9.]+) tokens/s", text)
    if not m:
        sys.exit(f"no decode rate in the output of {binary}:\n{text}")
    return float(m.group(2)), int(m.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adadim", default=os.path.join(ROOT, "target/release/adadim"))
    p.add_argument("--model", default=os.path.join(ROOT, "out/smollm2-w3g64-rtn-ada"))
    p.add_argument(
        "--gguf",
        default=os.path.expanduser("~/.cache/adadim/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    for path in (args.adadim, args.model, args.gguf):
        if not os.path.exists(path):
            sys.exit(f"{path} does not exist (build with `cargo build --release -p adadim-cli`, "
                     "make the model with `cargo xtask quantize --config "
                     "configs/smollm2-w3g64-rtn-ada.toml`, fetch the GGUF with "
                     "`cargo xtask fetch-assets`)")

    llm = llama_cpp.Llama(
        model_path=args.gguf, n_threads=args.threads, n_ctx=512, verbose=False, seed=0
    )
    llama_cpp_rate(llm, 8)  # warm-up
    adadim_rate(args.adadim, args.model, 8, args.threads)
    ours, theirs = [], []
    for r in range(1, args.rounds + 1):
        a, na = adadim_rate(args.adadim, args.model, args.tokens, args.threads)
        b, nb = llama_cpp_rate(llm, args.tokens)
        print(f"round {r}/{args.rounds}: adadim {a:.1f} tokens/s ({na} tokens), "
              f"llama.cpp {b:.1f} tokens/s ({nb} tokens), ratio {a / b:.2f}", file=sys.stderr)
        ours.append(a)
        theirs.append(b)
    ratios = [a / b for a, b in zip(ours, theirs)]
    load = open("/proc/loadavg").read().split()[:3]
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, {args.tokens} new "
          f"tokens, prompt {PROMPT!r}, {args.rounds} rounds, load average after {' '.join(load)}")
    print("| runtime | median tokens/s | range |\n|---|---|---|")
    print(f"| adadim, {os.path.basename(args.model)} | {statistics.median(ours):.1f} | "
          f"{min(ours):.1f}–{max(ours):.1f} |")
    print(f"| llama.cpp, {os.path.basename(args.gguf)} | {statistics.median(theirs):.1f} | "
          f"{min(theirs):.1f}–{max(theirs):.1f} |")
    print(f"\nadadim / llama.cpp within a round: median {statistics.median(ratios):.2f}×, "
          f"range {min(ratios):.2f}–{max(ratios):.2f}×")


if __name__ == "__main__":
    main()
