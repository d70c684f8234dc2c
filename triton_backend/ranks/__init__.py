"""The ranks layer: how rank 0 leads the tensor-parallel followers, and rank 0's own process session."""
