"""A hyperparameter search: settings.py (what the user asked for, checked before Ray starts; what a search
returns), driver.py (Ray Tune wiring and the MLflow parent run, on the driver), trials.py (the trial
functions, the only part Ray workers import) and report.py (trial table, CSV, plots, recipe file).

Nothing is imported here: a worker importing trials.py must not pull in the driver's libraries."""
