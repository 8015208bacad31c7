"""Megatron-LM's pretrain_gpt.py, with davinci's loss-mask sidecar for SFT stages.

`--davinci-sft-mask` (removed before Megatron parses the arguments) swaps GPTDataset for
davinci_sft.MaskedGPTDataset; everything else is pretrain_gpt.py as the image ships it
(MEGATRON_DIR, default /opt/megatron-lm).
"""
import os
import runpy
import sys

if __name__ == "__main__":
    if "--davinci-sft-mask" in sys.argv:
        sys.argv.remove("--davinci-sft-mask")
        import megatron.core.datasets.gpt_dataset as gpt_dataset

        import davinci_sft

        # pretrain_gpt.py imports GPTDataset from this module when it runs.
        gpt_dataset.GPTDataset = davinci_sft.MaskedGPTDataset
    script = os.path.join(os.environ.get("MEGATRON_DIR", "/opt/megatron-lm"), "pretrain_gpt.py")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
