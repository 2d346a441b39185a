"""``python -m qsched.bench``: regenerate BENCHMARKS.md (see :mod:`qsched.bench`)."""

from qsched.bench.cli import bench_app

if __name__ == "__main__":
    bench_app(prog_name="python -m qsched.bench")
