"""See simulations/__init__.py."""
