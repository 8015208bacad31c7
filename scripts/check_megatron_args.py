#!/usr/bin/env python3
"""Parses the Megatron arguments the trainer renders with Megatron-LM's own parser and checks.

Usage: scripts/check_megatron_args.py [FILE.args:WORLD_SIZE[:MODEL_VOCAB] ...]
  Default: the golden argument files of services/trainer/tests/fixtures/jobset/golden/
  (Qwen2.5-0.5B on 8 GPUs, 32B on 32, 72B stage 0 and 1 on 64).
The first GPU's architecture is answered as Hopper (sm 90): no GPU is needed.
Each file gets what the pod script adds (--load/--save/--finetune) and loses what it removes
(--davinci-sft-mask), then goes through megatron.training.arguments.parse_args and
validate_args with WORLD_SIZE set, and Megatron's vocabulary padding is checked against the
checkpoint's rows (MODEL_VOCAB). Needs megatron-core and Megatron-LM's megatron/training on
PYTHONPATH: scripts/check_megatron_args.sh sets both up in a virtualenv.
Exits 0 with a SKIP message when megatron.training is not importable.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "services/trainer/tests/fixtures/jobset/golden")
DEFAULT = [
    f"{GOLDEN}/qwen2.5-0.5b.args:8:151936",
    f"{GOLDEN}/qwen2.5-32b.args:32:152064",
    f"{GOLDEN}/qwen2.5-72b-stage-0.args:64:152064",
    f"{GOLDEN}/qwen2.5-72b-stage-1.args:64:152064",
]
TOKENIZER_LEN = 151665  # Qwen2.5: 151,643 BPE tokens + 22 special ones


def main(specs):
    try:
        import megatron.core
        from megatron.training.arguments import parse_args, validate_args
        from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding
        import megatron.training.arguments as margs
    except Exception as e:  # ImportError, or torch missing underneath
        print(f"SKIP: megatron.training is not importable ({type(e).__name__}: {e})")
        return 0
    print(f"megatron-core {megatron.core.__version__}")
    # validate_args asks the first GPU for its architecture; without one, answer for the
    # nodes' H100s (sm 90), as the pods would.
    margs.get_device_arch_version = lambda: 9
    failures = 0
    for spec in specs or DEFAULT:
        path, world, *vocab = spec.split(":")
        with open(path) as f:
            argv = [a for a in f.read().split("\n") if a and a != "--davinci-sft-mask"]
        argv += ["--load", "/ckpt/prev", "--finetune", "--no-load-optim", "--no-load-rng", "--save", "/ckpt/this"]
        os.environ.update(WORLD_SIZE=world, RANK="0", LOCAL_RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
        sys.argv = ["pretrain_gpt.py", *argv]
        name = os.path.basename(path)
        try:
            args = parse_args()
            validate_args(args, {})
            padded = _vocab_size_with_padding(TOKENIZER_LEN, args, logging_enabled=False)
            problems = []
            if vocab and padded != int(vocab[0]):
                problems.append(f"padded vocab {padded} != checkpoint rows {vocab[0]}")
            status = "OK" if not problems else "FAIL: " + "; ".join(problems)
            print(
                f"{name}: world {world} = tp {args.tensor_model_parallel_size} x pp "
                f"{args.pipeline_model_parallel_size} x dp {args.data_parallel_size}, "
                f"{args.num_layers} layers, {args.num_query_groups} query groups, "
                f"padded vocab {padded}, {args.train_iters} iters, "
                f"{len(args.data_path) // 2} blend prefixes: {status}"
            )
            failures += bool(problems)
        except SystemExit as e:
            print(f"{name}: FAIL: Megatron's parser exited ({e})")
            failures += 1
        except Exception as e:
            print(f"{name}: FAIL: {type(e).__name__}: {e}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
