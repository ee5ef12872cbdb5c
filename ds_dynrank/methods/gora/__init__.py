"""GoRA (arXiv 2502.12171): one allocation from gradients accumulated over the first steps, then plain LoRA."""
