"""Megatron GPTDataset with davinci's loss-mask sidecar (`{prefix}.mask.{bin,idx}`, uint8, the
same sequences and documents as `{prefix}`), for SFT stages (mask `assistant-only`).

Megatron's GPTDataset masks the loss only on EOD inputs and padding. This subclass reads the
sidecar through the very same sample index (so each sample's mask window covers exactly its
token window, across document and shard boundaries) and multiplies it in. Alignment, as the
packer writes the mask and the candle trainer reads it: mask[i] = 1 when token i is a training
target, so position t, which predicts token t + 1, gets weight mask[t + 1] (`label_mask`).
"""
import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset

MASK_SUFFIX = ".mask"


def label_mask(window, add_extra_token=True):
    """Per-position loss weights of a sample from the per-token mask of its token window.

    With add_extra_token (Megatron's default) the window has seq_len + 1 tokens, tokens =
    window[:-1] and labels = window[1:]: the weight of position t is the mask of label t, i.e.
    window[t + 1]. Without it, labels are the window rolled by one and the last label is padding.
    """
    w = (numpy.asarray(window) == 1).astype(numpy.float32)
    if add_extra_token:
        return w[1:]
    return numpy.concatenate([w[1:], numpy.zeros(1, dtype=numpy.float32)])


class MaskedGPTDataset(GPTDataset):
    def __init__(self, indexed_dataset, dataset_path, *args, **kwargs):
        super().__init__(indexed_dataset, dataset_path, *args, **kwargs)
        self.mask_dataset = self.build_low_level_dataset(dataset_path + MASK_SUFFIX, self.config)
        same = numpy.array_equal(
            self.mask_dataset.sequence_lengths, indexed_dataset.sequence_lengths
        ) and numpy.array_equal(self.mask_dataset.document_indices, indexed_dataset.document_indices)
        if not same:
            raise ValueError(
                f"{dataset_path}{MASK_SUFFIX} does not line up with {dataset_path} "
                "(different sequence lengths or documents): repack the stage"
            )

    def mask_window(self, idx):
        """The sidecar's values over sample idx's token window (padding reads as 0)."""
        tokens = self.dataset
        try:
            self.dataset = self.mask_dataset
            window, _ = self._query_document_sample_shuffle_indices(idx)
        finally:
            self.dataset = tokens
        return window

    def __getitem__(self, idx):
        out = super().__getitem__(idx)
        window = self.mask_window(0 if idx is None else idx)
        weights = label_mask(window, self.config.add_extra_token_to_sequence)
        out["loss_mask"] = out["loss_mask"] * torch.from_numpy(weights)
        return out
