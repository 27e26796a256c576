"""The experiment files of the evidence issue hold the settings they state (no Ray here)."""

from __future__ import annotations

from fedcsg.spec.experiments import load_experiment


def test_cross_device_config_is_many_clients_few_a_round() -> None:
    cfg = load_experiment("cifar10-resnet20-cross-device")
    assert (cfg.num_clients, cfg.clients_per_round, cfg.num_rounds) == (100, 10, 40)
    assert cfg.clients_per_round / cfg.num_clients <= 0.10
    assert (cfg.partitioner, cfg.dirichlet_alpha) == ("dirichlet", 0.5)
    assert cfg.train_limit == 0 and cfg.test_limit == 2000  # the whole train split: 500 images a client on average
    assert cfg.arm_list == ["fedavg", "fedpara", "csg", "csg-frozen", "csg+int8/delta-int8", "csg+int8/int8"]
    assert cfg.min_train_nodes == cfg.clients_per_round and cfg.min_available_nodes == cfg.num_clients


def test_headline_config_is_the_peers_and_two_way_arms_over_three_seeds() -> None:
    headline = load_experiment("cifar10-resnet20-headline")
    peers = load_experiment("cifar10-resnet20-peers")
    two_way = load_experiment("cifar10-resnet20-two-way")
    assert headline.seed_list == [0, 1, 2]
    assert set(headline.arm_list) == set(peers.arm_list) | set(two_way.arm_list)
    assert len(headline.arm_list) == 12
    # Everything but the arms and the seeds is the peers run's, so its records are comparable.
    assert headline.replace(arms=peers.arms, seeds="") == peers
    assert two_way.replace(arms=peers.arms) == peers
