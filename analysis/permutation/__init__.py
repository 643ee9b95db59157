"""Permutation alignment of models trained from different initialisations:
permutation specs, weight matching (Git Re-Basin), C2M3 (cycle-consistent
multi-model matching), activation matching, REPAIR, loss barriers and 2-D
loss planes, for MLPs, CNNs, residual nets and BERT-style transformers
(`transformer.bert_spec`: residual, FFN and head-structured attention groups).

Linear assignment problems are solved by scipy on the CPU; everything else
runs with torch on `analysis.device.get_device()`.
"""
from analysis.permutation.barrier import barriers, interpolate, interpolation_curve
from analysis.permutation.c2m3 import C2M3Result, c2m3, merge_in_universe
from analysis.permutation.plane import loss_plane, plane_basis
from analysis.permutation.repair import repair, unit_statistics
from analysis.permutation.specs import (Attention, PermutationSpec, apply_permutation, compose, conv_bn_chain_spec, cycle_error,
                                        identity_perms, invert, linear_chain_names, mlp_spec,
                                        mlp_spec_from_state_dict, random_perms, residual_mlp_spec)
from analysis.permutation.weight_matching import matching_objective, weight_matching

__all__ = [
    "Attention", "PermutationSpec", "apply_permutation", "compose", "conv_bn_chain_spec", "cycle_error", "identity_perms",
    "invert", "linear_chain_names", "mlp_spec", "mlp_spec_from_state_dict", "random_perms", "residual_mlp_spec",
    "weight_matching", "matching_objective", "c2m3", "C2M3Result", "merge_in_universe", "repair",
    "unit_statistics", "interpolate", "interpolation_curve", "barriers", "loss_plane", "plane_basis",
]
