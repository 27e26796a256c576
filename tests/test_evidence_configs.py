"""The experiment files of the evidence issue hold the settings they state (no Ray here)."""

from __future__ import annotations

from fedcsg.spec.experiments import load_experiment


def test_cross_device_config_is_many_clients_few_a_round() -> None:
    cfg = load_experiment("cifar10-resnet20-cross-device")
    assert (cfg.num_clients, cfg.clients_per_round, cfg.num_rounds) == (100, 10, 40)
    assert cfg.clients_per_round / cfg.num_clients <= 0.10
    assert (cfg.partitioner, cfg.dirichlet_alpha) == ("dirichlet", 0.5)
    assert cfg.train_limit == 0 and cfg.test_limit == 2000  # the whole train split: 500 images a client on average
    assert cfg.arm_list == ["fedavg", "fedpara", "csg", "csg-frozen", "csg+int8/delta-int8"]
    assert cfg.min_train_nodes == cfg.clients_per_round and cfg.min_available_nodes == cfg.num_clients
