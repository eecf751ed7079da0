"""The built-in models by the import strings sweep files may name them with
(`model: {factory: "optimsweep.models:NeuralNetwork"}`); they live in core/models.py."""

from optimsweep.core.models import LinearRegressionModel, NeuralNetwork, SmallCNN

__all__ = ["LinearRegressionModel", "NeuralNetwork", "SmallCNN"]
