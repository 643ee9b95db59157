"""The built-in benchmark: a real transformer fine-tuned on real text tasks,
MNIST MLPs from several seeds, and the frozen per-task heads that score them.

    from analysis.zoo import load_demo, build_tiny_demo, DemoNotBuilt
    demo = load_demo()                 # DemoNotBuilt until `python -m analysis.zoo build [--quick]`
    demo.tvs, demo.evaluator, demo.reference, demo.cards, demo.mnist_paths
"""
from analysis.zoo.builder import (REAL_TASKS, BuildConfig, DemoNotBuilt, build, default_cache_dir, find_build,
                                preset)
from analysis.zoo.demo import Demo, build_tiny_demo, load_demo, open_demo
from analysis.zoo.mnist import MLP, load_mnist, mnist_model_paths

__all__ = ["REAL_TASKS", "BuildConfig", "Demo", "DemoNotBuilt", "MLP", "build", "build_tiny_demo",
           "default_cache_dir", "find_build", "load_demo", "load_mnist", "mnist_model_paths", "open_demo", "preset"]
