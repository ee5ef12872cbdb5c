"""ALoRA (arXiv 2403.16187): AB-LoRA ablation importance per rank; prune the lowest, grow modules that lost none."""
