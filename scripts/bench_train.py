#!/usr/bin/env python3
"""CPU training throughput, davinci-model (candle) beside transformers, same model and batch.

Usage: scripts/bench_train.py [--rows 4 --len 512 --docs 4 --steps 5 --threads 2]
Builds (cargo build --release -p davinci-model) and runs crates/model's `bench_train` example and a transformers
Qwen2ForCausalLM step (eager attention with the same block-diagonal mask, AdamW, clipping) in
separate processes, one after the other, and prints tokens/s and peak RSS for each. The model is
deploy/examples/tiny-qwen2.json with wider layers (below), random weights, random tokens; every
row holds --docs documents. Needs torch + transformers (e.g. /var/tmp/venv-torch/bin/python).
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


def torch_side(rows, length, docs, steps, threads):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = Qwen2Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type", "torch_dtype")})
    model = Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (rows, length))
    lens = [length // docs + (d < length % docs) for d in range(docs)]
    seg = torch.cat([torch.full((n,), d) for d, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens]).expand(rows, -1)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(rows, 1, length, length)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    labels = ids.clone()
    same = torch.cat([seg[1:] == seg[:-1], torch.tensor([False])])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, labels[:, 1:, None])[..., 0]
        w = same[:-1].float().expand(rows, -1)
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        last = step()
    secs = time.perf_counter() - t
    import transformers

    return {
        "engine": f"transformers {transformers.__version__} (torch {torch.__version__}, {threads} threads)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": rows * length,
        "steps": steps,
        "seconds": secs,
        "tokens_per_s": rows * length * steps / secs,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_loss": last,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.torch_only:
        print(json.dumps(torch_side(a.rows, a.len, a.docs, a.steps, a.threads)))
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(CONFIG, f)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    # Only the model crate: a release build of the whole workspace is not needed to time it.
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "davinci-model", "--example", "bench_train"],
                   cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    load_before = os.getloadavg()[0]
    ours = subprocess.run(
        [os.path.join(target, "release", "examples", "bench_train"),
         f.name, str(a.rows), str(a.len), str(a.docs), str(a.steps)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    ).stdout
    theirs = subprocess.run(
        [sys.executable, __file__, "--torch-only", "--rows", str(a.rows), "--len", str(a.len),
         "--docs", str(a.docs), "--steps", str(a.steps), "--threads", str(a.threads)],
        check=True, capture_output=True, text=True,
    ).stdout
    print(f"load average before: {load_before:.1f} (1 min) on {os.cpu_count()} cores")
    for line in (ours, theirs):
        r = json.loads(line.strip().splitlines()[-1])
        print(f"{r['engine']}: {r['parameters']} params, {r['tokens_per_step']} tokens/step, "
              f"{r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mib']:.0f} MiB, loss {r['last_loss']:.4f}")
    print(f"load average after: {os.getloadavg()[0]:.1f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
