"""Hugging Face <-> Megatron checkpoints with Megatron-Bridge's AutoBridge (on CPU, gloo).

  convert.py import --hf DIR --megatron DIR
      HF model directory -> Megatron distributed checkpoint (embedding rows = config.json's
      vocab_size; the rendered --make-vocab-size-divisible-by makes Megatron pad to the same).
  convert.py export --hf-base DIR --megatron DIR --hf DIR
      The newest iteration of a Megatron-LM checkpoint (pretrain_gpt.py's --save) -> HF model
      directory with the base model's config and tokenizer files.
"""
import argparse
import os
import shutil


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import")
    i.add_argument("--hf", required=True)
    i.add_argument("--megatron", required=True)
    e = sub.add_parser("export")
    e.add_argument("--hf-base", required=True)
    e.add_argument("--megatron", required=True)
    e.add_argument("--hf", required=True)
    a = p.parse_args()

    import torch
    from megatron.bridge import AutoBridge

    if a.cmd == "import":
        AutoBridge.import_ckpt(a.hf, a.megatron, torch_dtype=torch.bfloat16, low_memory_save=True)
        return
    with open(os.path.join(a.megatron, "latest_checkpointed_iteration.txt")) as f:
        it = int(f.read().strip())
    src = os.path.join(a.megatron, f"iter_{it:07d}")
    bridge = AutoBridge.from_hf_pretrained(a.hf_base, torch_dtype=torch.bfloat16)
    bridge.export_ckpt(src, a.hf, show_progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        if os.path.exists(os.path.join(a.hf_base, name)) and not os.path.exists(os.path.join(a.hf, name)):
            shutil.copy2(os.path.join(a.hf_base, name), os.path.join(a.hf, name))


if __name__ == "__main__":
    main()
