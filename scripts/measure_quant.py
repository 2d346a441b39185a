"""Thin wrapper of ``python -m qsched.bench.sd15`` (the SD1.5-sized UNet measurement, qsched/bench/sd15.py)."""
from qsched.bench.sd15 import _cli

if __name__ == "__main__":
    _cli()(prog_name="scripts/measure_quant.py")
