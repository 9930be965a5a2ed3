from serving.triton_backend import DenoiseLoopModel as TritonPythonModel  # noqa: F401
