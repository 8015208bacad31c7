#!/usr/bin/env python3
"""Reports how tightly a `davinci pack` output is packed, from its Megatron `.idx` files alone.

Usage: scripts/packing_report.py PACKED_DIR SEQ_LEN

For each `{stage}/{dataset}` (all its `-NNNNN.idx` shards, masks excluded) it prints documents,
tokens T, bins used, ceil(T / SEQ_LEN), the issue's bound 1.001 * ceil(T / SEQ_LEN) + 1, a lower
bound no packer can beat without cutting documents (bins >= ceil(T / SEQ_LEN) and bins >= the
number of documents longer than SEQ_LEN / 2, since no two of those fit one bin), and padding.
Layout read (DESIGN.md §4): magic MMIDIDX\\0\\0, u64 version, u8 dtype, u64 N sequences,
u64 M+1 document indices, int32 lengths[N], int64 pointers[N], int64 doc_idx[M+1].
"""
import glob
import os
import struct
import sys


def read_idx(path):
    with open(path, "rb") as f:
        b = f.read()
    assert b[:9] == b"MMIDIDX\x00\x00", f"{path}: not a Megatron index"
    n, m = struct.unpack_from("<QQ", b, 18)
    lengths = struct.unpack_from(f"<{n}i", b, 34)
    doc_idx = struct.unpack_from(f"<{m}q", b, 34 + 4 * n + 8 * n)
    return lengths, doc_idx


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root, seq_len = sys.argv[1], int(sys.argv[2])
    groups = {}
    for idx in sorted(glob.glob(os.path.join(root, "**", "*.idx"), recursive=True)):
        if ".mask" in os.path.basename(idx):
            continue
        prefix = os.path.relpath(idx, root).rsplit("-", 1)[0]
        groups.setdefault(prefix, []).append(idx)
    for prefix, files in groups.items():
        lengths, bins = [], 0
        for f in files:
            ls, doc_idx = read_idx(f)
            lengths.extend(ls)
            bins += len(doc_idx) - 1
        tokens = sum(lengths)
        ceil = -(-tokens // seq_len)
        bound = 1.001 * ceil + 1
        long_docs = sum(1 for l in lengths if l > seq_len // 2)
        lower = max(ceil, long_docs)
        padding = 1 - tokens / (bins * seq_len) if bins else 0.0
        verdict = "meets" if bins <= bound else ("cannot meet (lower bound > bound)" if lower > bound else "MISSES")
        print(f"{prefix}: {len(lengths)} documents, {tokens} tokens, {bins} bins; ceil(T/S) {ceil}, "
              f"bound {bound:.2f}, lower bound {lower} ({long_docs} documents > S/2); "
              f"padding {padding:.2%}: {verdict}")


if __name__ == "__main__":
    main()
