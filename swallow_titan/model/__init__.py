"""The Llama-3.1 model as swallow-titan trains it (torchtitan's llama3 Transformer)."""
