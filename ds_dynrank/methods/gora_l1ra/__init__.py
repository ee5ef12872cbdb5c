"""GoRA then L1RA: a one-shot gradient allocation after warm-up, refined by L1RA's gated events after it."""
