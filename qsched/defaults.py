"""The main job's defaults (``qsched calibrate`` with no options, and the benchmark's "default path" section).

Chosen on the testbed (BENCHMARKS.md, "Default path"): search 60 trials shared by the "auto" parametrizations
on 20 prompts x 1 seed, then validate on 48 other prompts x 2 other seeds; do no harm. No torch import here, so
the CLI's ``--help`` stays fast.
"""

SEARCH_PROMPTS = 20
SEARCH_SEEDS = (0,)
VALIDATION_PROMPTS = 48
VALIDATION_SEEDS = (1, 2)
TRIALS = 60
PARAMETRIZATION = "auto"
