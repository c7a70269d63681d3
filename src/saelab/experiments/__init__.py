"""The seeds' research experiments, one module each: a config dataclass, `run_*` (the whole
experiment into an output folder, metrics rows through saelab.evals.entry), a typed result and
a formatter (saelab.tables): prune (seed 000), perturb (seed 002), sparse_mlp (seed 004) and
compare (dictionary agreement, MMCS)."""
