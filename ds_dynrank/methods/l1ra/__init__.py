"""L1RA (arXiv 2509.04884): gates under an L1 pull; ranks whose gate reaches zero are re-assigned."""
