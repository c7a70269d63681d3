"""Evaluation: metric definitions (`metrics`), reconstruction and sparsity over activation
batches or a live LM, and downstream CE / KL / loss recovered (`downstream`)."""
