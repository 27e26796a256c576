"""A run in flight on Flower: the strategy and server optimizers, the ServerApp and ClientApp, the
training task, the byte accounting of real messages, and the simulation engine on Ray."""
