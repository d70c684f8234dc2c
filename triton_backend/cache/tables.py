"""The running sequences' block tables, kept by every rank between steps and changed by edits, not resent.

A sequence the engine runs has a slot (0 .. max_slots - 1) for as long as it runs; row ``slot`` of a
[max_slots, context blocks] table holds its block ids. A sequence's table only grows while it runs (a block each
``block_size`` tokens; ``BlockPool`` never swaps a block it holds), so a step carries, for each of its sequences,
only the slot, how many entries the ranks already hold (``keeps``: the rest of the row is stale), the table's
length now and the entries past ``keeps`` (``entries``, all the step's, in packed order). In a steady decode that
is one entry per sequence every ``block_size`` steps, where the whole tables used to travel (64 sequences of 8k
tokens in blocks of 32: 128 KiB a step, broadcast to every rank and uploaded to every device;
``tools/probes/step_bytes.py`` counts both).

Each rank keeps the table twice: on the host, where the step is planned (and the CPU kernel reads it), and on
the device, where FlexAttention's masks and the CUDA graphs' inputs are gathered from it by slot, so no table is
uploaded whole. An edit is one small upload and one scatter. Rank 0 validates what it sends; a follower applies
the same edits to the same rows, so every rank's copy is the same.
"""

from __future__ import annotations

import numpy as np
import torch

from triton_backend.transfer import upload


class BatchTables:
    """``slots`` block tables of up to ``width`` entries, each a block id below ``num_blocks``."""

    def __init__(self, slots: int, width: int, num_blocks: int, device):
        self.num_blocks = num_blocks
        self.host = np.zeros((slots, width), dtype=np.int64)
        self.device = torch.zeros((slots, width), dtype=torch.int64, device=device)

    @property
    def width(self) -> int:
        return self.host.shape[1]

    def apply(self, slots: np.ndarray, keeps: np.ndarray, lengths: np.ndarray, entries: np.ndarray) -> np.ndarray:
        """Sequence i (in slot ``slots[i]``) keeps its first ``keeps[i]`` entries and gets the next
        ``lengths[i] - keeps[i]`` of ``entries``; returns the step's whole tables, concatenated in packed order
        (what ``kv_cache.plan`` takes). Raises ``ValueError`` naming the rule an edit breaks."""
        slots, keeps, lengths, entries = (np.asarray(x, dtype=np.int64).reshape(-1)
                                          for x in (slots, keeps, lengths, entries))
        if not len(slots) == len(keeps) == len(lengths):
            raise ValueError("a step's slots, kept entries and table lengths must be one per sequence")
        if ((slots < 0) | (slots >= len(self.host))).any() or len(np.unique(slots)) != len(slots):
            raise ValueError(f"a step's slots must be distinct and below {len(self.host)}")
        if ((keeps < 0) | (keeps > lengths) | (lengths > self.width)).any():
            raise ValueError(f"a block table keeps at most its length, of at most {self.width} entries")
        if (lengths - keeps).sum() != len(entries) or ((entries < 0) | (entries >= self.num_blocks)).any():
            raise ValueError(f"a step's new table entries must be one per new block, each below {self.num_blocks}")
        new = lengths - keeps
        rows = np.repeat(slots, new)
        columns = np.repeat(keeps - np.cumsum(new) + new, new) + np.arange(len(entries))
        if len(entries):
            self.host[rows, columns] = entries
            edit = upload(np.stack([rows, columns, entries]), self.device.device)  # one upload
            self.device.index_put_((edit[0], edit[1]), edit[2])
        starts = np.cumsum(lengths) - lengths
        return self.host[np.repeat(slots, lengths), np.arange(lengths.sum()) - np.repeat(starts, lengths)]

    def rows(self, slots: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """The device tables of ``slots`` [n], [n, width] (entries past a table's length are stale: mask them)."""
        return self.device.index_select(0, slots)[:, :width]
