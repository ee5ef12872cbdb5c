"""Dynamic module allocation (DynaLoRA): every adapter keeps its rank; a chosen subset of modules trains at a time."""
