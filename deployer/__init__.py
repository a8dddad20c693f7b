"""Pull-based deployer for EC2 Auto Scaling fleets: the instance agent and the shared protocol."""

__version__ = "0.1.0"
