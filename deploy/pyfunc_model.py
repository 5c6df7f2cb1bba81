"""The pyfunc model of every logged platform model, "from code" (deploy/registry.py PYFUNC_CODE): MLflow
copies this file into the model when it is logged and runs it when `mlflow.pyfunc.load_model` loads the
model, so that nothing of it is unpickled. The model object itself is deploy.registry.PlatformPyfunc."""

import mlflow

from deploy.registry import PlatformPyfunc

mlflow.models.set_model(PlatformPyfunc())
