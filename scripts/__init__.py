"""The project's command-line tools (run them as `python scripts/<name>.py`); tests and benchmarks import them as
`scripts.<name>`."""
