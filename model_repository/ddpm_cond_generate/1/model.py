from serving.triton_backend import GenerateLoopModel as TritonPythonModel  # noqa: F401
