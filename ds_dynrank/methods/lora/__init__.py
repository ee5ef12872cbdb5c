"""Fixed-rank LoRA: the baseline every dynamic method is measured against."""
