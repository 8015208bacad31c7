#!/usr/bin/env python3
"""CPU generation throughput, davinci-model (candle, the `inference` target's engine) beside
transformers' `generate`, same model shape, batch and lengths.

Usage: scripts/bench_generate.py [--prompts 4 --len 256 --new 64 --threads 2]
Builds (cargo build --release -p davinci-model) and runs crates/model's `bench_generate` example
and a transformers Qwen2ForCausalLM greedy `generate` (KV cache on, no end-of-sequence token, so
both decode exactly --new tokens) in separate processes, one after the other. Prefill is timed
as one forward over the prompts; decode is the rest of the generation, per generated token
after the first. The model is deploy/examples/tiny-qwen2.json with wider layers (as
scripts/bench_train.py), random weights and prompts. Needs torch + transformers (e.g.
/var/tmp/venv-torch/bin/python).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(
    json.load(open(os.path.join(ROOT, "deploy/examples/tiny-qwen2.json"))),
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
)


def torch_side(n, length, new, threads):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")})
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (n, length))
    attn = torch.ones_like(ids)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
              pad_token_id=0, use_cache=True)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=attn, **dict(kw, max_new_tokens=2, min_new_tokens=2))
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=attn, use_cache=True)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=attn, **kw)
        total = time.perf_counter() - t
    assert out.shape == (n, length + new), out.shape
    return {
        "engine": f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, sdpa)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompts": n, "prompt_len": length, "new_tokens": new,
        "prefill_tokens_per_s": n * length / prefill,
        "decode_tokens_per_s": n * (new - 1) / max(total - prefill, 1e-9),
        "seconds": total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--len", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-only", action="store_true")
    a = p.parse_args()
    if a.torch_only:
        print(json.dumps(torch_side(a.prompts, a.len, a.new, a.threads)))
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(CONFIG, f)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "davinci-model", "--example", "bench_generate"],
                   cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    load_before = os.getloadavg()[0]
    ours = subprocess.run(
        [os.path.join(target, "release", "examples", "bench_generate"),
         f.name, str(a.prompts), str(a.len), str(a.new)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout
    theirs = subprocess.run(
        [sys.executable, __file__, "--torch-only", "--prompts", str(a.prompts), "--len", str(a.len),
         "--new", str(a.new), "--threads", str(a.threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    print(f"load average before: {load_before:.1f} (1 min) on {os.cpu_count()} cores")
    for line in (ours, theirs):
        r = json.loads(line.strip().splitlines()[-1])
        print(f"{r['engine']}: {r['parameters']} params, {r['prompts']}×{r['prompt_len']} prompt tokens, "
              f"{r['new_tokens']} new each: prefill {r['prefill_tokens_per_s']:.0f} tokens/s, "
              f"decode {r['decode_tokens_per_s']:.1f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
