"""Taking a trained GPT elsewhere: a safetensors folder (safetensors.py), a Hugging Face `transformers`
folder (hf.py) and an ONNX graph (onnx.py). `lm export` (lm/commands/export.py) drives them.

`transformers`, `onnx` and `onnxruntime` are not dependencies of `lm`: the code that needs them
imports them when it runs (they are in the `test` extra)."""
