"""Constants shared with the compiled kernels (csrc/scan_shapes.h)."""

# Steps between saved scan states; mirrors kCheckpointChunk in csrc/scan_shapes.h.
CHECKPOINT_CHUNK = 64


def num_checkpoints(length):
    """Saved states for a scan segment of ``length`` steps (works on SymInts)."""
    return (length + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK
