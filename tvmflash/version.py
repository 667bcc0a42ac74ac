"""The package version, in a module of its own: the builder records it in every manifest."""

__version__ = "0.1.0"
