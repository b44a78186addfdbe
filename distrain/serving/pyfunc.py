"""The registered ensemble as an MLflow pyfunc model: `mlflow.pyfunc.load_model(uri).predict(images)`
returns class probabilities, and `predict(images, params={"output": "labels"})` the decided class indices
(argmax, or p(positive) >= the OOF-tuned threshold of a binary task; multilabel: 0/1 rows, each label at
its OOF-tuned threshold), through
`distrain.serving.predictor.EnsemblePredictor`."""

from __future__ import annotations

import contextlib
import warnings

from distrain.serving.predictor import EnsemblePredictor


@contextlib.contextmanager
def _without_type_hint_notice():
    """MLflow suggests type hints on `predict` for signature inference, when mlflow.pyfunc is imported and
    when a PythonModel is defined; images of any shape go in, so there is no signature to infer and the
    notice would reach every user. MLflow forces its own "once" filter around the check, so the notice is
    dropped where it is shown."""
    shown = warnings.showwarning

    def drop_notice(message, category, filename, lineno, file=None, line=None):
        if "Add type hints to the `predict` method" not in str(message):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = drop_notice
    try:
        yield
    finally:
        warnings.showwarning = shown


with _without_type_hint_notice():
    import mlflow.pyfunc

    class DistrainPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc: `predict(images)` returns class probabilities [N, num_classes]; with
        `params={"output": "labels"}` the decided class indices [N] (multilabel: 0/1 rows [N, L])."""

        def load_context(self, context):
            self.predictor = EnsemblePredictor(context.artifacts["ensemble"])

        @staticmethod
        def signature():
            """No input schema (images of any size and shape go in); one parameter, `output`."""
            from mlflow.models import ModelSignature
            from mlflow.types import ParamSchema, ParamSpec

            return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("output", "string", "probabilities")]))

        def predict(self, context, model_input, params=None):
            probs = self.predictor.predict_proba(model_input)
            output = (params or {}).get("output", "probabilities")
            if output not in ("probabilities", "labels"):
                raise ValueError(f"params.output: {output!r} (expected 'probabilities' or 'labels')")
            return self.predictor.decide(probs) if output == "labels" else probs

    class DensePyfunc(DistrainPyfunc):
        """A dense study's served model: `predict(images)` returns one prediction per image, made by the predictor
        class `predictor_path` ("module:Class") names, through its method `output`."""

        predictor_path = ""
        output = ""

        def load_context(self, context):
            import importlib

            module, name = self.predictor_path.split(":")
            self.predictor = getattr(importlib.import_module(module), name)(context.artifacts["ensemble"])

        @staticmethod
        def signature():
            """None: images of any size go in, and there is no parameter."""
            return None

        def predict(self, context, model_input, params=None):
            return getattr(self.predictor, self.output)(model_input)

    class DetectionPyfunc(DensePyfunc):
        """A text-detection study's: each image's words, a list of {"points": [[x, y] x 4], "score"} in its pixels
        (the voting fold models of `serving.detection`)."""

        predictor_path, output = "distrain.serving.detection:DetectionPredictor", "predict_words"

    class MaskPyfunc(DensePyfunc):
        """A segmentation study's: each image's class-id mask (uint8 [H, W], its size; `serving.masks`)."""

        predictor_path, output = "distrain.serving.masks:MaskPredictor", "predict_masks"


def load_registered_predictor(model_uri: str, tracking_uri: str) -> EnsemblePredictor:
    """The ensemble behind a registered model (e.g. `models:/distrain-digits/3`), downloaded by MLflow (a
    text-detection study's: its `DetectionPredictor`)."""
    mlflow.set_tracking_uri(tracking_uri)
    with _without_type_hint_notice():
        model = mlflow.pyfunc.load_model(model_uri)
    return model.unwrap_python_model().predictor
