"""The networks, free of Flower: CSG layers and the converter, FedPara, the model registry,
parameter counts and the training loop."""
