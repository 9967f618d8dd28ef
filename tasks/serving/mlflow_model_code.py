"""MLflow runs this file to build the registered model (models from code: nothing is unpickled);
see :mod:`tasks.serving.mlflow_model`."""

import mlflow.models

from tasks.serving.mlflow_model import CutoutModel

mlflow.models.set_model(CutoutModel())
