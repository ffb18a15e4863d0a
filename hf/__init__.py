"""Hugging Face conversion: config mapping (`hf.config`), parameter names and layouts (`hf.weights`), safetensors
reading and writing (`hf.safetensors_io`), and the two directions end to end (`hf.convert`), which
scripts/convert_hf.py runs."""
