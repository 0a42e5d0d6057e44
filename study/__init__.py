"""What to run: spec files, the command line, and (with Ray Tune + Optuna) studies."""
