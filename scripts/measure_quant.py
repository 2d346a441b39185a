"""Thin wrapper of ``python -m qsched.bench.sd15`` (the SD1.5-sized UNet measurement, qsched/bench/sd15.py)."""
from qsched.bench.cli import sd15_app
if __name__ == "__main__":
    sd15_app(prog_name="scripts/measure_quant.py")
