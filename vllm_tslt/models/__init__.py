"""Built-in draft/target model pairs, trained locally from the Python standard library's sources.

No model hub is needed: `ensure_pair("tiny")` builds (or loads from cache) a byte-level BPE tokenizer
and two Llama-architecture Hugging Face checkpoints that share it.
"""
