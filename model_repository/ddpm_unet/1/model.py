from serving.triton_backend import SingleShotModel as TritonPythonModel  # noqa: F401
