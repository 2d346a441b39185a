"""Would validating on new wording have caught the harmful default-path schedules? (BENCHMARKS.md, "Default path")

The default-path run of commit 128b566 calibrated on *training* wording (testbed-calib was then training
captions) and made held-out FD worse in 11 of 36 draws. This script re-scores every schedule that run kept, paired
with the original schedule, on 48 prompts x seeds (1, 2) of a wording the model was never trained on and that no
evaluation uses (the synonyms and templates that became ``testbed-calib``), and prints that validation gain next
to the run's own validation gain and its held-out outcome.

Reproduce: check out 128b566, run ``python -m qsched.bench --out runs/default2/BENCHMARKS.md --work
runs/bench-default2 --no-rss --no-progress --jobs 2 --sections default --default-images 1000 --default-draws 3``
(23 min; its per-draw JSON is committed as benchmarks/default_path_training_wording.json, and the schedules it
kept stay in runs/bench-default2), then, on this commit, ``PYTHONPATH=$PWD python scripts/validation_wording.py``
(about 2 min). Output: benchmarks/validation_wording.json.
"""
import glob
import json
import sys

import numpy as np
import torch

from qsched.bench.env import BenchEnv, Models
from qsched.schedule import Schedule
from qsched.runner import generate, using_schedule
from qsched.validation import paired_gain, per_prompt_means
from qsched.prompts import load_prompts

def novel(n: int, seed: int) -> list[str]:
    """The new wording (today's testbed-calib; identical to the lists this experiment used)."""
    return load_prompts("testbed-calib", n, seed=seed).prompts


torch.set_num_threads(1)
env = BenchEnv.testbed(); models = Models(env); jaq = env.jaq()
res = json.load(open(sys.argv[1] if len(sys.argv) > 1 else 'benchmarks/default_path_training_wording.json'))['default']['rows']
out = {}
which = sys.argv[2:] or None
for unit in sorted(glob.glob('runs/bench-default2/units/default-calib/*/result.json')):
    r = json.load(open(unit)); c = r['config']; key = f"{c['steps']}:{c['spec']}"
    if "calib_prompts_sha1" in c:  # a unit of a later run (calibrated on the new wording)
        continue
    if which and key not in which: continue
    sched = Schedule.from_dict(r['result']['schedule'])
    if sched.is_identity if hasattr(sched,'is_identity') else False: continue
    draw = c['draw']; drow = res[key]['draws'][draw]
    if drow['decision'] != 'qsched':
        # still informative: what was the best candidate? skip for speed
        continue
    pipe = models.pipe(c['spec']); steps = c['steps']
    ps = novel(48, seed=draw)
    def run(s):
        with using_schedule(pipe, s):
            ims = torch.cat([generate(pipe, ps, steps, seed=sd) for sd in (1, 2)])
        return jaq.score(ims, ps * 2)
    a, b = run(sched), run(Schedule.identity(steps))
    def pp(s): return per_prompt_means(np.asarray(s.tc_per_image) + s.k*np.asarray(s.iq_per_image), len(ps))
    g = paired_gain(pp(a), pp(b))
    out[f"{key}:d{draw}"] = {"novel": g.to_dict(), "val": drow['validation_gain'], "fd": drow['fd']['diff'],
                             "fd_ci": [drow['fd']['ci_low'], drow['fd']['ci_high']], "acc": drow['accuracy']['diff'],
                             "heldout_jaq": drow['jaq']['diff']}
    o = out[f"{key}:d{draw}"]
    print(f"{key} d{draw}: val {o['val']['mean']:+.2f} [{o['val']['ci_low']:+.2f},{o['val']['ci_high']:+.2f}]  novel {g.mean:+.2f} [{g.ci_low:+.2f},{g.ci_high:+.2f}]  held-out jaq {o['heldout_jaq']:+.2f} fd {o['fd']:+.2f} {o['fd_ci']} acc {o['acc']:+.3f}", flush=True)
json.dump(out, open('benchmarks/validation_wording.json', 'w'), indent=1)
