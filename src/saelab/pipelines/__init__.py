"""The jobs behind `saelab train`, `saelab quickstart` (train_lm) and `saelab toy` (toy)."""
