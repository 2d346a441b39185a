from qsched.cli import app

app(prog_name="qsched")
