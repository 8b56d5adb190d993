"""The serving engine: one model thread owns the base model and serves every adapter from it.

``engine`` is the side request handlers see (``InferenceEngine``: tokenize, submit, await); ``scheduler`` the
model thread's loop (admission, continuous batching, cold adapter loads); ``messages`` what passes between
them; ``batch`` the running batch and sampling; ``adapter_pool`` the adapters resident in the model and in
host memory; ``model_host`` the Bone-wrapped base model; ``detokenize`` streamed text.
"""

from app.engine.engine import InferenceEngine
from app.engine.messages import BASE_MODEL, GenerationRequest, GenerationResult, Target

__all__ = ["BASE_MODEL", "GenerationRequest", "GenerationResult", "InferenceEngine", "Target"]
