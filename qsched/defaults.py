"""The main job's defaults (``qsched calibrate`` with no options, and the benchmark's "default path" section).

Chosen on the testbed (BENCHMARKS.md, "Default path"): search 60 trials shared by the "auto" parametrizations
on 20 prompts x 1 seed, then validate on 96 other prompts x 3 other seeds; do no harm. With 48 x 2 the validation
interval was too wide to confirm the W4A4 gains (a schedule kept in 1 of 3 draws at 2 steps, 0 of 3 at 4); 96 x 3 confirmed them in
every draw without letting a harmful schedule through (the 4-step W4A8 default takes about 40 s on a 2-core CPU).
No torch import here, so the CLI's ``--help`` stays fast.
"""

SEARCH_PROMPTS = 20
SEARCH_SEEDS = (0,)
VALIDATION_PROMPTS = 96
VALIDATION_SEEDS = (1, 2, 3)
TRIALS = 60
PARAMETRIZATION = "auto"
