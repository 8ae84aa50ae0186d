"""Command-line tools around the library and main.py (benchmark, sweep, export, analysis); not installed."""
