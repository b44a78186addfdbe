"""The registered ensemble as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(images)`
returns class probabilities, through `distrain.ensembles.serving.EnsemblePredictor`."""

from __future__ import annotations

import warnings

import mlflow.pyfunc

from distrain.ensembles.serving import EnsemblePredictor

# MLflow suggests type hints on `predict` for signature inference; images of any shape go in, so there is
# no useful signature to infer, and the suggestion would reach every user at every registration.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class DistrainPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: `predict(images)` returns class probabilities [N, num_classes]."""

    def load_context(self, context):
        self.predictor = EnsemblePredictor(context.artifacts["ensemble"])

    def predict(self, context, model_input, params=None):
        return self.predictor.predict_proba(model_input)
