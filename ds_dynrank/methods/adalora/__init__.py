"""AdaLoRA-style allocation (arXiv 2303.10512): sensitivity x uncertainty scores, a cubic budget schedule."""
