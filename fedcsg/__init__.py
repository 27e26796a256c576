"""fedcsg: federated learning with Convolutional Slice Generator (CSG) CNNs on Flower and Ray.

The folders are the design, lowest first (docs/architecture.md): ``io`` and ``processes`` (files and
processes, shared by every part), ``nn`` and ``data`` (networks and data sets, free of Flower),
``spec`` (what a run is), ``wire`` (what travels), ``runs`` (a run on disk), ``fl`` (a run in flight),
``deploy`` (real SuperNodes) and ``cli``. A module imports only from its own folder or lower ones.
"""
