#!/usr/bin/env python3
"""Pins the SFT loss-mask alignment of the jobset engine: Megatron's own GPTDataset, extended by
the dataset module the trainer ships in the job's ConfigMap (services/trainer/src/jobset/pod/
davinci_sft.py), must weight exactly the positions the candle trainer weights.

The candle convention (crates/model/src/batch.rs, `shift_alignment_is_pinned`): the mask is
aligned with the tokens (mask[i] = 1 when token i is a target); position t predicts token t + 1
of the same document with weight mask[t + 1]; nothing is predicted across a document's end (the
EOD). The check writes a shard and its `.mask` sidecar (uint8, same sequences and documents,
as the packer lays them out: one Megatron document = one packed bin of several sequences),
builds MaskedGPTDataset over it the way pretrain_gpt.py would (reset positions, EOD loss
masking) and compares every sample's loss_mask with that rule, across bin boundaries and
padding. Also checks that a sidecar that does not line up is refused.

Usage: scripts/check_megatron_sft.py   (needs megatron-core and torch, as check_megatron_args.sh
sets up: VENV/bin/python scripts/check_megatron_sft.py). Exits 0 with SKIP without them.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "services/trainer/src/jobset/pod"))
EOD = 1


class Tok:
    """The two things GPTDataset asks a tokenizer: EOD and padding ids."""

    eod = EOD
    pad = 0
    unique_identifiers = {"class": "Tok"}


def write(prefix, bins, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in bins:
        for s in seqs:
            b.add_item(__import__("torch").tensor(s))
        b.end_document()
    b.finalize(prefix + ".idx")


def main():
    try:
        import numpy as np
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        from megatron.core.datasets.utils import Split

        import davinci_sft
    except Exception as e:
        print(f"SKIP: megatron.core is not importable ({type(e).__name__}: {e})")
        return 0
    # Token ids are unique (EOD aside), so a window's tokens say where it came from.
    # Each sequence: prompt tokens (mask 0), assistant tokens and the EOD (mask 1).
    docs = []
    nxt = 10
    for prompt, answer in [(3, 2), (2, 4), (4, 1), (1, 3), (5, 2), (2, 2), (3, 3)]:
        ids = list(range(nxt, nxt + prompt + answer)) + [EOD]
        nxt += prompt + answer
        docs.append((ids, [0] * prompt + [1] * answer + [1]))
    bins = [docs[0:2], docs[2:4], docs[4:5], docs[5:7]]  # packed bins of <= 12 tokens
    mask_of = {}
    for ids, m in docs:
        for t, v in zip(ids, m):
            if t != EOD:
                mask_of[t] = v
    seq_len = 12
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "sft-00000")
        write(prefix, [[ids for ids, _ in b] for b in bins], np.uint16)
        write(prefix + ".mask", [[m for _, m in b] for b in bins], np.uint8)
        cfg = GPTDatasetConfig(
            random_seed=1234,
            sequence_length=seq_len,
            path_to_cache=os.path.join(tmp, "cache"),
            tokenizer=Tok(),
            reset_position_ids=True,
            reset_attention_mask=False,
            eod_mask_loss=True,
            create_attention_mask=False,
            mid_level_dataset_surplus=0.005,
        )
        low = IndexedDataset(prefix)
        n_seq = len(low.sequence_lengths)
        ds = davinci_sft.MaskedGPTDataset(low, prefix, np.arange(n_seq), 24, Split.train, cfg)
        checked = weighted = 0
        problems = []
        for i in range(len(ds)):
            s = ds[i]
            tokens, labels, loss = s["tokens"].tolist(), s["labels"].tolist(), s["loss_mask"].tolist()
            window = ds.mask_window(i).tolist()
            for t in range(seq_len):
                # The sidecar window lines up with the token window.
                tok = tokens[t]
                if tok in mask_of and window[t] != mask_of[tok]:
                    problems.append(f"sample {i} position {t}: mask {window[t]} for token {tok}")
                # The candle rule: weight of predicting labels[t] is its own mask entry,
                # none from an EOD (a document's end) and none on padding.
                if tokens[t] == EOD or labels[t] == 0:
                    want = 0.0
                else:
                    want = float(mask_of.get(labels[t], 1))
                if loss[t] != want:
                    problems.append(
                        f"sample {i} position {t}: loss weight {loss[t]} for {tokens[t]} -> {labels[t]}, want {want}"
                    )
                checked += 1
                weighted += want > 0
        # A sidecar that does not line up is refused before training.
        bad = os.path.join(tmp, "bad-00000")
        write(bad, [[ids for ids, _ in b] for b in bins], np.uint16)
        write(bad + ".mask", [[m for _, m in b] for b in bins[:-1]], np.uint8)
        try:
            davinci_sft.MaskedGPTDataset(IndexedDataset(bad), bad, np.arange(n_seq), 4, Split.train, cfg)
            problems.append("a sidecar with fewer documents was accepted")
        except ValueError as e:
            if "does not line up" not in str(e):
                problems.append(f"unexpected refusal: {e}")
    status = "OK" if not problems else "FAIL: " + "; ".join(problems[:5])
    print(f"MaskedGPTDataset: {len(ds)} samples, {checked} positions ({weighted} weighted) checked against the candle rule: {status}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
