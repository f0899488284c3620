"""The code a Hugging Face folder of an `lm` model carries (`lm export --format hf` copies these files into it,
for `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`). They import only torch and
transformers, never `lm`: the folder must load where `lm` is not installed. `lm` itself never imports them;
tests/test_export_hf.py holds them to `lm`'s logits and greedy tokens."""
