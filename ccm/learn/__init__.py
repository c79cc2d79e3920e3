"""Training and evaluation: the Lightning data module, recipes, training, metrics, probes and
report figures."""
