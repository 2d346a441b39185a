"""Human preference study (``qsched study``): pairwise A/B votes on a local web page, Bradley-Terry results.

Modules: ``create`` (images + manifest), ``store`` (SQLite WAL votes), ``pairing`` (pair scheduling),
``app`` (FastAPI app), ``page`` (the rater's HTML), ``server`` (uvicorn runner), ``results`` (win rates,
Bradley-Terry/Elo with bootstrap CIs), ``raters`` (simulated raters that vote over HTTP), ``cli`` (the
``qsched study`` typer sub-app).
"""
