"""Pretraining objectives: the Objective interface and registry (base), loss sums (losses),
masking, sentence pairs, and one module per objective (mlm, electra, distill, mapnet).

Import the submodule you need (`from spanlm.objectives import masking`); this package
imports nothing, so a leaf stays cheap to import.
"""
