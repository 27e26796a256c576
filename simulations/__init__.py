"""Scripts around fedcsg, by purpose; each runs from the checkout as ``python3 -m simulations.FOLDER.NAME``.

- ``benchmarks/``: speed, memory and byte measurements that print a table and write JSON
  (``bench_*.py``; ``gpu_check.py``, the device machine's one-call check).
- ``studies/``: experiments whose findings are written up in docs/ (the CSG ablation, the
  code-dim frontier, central training).
- ``tools/``: pieces other scripts and tests use (a byte-counting TCP relay).
- ``benchlib.py``: what they share (running a command while sampling its process tree's memory,
  argument types, the app bundle's size, tables and JSON).
"""
