"""Experiments over seeds: stages of training runs, their statistics, tables and figures (tools/transfer.py,
tools/cifar_degradation.py)."""
