"""MLflow pyfunc wrapper around a generator checkpoint, for the Model Registry.

Why a pyfunc: an engineer who picked the ``best`` alias in the MLflow UI loads it with
``mlflow.pyfunc.load_model("models:/<name>@best")`` and generates pairs without knowing where
the sweep stored its checkpoints. ``predict`` takes rows of ``product``, ``defect`` and
optionally ``seed`` and returns one row per pair with ``image``/``mask`` as nested lists (pyfunc
outputs must be serialisable); ``model.unwrap_python_model().generator`` is the generator itself.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from defectforge.methods.base import load_generator

        self.generator = load_generator(context.artifacts["generator"])

    # No type hints on predict: MLflow 3 reads them as an input schema and warns about ``Any``; the
    # input is a table (DataFrame or dict of columns), converted below.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd

        from defectforge.methods.base import Conditions

        df = pd.DataFrame(model_input)
        seed = int(df["seed"].iloc[0]) if "seed" in df else 0
        cond = Conditions(df["product"].astype(str).tolist(), df["defect"].astype(str).tolist())
        out = self.generator.sample(len(cond), cond, seed=seed)
        return pd.DataFrame({"product": out.product, "defect": out.defect,
                             "image": [im.tolist() for im in out.images],
                             "mask": [m.tolist() for m in out.masks]})
