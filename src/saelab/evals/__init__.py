"""Evaluation: metric definitions (`metrics`), the typed metrics.json row with its one writer
and reader (`entry`), reconstruction and sparsity over activation batches or a live LM
(`reconstruction`), and downstream CE / KL / loss recovered (`downstream`)."""
