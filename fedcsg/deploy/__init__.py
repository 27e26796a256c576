"""Running fedcsg on real machines: TLS certificates and SuperNode keys (:mod:`~fedcsg.deploy.credentials`),
the ``flwr`` CLI and the SuperLink / SuperNode command lines (:mod:`~fedcsg.deploy.flwr_cli`), process
supervision (:mod:`~fedcsg.processes`), a SuperNode restarted whenever it exits
(:mod:`~fedcsg.deploy.supervisor`), a federation on this machine and runs on it
(:mod:`~fedcsg.deploy.federation`), and model files for devices (:mod:`~fedcsg.deploy.export`)."""
