"""The run report: a run directory's history drawn as one self-contained HTML page.

``history`` (the layout of ``<run_dir>/timeseries/`` and its reader; the daemon's writer
uses the same layout), ``curves`` (reference AUC curves beside the model's: the oracle,
baselines), ``plots`` (the PNGs; the only module that imports matplotlib), ``page`` (the
HTML). Imported by the CLI; the runtime imports ``history`` alone, for the file layout.
Reads files, never a running daemon.
"""
