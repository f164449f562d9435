"""The file MLflow runs to load a served model version (MLflow's "models from code": no pickle in
the artifacts). It is copied into each model; the class it names comes from the installed package."""

from mlflow.models import set_model

from tasks.serving import CNSModel

set_model(CNSModel())
