"""Distributed strategies (subclasses of Lightning's ``DDPStrategy``), registered by name at import."""

__all__: list[str] = []
