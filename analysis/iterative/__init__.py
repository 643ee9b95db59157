"""Iterative merging: merge more than once, round by round.

    from analysis.iterative import IterativeConfig, preset, run, load_run
    config = preset("quick", "atm", demo.tasks, demo.manifest["config"])     # 3 rounds, the build's budget
    result = run(config, demo.evaluator, progress=print_progress)            # cached, resumable
    result.table                                 # tidy: procedure, round, steps, task, metric, value, split
    result.metric("mean_accuracy"), result.final_state(), result.final_delta(demo.tvs)

**ATM** (Zhou et al., "ATM: Improving Model Merging by Alternating Tuning and
Merging", 2024): from the pretrained model, each round fine-tunes a copy on
every task for a short budget and merges the task vectors into the next shared
model, θ_r = θ_{r-1} + merge(τ_1..τ_T); task arithmetic (θ_{r-1} + α Σ τ_t) by
default, any registry method that yields one model on request.
**ColD Fusion** (Don-Yehiya et al., "ColD Fusion: Collaborative Descent for
Distributed Multitask Finetuning", ACL 2023): each round every contributor
fine-tunes the current shared model on its own task and the fused model is the
weight average of the contributors' models (`weight_averaging`, pluggable:
any registry method); the fused model is then measured as a starting point on
held-out tasks never fused: a linear probe and a short fine-tune, per round,
against the same from the original backbone (round 0).

Both runs are `analysis.iterative.runner.run` with a different config; per
round they record per-task and mean accuracy, the mean pairwise cosine of the
round's task vectors, the norm of the update and each task vector's norm.

Our choices and the differences from the papers (deliberate, for a fair and
CPU-sized comparison on the zoo's benchmark):
- Budget: `total_steps` per task over the whole run equals what the build's
  ordinary fine-tune spent on that task, split evenly over rounds (ATM's paper
  fixes a total number of epochs and splits it likewise). Each round's
  fine-tune is the zoo's protocol with a fresh AdamW and its own warm-up and
  linear decay over that round's steps (the optimiser state is not carried
  across rounds, as when contributors share only weights).
- ATM's α: the registry's task-arithmetic default (α = 0.3, the Merge page's
  default), not tuned per round on validation data; pass merge_knobs to change it.
- Heads: each task keeps the zoo's frozen linear-probe head trained on the
  pretrained features (ColD Fusion's contributors train a fresh head each time
  and discard it). Held-out probes are trained anew on each round's features.
- ColD Fusion's paper samples a subset of contributors per iteration; here
  every contributor takes part in every round (as the issue asks).
- Seeds: each fine-tune's batch order and dropout are seeded by
  (seed, task, round) alone, so one contributor's ColD Fusion is sequential
  fine-tuning and a resumed run equals an uninterrupted one.
"""
from analysis.iterative.config import DEFAULT_MERGE, PRESETS, PROCEDURES, IterativeConfig, preset, round_seed
from analysis.iterative.runner import IterativeRun, check, load_run, model_delta, run, run_folder, source_key

__all__ = ["DEFAULT_MERGE", "PRESETS", "PROCEDURES", "IterativeConfig", "IterativeRun", "check", "load_run",
           "model_delta", "preset", "round_seed", "run", "run_folder", "source_key"]
