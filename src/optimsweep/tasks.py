"""The built-in tasks by the import strings sweep files may name them with
(`data: {factory: "optimsweep.tasks:fashion_mnist"}`); they live in core/tasks.py."""

from optimsweep.core.tasks import fashion_mnist, regression

__all__ = ["fashion_mnist", "regression"]
