#!/usr/bin/env python3
"""Reference fixtures for crates/model, made with Hugging Face `transformers` (Qwen2ForCausalLM).

Usage:
  scripts/gen_model_fixtures.py gen [OUT_DIR]
      Writes, for a tied and an untied tiny random Qwen2, `OUT_DIR/<name>/` holding the checkpoint
      as `save_pretrained` writes it (config.json + model.safetensors), `batch.json` (two packed
      rows; row 0 holds two documents, row 1 one document and padding) and `reference.safetensors`
      (logits of every position, `grad.<param>` for every parameter) plus `reference.json` (loss).
      OUT_DIR defaults to crates/model/tests/fixtures.
  scripts/gen_model_fixtures.py gen-generate [OUT_DIR]
      For the checkpoints already in OUT_DIR, writes `generate.json` (prompts and the tokens
      `generate(do_sample=False)` produces for each, run one prompt at a time) and
      `generate.safetensors` (`scores.<i>`: the logits of every generated step of prompt i).
  scripts/gen_model_fixtures.py check-ours CKPT_DIR FIXTURE_DIR
      Loads a checkpoint our Rust code wrote with `Qwen2ForCausalLM.from_pretrained` and checks
      that its logits on the fixture batch equal the fixture's (max abs diff <= 1e-5).

The loss convention matches crates/model: position t of a row predicts token t+1 when both lie in
the same document, weighted by mask[t+1] (the mask entry of the predicted token); the loss is the
weighted mean over the batch. Attention is block-diagonal per document and position ids restart
at every document. The reference logits come from the packed rows with a 4D additive mask and
are checked against running every document on its own.
Needs torch, transformers and safetensors (e.g. a venv at /var/tmp/venv-torch).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file, load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 16
# (row, [document lengths]); the rest of a row is padding.
ROWS = [[7, 9], [12]]


def config(tied: bool) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        use_sliding_window=False,
        attn_implementation="eager",
    )


def make_batch(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids, pos, seg, mask = [], [], [], []
    for r, lens in enumerate(ROWS):
        i, p, s, m = [], [], [], []
        for d, n in enumerate(lens):
            i += torch.randint(0, vocab, (n,), generator=g).tolist()
            p += list(range(n))
            s += [d] * n
            if r == 0:
                m += [1] * n  # mid-training: every token
            else:
                m += [int(k % 4 != 1) for k in range(n)]  # SFT-like gaps
        pad = T - len(i)
        i += [0] * pad
        p += [0] * pad
        s += [-1] * pad  # -1: padding
        m += [0] * pad
        ids.append(i), pos.append(p), seg.append(s), mask.append(m)
    return {"ids": ids, "positions": pos, "segments": seg, "mask": mask}


def additive_mask(seg, dtype):
    seg = torch.tensor(seg)
    b, t = seg.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    # padding rows attend to themselves only, so no row is fully masked
    allowed = (same & causal) | torch.eye(t, dtype=torch.bool)
    m = torch.zeros(b, 1, t, t, dtype=dtype)
    m.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return m


def forward(model, batch):
    out = model(
        input_ids=torch.tensor(batch["ids"]),
        position_ids=torch.tensor(batch["positions"]),
        attention_mask=additive_mask(batch["segments"], torch.float32),
        use_cache=False,
    )
    return out.logits


def loss_of(logits, batch):
    ids = torch.tensor(batch["ids"])
    seg = torch.tensor(batch["segments"])
    mask = torch.tensor(batch["mask"], dtype=torch.float32)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = ids[:, 1:]
    nll = -logp.gather(-1, tgt[..., None])[..., 0]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] >= 0)
    w = mask[:, 1:] * same
    return (nll * w).sum() / w.sum()


def check_per_document(model, batch, logits):
    worst = 0.0
    for r, lens in enumerate(ROWS):
        start = 0
        for n in lens:
            ids = torch.tensor([batch["ids"][r][start : start + n]])
            alone = model(input_ids=ids, use_cache=False).logits[0]
            worst = max(worst, (alone - logits[r, start : start + n]).abs().max().item())
            start += n
    assert worst < 1e-5, f"packed logits differ from per-document logits by {worst}"
    return worst


def gen(out_root: str):
    for name, tied, seed in [("tiny-qwen2", False, 1), ("tiny-qwen2-tied", True, 2)]:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config(tied)).float()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.2 * torch.randn_like(p))
        out = os.path.join(out_root, name)
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        os.remove(os.path.join(out, "generation_config.json"))  # not part of the fixture
        batch = make_batch(model.config.vocab_size, seed)
        logits = forward(model, batch)
        worst = check_per_document(model, batch, logits)
        loss = loss_of(logits, batch)
        model.zero_grad()
        loss.backward()
        ref = {"logits": logits.detach().contiguous()}
        for pname, p in model.named_parameters():
            ref["grad." + pname] = p.grad.detach().contiguous()
        save_file(ref, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "batch.json"), "w") as f:
            json.dump(batch, f)
        with open(os.path.join(out, "reference.json"), "w") as f:
            json.dump(
                {
                    "loss": loss.item(),
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "packed_vs_per_document_max_abs": worst,
                },
                f,
                indent=1,
            )
        print(f"{name}: loss {loss.item():.6f}, packed vs per-document {worst:.2e}, {len(ref) - 1} grads")


GEN_PROMPTS = [5, 11, 1, 8]
GEN_NEW = 24


def gen_generate(out_root: str):
    for name, seed in [("tiny-qwen2", 11), ("tiny-qwen2-tied", 12)]:
        out = os.path.join(out_root, name)
        model = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        g = torch.Generator().manual_seed(seed)
        prompts, outputs, scores = [], [], {}
        for i, n in enumerate(GEN_PROMPTS):
            ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g)
            with torch.no_grad():
                res = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=GEN_NEW,
                    min_new_tokens=GEN_NEW,
                    do_sample=False,
                    pad_token_id=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            prompts.append(ids[0].tolist())
            outputs.append(res.sequences[0, n:].tolist())
            scores[f"scores.{i}"] = torch.cat(res.scores, dim=0).contiguous()
        save_file(scores, os.path.join(out, "generate.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "generate.json"), "w") as f:
            json.dump(
                {
                    "prompts": prompts,
                    "max_new_tokens": GEN_NEW,
                    "greedy": outputs,
                    "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                },
                f,
            )
        print(f"{name}: {len(prompts)} prompts, {GEN_NEW} greedy tokens each")


def check_ours(ckpt: str, fixture: str) -> int:
    model = Qwen2ForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32)
    theirs = Qwen2ForCausalLM.from_pretrained(fixture, attn_implementation="eager", dtype=torch.float32)
    ours_keys = set(load_file(os.path.join(ckpt, "model.safetensors")).keys())
    their_keys = set(load_file(os.path.join(fixture, "model.safetensors")).keys())
    if ours_keys != their_keys:
        print(f"FAIL: tensor names differ: ours-only {ours_keys - their_keys}, theirs-only {their_keys - ours_keys}")
        return 1
    with open(os.path.join(fixture, "batch.json")) as f:
        batch = json.load(f)
    ref = load_file(os.path.join(fixture, "reference.safetensors"))["logits"]
    with torch.no_grad():
        got = forward(model, batch)
        again = forward(theirs, batch)
    d = (got - ref).abs().max().item()
    d2 = (again - ref).abs().max().item()
    print(f"ours loaded by transformers {__import__('transformers').__version__}: max |logits - reference| = {d:.3e} (fixture itself: {d2:.3e})")
    return 0 if d <= 1e-5 else 1


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "gen":
        gen(sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "crates/model/tests/fixtures"))
        return 0
    if len(sys.argv) >= 2 and sys.argv[1] == "gen-generate":
        gen_generate(sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "crates/model/tests/fixtures"))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "check-ours":
        return check_ours(sys.argv[2], sys.argv[3])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
