"""Where a run's parties compute: the rule that turns ``client-num-gpus = "auto"`` and
``server-device = "auto"`` into a client's GPU share and the server's device, from what the Ray
cluster offers. Pure arithmetic; :func:`fedcsg.fl.ray_cluster.resolve_resources` applies it to a run.

The rule (docs/gpu.md has the memory arithmetic behind it):

* ``client-num-gpus = "auto"`` on a cluster without GPUs: 0 (the clients train on CPUs).
* ``client-num-gpus = "auto"`` on a cluster with GPUs: ``1 / clients-per-gpu``, so that Ray places
  ``clients-per-gpu`` clients on each GPU; when the server evaluates on a GPU of its own machine
  (``server-device`` resolved to ``cuda``), ``1 / (clients-per-gpu - 1)``: the server is then one
  of the ``clients-per-gpu`` tenants of GPU 0, and Ray's shares leave its place free.
* ``server-device = "auto"``: ``cuda`` when the server's machine has a CUDA device, else ``cpu``.
* A number for ``client-num-gpus`` is taken as it is.
"""

from __future__ import annotations

import math

AUTO = "auto"
SERVER_DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CLIENTS_PER_GPU = 4  # clients Ray places on one GPU under client-num-gpus = "auto"


def check_client_num_gpus(value: object) -> float | str:
    """``value`` as a ``client-num-gpus`` setting ("auto", or a finite number >= 0 as a float), else a
    one-line ValueError."""
    if value == AUTO:
        return AUTO
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf:
        return float(value)
    raise ValueError(f'client-num-gpus = {value!r} is not accepted: "auto" or a finite number >= 0 is')


def server_device(setting: str, cuda_here: bool) -> str:
    """The server's device for ``server-device = setting``: ``cuda`` or ``cpu`` (``auto``: ``cuda``
    when the server's machine has a CUDA device, ``cuda_here``)."""
    if setting == AUTO:
        return "cuda" if cuda_here else "cpu"
    return setting


def client_gpu_share(setting: float | str, clients_per_gpu: int, cluster_gpus: float, server_on_gpu: bool) -> float:
    """The GPU share each client asks Ray for (see the module's rule).

    Parameters
    ----------
    setting : float or "auto"
        ``client-num-gpus``.
    clients_per_gpu : int
        ``clients-per-gpu``: the tenants of one GPU under "auto", the server included when it is on one.
    cluster_gpus : float
        The GPUs of the Ray node with the most of them (0: none anywhere).
    server_on_gpu : bool
        Whether the server evaluates on a GPU (:func:`server_device` gave ``cuda``).
    """
    if setting != AUTO:
        return float(setting)
    if cluster_gpus <= 0:
        return 0.0
    tenants = clients_per_gpu - 1 if server_on_gpu and clients_per_gpu > 1 else clients_per_gpu
    return 1.0 / tenants
