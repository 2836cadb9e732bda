"""The registered model's code: MLflow runs this file to build the pyfunc (models-from-code), so
loading a model unpickles nothing. The class itself is calibflow.tracking.served_model.CalibratedImageClassifier;
its weights, network shape, classes and calibrator are the model's artifacts (a state dict and
JSON files)."""

from calibflow.tracking.served_model import declare_served_model

declare_served_model()
